"""LoRA (Hu et al. 2021) applied after construction, over the op set: the model files do not change.

An adapted weight W (out, in) gets two trainable matrices, A (rank, in) and B (out, rank), and the
forward sees the effective weight W + (alpha / rank) * B @ A, computed with ops.matmul/mul/add inside
the loss function before `model.forward`. A starts seeded-random (PEFT's default: uniform in
+-1/sqrt(in), Kaiming-uniform with a = sqrt(5)), B at zero, so training starts from the base model.

Adapter names follow PEFT: `{module}.lora_A.weight` / `{module}.lora_B.weight` where the adapted
parameter is `{module}.weight`; `save_adapters` writes PEFT's `adapter_model.safetensors` layout
(`base_model.model.` prefix) with an `adapter_config.json`.

Targets are module names, matched against each 2-D `.weight` parameter: a plain name matches the last
components of the module path (`q_proj` matches `model.layers.0.self_attn.q_proj`), a name with a glob
character (`*?[`) is matched against the whole module path (`*.layers.1.*`).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accel.errors import UsageError
from accel.inputs import read_json_object

# The attention input projections of each family, as PEFT adapts them by default: Qwen2/Baichuan2-style
# q/v projections, ChatGLM's fused query_key_value, Baichuan2's W_pack, Qwen v1's c_attn.
DEFAULT_TARGETS = ("q_proj", "v_proj", "query_key_value", "W_pack", "c_attn")
PEFT_PREFIX = "base_model.model."


MAX_RANK = 1 << 16  # past any layer's width


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= MAX_RANK:
            raise UsageError(f"LoRA rank must be from 1 to {MAX_RANK}, not {self.rank}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise UsageError(f"LoRA alpha must be a finite number, not {self.alpha}")
        if not self.targets:
            raise UsageError("LoRA needs at least one target module name")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _matches(module: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(module, pattern)
    return module == pattern or module.endswith("." + pattern)


def target_weights(shapes: Mapping[str, Sequence[int]], config: LoraConfig) -> list[str]:
    """Names of the 2-D `.weight` parameters the config adapts, in parameter order. A target that
    matches nothing is an error (a typo would otherwise train nothing)."""
    modules = {name[: -len(".weight")]: name for name, shape in shapes.items()
               if name.endswith(".weight") and len(shape) == 2}
    chosen = [name for module, name in modules.items() if any(_matches(module, p) for p in config.targets)]
    if not chosen:
        raise UsageError(f"LoRA targets {', '.join(config.targets)} match no 2-D weight of this model; "
                         f"its modules include {', '.join(list(modules)[:6])}")
    return chosen


def adapter_names(weight: str) -> tuple[str, str]:
    module = weight[: -len(".weight")]
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def init_adapters(params: Mapping[str, np.ndarray], config: LoraConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 adapters for every target weight: A uniform in +-1/sqrt(in), B zeros."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for weight in target_weights({k: np.shape(v) for k, v in params.items()}, config):
        n_out, n_in = np.shape(params[weight])
        a, b = adapter_names(weight)
        bound = 1.0 / np.sqrt(n_in)
        out[a] = rng.uniform(-bound, bound, (config.rank, n_in)).astype(np.float32)
        out[b] = np.zeros((n_out, config.rank), np.float32)
    return out


def apply(ops: Any, params: Mapping[str, Any], adapters: Mapping[str, Any], config: LoraConfig) -> dict[str, Any]:
    """params with each adapted weight replaced by W + (alpha / rank) * B @ A."""
    out = dict(params)
    for name in adapters:
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[: -len(".lora_A.weight")]
        delta = ops.matmul(adapters[f"{module}.lora_B.weight"], adapters[name])  # (out, in)
        out[f"{module}.weight"] = ops.add(params[f"{module}.weight"], ops.mul(delta, config.scale))
    return out


def save_adapters(directory: str | Path, adapters: Mapping[str, np.ndarray], config: LoraConfig,
                  base_model: str) -> None:
    """PEFT's layout: adapter_model.safetensors (+ adapter_config.json) in `directory`."""
    from accel.checkpoint import safetensors

    directory = Path(directory)
    tensors = {PEFT_PREFIX + k: np.ascontiguousarray(v) for k, v in adapters.items()}
    safetensors.write(directory / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    modules = sorted(k[: -len(".lora_A.weight")] for k in adapters if k.endswith(".lora_A.weight"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": base_model,
    }, indent=2) + "\n")


def load_adapters(directory: str | Path) -> tuple[dict[str, np.ndarray], LoraConfig]:
    """Adapters and config written by `save_adapters` (or PEFT), names without the PEFT prefix."""
    from accel.checkpoint.safetensors import SafetensorsFile

    directory = Path(directory)
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise UsageError(f"{directory} has no adapter_config.json; is it a LoRA adapter directory?")
    cfg = read_json_object(path, UsageError, "a LoRA adapter config")
    rank, alpha, modules = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("target_modules")
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise UsageError(f"{path}: r is {str(rank)[:40]!r}; it must be an integer")
    if isinstance(modules, str):  # PEFT also takes one regular expression; accel matches names, not patterns
        raise UsageError(f"{path}: target_modules is the regular expression {modules[:40]!r}; accel takes a list "
                         "of module names")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise UsageError(f"{path}: target_modules is {str(modules)[:40]!r}; it must be a list of module names")
    try:
        config = LoraConfig(rank, alpha, tuple(modules))  # type: ignore[arg-type]
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    tensors = SafetensorsFile(directory / "adapter_model.safetensors")
    adapters = {k.removeprefix(PEFT_PREFIX): np.array(v) for k, v in tensors.items()}
    return adapters, config
