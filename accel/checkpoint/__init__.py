"""Checkpoint formats: streaming readers and writers, one tensor (one chunk) at a time.

- `base`: tensor entries, byte-range streaming, the Reader protocol.
- `safetensors`, `torch_bin`, `mindspore_ckpt`, `npz`: one module per file format, each reader
  checking its headers against the bytes present before trusting them (CheckpointError otherwise).
- `hf`: Hugging Face checkpoint directories (single or sharded with an index), read and written.
- `keymap` + `keymaps/*.yaml`: HF <-> MindFormers names and fused q/k/v layouts, as data.
- `convert`, `compare`: `accel convert` (streamed, hashed, atomic) and `accel verify`.
"""
