"""Model families, installed as `accel.models`: the registry by HF `model_type`, presets, and loading
(`load("qwen2-tiny")` builds seeded random weights; `load(DIR)` reads an HF checkpoint directory).

Parameters keep the original checkpoint's names, so loading needs no key map: the checkpoint's tensors
are checked against the family's parameter spec (every name present, every shape right, nothing
unexpected) and returned as NumPy arrays in their stored dtype.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from accel.errors import CheckpointError, ModelError
from accel.models._layers import Model

# model_type in config.json -> "module:Class"
FAMILIES: dict[str, str] = {
    "chatglm": "accel.models.chatglm:ChatGLM",
    "qwen": "accel.models.qwen:QWen",
    "qwen2": "accel.models.qwen:Qwen2",
    "baichuan": "accel.models.baichuan:Baichuan",
}

# Tensors some exporters add that carry nothing the forward needs (recomputed rotary buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def family(model_type: str) -> type[Model]:
    if model_type not in FAMILIES:
        raise ModelError(f"unknown model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    module, _, attr = FAMILIES[model_type].partition(":")
    return getattr(importlib.import_module(module), attr)


def presets() -> dict[str, type[Model]]:
    out: dict[str, type[Model]] = {}
    for model_type in FAMILIES:
        cls = family(model_type)
        out |= dict.fromkeys(cls.PRESETS, cls)
    return out


def from_preset(name: str, seed: int = 0) -> tuple[Model, dict[str, np.ndarray]]:
    table = presets()
    if name not in table:
        raise ModelError(f"{name!r} is neither a model directory nor a preset; presets: {', '.join(table)}")
    model = table[name].preset(name)
    return model, model.init_params(seed)


def config_from_pretrained(directory: str | Path) -> Model:
    from accel.checkpoint.hf import read_config

    directory = Path(directory)
    cfg = read_config(directory)
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ModelError(f"{directory / 'config.json'} has no model_type")
    try:
        return family(model_type).from_hf_config(cfg, name=directory.name)
    except KeyError as e:
        raise ModelError(f"{directory / 'config.json'} lacks field {e} that {model_type} needs") from None


def from_pretrained(directory: str | Path) -> tuple[Model, dict[str, np.ndarray]]:
    """Config and weights of an HF checkpoint directory, weights checked against the parameter spec."""
    from accel.checkpoint.hf import HFCheckpoint

    model = config_from_pretrained(directory)
    ckpt = HFCheckpoint(directory)
    spec = model.param_spec()
    names = [n for n in ckpt.keys() if not n.endswith(IGNORED_SUFFIXES) or n in spec]
    unexpected = sorted(set(names) - set(spec))
    missing = [n for n in spec if n not in names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: tensor {missing[0]}{more} missing from the checkpoint")
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{directory}: unexpected tensor {unexpected[0]}{more} for {model.model_type}")
    params = {}
    for name, p in spec.items():
        shape = ckpt.shape(name)
        if shape != p.shape:
            raise CheckpointError(f"{directory}: tensor {name} has shape {list(shape)}, "
                                  f"the config implies {list(p.shape)}")
        params[name] = ckpt.get(name)
    return model, params


def load(spec: str, seed: int = 0) -> tuple[Model, dict[str, Any]]:
    """A preset name or an HF checkpoint directory."""
    if Path(spec).exists() or "/" in spec or spec.startswith("."):
        return from_pretrained(spec)
    return from_preset(spec, seed)
