"""Key maps: how one model family's tensors are named on the Hugging Face side ("hf") and on the
MindFormers side ("mindformers"), as data (keymaps/<model_type>.yaml), and the plan that turns one
checkpoint's tensors into the other side's.

A map has `names` (HF pattern: MindFormers pattern), `keep` (the same name on both sides) and `split`
(one fused HF tensor whose consecutive row blocks are several MindFormers tensors: c_attn, W_pack,
query_key_value -> wq, wk, wv). Block sizes are named by rules, `q` (attention heads x head dim) and
`kv` (key/value heads x head dim), resolved from config.json by the map's `sizes.config` fields, or,
without a config, from the tensors' own shapes: `sizes.q_from` names the tensor whose input width is q
(the attention output projection), and kv follows from the fused tensor's rows.

A map may also have `fuse` (several HF tensors whose row blocks make one MindFormers tensor: Megatron's
linear_qkv from q_proj, k_proj, v_proj), and a split or fuse may interleave its parts in `groups`: the
fused rows are then `groups` repetitions of one block of each part (`kv_heads`: Megatron's per-query-group
[q_g, k_g, v_g]; `row`: one row of each part, Megatron's [gate_0, up_0, gate_1, ...]).

MindFormers has renamed its tensors over releases, so a map may hold several `generations`, each with
its own names, keep, split, fuse and sizes (top-level `sizes` is shared); `default` is the one written
by `--keymap mindformers`. On the way back the generation is the one that knows most of the checkpoint's
names.

Every output tensor is planned as a list of byte ranges of source tensors: a split block is a range of
rows, which in C order is a contiguous byte range, and a fused tensor is its blocks one after the other,
so neither needs the tensor in memory. Interleaved groups make that one range per group and part.
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
SMALL_PIECE = 256 << 10  # pieces averaging less than this (interleaved rows) are read in batches
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
    fused: Pattern  # the fused tensor, on side `fused_side`
    parts: tuple[Pattern, ...]  # its row blocks, in order, on the other side
    rows: tuple[str, ...]  # size rule of each block: "q", "kv" or "ffn"
    fused_side: str = "hf"
    groups: str | None = None  # None: blocks one after the other; "kv_heads" or "row": interleaved


@dataclass(frozen=True)
class Generation:
    """One MindFormers naming scheme of a family: its rules and how its block sizes are found."""

    name: str
    names: tuple[tuple[Pattern, Pattern], ...]
    splits: tuple[Split, ...]
    size_config: Mapping[str, str]
    q_from: Pattern | None  # a tensor on the fused tensor's side whose input width is q


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


def _load(model_type: str) -> dict[str, Any]:
    path = KEYMAPS / f"{model_type}.yaml"
    if not path.is_file():
        raise ModelError(f"no key map for model_type {model_type!r}; known: {', '.join(families())}")
    return yaml.safe_load(path.read_text())


def _generation(name: str, data: Mapping[str, Any], shared_sizes: Mapping[str, Any]) -> Generation:
    names = [(Pattern(k), Pattern(v)) for k, v in (data.get("names") or {}).items()]
    names += [(Pattern(k), Pattern(k)) for k in data.get("keep") or []]
    splits = [Split(Pattern(k), tuple(Pattern(p) for p in v["parts"]), tuple(v["rows"]), side, v.get("groups"))
              for section, side in (("split", "hf"), ("fuse", "mindformers"))
              for k, v in (data.get(section) or {}).items()]
    for s in splits:
        if s.groups not in (None, "kv_heads", "row"):
            raise ModelError(f"key map generation {name}: {s.fused.text} has groups {s.groups!r}; "
                             "use kv_heads or row")
    sizes = {**shared_sizes, **(data.get("sizes") or {})}
    return Generation(name, tuple(names), tuple(splits), sizes.get("config") or {},
                      Pattern(sizes["q_from"]) if sizes.get("q_from") else None)


def generations(model_type: str) -> tuple[list[str], str]:
    """The MindFormers generations of a family's map, and the default one."""
    data = _load(model_type)
    names = list(data.get("generations") or {}) or ["default"]
    return names, data.get("default") or names[0]


class KeyMap:
    def __init__(self, model_type: str, generation: str | None = None):
        """`generation`: the MindFormers naming to write and read (default: the map's `default` to write,
        the best match to read)."""
        data = _load(model_type)
        self.model_type = model_type
        shared = data.get("sizes") or {}
        if data.get("generations"):
            self.generations = {g: _generation(g, d, shared) for g, d in data["generations"].items()}
        else:
            self.generations = {"default": _generation("default", data, shared)}
        default = data.get("default") or next(iter(self.generations))
        if generation is not None and generation not in self.generations:
            raise ModelError(f"the {model_type} key map has no MindFormers generation {generation!r}; "
                             f"known: {', '.join(self.generations)}")
        self.pinned = generation
        self.gen = self.generations[generation or default]

    def label(self, side: str, keys: Sequence[str] = ()) -> str:
        """How a manifest names a side: "hf", "mindformers" or "mindformers:<generation>" (the generation
        written, or the one detected in MindFormers-named `keys`)."""
        if side == "hf" or len(self.generations) == 1:
            return side
        gen = self.gen if self.pinned is not None or not keys else self.detect(keys)
        return f"{side}:{gen.name}"

    def detect(self, keys: Sequence[str]) -> Generation:
        """The generation of MindFormers-named `keys`: the pinned one, else the one knowing most of them
        (the default on a tie)."""
        if self.pinned is not None:
            return self.gen
        return max(self.generations.values(),
                   key=lambda g: (sum(bool(self._rules(k, "mindformers", g)) for k in keys), g is self.gen))

    # --- which rule a name falls under --------------------------------------------------------------

    def _rules(self, name: str, side: str, gen: Generation | None = None
               ) -> list[tuple[str, Any, int, dict[str, str]]]:
        """(kind, rule, part index, placeholder values) of every rule `name` matches on `side`."""
        gen = gen or self.gen
        found: list[tuple[str, Any, int, dict[str, str]]] = []
        hf = side == "hf"
        for src, dst in gen.names:
            if (g := (src if hf else dst).match(name)) is not None:
                found.append(("rename", (src, dst) if hf else (dst, src), 0, g))
        for s in gen.splits:
            if side == s.fused_side and (g := s.fused.match(name)) is not None:
                found.append(("split", s, 0, g))
            for k, part in enumerate(s.parts):
                if side != s.fused_side and (g := part.match(name)) is not None:
                    found.append(("fuse", s, k, g))
        if len(found) > 1:
            raise CheckpointError(f"key map {self.model_type}: {name!r} matches several rules; the map is ambiguous")
        return found

    def known(self, name: str, side: str) -> bool:
        """Whether a rule knows `name` on `side`: the pinned generation's, else any generation's."""
        gens = [self.gen] if self.pinned is not None else self.generations.values()
        return any(self._rules(name, side, g) for g in gens)

    def side_of(self, keys: Sequence[str], default: str) -> str:
        """The naming a checkpoint uses: the side that knows more of its names (`default` on a tie)."""
        score = {side: sum(self.known(k, side) for k in keys) for side in SIDES}
        other = SIDES[1 - SIDES.index(default)]
        return other if score[other] > score[default] else default

    # --- sizes of split blocks ----------------------------------------------------------------------

    def _block_sizes(self, gen: Generation, s: Split, groups: dict[str, str], rows: int, reader: Reader,
                     config: Mapping[str, Any] | None, fused_name: str) -> list[int]:
        sizes = self.sizes_from_config(config, gen) if config else None
        if sizes is None or any(r not in sizes for r in s.rows):
            sizes = self._sizes_from_shapes(gen, s, groups, rows, reader, fused_name)
        blocks = [sizes[r] for r in s.rows]
        if sum(blocks) != rows:
            raise CheckpointError(f"{fused_name} has {rows} rows but the config gives "
                                  f"{'+'.join(f'{r}={sizes[r]}' for r in s.rows)} = {sum(blocks)}")
        return blocks

    def _sizes_from_shapes(self, gen: Generation, s: Split, groups: dict[str, str], rows: int, reader: Reader,
                           fused_name: str) -> dict[str, int]:
        if len(set(s.rows)) == 1:  # blocks of one rule (gate | up) are equal
            size, rest = divmod(rows, len(s.rows))
            if rest:
                raise CheckpointError(f"{fused_name} has {rows} rows, which is not {len(s.rows)} equal blocks")
            return {s.rows[0]: size}
        if gen.q_from is None:
            raise CheckpointError(f"cannot size the blocks of {fused_name}: give --config CONFIG.json")
        q_name = gen.q_from.format(groups)
        if q_name not in reader.keys() or len(reader.shape(q_name)) != 2:
            raise CheckpointError(f"cannot size the blocks of {fused_name} without {q_name}: "
                                  "give --config CONFIG.json")
        q = reader.shape(q_name)[1]
        n_q, n_kv = s.rows.count("q"), s.rows.count("kv")
        kv, rest = divmod(rows - n_q * q, n_kv) if n_kv else (0, rows - n_q * q)
        if rest or (n_kv and kv <= 0):
            raise CheckpointError(f"{fused_name} has {rows} rows, which is not {'+'.join(s.rows)} with q={q} "
                                  f"(the input width of {q_name}); give --config CONFIG.json")
        return {"q": q, "kv": kv}

    def _group_count(self, gen: Generation, s: Split, blocks: Sequence[int], config: Mapping[str, Any] | None,
                     fused_name: str) -> int:
        """How many times the fused tensor repeats one block of each part (1: not interleaved)."""
        if s.groups is None:
            return 1
        if s.groups == "row":
            if len(set(blocks)) != 1:
                raise CheckpointError(f"{fused_name}: row-interleaved parts need equal rows, not {list(blocks)}")
            count = blocks[0]
        else:  # kv_heads: the shapes give kv heads x head dim; which factor is the heads needs the config
            sizes = self.sizes_from_config(config, gen) if config else None
            if sizes is None:
                raise CheckpointError(f"cannot find the query groups of {fused_name}: give --config CONFIG.json")
            count = sizes["kv_heads"]
        if count <= 0 or any(b % count for b in blocks):
            raise CheckpointError(f"{fused_name}: blocks of {list(blocks)} rows do not make {count} groups")
        return count

    def sizes_from_config(self, config: Mapping[str, Any], gen: Generation | None = None) -> dict[str, int] | None:
        c = (gen or self.gen).size_config
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
        sizes = {"q": heads * head_dim, "kv": kv_heads * head_dim, "kv_heads": kv_heads}
        if c.get("ffn") and config.get(c["ffn"]) is not None:
            sizes["ffn"] = int(config[c["ffn"]])
        return sizes

    # --- the plan -----------------------------------------------------------------------------------

    def plan(self, reader: Reader, src: str, dst: str, config: Mapping[str, Any] | None = None,
             allow_unmapped: bool = False) -> list[Planned]:
        """Output tensors named for side `dst` from `reader`'s tensors named for side `src`."""
        gen = self.detect(reader.keys()) if src == "mindformers" else self.gen
        out: list[Planned | tuple[str, Split, dict[str, str]]] = []
        fusing: dict[str, dict[int, str]] = {}  # fused name -> part index -> source name
        for name in reader.keys():
            info = reader.info(name)
            rules = self._rules(name, src, gen)
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
                out += self._split(gen, reader, name, info, rule, groups, config)
            else:
                fused = rule.fused.format(groups)
                if fused not in fusing:
                    fusing[fused] = {}
                    out.append((fused, rule, groups))
                fusing[fused][k] = name
        planned = [p if isinstance(p, Planned) else self._fuse(gen, reader, *p, fusing[p[0]], config) for p in out]
        seen: dict[str, str] = {}
        for p in planned:
            if p.name in seen:
                raise CheckpointError(f"tensors {seen[p.name]!r} and {p.pieces[0][0]!r} both become {p.name!r}")
            seen[p.name] = p.pieces[0][0]
        return planned

    def _split(self, gen: Generation, reader: Reader, name: str, info: TensorInfo, s: Split,
               groups: dict[str, str], config: Mapping[str, Any] | None) -> list[Planned]:
        if not info.shape:
            raise CheckpointError(f"{name} is a scalar; it cannot be split into {len(s.parts)} blocks")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        blocks = self._block_sizes(gen, s, groups, info.shape[0], reader, config, name)
        count = self._group_count(gen, s, blocks, config, name)
        per = [b // count for b in blocks]  # rows of each part in one group
        stride = sum(per) * row_bytes
        out = []
        for k, (part, rows) in enumerate(zip(s.parts, blocks)):
            at = sum(per[:k]) * row_bytes
            pieces = tuple((name, g * stride + at, g * stride + at + per[k] * row_bytes) for g in range(count))
            out.append(Planned(part.format(groups), TensorInfo(info.dtype, (rows, *info.shape[1:])), pieces, "split"))
        return out

    def _fuse(self, gen: Generation, reader: Reader, fused: str, s: Split, groups: dict[str, str],
              parts: dict[int, str], config: Mapping[str, Any] | None) -> Planned:
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
        sizes = self.sizes_from_config(config, gen) if config else None
        if sizes is not None and all(r in sizes for r in s.rows):
            expected = [sizes[r] for r in s.rows]
            if rows != expected:
                raise CheckpointError(f"cannot rebuild {fused}: its blocks have {rows} rows, "
                                      f"the config says {expected}")
        count = self._group_count(gen, s, rows, config, fused)
        row_bytes = [i.nbytes // i.shape[0] if i.shape[0] else 0 for i in infos]
        pieces = []
        for g in range(count):  # one block of each part per group
            for n, r, rb in zip(names, rows, row_bytes):
                per = r // count * rb
                pieces.append((n, g * per, (g + 1) * per))
        info = TensorInfo(first.dtype, (sum(rows), *first.shape[1:]))
        return Planned(fused, info, tuple(pieces), "fuse")


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
        pieces = []  # the pieces within lo..hi, clipped to it
        for src, b, e in p.pieces:
            a, z = max(lo, pos), min(hi, pos + e - b)
            if a < z:
                pieces.append((src, b + a - pos, b + z - pos))
            pos += e - b
        if len(pieces) <= 64 or (hi - lo) // len(pieces) >= SMALL_PIECE:
            for src, b, e in pieces:
                yield from self.reader.chunks(src, b, e, size)
            return
        # Many small pieces (rows of an interleaved layout): read each source's rows of a batch in one
        # go and assemble the batch, instead of one read per row.
        batch: list[tuple[str, int, int]] = []
        nbytes = 0
        for piece in pieces:
            if batch and nbytes + piece[2] - piece[1] > size:
                yield self._gather(batch, nbytes, size)
                batch, nbytes = [], 0
            if piece[2] - piece[1] > size:  # a chunk is at most `size`
                yield from self.reader.chunks(*piece, size)
                continue
            batch.append(piece)
            nbytes += piece[2] - piece[1]
        if batch:
            yield self._gather(batch, nbytes, size)

    def _gather(self, batch: Sequence[tuple[str, int, int]], nbytes: int, size: int) -> Chunk:
        spans: dict[str, tuple[int, int]] = {}  # per source: the bytes covering its pieces
        for src, b, e in batch:
            a, z = spans.get(src, (b, e))
            spans[src] = (min(a, b), max(z, e))
        out = bytearray(nbytes)
        read: dict[str, tuple[int, bytes]] = {}
        for src, (a, z) in spans.items():
            need = sum(e - b for s, b, e in batch if s == src)
            if z - a <= 2 * need + size:  # rows of every other group: read the covering range
                read[src] = (a, b"".join(bytes(c) for c in self.reader.chunks(src, a, z, size)))
        pos = 0
        for src, b, e in batch:
            if src in read:
                at, data = read[src]
                out[pos : pos + e - b] = data[b - at : e - at]
            else:
                out[pos : pos + e - b] = b"".join(bytes(c) for c in self.reader.chunks(src, b, e, size))
            pos += e - b
        return memoryview(out)

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
