"""Parallelism applied after construction: Megatron-style tensor parallelism of a model's parameter
dict, and data parallelism by gradient averaging. The model files know nothing of either.

Tensor parallelism (the layout of gpt-fast's tp.py, over the op set):

- Column-parallel (split by output rows, head by head): the Q/K/V projections and the MLP's gate/up.
  Fused layouts are split block by block and re-fused per rank, so the rank's tensor keeps the
  original layout at its own width: c_attn and W_pack [Q | K | V], ChatGLM's query_key_value
  [Q (heads d) | K (groups d) | V (groups d)], dense_h_to_4h [gate | up]. Biases follow their rows.
- Row-parallel (split by input columns): the attention output projection and the MLP's down
  projection. Each rank computes a partial sum; one all_reduce after each adds them: two per block.
- Replicated: the embedding, the norms and the LM head (NormHead included), so every rank computes
  the whole logits with no gather and they equal the single-device logits. A vocab-parallel head
  (Megatron's) would save vocab x hidden weights per rank for an all_gather of the logits and, for the
  embedding, a masked lookup plus an all_reduce; it is not done here.
- KV heads: with groups % tp == 0 each rank takes groups / tp of them. With tp % groups == 0
  (ChatGLM's 2 groups on 4 or 8 ranks, Qwen2's GQA) each rank takes the one KV head its query heads
  read, replicated on tp / groups ranks, as Megatron does when num_query_groups < tp. Any other count
  is an error naming the counts.
- ALiBi (Baichuan2-13B): a rank's slopes are the slopes of its slice of the global heads.

The rank's model is the family's own class with per-rank hyperparameters (heads, KV heads or groups
and MLP width divided by tp, `dataclasses.replace` style). The families derive head_dim as
hidden_size // num_heads, which would change with the heads, so the rank's class is a subclass that
pins head_dim to the global value; the forward is the family's, untouched. The collectives enter
through `TPOps`, a thin proxy of the op set that all-reduces the output of a linear whose weight is a
row-parallel parameter (recognised by identity: the tensor object in the rank's parameter dict), gives
the split after a fused column-parallel projection the rank's block sizes (QWen and Baichuan split
c_attn / W_pack by hidden_size, the global width), and hands alibi_bias the rank's slopes.

TP here is a forward (inference, generation with the rank's KV cache). Data parallelism trains:
`make_dp_train_step` averages the gradients across ranks in one flat bucket, weighted by each rank's
share of the target tokens, so a step equals the single-process step on the concatenated batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from accel.errors import ModelError, UsageError
from accel.models._layers import alibi_slopes

AllReduce = Callable[[Any, str], Any]  # all_reduce(x, op) -> reduced x: an accel.dist Collectives method


# --- sharding rules -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """`units` consecutive units of `size` rows (heads of head_dim rows, or single rows of an MLP)."""

    units: int
    size: int = 1
    what: str = "rows"
    replicable: bool = False  # KV heads: may be replicated when fewer than the ranks


@dataclass(frozen=True)
class Column:
    blocks: tuple[Block, ...]  # the fused layout, block after block along the output rows


@dataclass(frozen=True)
class RowSplit:
    block: Block  # along the input columns


Rule = Column | RowSplit


def _units(block: Block, tp: int, rank: int, model: Any) -> range:
    if block.units % tp == 0:
        n = block.units // tp
        return range(rank * n, (rank + 1) * n)
    if block.replicable and tp % block.units == 0:
        j = rank // (tp // block.units)
        return range(j, j + 1)
    hint = " (or a multiple of them)" if block.replicable else ""
    raise ModelError(f"{model.name}: its {block.units} {block.what} do not split over {tp} tensor-parallel ranks; "
                     f"use a tp that divides {block.units}{hint}")


def _rows(blocks: tuple[Block, ...], tp: int, rank: int, model: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """Row indices of this rank in a fused layout, and the rank's block widths."""
    index, widths, start = [], [], 0
    for b in blocks:
        units = _units(b, tp, rank, model)
        index += [np.arange(start + u * b.size, start + (u + 1) * b.size) for u in units]
        widths.append(len(units) * b.size)
        start += b.units * b.size
    return np.concatenate(index), tuple(widths)


@dataclass(frozen=True)
class FamilyPlan:
    layer: str  # parameter prefix of layer i, "{i}" in place of the index
    rules: dict[str, Rule]  # per-layer parameter suffix -> rule; anything else is replicated
    changes: dict[str, Callable[[int], int]]  # config field -> its value on a rank, from tp
    alibi: bool = False


def _heads(n: int, d: int, what: str = "heads", replicable: bool = False) -> Block:
    return Block(n, d, what, replicable)


def _plan_qwen2(m: Any) -> FamilyPlan:
    q, kv, mlp = _heads(m.num_heads, m.head_dim), _heads(m.num_kv_heads, m.head_dim, "KV heads", True), \
        Block(m.intermediate_size, 1, "MLP rows")
    rules: dict[str, Rule] = {f"self_attn.{n}_proj.{t}": Column((q if n == "q" else kv,))
                              for n in "qkv" for t in ("weight", "bias")}
    rules |= {"self_attn.o_proj.weight": RowSplit(q), "mlp.gate_proj.weight": Column((mlp,)),
              "mlp.up_proj.weight": Column((mlp,)), "mlp.down_proj.weight": RowSplit(mlp)}
    return FamilyPlan("model.layers.{i}.", rules, {
        "num_heads": lambda tp: m.num_heads // tp,
        "num_kv_heads": lambda tp: max(m.num_kv_heads // tp, 1),
        "intermediate_size": lambda tp: m.intermediate_size // tp})


def _plan_qwen(m: Any) -> FamilyPlan:
    q, mlp = _heads(m.num_heads, m.head_dim), Block(m.intermediate_size // 2, 1, "MLP rows")  # w1/w2: I/2 rows
    rules: dict[str, Rule] = {"attn.c_attn.weight": Column((q, q, q)), "attn.c_attn.bias": Column((q, q, q)),
                              "attn.c_proj.weight": RowSplit(q), "mlp.w1.weight": Column((mlp,)),
                              "mlp.w2.weight": Column((mlp,)), "mlp.c_proj.weight": RowSplit(mlp)}
    return FamilyPlan("transformer.h.{i}.", rules, {
        "num_heads": lambda tp: m.num_heads // tp,
        "intermediate_size": lambda tp: 2 * (m.intermediate_size // 2 // tp)})


def _plan_chatglm(m: Any) -> FamilyPlan:
    q, kv, mlp = _heads(m.num_heads, m.head_dim), _heads(m.num_groups, m.head_dim, "multi-query groups", True), \
        Block(m.ffn_hidden_size, 1, "MLP rows")
    qkv = Column((q, kv, kv))
    rules: dict[str, Rule] = {"self_attention.query_key_value.weight": qkv, "self_attention.query_key_value.bias": qkv,
                              "self_attention.dense.weight": RowSplit(q),
                              "mlp.dense_h_to_4h.weight": Column((mlp, mlp)), "mlp.dense_4h_to_h.weight": RowSplit(mlp)}
    return FamilyPlan("transformer.encoder.layers.{i}.", rules, {
        "num_heads": lambda tp: m.num_heads // tp,
        "num_groups": lambda tp: max(m.num_groups // tp, 1),
        "ffn_hidden_size": lambda tp: m.ffn_hidden_size // tp})


def _plan_baichuan(m: Any) -> FamilyPlan:
    q, mlp = _heads(m.num_heads, m.head_dim), Block(m.intermediate_size, 1, "MLP rows")
    rules: dict[str, Rule] = {"self_attn.W_pack.weight": Column((q, q, q)), "self_attn.o_proj.weight": RowSplit(q),
                              "mlp.gate_proj.weight": Column((mlp,)), "mlp.up_proj.weight": Column((mlp,)),
                              "mlp.down_proj.weight": RowSplit(mlp)}
    return FamilyPlan("model.layers.{i}.", rules, {
        "num_heads": lambda tp: m.num_heads // tp,
        "intermediate_size": lambda tp: m.intermediate_size // tp}, alibi=m.alibi)


PLANS: dict[str, Callable[[Any], FamilyPlan]] = {
    "qwen2": _plan_qwen2, "qwen": _plan_qwen, "chatglm": _plan_chatglm, "baichuan": _plan_baichuan,
}


def _pinned(cls: type, head_dim: int) -> type:
    """`cls` with head_dim a class constant: a rank keeps the global head width with fewer heads."""
    key = (cls, head_dim)
    if key not in _PINNED:
        _PINNED[key] = type(cls.__name__, (cls,), {"head_dim": head_dim, "__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _PINNED[key]


_PINNED: dict[tuple[type, int], type] = {}


# --- one rank's shard --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TPShard:
    """One tensor-parallel rank: its model (the family's class, per-rank hyperparameters), its weights,
    and what TPOps needs to know about them."""

    model: Any
    params: dict[str, np.ndarray]
    tp: int
    rank: int
    row_parallel: frozenset[str]  # weights whose linear output is a partial sum to all-reduce
    fused_splits: dict[str, tuple[int, ...]]  # fused column weights -> the rank's block widths
    sharded: frozenset[str]  # names that differ between ranks (the rest are replicated)
    alibi_slopes: np.ndarray | None = field(default=None, repr=False)


def plan(model: Any) -> FamilyPlan:
    if model.model_type not in PLANS:
        raise ModelError(f"no tensor-parallel plan for {model.model_type}; plans exist for {', '.join(PLANS)}")
    return PLANS[model.model_type](model)


def shard(model: Any, params: Mapping[str, np.ndarray], tp: int, rank: int) -> TPShard:
    """Rank `rank` of `tp` tensor-parallel ranks: the rank's model and weights (NumPy, as given)."""
    if not isinstance(tp, int) or tp < 1 or not 0 <= rank < tp:
        raise UsageError(f"tensor-parallel rank {rank} of {tp} is not a rank")
    fp = plan(model)
    local = _pinned(type(model), model.head_dim)(**(model.config_dict() | {k: f(tp) for k, f in fp.changes.items()}))
    out, row, fused, sharded = {}, set(), {}, set()
    for name, value in params.items():
        rule = _rule(fp, name, model.num_layers)
        if rule is None:
            out[name] = value
            continue
        sharded.add(name)
        if isinstance(rule, Column):
            index, widths = _rows(rule.blocks, tp, rank, model)
            out[name] = np.ascontiguousarray(np.asarray(value)[index])
            if len(widths) > 1 and name.endswith("weight"):
                fused[name] = widths
        else:
            index, _ = _rows((rule.block,), tp, rank, model)
            out[name] = np.ascontiguousarray(np.asarray(value)[:, index])
            row.add(name)
    # the rank's class must expect these shapes; QWen and Baichuan state their attention weights in
    # hidden_size, which a rank keeps, so there a sharded weight may also meet its global shape
    spec = local.param_spec()
    bad = next((n for n in spec if n not in out or (tuple(out[n].shape) != spec[n].shape and not (
        n in sharded and tuple(np.shape(params[n])) == spec[n].shape))), None)
    if bad is not None:
        got = tuple(out[bad].shape) if bad in out else "missing"
        raise ModelError(f"{model.name}: tensor-parallel shard of {bad} is {got}, the rank's model expects "
                         f"{spec[bad].shape}")
    slopes = None
    if fp.alibi:
        heads = _rows((_heads(model.num_heads, 1),), tp, rank, model)[0]
        slopes = alibi_slopes(model.num_heads)[heads]
    return TPShard(local, out, tp, rank, frozenset(row), fused, frozenset(sharded), slopes)


def _rule(fp: FamilyPlan, name: str, num_layers: int) -> Rule | None:
    head = fp.layer.partition("{i}")[0]
    if not name.startswith(head):
        return None
    index, dot, suffix = name[len(head):].partition(".")
    if not index.isdigit() or not dot or int(index) >= num_layers:
        return None
    return fp.rules.get(suffix)


def feasible(model: Any, tp: int) -> str | None:
    """None when `model` splits over `tp` tensor-parallel ranks, else why not."""
    try:
        fp = plan(model)
        for rule in fp.rules.values():
            for block in rule.blocks if isinstance(rule, Column) else (rule.block,):
                _units(block, tp, 0, model)
    except ModelError as e:
        return str(e)
    return None


# --- the op-set proxy ------------------------------------------------------------------------------------


class TPOps:
    """The op set of one tensor-parallel rank: `ops` plus the rank's collectives (see the module
    docstring). Build one per call from the parameter dict the forward will read: row-parallel
    weights are recognised by the identity of those tensor objects."""

    def __init__(self, ops: Any, params: Mapping[str, Any], tp_shard: TPShard, all_reduce: AllReduce,
                 alibi_slopes: Any = None):
        self._ops = ops
        self._all_reduce = all_reduce
        self._row = {id(params[n]) for n in tp_shard.row_parallel}
        self._fused = {id(params[n]): sizes for n, sizes in tp_shard.fused_splits.items()}
        self._pending: dict[int, tuple[Any, tuple[int, ...]]] = {}
        self._slopes = alibi_slopes if alibi_slopes is not None else tp_shard.alibi_slopes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def linear(self, x: Any, weight: Any, bias: Any = None) -> Any:
        if id(weight) in self._row:
            y = self._all_reduce(self._ops.linear(x, weight), "sum")  # the bias, if any, once, after the sum
            return y if bias is None else self._ops.add(y, bias)
        y = self._ops.linear(x, weight, bias)
        sizes = self._fused.get(id(weight))
        if sizes is not None:
            self._pending[id(y)] = (y, sizes)  # the tensor is held, so its id stays its own until the split
        return y

    def split(self, x: Any, sizes: Any, axis: int) -> Any:
        entry = self._pending.pop(id(x), None)
        if entry is not None and entry[0] is x and axis in (-1, len(x.shape) - 1):
            sizes = list(entry[1])
        return self._ops.split(x, sizes, axis)

    def alibi_bias(self, slopes: Any, kv_len: int) -> Any:
        if self._slopes is None:
            return self._ops.alibi_bias(slopes, kv_len)
        if isinstance(self._slopes, np.ndarray):
            self._slopes = self._ops.asarray(self._slopes, "float32")
        return self._ops.alibi_bias(self._slopes, kv_len)


def forward(tp_shard: TPShard, ops: Any, params: Mapping[str, Any], input_ids: Any, all_reduce: AllReduce,
            cache: Any = None, taps: dict | None = None, alibi_slopes: Any = None) -> Any:
    """The rank's forward: its model over TPOps; every rank returns the whole logits."""
    tp_ops = TPOps(ops, params, tp_shard, all_reduce, alibi_slopes)
    return tp_shard.model.forward(tp_ops, params, input_ids, cache=cache, taps=taps)


# --- data parallelism ----------------------------------------------------------------------------------


def average_gradients(ops: Any, grads: Mapping[str, Any], all_reduce: AllReduce, weight: Any = None) -> dict[str, Any]:
    """The average over ranks of each gradient (times `weight` on this rank first, when given), as one
    all_reduce of every gradient flattened into one buffer: per-tensor calls would pay the collective's
    latency once per weight."""
    names = list(grads)
    shapes = [tuple(grads[n].shape) for n in names]
    flat = ops.concat([ops.reshape(grads[n], (-1,)) for n in names], 0)
    if weight is not None:
        flat = ops.mul(flat, weight)
    flat = all_reduce(flat, "avg")
    pieces = ops.split(flat, [math.prod(s) for s in shapes], 0)
    return {n: ops.reshape(p, s) for n, p, s in zip(names, pieces, shapes)}


def make_dp_train_step(model: Any, backend: Any, opt: Any, collectives: Any, lora: Any = None) -> Callable:
    """step(trainable, frozen, state, input_ids, labels) -> (loss, grad_norm, trainable, state), as
    accel.train.make_train_step's, with this rank's share of the global batch. The loss is a mean over
    target tokens, so each rank's gradient is weighted by world * (its tokens / all tokens) before the
    average: the step equals the single-process step on the concatenated batch even when the ranks hold
    different numbers of target tokens. The returned loss is the global batch's."""
    from accel import lora as lora_mod
    from accel.train import IGNORE_INDEX, adamw_update, grad_norm, lm_loss

    ops = backend.ops

    def loss_fn(trainable: Mapping[str, Any], frozen: Mapping[str, Any], input_ids: Any, labels: Any) -> Any:
        params = {**frozen, **trainable} if lora is None else lora_mod.apply(ops, frozen, trainable, lora)
        return lm_loss(model, ops, params, input_ids, labels)

    value_and_grad = backend.value_and_grad(loss_fn)
    update = backend.compile(lambda p, g, s: adamw_update(ops, opt, p, g, s))
    world = collectives.world_size

    def step(trainable: Mapping[str, Any], frozen: Mapping[str, Any], state: Mapping[str, Any], input_ids: Any,
             labels: Any) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
        mine = int((np.asarray(backend.to_numpy(labels)) != IGNORE_INDEX).sum())
        total = collectives.all_reduce(backend.asarray(np.array([mine], np.int64), "int64"), "sum")
        share = mine / max(int(np.asarray(backend.to_numpy(total))[0]), 1)
        loss, grads = value_and_grad(trainable, frozen, input_ids, labels)
        grads = average_gradients(ops, grads, collectives.all_reduce, world * share)
        loss = collectives.all_reduce(ops.mul(loss, share), "sum")
        new_trainable, new_state = update(trainable, grads, state)
        return loss, grad_norm(ops, grads), new_trainable, new_state

    return step
