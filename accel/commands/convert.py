"""`accel convert`: a checkpoint from one format and naming to another, streamed, verified and atomic."""

from __future__ import annotations

import argparse

from accel.checkpoint.base import FLOATS


def register(sub: argparse._SubParsersAction) -> None:
    from accel.checkpoint.formats import FORMATS
    from accel.checkpoint.keymap import families, generations

    p = sub.add_parser(
        "convert", help="convert a checkpoint between formats and HF/MindFormers names",
        description="Convert a checkpoint tensor by tensor (memory: a few chunks, not the model). FORMAT is one "
                    f"of {', '.join(FORMATS)}; PATH is a file, or a directory for a (sharded) Hugging Face "
                    "checkpoint. Names follow the output format (MindFormers' for mindspore-*, Hugging Face's "
                    "for safetensors and torch-bin, unchanged for npz) unless --keymap says otherwise. The "
                    "output appears only when complete, with OUTPUT.manifest.json (SHA-256 of every tensor) "
                    "beside it; the source is only read.")
    p.add_argument("--from", dest="source", required=True, metavar="FORMAT:PATH", help="the checkpoint to read")
    p.add_argument("--to", dest="output", required=True, metavar="FORMAT:PATH", help="the checkpoint to write")
    p.add_argument("--model", metavar="FAMILY",
                   help=f"model family for the key map: {', '.join(families())}, or a preset name "
                        "(default: model_type of the config)")
    p.add_argument("--config", metavar="CONFIG.json",
                   help="HF config.json giving the family and the sizes of fused q/k/v blocks (default: the "
                        "config.json in the source directory or beside the source file; without one, sizes "
                        "come from the tensor shapes)")
    p.add_argument("--dtype", choices=FLOATS, help="cast floating-point tensors (round to nearest even)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="largest shard of a directory output, e.g. 2GB "
                                                            "(default 5GB)")
    gens = "; ".join(f"{f}: " + ", ".join(f"{g} (default)" if g == default else g for g in names)
                     for f in families() for names, default in [generations(f)] if len(names) > 1)
    p.add_argument("--keymap", metavar="NAMES",
                   help="names to write: hf (Hugging Face's), mindformers (MindFormers' default generation), "
                        f"mindformers:GENERATION ({gens}) or keep (the source's). Reading MindFormers names, "
                        "the generation is the one that knows most of them")
    p.add_argument("--strategy", metavar="FILE",
                   help="the parallel strategy file of a distributed MindSpore checkpoint (--from mindspore-ckpt:DIR "
                        "with rank_*/ folders; default: the *strategy*.ckpt in DIR or DIR/strategy/)")
    p.add_argument("--allow-unmapped", action="store_true",
                   help="copy tensors the key map does not know unchanged (default: an error)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file and its manifest (never a file the conversion reads)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accel.checkpoint.convert import convert, human

    r = convert(args.source, args.output, model=args.model, config=args.config, dtype=args.dtype,
                max_shard_size=args.max_shard_size, keymap=args.keymap, allow_unmapped=args.allow_unmapped,
                overwrite=args.overwrite, strategy=args.strategy)
    names = (f"names {r.source_names} -> {r.output_names}" if r.source_names != r.output_names
             else f"names {r.output_names}")
    rules = ", ".join(f"{n} {k}" for k, n in sorted(r.rules.items()))
    print(f"{args.source} -> {args.output}: {r.tensors} tensors, {human(r.nbytes)} in {r.seconds:.1f} s "
          f"({human(r.nbytes / max(r.seconds, 1e-9))}/s); {r.family or 'no family'}, {names} ({rules}); "
          f"manifest {r.manifest}")
    return 0
