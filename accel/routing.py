"""Per-op routing: which of a backend's implementations of an op runs.

A backend offers, for each op, a ranked list of implementations ("fused" vendor kernel first, then
"composite", ...), each with a run-time availability check. The default route takes the first
available one. A policy overrides that per op, from `ACCEL_OPS` ("rms_norm=composite,attention=fused")
or a YAML file (`ACCEL_OPS=policy.yaml`, a mapping of op name to implementation name), so the suite can
run the fused kernel and the composite on the same device. An override that names an implementation
the target lacks is an error, never a quiet fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accel.errors import RoutingError
from accel.ops import OP_NAMES


@dataclass(frozen=True)
class Impl:
    """One implementation of an op. `unavailable` is None when it can run here, else the reason."""

    variant: str
    fn: Callable[..., Any]
    unavailable: str | None = None


def parse_policy(text: str | None) -> dict[str, str]:
    """`ACCEL_OPS` syntax: "op=variant,op=variant", or a path to a YAML mapping op -> variant."""
    if not text or not text.strip():
        return {}
    text = text.strip()
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return _policy_from_yaml(Path(text))
    policy: dict[str, str] = {}
    for item in text.split(","):
        op, sep, variant = item.partition("=")
        if not sep or not op.strip() or not variant.strip():
            raise RoutingError(f"routing policy item {item!r} is not of the form op=implementation")
        policy[op.strip()] = variant.strip()
    _check_op_names(policy)
    return policy


POLICY_BYTES = 1 << 20  # a policy names a few dozen ops


def _policy_from_yaml(path: Path) -> dict[str, str]:
    import yaml

    if path.exists() and not path.is_file():
        raise RoutingError(f"routing policy file {path} is not a regular file")
    try:
        if path.is_file() and path.stat().st_size > POLICY_BYTES:
            raise RoutingError(f"routing policy file {path} is larger than {POLICY_BYTES} bytes; it maps op names")
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise RoutingError(f"routing policy file {path} does not exist") from None
    except UnicodeDecodeError:
        raise RoutingError(f"routing policy file {path} is not UTF-8 text") from None
    except OSError as e:
        raise RoutingError(f"cannot read routing policy file {path}: {e.strerror or e}") from None
    except RecursionError:
        raise RoutingError(f"routing policy file {path} nests too deeply; it is a flat mapping") from None
    except yaml.YAMLError as e:
        raise RoutingError(f"routing policy file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, Mapping) or not all(isinstance(v, str) for v in data.values()):
        raise RoutingError(f"routing policy file {path} must be a mapping of op name to implementation name")
    policy = {str(k): str(v) for k, v in data.items()}
    _check_op_names(policy)
    return policy


def _check_op_names(policy: Mapping[str, str]) -> None:
    unknown = sorted(set(policy) - set(OP_NAMES))
    if unknown:
        raise RoutingError(f"routing policy names unknown op(s) {', '.join(unknown)}; ops are: {', '.join(OP_NAMES)}")


def policy_from_env() -> dict[str, str]:
    return parse_policy(os.environ.get("ACCEL_OPS"))


class Ops:
    """The routed op namespace handed to models: `ops.rms_norm(...)` and friends, plus the backend's
    `asarray`/`to_numpy`. `routes` says which implementation each op runs."""

    def __init__(self, fns: Mapping[str, Callable[..., Any]], routes: Mapping[str, str], backend: Any):
        self.__dict__.update(fns)
        self.routes = dict(routes)
        self.backend = backend
        self.asarray = backend.asarray
        self.to_numpy = backend.to_numpy

    def __repr__(self) -> str:
        return f"Ops({self.backend!r})"


def build_ops(backend: Any, table: Mapping[str, list[Impl]], policy: Mapping[str, str], target: str) -> Ops:
    missing = [name for name in OP_NAMES if not table.get(name)]
    if missing:
        raise RoutingError(f"{target} implements no {', '.join(missing)}: a backend must implement every op")
    fns: dict[str, Callable[..., Any]] = {}
    routes: dict[str, str] = {}
    for name in OP_NAMES:
        impls = table[name]
        wanted = policy.get(name)
        if wanted is None:
            chosen = next((i for i in impls if i.unavailable is None), None)
            if chosen is None:
                reasons = "; ".join(f"{i.variant}: {i.unavailable}" for i in impls)
                raise RoutingError(f"{target} has no usable implementation of {name} ({reasons})")
        else:
            chosen = next((i for i in impls if i.variant == wanted), None)
            if chosen is None:
                offered = ", ".join(i.variant for i in impls)
                raise RoutingError(f"{target} has no {wanted!r} implementation of {name}; it offers {offered}")
            if chosen.unavailable is not None:
                raise RoutingError(f"{name}={wanted} cannot run on {target}: {chosen.unavailable}")
        fns[name] = chosen.fn
        routes[name] = chosen.variant
    return Ops(fns, routes, backend)
