"""accel.migrate / `accel run`: CUDA-written PyTorch code, unmodified, on cpu; reversible patching."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from accel import cli, migrate
from accel.errors import TargetUnavailable, UsageError
from tests.conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "migrate"
TORCH_NPU_EXPORTS = {line for line in (FIXTURES / "torch_npu_exports.txt").read_text().split("\n")
                     if line and not line.startswith("#")}

# Entry points a CUDA script touches, named here independently of accel.migrate's own list.
PATCHED = [
    (torch.Tensor, "cuda"), (torch.Tensor, "to"), (torch.Tensor, "new_zeros"), (torch.nn.Module, "cuda"),
    (torch.nn.Module, "to"), (torch, "zeros"), (torch, "tensor"), (torch, "randn"), (torch, "arange"), (torch, "load"),
    (torch.cuda, "is_available"), (torch.cuda, "device_count"), (torch.cuda, "set_device"),
    (torch.cuda, "synchronize"), (torch.cuda, "memory_allocated"), (torch.cuda, "max_memory_allocated"),
    (torch.cuda, "reset_peak_memory_stats"), (torch.cuda, "empty_cache"), (torch.cuda, "Stream"),
    (torch.cuda, "Event"), (torch.cuda, "current_stream"), (torch.cuda, "stream"), (torch.cuda, "manual_seed"),
    (torch.cuda, "manual_seed_all"), (torch.cuda, "get_rng_state"), (torch.cuda, "set_rng_state"),
    (torch.amp.autocast_mode.autocast, "__init__"), (torch.amp.grad_scaler.GradScaler, "__init__"),
    (dist, "init_process_group"), (DistributedDataParallel, "__init__"), (torch.cuda, "get_device_properties"),
    (torch.cuda, "get_device_capability"), (torch.cuda, "mem_get_info"), (torch.cuda, "ipc_collect"),
    (torch.cuda, "memory_summary"), (torch.cuda.nvtx, "range_push"), (torch.cuda, "LongTensor"),
    (torch, "Generator"), (torch.Tensor, "pin_memory"), (torch.cuda, "CUDAGraph"),
]
UNRELATED = [(torch, "add"), (torch, "matmul"), (torch.Tensor, "add"), (torch.Tensor, "cpu"),
             (torch.nn.functional, "linear"), (torch.cuda, "get_sync_debug_mode"), (torch, "manual_seed"),
             (torch.Tensor, "is_cuda")]


@pytest.fixture
def on_cpu():
    migrate.disable()
    migrate.enable("torch:cpu")
    yield
    migrate.disable()


def test_enable_patches_and_disable_restores_the_original_objects():
    before = {(owner, name): getattr(owner, name) for owner, name in PATCHED + UNRELATED}
    inherited = "cuda" in vars(torch.Tensor)
    migrate.enable("torch:cpu")
    try:
        for owner, name in PATCHED:
            assert getattr(owner, name) is not before[owner, name], f"{owner.__name__}.{name} was not patched"
        for owner, name in UNRELATED:
            assert getattr(owner, name) is before[owner, name], f"{owner.__name__}.{name} should be untouched"
    finally:
        migrate.disable()
    for owner, name in PATCHED + UNRELATED:
        assert getattr(owner, name) is before[owner, name], f"{owner.__name__}.{name} not restored"
    assert ("cuda" in vars(torch.Tensor)) == inherited  # Tensor.cuda lives on TensorBase: removed, not copied
    assert migrate.enabled() is None


def test_enable_twice_is_enable_once_and_logs_one_line(caplog):
    migrate.disable()
    with caplog.at_level(logging.INFO, logger="accel.migrate"):
        assert migrate.enable("torch:cpu") == "torch:cpu"
        patched_once = torch.cuda.synchronize
        assert migrate.enable("torch:cpu") == "torch:cpu"
        assert migrate.enable() == "torch:cpu"
        assert torch.cuda.synchronize is patched_once
    try:
        lines = [r.getMessage() for r in caplog.records if r.name == "accel.migrate"]
        assert len(lines) == 1
        assert "torch:cpu" in lines[0] and "torch.cuda.synchronize" in lines[0] and "torch.Tensor.cuda" in lines[0]
        with pytest.raises(UsageError, match="already enabled for torch:cpu"):
            migrate.enable("torch:npu")
    finally:
        migrate.disable()
    migrate.disable()  # a second disable is harmless
    assert torch.cuda.synchronize is not patched_once


def test_cuda_devices_land_on_cpu_and_other_devices_stay(on_cpu):
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 1)).device.type == "cpu"
    assert torch.tensor([1.0], device="cuda:0").device.type == "cpu"
    x = torch.arange(3.0)
    for moved in (x.cuda(), x.cuda(1), x.to("cuda"), x.to("cuda:1", torch.float64), x.to(device="cuda"), x.to(0),
                  x.new_zeros(2, device="cuda")):
        assert moved.device.type == "cpu"
    assert x.to("cuda:1", torch.float64).dtype == torch.float64
    assert torch.zeros(2, device="meta").device.type == "meta"  # not CUDA: left alone
    net = torch.nn.Linear(3, 2).cuda()
    assert net(x.cuda()).shape == (2,)
    assert torch.nn.Linear(3, 2).to("cuda").weight.device.type == "cpu"
    with torch.device("cuda"):
        assert torch.empty(1).device.type == "cpu"


def test_torch_cuda_namespace_on_cpu(on_cpu):
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
    torch.cuda.set_device(1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.empty_cache()
    assert torch.cuda.max_memory_allocated() >= torch.cuda.memory_allocated() > 0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    time.sleep(0.02)
    end.record()
    assert end.query() and 15 <= start.elapsed_time(end) < 2000  # milliseconds, as CUDA events report
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert torch.cuda.current_stream() is side
        side.wait_stream(torch.cuda.default_stream())
    assert torch.cuda.current_stream() is torch.cuda.default_stream()
    torch.cuda.current_stream().synchronize()


def test_device_queries_have_a_host_meaning(on_cpu):
    capability = torch.cuda.get_device_capability()
    assert capability < (8, 0) and capability[0] == 0  # `cap[0] >= 8` gates CUDA-only kernels off
    props = torch.cuda.get_device_properties(0)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert props.name == "cpu" and abs(props.total_memory - total) < 2**20 and props.major == 0
    free, whole = torch.cuda.mem_get_info()
    assert 0 < free <= whole and abs(whole - total) < 2**20
    torch.cuda.ipc_collect()
    assert torch.cuda.get_arch_list() == [] and torch.cuda.is_initialized()
    assert torch.cuda.is_bf16_supported() and torch.cuda.is_bf16_supported(including_emulation=False)


def test_memory_statistics_measure_the_process(on_cpu):
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, written, so resident
    grown = torch.cuda.memory_allocated() - before
    assert 56 << 20 < grown < 200 << 20
    assert torch.cuda.max_memory_allocated() >= torch.cuda.memory_allocated()
    stats = torch.cuda.memory_stats()
    assert stats["allocated_bytes.all.peak"] >= stats["allocated_bytes.all.current"] > 0
    summary = torch.cuda.memory_summary()
    assert "resident" in summary and "GiB" in summary  # torch's own summary raised KeyError here
    del big
    torch.cuda.set_per_process_memory_fraction(0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        torch.cuda.set_per_process_memory_fraction(1.5)


def test_legacy_types_generators_pinning_and_annotations(on_cpu):
    ids = torch.cuda.LongTensor([3, 1])
    assert ids.dtype == torch.int64 and ids.device.type == "cpu" and isinstance(ids, torch.cuda.LongTensor)
    x = torch.arange(3.0)
    assert x.type("torch.cuda.HalfTensor").dtype == torch.float16
    assert x.type(torch.cuda.DoubleTensor).dtype == torch.float64  # not silently float32
    assert x.type() == "torch.FloatTensor"
    g = torch.Generator(device="cuda").manual_seed(5)
    assert g.device.type == "cpu" and isinstance(g, torch.Generator)
    assert isinstance(torch.default_generator, torch.Generator)  # the real class's instances still pass
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=torch._C.Generator().manual_seed(5)))
    assert torch.cuda.default_generators[0] is torch.default_generator
    assert x.pin_memory() is x and x.pin_memory().to("cuda", non_blocking=True).device.type == "cpu"
    assert torch.empty(2, pin_memory=True).shape == (2,)
    with torch.cuda.nvtx.range("step"):
        assert torch.cuda.nvtx.range_push("inner") == 1
        assert torch.cuda.nvtx.range_pop() == 1
    assert torch.cuda.nvtx.range_pop() == -1  # nothing left open
    torch.cuda.nvtx.mark("here")


def test_precision_switches_leave_cpu_results_alone(on_cpu):
    a, b = torch.randn(64, 64, dtype=torch.float32), torch.randn(64, 64)
    exact = a @ b
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_flash_sdp(True)
        assert torch.equal(a @ b, exact)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_a_call_with_no_host_equivalent_stops_with_one_line(tmp_path, capsys):
    migrate.disable()
    script = tmp_path / "graphs.py"
    script.write_text("import torch\n\ng = torch.cuda.CUDAGraph()\n")
    assert migrate.launch(["python", str(script)], "torch:cpu") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{script}:3: torch.cuda.CUDAGraph has no equivalent on torch:cpu" in err


def test_the_table_is_what_enable_patches():
    """Every row that is not `unchanged` is replaced on cpu, under its row's name, and nothing else is."""
    device_arguments, rows = migrate.table()
    labels = {label for *_, label in migrate._patches(migrate.Target("cpu", None))}
    expected = {n for n, r in rows.items() if r.kind("cpu") != "unchanged"}
    functions = {f"{owner}.{n}" for owner, names in device_arguments.items() if owner != "with_indices"
                 for n in names if hasattr(migrate._object(owner), n)}
    functions |= {f"{owner}.{n}" for owner, names in device_arguments["with_indices"].items() for n in names}
    assert labels == expected | functions
    for name, row in rows.items():  # a dotted npu object is one torch_npu 2.7.1 exports
        if row.kind("npu") == "object" and row.columns["npu"].startswith("torch.npu."):
            assert row.columns["npu"].removeprefix("torch.npu.").split(".")[0] in TORCH_NPU_EXPORTS, name


def test_cuda_rng_is_the_cpu_generator(on_cpu):
    torch.cuda.manual_seed(7)
    a = torch.randn(4, device="cuda")
    torch.manual_seed(7)  # calls torch.cuda.manual_seed_all inside torch: must not recurse
    b = torch.randn(4)
    assert torch.equal(a, b)
    state = torch.cuda.get_rng_state()
    c = torch.randn(3, device="cuda")
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.randn(3), c)


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp:FutureWarning")  # deprecated, still in CUDA scripts
def test_autocast_and_grad_scaler_on_cuda_run_on_cpu(on_cpu):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cuda"):  # CUDA's default autocast dtype is float16, and stays so
        assert (a @ b).dtype == torch.float16
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with torch.cuda.amp.autocast(dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        assert (a @ b).dtype == torch.float32
    loss = (a @ b).sum()
    for scaler in (torch.cuda.amp.GradScaler(), torch.amp.GradScaler("cuda"), torch.amp.GradScaler()):
        assert scaler.is_enabled()  # on a CPU build an unmapped CUDA scaler disables itself
        assert torch.equal(scaler.scale(loss), loss * 65536.0)


def test_unmapped_cuda_scaler_disables_itself_without_migrate():
    migrate.disable()
    with pytest.warns(UserWarning):
        assert not torch.amp.GradScaler("cuda").is_enabled()


def test_torch_load_map_location(on_cpu, tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    for location in ("cuda", "cuda:1", torch.device("cuda", 0), {"cpu": "cuda:0"}):
        buf.seek(0)
        loaded = torch.load(buf, map_location=location)["w"]
        assert loaded.device.type == "cpu" and torch.equal(loaded, torch.arange(4.0))


def _saved_on_cuda() -> bytes:
    """A checkpoint whose storages are tagged cuda:0, as if written on a GPU: torch's own location
    registry tags them (torch.serialization.register_package)."""
    from torch.serialization import _package_registry, register_package

    entry = (0, lambda storage: "cuda:0", lambda storage, location: None)
    register_package(*entry)
    try:
        buf = io.BytesIO()
        torch.save({"w": torch.arange(3.0)}, buf)
    finally:
        _package_registry.remove(entry)
    return buf.getvalue()


def test_checkpoint_written_on_cuda_loads_on_the_target():
    data = _saved_on_cuda()
    migrate.disable()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(io.BytesIO(data))
    migrate.enable("torch:cpu")
    try:
        loaded = torch.load(io.BytesIO(data))["w"]
    finally:
        migrate.disable()
    assert loaded.device.type == "cpu" and torch.equal(loaded, torch.arange(3.0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="expects a machine without CUDA or NPU")
def test_target_selection(monkeypatch):
    migrate.disable()
    monkeypatch.delenv("ACCEL_TARGET", raising=False)
    with pytest.raises(TargetUnavailable, match="torch_npu is not installed"):
        migrate.enable("torch:npu")
    assert migrate.enabled() is None and not torch.cuda.is_available()  # nothing half-patched
    with pytest.raises(UsageError, match="not a torch target"):
        migrate.enable("mindspore:cpu")
    monkeypatch.setenv("ACCEL_TARGET", "torch:npu")
    with pytest.raises(TargetUnavailable, match="ACCEL_TARGET"):
        migrate.enable()
    monkeypatch.delenv("ACCEL_TARGET")
    try:
        assert migrate.enable() == "torch:cpu"  # npu and cuda are not available here
    finally:
        migrate.disable()


def test_npu_and_cpu_mappings():
    npu, npu3, cpu = migrate.Target("npu", None), migrate.Target("npu", 3), migrate.Target("cpu", None)
    assert [npu.map_str(s) for s in ("cuda", "cuda:1", "cpu", "cudax", "meta")] == ["npu", "npu:1", "cpu", "cudax",
                                                                                    "meta"]
    assert npu3.map_str("cuda") == "npu:3" and npu3.map_str("cuda:0") == "npu:0"
    assert cpu.map_str("cuda:5") == "cpu"
    assert npu.backend("nccl") == "hccl" and cpu.backend("nccl") == "gloo" and npu.backend("gloo") == "gloo"
    assert npu.backend("cpu:gloo,cuda:nccl") == "cpu:gloo,npu:hccl"
    assert cpu.backend("cpu:gloo,cuda:nccl") == "cpu:gloo"
    assert cpu.map(torch.device("cuda", 2)) == torch.device("cpu") and cpu.map(torch.device("meta")).type == "meta"
    assert cpu.map(1, ints=True) == torch.device("cpu") and cpu.map(1) == 1 and cpu.map(True, ints=True) is True


def test_launch_runs_a_script_as_main_with_its_argv_and_exit_code(tmp_path, capsys):
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, torch\n"
        "x = torch.ones(2).cuda()\n"
        "print(__name__, sys.argv[1:], x.device.type, torch.cuda.is_available())\n"
        "sys.exit(int(sys.argv[1]))\n")
    argv = sys.argv[:]
    assert migrate.launch(["python", str(script), "3", "--lr", "0.1"], "torch:cpu") == 3
    assert capsys.readouterr().out == "__main__ ['3', '--lr', '0.1'] cpu True\n"
    assert sys.argv == argv and migrate.enabled() is None  # restored after the script
    assert migrate.launch([str(script), "0"], "torch:cpu") == 0


def test_launch_runs_a_module_and_reports_a_failure_like_python(tmp_path, monkeypatch, capsys):
    (tmp_path / "jobmod.py").write_text("import sys\nprint('module', __name__, sys.argv[1:])\n")
    (tmp_path / "broken.py").write_text("def f():\n    raise ValueError('boom')\nf()\n")
    monkeypatch.chdir(tmp_path)
    assert migrate.launch(["python", "-u", "-m", "jobmod", "a"], "torch:cpu") == 0
    assert capsys.readouterr().out == "module __main__ ['a']\n"
    assert migrate.launch(["python", "broken.py"], "torch:cpu") == 1
    err = capsys.readouterr().err
    assert "ValueError: boom" in err and "broken.py" in err and "migrate.py" not in err and "runpy" not in err
    for bad, message in ((["torchrun", "x.py"], "accel.migrate"), (["python", "-c", "1"], "-c"),
                         (["python"], "no script"), (["python", "missing.py"], "does not exist")):
        with pytest.raises(UsageError, match=message):
            migrate.launch(bad, "torch:cpu")


def test_accel_run_command(tmp_path, capsys):
    script = tmp_path / "job.py"
    script.write_text("import sys, torch\nprint(torch.zeros(1, device='cuda').device)\nsys.exit(len(sys.argv))\n")
    done = run_cli("run", "--target", "torch:cpu", "--", "python", str(script), "-v", "--target", "x")
    assert done.returncode == 4 and done.stdout == "cpu\n"  # the script's own -v/--target are its arguments
    assert cli.main(["run", "--target", "torch:npu", "--", "python", str(script)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "torch_npu is not installed" in err


def _launch(*args: str) -> None:
    """Two ranks on this machine through torch.distributed's own launcher."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.05)
    elastic_launch(config, sys.executable)(*args)


def test_cuda_ddp_script_runs_unmodified_on_cpu_with_the_cpu_scripts_loss(tmp_path):
    migrate.disable()
    _launch("-m", "accel.migrate", "--target", "torch:cpu", str(FIXTURES / "train_cuda.py"),
            str(tmp_path / "cuda.json"))
    _launch(str(FIXTURES / "train_cpu.py"), str(tmp_path / "cpu.json"))
    ported = json.loads((tmp_path / "cuda.json").read_text())
    reference = json.loads((tmp_path / "cpu.json").read_text())
    assert (ported["device"], ported["backend"], ported["world"]) == ("cpu", "gloo", 2)
    assert ported["loss"] == reference["loss"]  # the same computation, bit for bit
    assert ported["first_loss"] == reference["first_loss"]
    assert ported["loss"] < 0.95 * ported["first_loss"]  # it trained


def test_the_cuda_fixture_really_needs_cuda():
    """Without accel.migrate the CUDA fixture fails on this machine: the test above proves the mapping."""
    done = subprocess.run([sys.executable, str(FIXTURES / "train_cuda.py"), os.devnull], capture_output=True,
                          text=True, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, timeout=120)
    assert done.returncode != 0 and "needs a CUDA device" in done.stderr


def test_device_context_works_again_after_disable():
    # torch caches the factory functions its device context intercepts; a cache built while patched
    # must not outlive disable() (transformers builds models under a meta-device context)
    migrate.disable()
    migrate.enable("torch:cpu")
    with torch.device("cuda"):
        assert torch.empty(1).device.type == "cpu"
    migrate.disable()
    with torch.device("meta"):
        assert torch.empty(2).is_meta and torch.zeros(3).is_meta


# --- a nanoGPT-shaped training script, unmodified ---------------------------------------------------------

NANOGPT = FIXTURES / "nanogpt_train.py"
# the same file as the plain CPU version: cpu device, gloo, and the fused AdamW that nanoGPT picks on CUDA
PLAIN_CPU = ("--device=cpu", "--backend=gloo", "--fused=True")
# Both versions on one intra-op thread: float32 sums split over a different thread count differ in the last
# bits, and the thread count torch picks depends on what else runs on the machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _plain(out: Path, *config: str) -> dict:
    done = subprocess.run([sys.executable, str(NANOGPT), *PLAIN_CPU, f"--out_json={out}", *config],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, **ONE_THREAD})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def _ported(out: Path, *config: str) -> tuple[dict, str]:
    done = run_cli("run", "--target", "torch:cpu", "--", "python", str(NANOGPT), f"--out_json={out}", *config,
                   env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_nanogpt_shaped_training_runs_unmodified_with_the_plain_cpu_losses(tmp_path):
    ported, stdout = _ported(tmp_path / "ported.json", "--dtype=float32")
    plain = _plain(tmp_path / "plain.json", "--dtype=float32")
    assert (ported["device"], ported["fused"], ported["scaler_enabled"]) == ("cpu", True, False)
    assert ported["train_loss"] == plain["train_loss"] and ported["eval"] == plain["eval"]  # bit for bit
    assert ported["resumed_equal"]  # torch.load(map_location='cuda') of its own checkpoint
    assert "compute capability 0.0: flash attention off" in stdout and "resident" in stdout  # memory_summary
    assert ported["max_memory_allocated"] > 0


def test_nanogpt_shaped_training_under_autocast_and_grad_scaler(tmp_path):
    fp32, _ = _ported(tmp_path / "fp32.json", "--dtype=float32")
    default, _ = _ported(tmp_path / "default.json")  # dtype from torch.cuda.is_bf16_supported()
    fp16, _ = _ported(tmp_path / "fp16.json", "--dtype=float16")
    assert default["dtype"] == "bfloat16" and not default["scaler_enabled"]
    assert fp16["scaler_enabled"] and fp16["scale"] > 1  # GradScaler('cuda') scales on the host
    for run in (default, fp16):  # autocast really ran in the low precision, and training still works
        assert run["train_loss"] != fp32["train_loss"]
        assert max(abs(a - b) for a, b in zip(run["train_loss"], fp32["train_loss"])) < 0.05
        assert run["eval"][-1]["train"] < run["eval"][0]["train"] + 0.05


def test_nanogpt_shaped_training_compiled(tmp_path):
    ported, _ = _ported(tmp_path / "ported.json", "--dtype=float32", "--compile=True")
    plain = _plain(tmp_path / "plain.json", "--dtype=float32", "--compile=True")
    assert ported["train_loss"] == plain["train_loss"] and ported["eval"] == plain["eval"]


def test_nanogpt_shaped_training_on_two_ranks_over_nccl(tmp_path):
    migrate.disable()
    _launch("-m", "accel.migrate", "--target", "torch:cpu", str(NANOGPT), f"--out_json={tmp_path / 'ported.json'}",
            "--dtype=float32")
    _launch(str(NANOGPT), *PLAIN_CPU, f"--out_json={tmp_path / 'plain.json'}", "--dtype=float32")
    ported, plain = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ported", "plain"))
    assert ported["world"] == 2 and ported["device"] == "cpu"
    assert ported["train_loss"] == plain["train_loss"] and ported["eval"] == plain["eval"]
