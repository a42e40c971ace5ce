"""accel.msprobe_dump against the real mindstudio-probe: PrecisionDebugger's dumps of transformers' Qwen2
(task tensor in float32, task statistics in bfloat16) read back, equal to the modules' outputs captured by
forward hooks in the same run and, through module_map and the stated layouts, to accel's own taps on the
same weights; write_dump's statistics equal msprobe's own, and `msprobe compare` reads two written dumps
and flags the module given a planted difference; wrong targets and broken dumps are one-line errors."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from accel.models._layers import Taps
from accel.msprobe_dump import DumpError, ModuleCall, first_error_row, module_map, read_dump, to_tap_layout, write_dump
from tests.conftest import QWEN2_TINY
from tests.msprobe_fixtures import dump_script, run_together

IDS = [5, 17, 33, 2, 200, 91, 7]
PLANTED = "model.layers.1.mlp.down_proj"

# One PrecisionDebugger dump per process (msprobe's debugger is a singleton) of a seeded random Qwen2 (the
# same weights in each, saved for accel by the float32 run), each module's first output captured by a
# forward hook of the same run.
SETUP = r"""
task, dtype, out = sys.argv[1:4]
if dtype == "float32":
    model.save_pretrained(out + "/hf")
model = model.to(getattr(torch, dtype))
seen = {}
def keep(name):
    def hook(module, args, output):
        first = output if isinstance(output, torch.Tensor) else output[0]
        seen.setdefault(name, first.detach().float().numpy().copy())  # bfloat16 is exact in float32
    return hook
for name, module in model.named_modules():
    if name:
        module.register_forward_hook(keep(name))
"""


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{task: (dump root, hooked outputs, checkpoint)} of one forward of transformers' Qwen2 each."""
    base = tmp_path_factory.mktemp("msprobe")
    runs = {"tensor": "float32", "statistics": "bfloat16"}
    for task in runs:
        (base / task).mkdir()
    script = dump_script(QWEN2_TINY, IDS, SETUP, 'np.savez(out + "/outputs.npz", **seen)\n')
    run_together([[sys.executable, "-c", script, task, dtype, str(base / task)] for task, dtype in runs.items()],
                  base)
    return {task: (base / task / "dump", dict(np.load(base / task / "outputs.npz")), base / task / "hf")
            for task in runs}


def test_tensor_dump_reads_as_the_modules_computed(hf):
    root, outputs, _ = hf["tensor"]
    dump = read_dump(root)  # root/step0/proc<pid>
    assert dump.task == "tensor" and dump.path.parent.name == "step0" and dump.path.name.startswith("proc")
    modules = [e for e in dump.entries if e.kind == "module"]
    assert {e.module for e in modules} >= {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    compared = 0
    for e in modules:
        out = e.outputs()[0]
        got = out.load()
        assert got.dtype == np.float64 and got.shape == out.shape
        np.testing.assert_array_equal(got, outputs[e.module])
        assert (out.max, out.min) == (got.max(), got.min())  # what msprobe wrote, of the same data
        compared += 1
    assert compared == len(outputs)  # every module called but the root, which neither records
    down = dump.module(PLANTED)
    assert (down.cls, down.call, down.parent) == ("Linear", 0, "Module.model.layers.1.mlp.Qwen2MLP.forward.0")
    raw = json.loads((dump.path / "dump.json").read_text())["data"][down.name]["output"][0]
    assert (down.outputs()[0].mean, down.outputs()[0].norm) == (raw["Mean"], raw["Norm"])
    linear = next(e for e in dump.entries if e.name == "Functional.linear.3.forward")
    assert (linear.kind, linear.api, linear.call, linear.module) == ("api", "Functional.linear", 3, None)
    assert dump.entries.index(down) < dump.entries.index(dump.module("model.layers.1.mlp"))  # dump order


def test_statistics_dump_has_msprobes_statistics_and_write_dump_computes_the_same(hf, tmp_path):
    root, outputs, _ = hf["statistics"]
    dump = read_dump(next(root.iterdir()))  # a step folder
    assert dump.task == "statistics"
    assert all(dump.module(m.module).cls in m.classes for m in module_map("qwen2", 2))  # every layer's modules
    records = [(e, e.outputs()[0]) for e in dump.entries if e.kind == "module" and e.outputs()]
    assert all(r.path is None and r.dtype == "bfloat16" for _, r in records if r.dtype != "int64")
    with pytest.raises(DumpError, match="statistics only"):
        records[0][1].load()
    # bfloat16 statistics are torch's, in bfloat16: the same reductions, or the values differ
    calls = [ModuleCall(e.module, e.cls, [], [outputs[e.module].astype(ml_dtypes.bfloat16)])
             for e, r in records if r.dtype == "bfloat16"]
    ours = read_dump(write_dump(tmp_path / "stats", calls, task="statistics"))
    theirs = [r for _, r in records if r.dtype == "bfloat16"]
    assert len(ours.entries) == len(theirs) > 20
    for e, r in zip(ours.entries, theirs):
        assert (e.outputs()[0].max, e.outputs()[0].min, e.outputs()[0].mean, e.outputs()[0].norm) == \
            (r.max, r.min, r.mean, r.norm), e.name


def test_module_map_names_every_qwen2_module_in_a_real_dump_with_accels_taps(hf):
    from accel.models import from_pretrained
    from accel.runtime import place
    from accel.targets import open_target

    dump = read_dump(hf["tensor"][0])
    model, params = from_pretrained(hf["tensor"][2])
    ref = open_target("numpy:cpu")
    taps = Taps()
    model.forward(ref.ops, place(ref, params, "float64"), np.array([IDS]), taps=taps)
    mapped = module_map("qwen2", model.num_layers)
    assert len(mapped) == 4 + 12 * model.num_layers
    for m in mapped:
        entry = dump.module(m.module)
        assert entry.cls in m.classes, m.module
        for tap, layout, tensors in ((m.tap_out, m.out_layout, entry.outputs()),
                                     (m.tap_in, m.in_layout, entry.inputs())):
            if tap is not None:
                want = np.asarray(taps[tap])
                got = to_tap_layout(tensors[0].load(), layout, want.shape)
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{m.module} {tap}")
    # the layout is what makes them equal: heads split the other way round are other numbers
    q = dump.module("model.layers.0.self_attn.q_proj").outputs()[0].load()
    assert q.shape == (1, len(IDS), 64) and taps["layers.0.q"].shape == (1, len(IDS), 4, 16)
    swapped = to_tap_layout(q, "b s (d h) -> b s h d", taps["layers.0.q"].shape)
    assert np.abs(swapped - taps["layers.0.q"]).max() > 0.1


@pytest.mark.parametrize("family,preset", [("qwen", "qwen-tiny"), ("chatglm", "chatglm3-tiny"),
                                           ("baichuan", "baichuan2-7b-tiny"), ("baichuan", "baichuan2-13b-tiny")])
def test_every_mapped_tap_is_one_the_model_records(family, preset):
    from accel.models import from_preset
    from accel.runtime import place
    from accel.targets import open_target

    model, params = from_preset(preset)
    ref = open_target("numpy:cpu")
    taps = Taps()
    model.forward(ref.ops, place(ref, params, "float64"), np.array([IDS]), taps=taps)
    mapped = module_map(family, model.num_layers)
    for m in mapped:
        for tap, layout in ((m.tap_out, m.out_layout), (m.tap_in, m.in_layout)):
            if tap is not None:
                assert tap in taps, (m.module, tap)
                if layout:  # as many axes as the tap has
                    assert len(layout.split("->")[1].split()) == np.asarray(taps[tap]).ndim, (m.module, layout)
    first = next(m for m in mapped if m.module.endswith("0.input_layernorm") or m.module.endswith("0.ln_1"))
    assert first.tap_in == "embed"
    assert any(m.tap_in == f"layers.{model.num_layers - 1}.out" and m.tap_out == "final_norm" for m in mapped)


def test_module_map_knows_no_other_family():
    with pytest.raises(DumpError, match="model_type 'llama'.*qwen2"):
        module_map("llama", 2)


def test_written_dumps_are_read_by_msprobe_compare_which_flags_the_planted_module(hf, tmp_path):
    real = read_dump(hf["tensor"][0])
    modules = [e for e in real.entries if e.kind == "module"]
    golden = [e.as_call() for e in modules]
    planted = [dataclasses.replace(c, outputs=[c.outputs[0] * 3]) if c.module == PLANTED else c for c in golden]
    dirs = {(task, side): write_dump(tmp_path / f"{task}-{side}", calls, task=task)
            for task in ("tensor", "statistics") for side, calls in (("golden", golden), ("target", planted))}
    # write_dump's statistics are msprobe's (float32 here), its entries and data the dump's
    written = read_dump(dirs["tensor", "golden"])
    assert [e.name for e in written.entries] == [e.name for e in modules]
    for e, w in zip(modules, written.entries):
        for r, s in zip(e.outputs() + list(e.parameters.values()), w.outputs() + list(w.parameters.values())):
            assert (r.max, r.min, r.mean, r.norm, r.shape, r.dtype) == (s.max, s.min, s.mean, s.norm, s.shape, s.dtype)
    np.testing.assert_array_equal(written.module(PLANTED).inputs()[0].load(), real.module(PLANTED).inputs()[0].load())

    import pandas as pd

    msprobe = str(Path(sys.executable).with_name("msprobe"))
    run_together([[msprobe, "compare", "-tp", str(dirs[task, "target"] / "dump.json"),
                    "-gp", str(dirs[task, "golden"] / "dump.json"), "-o", str(tmp_path / f"cmp-{task}")]
                   for task in ("tensor", "statistics")], tmp_path)
    for task, reason in (("tensor", "One Thousandth Err Ratio"), ("statistics", "NormRelativeErr")):
        (result,) = (tmp_path / f"cmp-{task}").glob("compare_result_*.csv")
        row = first_error_row(result)
        assert row is not None and row["NPU Name"] == f"Module.{PLANTED}.Linear.forward.0.output.0", task
        assert row["Result"] == "error" and reason in row["Err_message"][0], row["Err_message"]
        assert first_error_row(result.parent) == row  # the folder holding it
        table = pd.read_csv(result)
        assert (table["Result"] == "error").sum() == 1, task  # the calls enclosing it, and those after, pass
    table.to_excel(tmp_path / "compare_result_x.xlsx", index=False)
    assert first_error_row(tmp_path / "compare_result_x.xlsx")["NPU Name"] == row["NPU Name"]
    table[table["Result"] != "error"].to_csv(tmp_path / "passing.csv", index=False)
    assert first_error_row(tmp_path / "passing.csv") is None
    table[["NPU Name"]].to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(DumpError, match="other.csv has no NPU Name, Result and Err_message columns"):
        first_error_row(tmp_path / "other.csv")


def test_write_dump_round_trips_dtypes_as_torch_tensors(tmp_path):
    import torch

    bf16 = np.array([[1.5, -2.25], [3.0, 0.1]], np.float32).astype(ml_dtypes.bfloat16)
    call = ModuleCall("model.layers.0.mlp", "Qwen2MLP", [bf16, np.arange(6, dtype=np.int64)],
                      [np.array([True, False]), np.float16(2.5)], {"weight": np.ones((2, 2))})
    dump = read_dump(write_dump(tmp_path / "d", [call, call]))
    first, second = dump.entries
    assert (first.name, second.name) == ("Module.model.layers.0.mlp.Qwen2MLP.forward.0",
                                         "Module.model.layers.0.mlp.Qwen2MLP.forward.1")
    x, ids = first.inputs()
    assert torch.load(x.path, weights_only=True).dtype == torch.bfloat16
    assert x.load(keep_dtype=True).dtype == ml_dtypes.bfloat16
    assert x.load(keep_dtype=True).view(np.uint16).tolist() == bf16.view(np.uint16).tolist()
    assert (x.max, x.min, ids.max, ids.mean) == (3.0, -2.25, 5, None)
    flag, scalar = first.outputs()
    assert (flag.max, flag.min, scalar.shape, scalar.mean) == (True, False, (), 2.5)
    weight = first.parameters["weight"]
    assert (weight.dtype, weight.mean, weight.requires_grad, x.requires_grad) == ("float64", None, True, False)


def test_write_dump_refuses_a_non_empty_target_and_leaves_nothing_when_it_fails(tmp_path):
    call = ModuleCall("lm_head", "Linear", [np.ones(3, np.float32)], [np.ones(2, np.float32)])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(DumpError, match="exists and is not empty") as e:
        write_dump(tmp_path / "taken", [call])
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    assert write_dump(tmp_path / "empty", [call]) == tmp_path / "empty" / "step0" / "rank0"
    with pytest.raises(TypeError):
        write_dump(tmp_path / "broken", [call, ModuleCall("x", "Linear", [object()], [])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_write_leaves_nothing_and_still_ends_the_process(tmp_path, signum):
    script = f"""
import os, signal, sys
import numpy as np
from accel.msprobe_dump import ModuleCall, write_dump

signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored

class Signals:  # signals its process while write_dump converts it
    def __array__(self, dtype=None, copy=None):
        os.kill(os.getpid(), {int(signum)})
        return np.zeros(3, np.float32)

ok = ModuleCall("a", "Linear", [np.ones(3, np.float32)], [np.ones(3, np.float32)])
write_dump(sys.argv[1], [ok, ModuleCall("b", "Linear", [Signals()], [])])
print("not reached")
"""
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == -signum and "not reached" not in r.stdout, r.stderr  # ended by the signal
    assert list(tmp_path.iterdir()) == []


def test_read_dump_picks_steps_and_ranks_and_names_the_choices(tmp_path):
    call = ModuleCall("lm_head", "Linear", [np.ones(3, np.float32)], [np.full(2, 7.0, np.float32)])
    for step, rank in (("step0", "rank0"), ("step0", "rank1"), ("step1", "proc42"), ("step2", "rank")):
        folder = write_dump(tmp_path / f"{step}-{rank}", [call])
        (tmp_path / "root" / step).mkdir(parents=True, exist_ok=True)
        folder.rename(tmp_path / "root" / step / rank)
    with pytest.raises(DumpError, match=r"holds 3 steps: pass step= one of step0, step1, step2$"):
        read_dump(tmp_path / "root")
    with pytest.raises(DumpError, match=r"holds 2 ranks: pass rank= one of rank0, rank1$"):
        read_dump(tmp_path / "root", step=0)
    with pytest.raises(DumpError, match=r"has no rank5: pass rank= one of rank0, rank1$"):
        read_dump(tmp_path / "root" / "step0", rank=5)
    assert read_dump(tmp_path / "root", step=0, rank=1).path == tmp_path / "root" / "step0" / "rank1"
    dump = read_dump(tmp_path / "root", step=1)  # its only one, proc42
    assert dump.path.name == "proc42" and dump.entries[0].outputs()[0].load().tolist() == [7.0, 7.0]
    assert read_dump(tmp_path / "root" / "step2").path.name == "rank"  # a single card's, numberless
    with pytest.raises(DumpError, match="not an msprobe dump"):
        read_dump(tmp_path)


def test_broken_dumps_are_one_line_errors_naming_the_file(tmp_path):
    import torch

    call = ModuleCall("lm_head", "Linear", [np.ones(3, np.float32)], [np.ones(2, np.float32)])

    def broken(name):
        return write_dump(tmp_path / name, [call])

    def one_line(match, fn, *args):
        with pytest.raises(DumpError, match=match) as e:
            fn(*args)
        assert "\n" not in str(e.value)

    folder = broken("cut")
    (folder / "dump.json").write_text((folder / "dump.json").read_text()[:200])
    one_line(r"cut/step0/rank0/dump.json is not valid JSON .*dump again", read_dump, tmp_path / "cut")
    folder = broken("missing")
    (folder / "dump_tensor_data" / "Module.lm_head.Linear.forward.0.output.0.pt").unlink()
    one_line(r"names Module.lm_head.Linear.forward.0.output.0.pt, missing from .*missing/step0/rank0/dump_tensor_data",
             read_dump, tmp_path / "missing")
    folder = broken("other")
    data = folder / "dump_tensor_data"
    torch.save({"x": torch.ones(2)}, data / "Module.lm_head.Linear.forward.0.output.0.pt")
    torch.save(Path("."), data / "Module.lm_head.Linear.forward.0.input.0.pt")  # weights_only refuses it
    entry = read_dump(folder).entries[0]
    one_line(r"output.0.pt holds a dict, not the bare tensor", entry.outputs()[0].load)
    one_line(r"input.0.pt is not a tensor file torch.load\(weights_only=True\) reads \(UnpicklingError\)",
             entry.inputs()[0].load)
