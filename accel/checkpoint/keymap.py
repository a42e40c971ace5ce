"""Key maps: how one model family's tensors are named on the Hugging Face side ("hf") and on the
MindFormers side ("mindformers"), as data (keymaps/<model_type>.yaml), and the plan that turns one
checkpoint's tensors into the other side's.

A map has `names` (HF pattern: MindFormers pattern), `keep` (the same name on both sides) and `split`
(one fused HF tensor whose consecutive row blocks are several MindFormers tensors: c_attn, W_pack,
query_key_value -> wq, wk, wv). Block sizes are named by rules, `q` (attention heads x head dim) and
`kv` (key/value heads x head dim), resolved from config.json by the map's `sizes.config` fields, or,
without a config, from the tensors' own shapes: `sizes.q_from` names the tensor whose input width is q
(the attention output projection), and kv follows from the fused tensor's rows.

Every output tensor is planned as a list of byte ranges of source tensors: a split block is a range of
rows, which in C order is a contiguous byte range, and a fused tensor is its blocks one after the other,
so neither needs the tensor in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from accel.checkpoint.base import CHUNK, DTYPES, FLOATS, Chunk, Reader, TensorInfo
from accel.errors import CheckpointError, ModelError

SIDES = ("hf", "mindformers")
KEYMAPS = Path(__file__).parent / "keymaps"
# Names a user may give --model for a family, besides its model_type and the presets of accel.models.
ALIASES = {"qwen1": "qwen", "qwen-v1": "qwen", "baichuan2": "baichuan", "chatglm2": "chatglm",
           "chatglm3": "chatglm"}


class Pattern:
    """A tensor name with placeholders: {i} a layer number, any other {name} one name component."""

    def __init__(self, text: str):
        self.text = text
        parts = re.split(r"\{(\w+)\}", text)
        regex = ""
        for k, part in enumerate(parts):
            if k % 2 == 0:
                regex += re.escape(part)
            else:
                regex += rf"(?P<{part}>\d+)" if part == "i" else rf"(?P<{part}>[^.]+)"
        self.fields = set(parts[1::2])
        self.regex = re.compile(regex + r"\Z")

    def match(self, name: str) -> dict[str, str] | None:
        m = self.regex.match(name)
        return m.groupdict() if m else None

    def format(self, groups: Mapping[str, str]) -> str:
        return self.text.format(**groups)


@dataclass(frozen=True)
class Split:
    fused: Pattern  # the HF tensor
    parts: tuple[Pattern, ...]  # its row blocks, in order, on the MindFormers side
    rows: tuple[str, ...]  # size rule of each block: "q" or "kv"


@dataclass(frozen=True)
class Planned:
    """One output tensor: `pieces` (source name, byte begin, byte end) concatenated, in source dtype."""

    name: str
    info: TensorInfo
    pieces: tuple[tuple[str, int, int], ...]
    rule: str  # what made it: "same", "rename", "split", "fuse", "unmapped"


def families() -> list[str]:
    return sorted(p.stem for p in KEYMAPS.glob("*.yaml"))


def resolve_family(name: str) -> str:
    """A model_type from what a user gives --model: a model_type, an alias, or a preset name."""
    if name in families():
        return name
    if name in ALIASES:
        return ALIASES[name]
    from accel.models import presets

    table = presets()
    if name in table:
        return table[name].model_type
    raise ModelError(f"--model {name!r} names no model family; use one of {', '.join(families())} "
                     f"(or a preset: {', '.join(table)})")


class KeyMap:
    def __init__(self, model_type: str):
        path = KEYMAPS / f"{model_type}.yaml"
        if not path.is_file():
            raise ModelError(f"no key map for model_type {model_type!r}; known: {', '.join(families())}")
        data = yaml.safe_load(path.read_text())
        self.model_type = model_type
        self.names = [(Pattern(k), Pattern(v)) for k, v in (data.get("names") or {}).items()]
        self.names += [(Pattern(k), Pattern(k)) for k in data.get("keep") or []]
        self.splits = [Split(Pattern(k), tuple(Pattern(p) for p in v["parts"]), tuple(v["rows"]))
                       for k, v in (data.get("split") or {}).items()]
        sizes = data.get("sizes") or {}
        self.size_config: dict[str, str] = sizes.get("config") or {}
        self.q_from = Pattern(sizes["q_from"]) if sizes.get("q_from") else None

    # --- which rule a name falls under --------------------------------------------------------------

    def _rules(self, name: str, side: str) -> list[tuple[str, Any, int, dict[str, str]]]:
        """(kind, rule, part index, placeholder values) of every rule `name` matches on `side`."""
        found: list[tuple[str, Any, int, dict[str, str]]] = []
        hf = side == "hf"
        for src, dst in self.names:
            if (g := (src if hf else dst).match(name)) is not None:
                found.append(("rename", (src, dst) if hf else (dst, src), 0, g))
        for s in self.splits:
            if hf and (g := s.fused.match(name)) is not None:
                found.append(("split", s, 0, g))
            for k, part in enumerate(s.parts):
                if not hf and (g := part.match(name)) is not None:
                    found.append(("fuse", s, k, g))
        if len(found) > 1:
            raise CheckpointError(f"key map {self.model_type}: {name!r} matches several rules; the map is ambiguous")
        return found

    def known(self, name: str, side: str) -> bool:
        return bool(self._rules(name, side))

    def side_of(self, keys: Sequence[str], default: str) -> str:
        """The naming a checkpoint uses: the side that knows more of its names (`default` on a tie)."""
        score = {side: sum(self.known(k, side) for k in keys) for side in SIDES}
        other = SIDES[1 - SIDES.index(default)]
        return other if score[other] > score[default] else default

    # --- sizes of split blocks ----------------------------------------------------------------------

    def _block_sizes(self, s: Split, groups: dict[str, str], rows: int, reader: Reader,
                     config: Mapping[str, Any] | None, fused_name: str) -> list[int]:
        sizes = self.sizes_from_config(config) if config else None
        if sizes is None:
            if self.q_from is None:
                raise CheckpointError(f"cannot size the blocks of {fused_name}: give --config CONFIG.json")
            q_name = self.q_from.format(groups)
            if q_name not in reader.keys() or len(reader.shape(q_name)) != 2:
                raise CheckpointError(f"cannot size the blocks of {fused_name} without {q_name}: "
                                      "give --config CONFIG.json")
            q = reader.shape(q_name)[1]
            n_q, n_kv = s.rows.count("q"), s.rows.count("kv")
            kv, rest = divmod(rows - n_q * q, n_kv) if n_kv else (0, rows - n_q * q)
            if rest or (n_kv and kv <= 0):
                raise CheckpointError(f"{fused_name} has {rows} rows, which is not {'+'.join(s.rows)} with q={q} "
                                      f"(the input width of {q_name}); give --config CONFIG.json")
            sizes = {"q": q, "kv": kv}
        blocks = [sizes[r] for r in s.rows]
        if sum(blocks) != rows:
            raise CheckpointError(f"{fused_name} has {rows} rows but the config gives "
                                  f"{'+'.join(f'{r}={sizes[r]}' for r in s.rows)} = {sum(blocks)}")
        return blocks

    def sizes_from_config(self, config: Mapping[str, Any]) -> dict[str, int] | None:
        c = self.size_config
        if not c:
            return None
        try:
            heads = int(config[c["heads"]])
            kv_heads = heads
            if c.get("kv_heads") and config.get(c["kv_heads"]) is not None and \
                    (not c.get("kv_heads_if") or config.get(c["kv_heads_if"])):
                kv_heads = int(config[c["kv_heads"]])
            head_dim = int(config[c["head_dim"]]) if c.get("head_dim") and c["head_dim"] in config \
                else int(config["hidden_size"]) // heads
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise ModelError(f"the config lacks a usable {e} for the {self.model_type} block sizes") from None
        return {"q": heads * head_dim, "kv": kv_heads * head_dim}

    # --- the plan -----------------------------------------------------------------------------------

    def plan(self, reader: Reader, src: str, dst: str, config: Mapping[str, Any] | None = None,
             allow_unmapped: bool = False) -> list[Planned]:
        """Output tensors named for side `dst` from `reader`'s tensors named for side `src`."""
        out: list[Planned | tuple[str, Split, dict[str, str]]] = []
        fusing: dict[str, dict[int, str]] = {}  # fused name -> part index -> source name
        for name in reader.keys():
            info = reader.info(name)
            rules = self._rules(name, src)
            whole = ((name, 0, info.nbytes),)
            if not rules:
                if not allow_unmapped:
                    raise CheckpointError(f"tensor {name!r} is not in the {self.model_type} key map "
                                          f"({src} names); pass --allow-unmapped to copy it unchanged")
                out.append(Planned(name, info, whole, "unmapped"))
                continue
            kind, rule, k, groups = rules[0]
            if src == dst:
                out.append(Planned(name, info, whole, "same"))
            elif kind == "rename":
                out.append(Planned(rule[1].format(groups), info, whole, "rename"))
            elif kind == "split":
                out += self._split(reader, name, info, rule, groups, config)
            else:
                fused = rule.fused.format(groups)
                if fused not in fusing:
                    fusing[fused] = {}
                    out.append((fused, rule, groups))
                fusing[fused][k] = name
        planned = [p if isinstance(p, Planned) else self._fuse(reader, *p, fusing[p[0]], config) for p in out]
        seen: dict[str, str] = {}
        for p in planned:
            if p.name in seen:
                raise CheckpointError(f"tensors {seen[p.name]!r} and {p.pieces[0][0]!r} both become {p.name!r}")
            seen[p.name] = p.pieces[0][0]
        return planned

    def _split(self, reader: Reader, name: str, info: TensorInfo, s: Split, groups: dict[str, str],
               config: Mapping[str, Any] | None) -> list[Planned]:
        if not info.shape:
            raise CheckpointError(f"{name} is a scalar; it cannot be split into {len(s.parts)} blocks")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        out, begin = [], 0
        for part, rows in zip(s.parts, self._block_sizes(s, groups, info.shape[0], reader, config, name)):
            end = begin + rows * row_bytes
            out.append(Planned(part.format(groups), TensorInfo(info.dtype, (rows, *info.shape[1:])),
                               ((name, begin, end),), "split"))
            begin = end
        return out

    def _fuse(self, reader: Reader, fused: str, s: Split, groups: dict[str, str], parts: dict[int, str],
              config: Mapping[str, Any] | None) -> Planned:
        names = []
        for k, pattern in enumerate(s.parts):
            if k not in parts:
                raise CheckpointError(f"cannot rebuild {fused}: {pattern.format(groups)} is missing")
            names.append(parts[k])
        infos = [reader.info(n) for n in names]
        first = infos[0]
        for n, info in zip(names, infos):
            if not info.shape or info.dtype != first.dtype or info.shape[1:] != first.shape[1:]:
                raise CheckpointError(f"cannot rebuild {fused}: {names[0]} {list(first.shape)} {first.dtype.name} "
                                      f"and {n} {list(info.shape)} {info.dtype.name} do not stack")
        rows = [i.shape[0] for i in infos]
        if config and (sizes := self.sizes_from_config(config)) is not None:
            expected = [sizes[r] for r in s.rows]
            if rows != expected:
                raise CheckpointError(f"cannot rebuild {fused}: its blocks have {rows} rows, "
                                      f"the config says {expected}")
        info = TensorInfo(first.dtype, (sum(rows), *first.shape[1:]))
        return Planned(fused, info, tuple((n, 0, i.nbytes) for n, i in zip(names, infos)), "fuse")


class MappedView:
    """A reader's tensors under planned names, optionally with floats cast to one dtype; reads stream."""

    def __init__(self, reader: Reader, planned: Sequence[Planned], dtype: str | None = None):
        self.reader, self.path = reader, reader.path
        self.planned = {p.name: p for p in planned}
        self.cast = DTYPES[dtype] if dtype else None

    def _target(self, p: Planned) -> np.dtype:
        return self.cast if self.cast is not None and p.info.dtype.name in FLOATS else p.info.dtype

    def keys(self) -> list[str]:
        return list(self.planned)

    def info(self, name: str) -> TensorInfo:
        p = self.planned[name]
        return TensorInfo(self._target(p), p.info.shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.planned[name].info.shape

    def source(self, name: str) -> Planned:
        return self.planned[name]

    def chunks(self, name: str, begin: int = 0, end: int | None = None, size: int = CHUNK) -> Iterator[Chunk]:
        p = self.planned[name]
        src, dst = p.info.dtype, self._target(p)
        scale = src.itemsize / dst.itemsize  # source bytes per output byte
        end = self.info(name).nbytes if end is None else end
        raw = self._raw(p, int(begin * scale), int(end * scale), size)
        if dst == src:
            yield from raw
            return
        carry = b""
        for chunk in raw:  # cast whole elements; a chunk may end inside one
            if carry:
                chunk, carry = carry + bytes(chunk), b""
            cut = len(chunk) - len(chunk) % src.itemsize
            if cut != len(chunk):
                chunk, carry = chunk[:cut], bytes(chunk[cut:])
            with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN cast as they are
                yield np.frombuffer(chunk, src).astype(dst).view(np.uint8).data
        if carry:
            raise CheckpointError(f"{self.path}: tensor {name!r} ended inside an element")

    def _raw(self, p: Planned, lo: int, hi: int, size: int) -> Iterator[Chunk]:
        pos = 0  # offset of the current piece within the output tensor
        for src, b, e in p.pieces:
            a, z = max(lo, pos), min(hi, pos + e - b)
            if a < z:
                yield from self.reader.chunks(src, b + a - pos, b + z - pos, size)
            pos += e - b

    def get(self, name: str) -> np.ndarray:
        info = self.info(name)
        out = np.empty(info.nbytes, np.uint8)
        pos = 0
        for chunk in self.chunks(name):
            out[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
            pos += len(chunk)
        return out.view(info.dtype).reshape(info.shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.planned:
            yield name, self.get(name)
