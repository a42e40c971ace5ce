"""Model families, installed as `accel.models`: the registry by HF `model_type`, presets, and loading
(`load("qwen2-tiny")` builds seeded random weights; `load(DIR)` reads an HF checkpoint directory).

Parameters keep the original checkpoint's names, so loading needs no key map: the checkpoint's tensors
are checked against the family's parameter spec (every name present, every shape right, nothing
unexpected) and returned as NumPy arrays in their stored dtype.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
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


# The families' config.json fields that size or shape the model, each checked before anything is built
# from it: integers in a range (a float, a string, 0, or a size no machine holds is a mistake, and
# one of 1e9 layers would hang building the parameter spec), finite positive floats, booleans.
_INT_FIELDS: dict[str, int] = {
    **dict.fromkeys(("num_hidden_layers", "num_layers"), 1024),
    **dict.fromkeys(("num_attention_heads", "num_key_value_heads", "multi_query_group_num"), 4096),
    **dict.fromkeys(("hidden_size", "kv_channels", "head_dim"), 1 << 17),
    **dict.fromkeys(("intermediate_size", "ffn_hidden_size"), 1 << 20),
    **dict.fromkeys(("vocab_size", "padded_vocab_size"), 1 << 24),
    **dict.fromkeys(("seq_length", "max_position_embeddings", "model_max_length"), 1 << 31),
}
_FLOAT_FIELDS = ("rms_norm_eps", "layer_norm_epsilon", "layernorm_epsilon", "rope_theta", "rotary_emb_base",
                 "rope_ratio", "rotary_pct")
_BOOL_FIELDS = ("tie_word_embeddings", "use_dynamic_ntk", "use_logn_attn", "rmsnorm", "post_layer_norm", "no_bias",
                "add_qkv_bias", "apply_residual_connection_post_layernorm", "use_sliding_window")


def check_config(cfg: dict[str, Any], path: Path) -> None:
    """One-line ModelError naming the field of config.json whose type or value no family accepts."""
    for key, top in _INT_FIELDS.items():
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top):
            raise ModelError(f"{path}: {key} is {str(v)[:40]!r}; it must be an integer from 1 to {top}")
    for key in _FLOAT_FIELDS:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < float("inf")):
            raise ModelError(f"{path}: {key} is {str(v)[:40]!r}; it must be a finite positive number")
    for key in _BOOL_FIELDS:
        v = cfg.get(key)
        if v is not None and not isinstance(v, bool):
            raise ModelError(f"{path}: {key} is {str(v)[:40]!r}; it must be true or false")
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ModelError(f"{path}: {key} is {str(cfg[key])[:40]!r}; it must be an object or null")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads") or cfg.get("multi_query_group_num")
    if heads and kv and heads % kv:
        raise ModelError(f"{path}: num_attention_heads {heads} is not a multiple of the {kv} key/value heads")
    hidden = cfg.get("hidden_size")
    if heads and hidden and not cfg.get("head_dim") and not cfg.get("kv_channels") and hidden % heads:
        raise ModelError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")


def config_from_pretrained(directory: str | Path) -> Model:
    from accel.checkpoint.hf import read_config

    directory = Path(directory)
    return model_from_config(read_config(directory), directory / "config.json", directory.name)


def model_from_config(cfg: dict[str, Any], path: Path, name: str) -> Model:
    """The model a config.json (read from `path`) describes, named `name`."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ModelError(f"{path} has no model_type")
    if not isinstance(model_type, str):
        raise ModelError(f"{path}: model_type is {str(model_type)[:40]!r}; it must be a string")
    cls = family(model_type)
    check_config(cfg, path)
    try:
        model = cls.from_hf_config(cfg, name=name)
    except KeyError as e:
        raise ModelError(f"{path} lacks field {e} that {model_type} needs") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError, OverflowError) as e:  # what check_config misses
        raise ModelError(f"{path} is not a valid {model_type} config: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    _check_built(model, path)
    return model


def _check_built(model: Model, path: Path) -> None:
    """The family's hyperparameters as built, by their declared types: a null or mistyped field that
    the family read without a default (`"num_layers": null`) is caught here, named, not later."""
    for f in dataclasses.fields(model):  # type: ignore[arg-type]
        v = getattr(model, f.name)
        ok, wanted = _BUILT.get(str(f.type), (None, ""))
        if ok is not None and not ok(v):
            raise ModelError(f"{path}: {model.model_type}'s {f.name} comes out as {str(v)[:40]!r} from this "
                             f"config; it must be {wanted}")


_BUILT = {  # declared type -> (what a value must satisfy, said in words)
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer of 1 or more"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


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
