"""Targets, selection order, availability reasons, the backend registry and the routing policy."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from accel import registry, targets
from accel.errors import RoutingError, TargetUnavailable, UnknownTarget
from accel.routing import parse_policy


def test_parse_targets():
    assert str(targets.parse("torch:cuda:1")) == "torch:cuda:1"
    assert targets.parse("torch:cpu").kind == "cpu"
    for bad in ("torch", "nonsense:cpu", "torch:tpu", "torch:cuda:x"):
        with pytest.raises(UnknownTarget):
            targets.parse(bad)


def test_selection_order(monkeypatch):
    monkeypatch.delenv("ACCEL_TARGET", raising=False)
    assert str(targets.select()) == "torch:cpu"  # no npu, no cuda here
    monkeypatch.setenv("ACCEL_TARGET", "numpy:cpu")
    assert str(targets.select()) == "numpy:cpu"
    assert str(targets.select("torch:cpu")) == "torch:cpu"  # argument beats the environment


@pytest.mark.parametrize("spec, why", [("torch:cuda", "CUDA"), ("torch:npu", "torch_npu"), ("torch:cuda:3", "CUDA")])
def test_unavailable_target_is_an_error_with_the_reason(spec, why):
    with pytest.raises(TargetUnavailable, match=why):
        targets.select(spec)


def test_unavailable_target_from_env_is_an_error(monkeypatch):
    monkeypatch.setenv("ACCEL_TARGET", "torch:cuda")
    with pytest.raises(TargetUnavailable, match="ACCEL_TARGET"):
        targets.select()


def test_discover_lists_reasons_and_capabilities():
    infos = {i.target: i for i in targets.discover()}
    assert infos["torch:cpu"].available and infos["numpy:cpu"].available
    assert not infos["torch:npu"].available and "torch_npu" in infos["torch:npu"].reason
    caps = infos["torch:cpu"].backend.capabilities()
    assert "bfloat16" in caps.dtypes and caps.training and caps.collectives == "gloo"
    assert "attention" in caps.fused_ops  # SDPA


def test_importing_accel_loads_no_framework():
    code = ("import sys, accel, accel.targets, accel.ops, accel.models, accel.cli; accel.cli.build_parser(); "
            "bad = [m for m in ('torch', 'mindspore', 'jax', 'tvm', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_entry_point_backends_are_discovered(monkeypatch):
    ep = importlib.metadata.EntryPoint("vendorx", "accel.backends.numpy_ref:NumpyBackend", "accel.backends")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == "accel.backends" else [])
    assert "vendorx" in registry.entries()
    assert registry.load("vendorx").__name__ == "NumpyBackend"
    assert targets.unavailable_reason(targets.parse("vendorx:cpu")) is None


def test_entry_point_that_cannot_import_is_unavailable_with_reason(monkeypatch):
    ep = importlib.metadata.EntryPoint("ghost", "ghost_vendor_pkg:Backend", "accel.backends")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == "accel.backends" else [])
    reason = targets.unavailable_reason(targets.parse("ghost:cpu"))
    assert reason is not None and "ghost_vendor_pkg" in reason


# --- routing --------------------------------------------------------------------------------------


def test_policy_syntax_and_yaml(tmp_path):
    assert parse_policy("rms_norm=composite, attention=fused") == {"rms_norm": "composite", "attention": "fused"}
    f = tmp_path / "policy.yaml"
    f.write_text("attention: composite\n")
    assert parse_policy(str(f)) == {"attention": "composite"}
    for bad in ("rms_norm", "warp_drive=fused"):
        with pytest.raises(RoutingError):
            parse_policy(bad)


def test_policy_routes_ops_and_refuses_unavailable_variants(monkeypatch):
    monkeypatch.setenv("ACCEL_OPS", "attention=composite")
    assert targets.open_target("torch:cpu").ops.routes["attention"] == "composite"
    assert targets.open_target("torch:cpu", policy={}).ops.routes["attention"] == "sdpa"
    with pytest.raises(RoutingError, match="torch_npu"):
        targets.open_target("torch:cpu", policy={"rms_norm": "fused"})  # no silent fallback
    with pytest.raises(RoutingError, match="offers"):
        targets.open_target("torch:cpu", policy={"rms_norm": "magic"})


def test_a_routing_policy_file_that_cannot_be_one_is_a_one_line_error(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("rms_norm: r\u00e9f\n".encode("latin-1"))
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "deep.yaml").write_text("[" * 20000 + "]" * 20000)
    for name, words in [("latin1.yaml", "not UTF-8"), ("dir.yaml", "not a regular file"),
                        ("deep.yaml", "nests too deeply"), ("missing.yaml", "does not exist")]:
        with pytest.raises(RoutingError, match=words):
            parse_policy(str(tmp_path / name))
