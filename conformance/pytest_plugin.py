"""pytest plugin (entry point `accel`): `pytest --accel-target torch:cpu` runs the conformance cases as
tests with readable ids, e.g. `test_inference[qwen2-tiny-float32-torch:cpu]`. Without --accel-target
the plugin only adds its options.

    pytest --accel-target torch:cpu --accel-target mindspore:cpu --accel-cases inference,generation
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("accel", "accel-port conformance cases")
    group.addoption("--accel-target", action="append", default=[], metavar="BACKEND:DEVICE",
                    help="run the conformance cases on this target (repeatable, or comma-separated)")
    group.addoption("--accel-models", default=None, metavar="M1,M2", help="model presets (default: every *-tiny)")
    group.addoption("--accel-cases", default="ops,inference,generation", metavar="C1,C2",
                    help="case kinds (default ops,inference,generation)")
    group.addoption("--accel-dtypes", default="float32", metavar="D1,D2", help="dtypes (default float32)")


class CaseFailure(Exception):
    def __init__(self, row: Any):
        super().__init__(row.detail)
        self.row = row


class ConformanceCollector(pytest.Collector):
    def collect(self) -> list[pytest.Item]:  # items are added by pytest_collection_modifyitems
        return []


class CaseItem(pytest.Item):
    def __init__(self, *, target: str, job: tuple[str, str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.target, self.job = target, job

    def runtest(self) -> None:
        from accel.conformance.cases import case_runners, op_case

        case, item, dtype = self.job
        backend = _backend(self.config, self.target)
        row = case_runners()[case](backend, op_case(item) if case == "ops" else item, dtype, _context(self.config))
        if row.status == "skipped":
            pytest.skip(row.detail)
        if row.status != "pass":
            raise CaseFailure(row)

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, CaseFailure):
            row = excinfo.value.row
            lines = [f"{row.target} {row.case} {row.model} {row.dtype}: {row.status}: {row.detail}"]
            if row.first_divergence:
                fd = row.first_divergence
                lines.append(f"first divergence: {fd.get('tap')} ({fd.get('op')}): {fd.get('detail', '')}")
            metrics = {k: v for k, v in row.metrics.items() if k in ("accel_cosine", "max_abs", "max_rel", "rmse")}
            if metrics:
                lines.append("metrics: " + ", ".join(f"{k}={v:.3g}" for k, v in metrics.items()))
            return "\n".join(lines)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, self.name


_BACKENDS = pytest.StashKey[dict]()
_CONTEXT = pytest.StashKey[Any]()


def _backend(config: pytest.Config, target: str) -> Any:
    from accel.targets import open_target

    cache = config.stash.setdefault(_BACKENDS, {})
    if target not in cache:
        cache[target] = open_target(target)
    return cache[target]


def _context(config: pytest.Config) -> Any:
    from accel.conformance.cases import Context

    if _CONTEXT not in config.stash:
        config.stash[_CONTEXT] = Context()
    return config.stash[_CONTEXT]


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    targets = [t for value in config.getoption("accel_target") for t in _csv(value)]
    if not targets:
        return
    from accel.conformance.runner import plan_jobs
    from accel.models import presets
    from accel.targets import select

    models = _csv(config.getoption("accel_models")) or [n for n in presets() if n.endswith("-tiny")]
    jobs = plan_jobs(_csv(config.getoption("accel_cases")), models, _csv(config.getoption("accel_dtypes")))
    parent = ConformanceCollector.from_parent(session, name="accel-conformance")
    for target in targets:
        target = str(select(target))  # an unavailable target is an error, never a silent skip
        for case, item, dtype in jobs:
            items.append(CaseItem.from_parent(parent, name=f"test_{case}[{item}-{dtype}-{target}]",
                                              target=target, job=(case, item, dtype)))
