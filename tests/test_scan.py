"""`accel scan`: planted CUDA ties are found at the right line in every kind of file, look-alikes are not,
severities follow what happens under migrate, the table is reviewed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from accel import cli
from accel.errors import AccelError, UsageError
from accel.scan import SEVERITIES, TARGETS, Triggers, load_table, scan, scan_source
from tests.conftest import run_cli

REPO = Path(__file__).parent / "fixtures" / "scan_repo"
TABLE = Path(__file__).parents[1] / "accel" / "scan_patterns.yaml"
EXPECT = re.compile(r"#\s*expect:\s*([\w\-, ]+)$")


def fixture_files(root: Path = REPO) -> list[Path]:
    """Every file of the fixture repository that scan reads: all but the .expect sidecars."""
    return [f for f in root.rglob("*") if f.is_file() and f.suffix != ".expect"]


def planted(root: Path = REPO) -> set[tuple[str, int, str]]:
    """(file, line, pattern) for every `# expect: pattern` marker in the fixture repository, and for every
    `LINE PATTERN` line of a FILE.expect sidecar (JSON has no comments to put a marker in)."""
    out = set()
    for file in fixture_files(root):
        rel = file.relative_to(root).as_posix()
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if m := EXPECT.search(line):
                out |= {(rel, number, p.strip()) for p in m.group(1).split(",")}
        sidecar = file.with_name(file.name + ".expect")
        if sidecar.exists():
            out |= {(rel, int(n), p) for n, p in (ln.split() for ln in sidecar.read_text().splitlines())}
    return out


def table() -> dict[str, dict]:
    return {p["id"]: p for p in yaml.safe_load(TABLE.read_text())["patterns"]}


def run(*args: str, capsys) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().out


def test_finds_every_planted_tie_at_its_line_and_nothing_else():
    expected = planted()
    assert len(expected) >= 100 and {p for *_, p in expected} == set(table())  # one of each pattern, at least
    kinds = {Path(file).suffix or Path(file).name for file, *_ in expected}
    assert {".py", ".txt", ".toml", ".json", ".yaml", ".sh", "Makefile"} <= kinds
    found = {(f.file, f.line, f.pattern) for f in scan(REPO).findings}
    assert found - expected == set(), "false positives"
    assert expected - found == set(), "missed"


def test_look_alikes_are_not_findings():
    findings = scan(REPO).findings
    assert not [f for f in findings if f.file == "utils/lookalikes.py"]
    assert not [f for f in findings if f.file == "configs/model_config.json"]  # not a DeepSpeed config
    for f in findings:
        assert "look-alike" not in (REPO / f.file).read_text().splitlines()[f.line - 1], f


@pytest.mark.parametrize("target", TARGETS)
def test_severity_and_replacement_come_from_the_table(target):
    rules = table()
    report = scan(REPO, target)
    assert report.findings
    for f in report.findings:
        rule = rules[f.pattern]["targets"][target]
        severity = "informational" if f.guard else rule["severity"]  # optional: the code runs without it
        assert (f.severity, f.replacement) == (severity, rule["replacement"].strip())


def test_replacements_name_the_target_api():
    by_pattern = {t: {f.pattern: f for f in scan(REPO, t).findings} for t in TARGETS}
    assert "torch_npu.npu_fusion_attention" in by_pattern["npu"]["flash-attn"].replacement
    assert "mindspore.ops.flash_attention_score" in by_pattern["mindspore"]["flash-attn"].replacement
    assert "torch_npu.npu_rms_norm" in by_pattern["npu"]["apex-normalization"].replacement
    assert by_pattern["npu"]["bitsandbytes"].severity == "no-equivalent"
    assert by_pattern["npu"]["torch-cuda-api"].severity == "runs-via-migrate"
    assert by_pattern["mindspore"]["torch-cuda-api"].severity == "needs-replacement"
    assert by_pattern["npu"]["cuda-string-compare"].severity == "needs-replacement"
    # a test of the script's own device string ('cuda' in device) still takes the CUDA branch under migrate
    assert by_pattern["npu"]["cuda-string-test"].severity == "runs-via-migrate"
    assert by_pattern["npu"]["cuda-string-test"].migrate and not by_pattern["npu"]["cuda-string-compare"].migrate


def test_the_table_is_reviewed_data():
    patterns = load_table().patterns
    assert [p.id for p in patterns] == list(table())
    for p in patterns:
        assert set(p.rules) == set(TARGETS)
        for rule in p.rules.values():
            assert rule.severity in SEVERITIES and len(rule.reason) > 15 and rule.replacement.strip()


def _broken(tmp_path, change, match):
    data = yaml.safe_load(TABLE.read_text())
    change(data, {p["id"]: p for p in data["patterns"]})
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(AccelError, match=match):
        load_table(tmp_path / "t.yaml")


def test_a_broken_table_is_rejected(tmp_path):
    _broken(tmp_path, lambda d, p: p["torch-cuda-api"]["targets"]["npu"].pop("reason"),
            "torch-cuda-api: npu: reason")
    _broken(tmp_path, lambda d, p: p["torch-cuda-other"]["targets"]["npu"].update(severity="maybe"),
            "severity must be one of")
    # migrate runs torch code only: a non-torch column cannot claim it
    _broken(tmp_path, lambda d, p: p["cuda-method"]["targets"]["mindspore"].update(severity="runs-via-migrate"),
            "mindspore: runs-via-migrate is for torch targets")
    _broken(tmp_path, lambda d, p: p["ds-fused-adam"]["match"]["config"][0].update({"in": "hydra"}),
            "config `in` must be any or one of deepspeed, accelerate")
    _broken(tmp_path, lambda d, p: p["pin-memory"]["match"]["keywords"][0].update(values="true"),
            "values must be a list of constants")
    _broken(tmp_path, lambda d, p: p["cuda-string-compare"]["match"].update(compare="sometimes"),
            "compare must be true or device")
    _broken(tmp_path, lambda d, p: d.update(files=dict(reversed(d["files"].items()))),
            "files must map setup, python")
    _broken(tmp_path, lambda d, p: d["guards"].pop("names"), "guards must list")


def test_migrate_claims_match_what_accel_migrate_maps():
    """What the table calls runs-via-migrate under torch.cuda is exactly what accel.migrate's table maps on
    npu, and each of those it replaces on cpu too (unless its cpu row says torch's own object does it)."""
    from accel import migrate

    rows = migrate.table()[1]
    listed = set(table()["torch-cuda-api"]["match"]["names"])
    mapped = {n for n, r in rows.items()
              if n.startswith("torch.cuda.") and r.kind("npu") not in ("unchanged", "refuse")}
    assert listed == mapped | {"torch.cuda.amp.autocast"}  # autocast: its __init__ is torch.autocast's, mapped
    replaced = [n for n in mapped if rows[n].kind("cpu") != "unchanged"]
    originals = {n: getattr(*migrate._resolve_name(n)) for n in replaced}
    migrate.enable("torch:cpu")
    try:
        assert [n for n, original in originals.items() if getattr(*migrate._resolve_name(n)) is original] == []
    finally:
        migrate.disable()


def test_the_other_migrate_claims_are_rows_accel_migrate_maps_on_npu():
    """TF32 flags, .cuda() and pinned memory are runs-via-migrate because migrate's table maps them on npu."""
    from accel import migrate

    mapped = {name for name, row in migrate.table()[1].items() if row.kind("npu") not in ("unchanged", "refuse")}
    rules = table()
    assert set(rules["tf32-flags"]["match"]["names"]) <= mapped
    for pid in ("cuda-method", "pin-memory", "tf32-flags"):
        assert rules[pid]["targets"]["npu"]["severity"] == "runs-via-migrate"
        assert {f"torch.Tensor.{m}" for m in rules[pid]["match"].get("method_call", [])} <= mapped


def test_json_output(capsys):
    code, out = run("scan", str(REPO), "--format", "json", "--fail-on", "none", capsys=capsys)
    data = json.loads(out)
    assert code == 0 and set(data) == {"findings", "summary"}
    keys = {"file", "line", "pattern", "severity", "replacement", "migrate", "guard"}
    assert all(set(f) == keys for f in data["findings"])
    assert {(f["file"], f["line"], f["pattern"]) for f in data["findings"]} == planted()
    rules = table()
    for f in data["findings"]:  # migrate: what the rule says, even where a guard makes the finding informational
        assert f["migrate"] is (rules[f["pattern"]]["targets"]["npu"]["severity"] == "runs-via-migrate")
        assert (f["guard"] is not None) is (f["file"] == "optional.py")
    summary = data["summary"]
    assert summary["findings"] == len(data["findings"]) == sum(summary["by_severity"].values())
    assert list(summary["by_severity"]) == list(SEVERITIES) and summary["by_severity"]["informational"] > 0
    assert summary["files"] == len(fixture_files()) and summary["target"] == "npu"
    assert summary["warnings"] == [] and summary["failed"] is False


def test_exit_code_follows_fail_on(tmp_path, capsys):
    assert run("scan", str(REPO), capsys=capsys)[0] == 1  # default no-equivalent: bitsandbytes, cupy, ...
    assert run("scan", str(REPO), "--fail-on", "none", capsys=capsys)[0] == 0
    (tmp_path / "ok.py").write_text("import torch\ntorch.cuda.synchronize()\n")
    assert run("scan", str(tmp_path), capsys=capsys)[0] == 0
    assert run("scan", str(tmp_path), "--fail-on", "needs-replacement", capsys=capsys)[0] == 0
    code, out = run("scan", str(tmp_path), "--fail-on", "runs-via-migrate", capsys=capsys)
    assert code == 1 and out.splitlines()[0].startswith("ok.py:2: runs-via-migrate: torch-cuda-api:")
    code, out = run("scan", str(tmp_path), "--target", "mindspore", "--fail-on", "needs-replacement", capsys=capsys)
    assert code == 1 and "1 files scanned for mindspore: 1 findings" in out


def test_text_and_markdown_end_with_the_summary(capsys):
    _, text = run("scan", str(REPO), capsys=capsys)
    counts = json.loads(run("scan", str(REPO), "--format", "json", capsys=capsys)[1])["summary"]["by_severity"]
    assert f"{counts['no-equivalent']} no-equivalent" in text.splitlines()[-2]
    assert text.splitlines()[-1] == f"{counts['no-equivalent']} findings at or above --fail-on no-equivalent"
    _, md = run("scan", str(REPO), "--format", "md", "--target", "xla", capsys=capsys)
    assert md.startswith("# accel scan:") and "| location | severity | migrate | pattern |" in md
    assert "jax.nn.dot_product_attention" in md
    _, md = run("scan", str(REPO), "--format", "md", capsys=capsys)
    assert "| optional.py:9 | informational | no | bitsandbytes |" in md and "guarded at line 8" in md
    assert "| train.py:31 | runs-via-migrate | yes | cuda-method |" in md
    assert "optional.py:9: informational: bitsandbytes: import bitsandbytes -> " in text
    assert "(optional: guarded at line 8, the code runs without it)" in text


def test_unparsable_files_are_warnings_and_junk_directories_are_skipped(tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo)
    (repo / "broken.py").write_text("import torch\ndef f(:\n    torch.cuda.synchronize()\n")
    (repo / "latin.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8 and no coding cookie
    (repo / "broken.json").write_text('{"zero_optimization": {"stage": 3,}}')  # a trailing comma
    (repo / "broken.yaml").write_text("distributed_type: MULTI_GPU\ngpu_ids: [0, 1\n")
    (repo / "broken.toml").write_bytes(b"x = 1\n")  # not a pyproject.toml: not read
    (repo / "sub").mkdir()
    (repo / "sub" / "pyproject.toml").write_text("[project\n")
    (repo / "tokenizer.json").write_text("{" * 5000)  # nothing a config pattern needs: not even parsed
    tie = "import torch\ntorch.cuda.synchronize()\n"
    for junk in (".git", ".venv/lib", "__pycache__", "node_modules/pkg", "site-packages", "env_custom"):
        (repo / junk).mkdir(parents=True, exist_ok=True)
        (repo / junk / "tie.py").write_text(tie)
    (repo / "env_custom" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    code, out = run("scan", str(repo), "--format", "json", "--fail-on", "none", capsys=capsys)
    summary = json.loads(out)["summary"]
    assert code == 0
    assert {(w["file"], w["line"]) for w in summary["warnings"]} == {
        ("broken.py", 2), ("latin.py", 0), ("broken.json", 0), ("broken.yaml", 3), ("sub/pyproject.toml", 0)}
    assert summary["files"] == len(fixture_files()) + 6
    assert {(f["file"], f["line"], f["pattern"]) for f in json.loads(out)["findings"]} == planted()
    _, text = run("scan", str(repo), "--fail-on", "none", capsys=capsys)
    assert "warning: broken.py:2: not scanned" in text


def test_a_single_file_and_bad_paths(tmp_path, capsys):
    code, out = run("scan", str(REPO / "quant.py"), "--format", "json", capsys=capsys)
    assert code == 1 and json.loads(out)["findings"][0]["file"] == "quant.py"
    code, out = run("scan", str(REPO / "requirements.txt"), "--format", "json", capsys=capsys)
    assert {(f["file"], f["line"], f["pattern"]) for f in json.loads(out)["findings"]} == {
        t for t in planted() if t[0] == "requirements.txt"}
    with pytest.raises(UsageError, match="does not exist"):
        scan(tmp_path / "nope")
    done = run_cli("scan", str(tmp_path / "nope"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_scanning_imports_no_framework():
    code = ("import sys, accel.cli, accel.scan, accel.commands.scan, accel.commands.run\n"
            "accel.cli.build_parser()\n"
            "accel.scan.scan(sys.argv[1]); accel.scan.scan(sys.argv[1], 'torch:npu')\n"
            "print(sorted(m for m in ('torch', 'mindspore', 'jax', 'tvm', 'onnxruntime') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_files_that_cannot_be_source_are_warnings_and_the_scan_goes_on(tmp_path, capsys):
    """A FIFO, a .py linked to /dev/zero, a file past the size limit, nesting that overflows CPython's
    parser, and a name that is not UTF-8: each a warning, none a hang, a crash or a traceback."""
    from accel import scan as scan_mod

    repo = tmp_path / "repo"
    repo.mkdir()
    os.mkfifo(repo / "pipe.py")
    (repo / "zero.py").symlink_to("/dev/zero")
    (repo / "huge.py").write_text("x = 1\n" * ((scan_mod.MAX_SOURCE_BYTES // 6) + 10))
    deep = "(" * 100000 + ")" * 100000
    (repo / "deep.py").write_text(f"import torch\ntorch.cuda.synchronize()\nx = {deep}\n")
    (repo / os.fsdecode(b"caf\xe9.py")).write_text("import torch\ntorch.cuda.synchronize()\n")
    code, out = run("scan", str(repo), "--format", "json", "--fail-on", "none", capsys=capsys)
    report = json.loads(out)
    warned = {w["file"]: w["message"] for w in report["summary"]["warnings"]}
    assert code == 0 and report["summary"]["files"] == 5
    assert "not a regular file" in warned["pipe.py"] and "not a regular file" in warned["zero.py"]
    assert "larger than" in warned["huge.py"] and "deep.py" in warned
    assert [f["file"] for f in report["findings"]] == ["caf\\udce9.py"]
    code, text = run("scan", str(repo), "--fail-on", "none", capsys=capsys)
    assert code == 0 and "caf\\udce9.py" in text


def test_a_file_is_skipped_unparsed_only_when_no_pattern_could_match_in_it(tmp_path):
    """Triggers must never hide a tie: every fixture file with a planted tie trips them and still yields
    that finding, whatever its kind; text that holds the table's words only inside other words, or no tie,
    does not. Every match kind of every pattern is planted, so a kind without its trigger words fails here."""
    t = load_table()
    tied = Triggers(t)
    for file, line, pattern in planted():
        text = (REPO / file).read_text()
        assert tied(text, t.kind(file)), file
        assert any(f.line == line and f.pattern == pattern for f in scan_source(text, file, t, "npu"))
    for text in ("x = [1, 2.5, 'tok_1', \"w\"]\n" * 1000, "import torch\ny = torch.zeros(3)\n",
                 "def load_table(): return {'amplitude': 1}\n"):  # `amp`, `load` only inside other words
        assert not tied(text), text
    assert tied("z = 'cuda:nccl'\n") and tied("torch.cuda.amp.autocast()\n") and tied('d = f"cuda:{rank}"\n')
    assert tied("m(bnb_4bit_quant_type='nf4')\n") and tied("dict(load_in_8bit=True)\n")
    assert not tied('{"optimizer": {"type": "AdamW"}, "fp16": {"enabled": true}}', "config")
    assert tied('{"train_micro_batch_size_per_gpu": 1}', "config") and tied("dist_backend: NCCL\n", "config")
    assert tied("anything at all\n", "requirements") and tied("# nothing\n", "shell")


def test_a_file_that_assigns_torch_has_no_implicit_torch(tmp_path):
    t = load_table()
    assert [f.pattern for f in scan_source("torch.cuda.synchronize()\n", "a.py", t, "npu")]
    assert not scan_source("torch = object()\ntorch.cuda.synchronize()\n", "b.py", t, "npu")
    assert scan_source("import torch\ntorch = torch\ntorch.cuda.synchronize()\n", "c.py", t, "npu")


@pytest.mark.parametrize("target, column", [("torch:npu", "npu"), ("torch-compile:npu:1", "npu"),
                                            ("mindspore:ascend", "mindspore"), ("tvm:llvm", "tvm"), ("xla:tpu", "xla")])
def test_the_target_is_named_as_every_other_command_names_it(target, column, capsys):
    code, out = run("scan", str(REPO), "--target", target, "--format", "json", "--fail-on", "none", capsys=capsys)
    assert code == 0 and json.loads(out)["summary"]["target"] == column
    assert json.loads(out) == json.loads(run("scan", str(REPO), "--target", column, "--format", "json",
                                             "--fail-on", "none", capsys=capsys)[1])


@pytest.mark.parametrize("target, words", [("torch:cpu", "scan has no table for torch:cpu"),
                                           ("onnxruntime:cann", "scan has no table"),
                                           ("cuda", "names no device"), ("foo:bar", "no backend named 'foo'")])
def test_a_target_scan_has_no_table_for_is_one_line(target, words):
    done = run_cli("scan", str(REPO), "--target", target)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert words in done.stderr


def _write(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def _findings(root: Path, files: dict[str, str]) -> list[tuple[int, str, str]]:
    """(line, pattern, severity) of what scan finds for npu in these files, written under root."""
    return [(f.line, f.pattern, f.severity) for f in scan(_write(root, files)).findings]


def test_a_guarded_optional_import_is_informational_and_the_same_import_unguarded_is_not(tmp_path):
    guarded = {f.line: (f.pattern, f.severity, f.guard) for f in scan(REPO).findings if f.file == "optional.py"}
    assert guarded == {9: ("bitsandbytes", "informational", 8), 14: ("flash-attn", "informational", 13),
                       18: ("xformers", "informational", 13), 23: ("bitsandbytes", "informational", 22),
                       26: ("cuda-device-string", "informational", 22), 31: ("triton", "informational", 28),
                       36: ("cupy", "informational", 35)}
    assert _findings(tmp_path / "a", {"q.py": "import bitsandbytes\n"}) == [(1, "bitsandbytes", "no-equivalent")]
    # the fallback of a failed import runs on the target; other exceptions and CUDA's own checks guard nothing
    # (accel run makes torch.cuda.is_available() true, so that branch runs on npu)
    source = ("import torch\n"
              "try:\n    import flash_attn\nexcept ImportError:\n    import xformers\n"
              "try:\n    import bitsandbytes\nexcept AttributeError:\n    pass\n"
              "if torch.cuda.is_available() or is_torch_cuda_available():\n    torch.cuda.synchronize()\n"
              "if not is_apex_available():\n    x = 1\nelse:\n    import apex\n")
    assert _findings(tmp_path / "b", {"g.py": source}) == [
        (3, "flash-attn", "informational"), (5, "xformers", "needs-replacement"),
        (7, "bitsandbytes", "no-equivalent"), (10, "torch-cuda-api", "runs-via-migrate"),
        (11, "torch-cuda-api", "runs-via-migrate"), (15, "apex-other", "informational")]
    # peft's form: a function that returns early unless the package is there; an early return on
    # anything else guards nothing
    source = ("def bnb_4bit():\n    if not is_bnb_available():\n        return False\n"
              "    import bitsandbytes\n    return bitsandbytes\n"
              "def other(x):\n    if not x:\n        return False\n    import bitsandbytes\n")
    assert _findings(tmp_path / "c", {"h.py": source}) == [
        (4, "bitsandbytes", "informational"), (9, "bitsandbytes", "no-equivalent")]


def test_informational_findings_do_not_fail_a_scan_unless_asked(tmp_path, capsys):
    _write(tmp_path, {"opt.py": "try:\n    import bitsandbytes\nexcept ImportError:\n    bitsandbytes = None\n"})
    code, out = run("scan", str(tmp_path), capsys=capsys)
    assert code == 0 and "1 findings (1 informational, 0 runs-via-migrate" in out
    assert run("scan", str(tmp_path), "--fail-on", "runs-via-migrate", capsys=capsys)[0] == 0
    code, out = run("scan", str(tmp_path), "--fail-on", "informational", capsys=capsys)
    assert code == 1 and out.endswith("1 findings at or above --fail-on informational\n")


def test_device_string_tests_follow_what_torch_reports_under_migrate(tmp_path):
    source = ("def f(device, x, args):\n"
              "    a = 'cuda' in device\n"  # the script's own string: migrate maps it where it reaches torch
              "    b = x.device.type == 'cuda'\n"  # torch says npu under accel run
              "    c = str(x.device).startswith('cuda')\n"
              "    d = x.device.type in ('cuda', 'xpu')\n"
              "    e = device in {'cuda', 'cpu'}\n"
              "    match x.device.type:\n        case 'cuda':\n            pass\n"
              "    return torch.device('cuda')\n")
    found = _findings(tmp_path, {"d.py": source})
    test, compare = ("cuda-string-test", "runs-via-migrate"), ("cuda-string-compare", "needs-replacement")
    assert found == [(2, *test), (3, *compare), (4, *compare), (5, *compare), (6, *test), (8, *compare),
                     (10, "cuda-device-string", "runs-via-migrate")]


def test_keyword_arguments_match_by_name_and_constant_value(tmp_path):
    source = ("import torch as th\n"
              "m(load_in_8bit=1)\n"  # 1 is not True
              "m(load_in_8bit=True)\n"
              "m(**{'load_in_4bit': True})\n"
              "m(torch_dtype=th.bfloat16)\n"
              "m(torch_dtype=th.float16, attn_implementation='sdpa', use_flash_attn=False, pin_memory=False)\n"
              "m(bnb_4bit_compute_dtype=th.float16)\n"
              "config = {'use_flash_attn': True, 'tf32': True}\n"
              "m(load_in_8bit=flag)\n")
    assert _findings(tmp_path, {"k.py": source}) == [
        (3, "bnb-quantization", "no-equivalent"), (4, "bnb-quantization", "no-equivalent"),
        (5, "bf16-dtype", "informational"), (7, "bnb-quantization", "no-equivalent"),
        (8, "flash-attn-flag", "needs-replacement"), (8, "tf32-argument", "needs-replacement")]


def test_package_names_are_compared_normalised(tmp_path):
    requirements = ("Flash_Attn==2.5\nFLASH.ATTN\nflash--attn>=2\nflash-attn-look-alike\nflashattn\n"
                    "tritonclient\ntriton_ascend\nTriton\nCuPy-CUDA11x\nnvidia_nccl_cu12\nNVIDIA-ML-PY\n"
                    "jax[cuda12_pip]\njax[cpu]\n-e git+https://github.com/NVIDIA/apex#egg=apex\n")
    assert [(line, p) for line, p, _ in _findings(tmp_path, {"requirements-dev.txt": requirements})] == [
        (1, "flash-attn"), (2, "flash-attn"), (3, "flash-attn"), (8, "triton"), (9, "cupy"), (10, "cuda-wheels"),
        (11, "pynvml"), (12, "cuda-wheels"), (14, "apex-other")]


def test_requirements_in_setup_py_and_pyproject_are_found_at_their_line(tmp_path):
    setup = ("from setuptools import setup\nBASE = ['torch',\n        'bitsandbytes']\nGPU = BASE + ['vllm']\n"
             "setup(name='triton', install_requires=GPU)\n")
    pyproject = ('[project]\ndependencies = ["vllm", "torch"]\n[dependency-groups]\ndev = ["vllm"]\n'
                 '[tool.uv]\nindex = [{name = "cu", url = "https://download.pytorch.org/whl/cu124"}]\n')
    report = scan(_write(tmp_path, {"setup.py": setup, "pyproject.toml": pyproject}))
    assert [(f.file, f.line, f.pattern) for f in report.findings] == [
        ("pyproject.toml", 2, "vllm"), ("pyproject.toml", 4, "vllm"), ("pyproject.toml", 6, "cuda-wheels"),
        ("setup.py", 3, "bitsandbytes"), ("setup.py", 4, "vllm")]


def test_json_keys_are_found_at_their_line(tmp_path):
    """json keeps no positions: the scan finds each key's line itself, through strings that hold braces,
    quotes and key names, tabs, one-line documents and keys repeated at other depths."""
    ds = ('{\n\t"note": "a \\"device\\": \\"cpu\\" } { in a string",\n'
          '\t"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam"},\n'
          '\t"zero_optimization": {\n\t\t"device": "cpu",\n\t\t"offload_param":\n\t\t\t{\n'
          '\t\t\t\t"pin_memory": true,\n\t\t\t\t"device": "nvme"\n\t\t\t}\n\t},\n'
          '\t"bf16": {"enabled": false}, "list": [{"bf16": {"enabled": true}}]\n}\n')
    one_line = '{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": true}}'
    found = [(f.file, f.line, f.pattern, f.code) for f in
             scan(_write(tmp_path, {"ds.json": ds, "one.json": one_line})).findings]
    assert found == [("ds.json", 3, "ds-fused-adam", "optimizer.type: Adam"),
                     ("ds.json", 9, "ds-zero-offload", "zero_optimization.offload_param.device: nvme"),
                     ("one.json", 1, "bf16-dtype", "bf16.enabled: true"),
                     ("one.json", 1, "ds-zero-offload", "zero_optimization.offload_optimizer.device: cpu")]


def test_yaml_documents_and_their_kinds(tmp_path):
    accelerate = ("compute_environment: LOCAL_MACHINE\nmixed_precision: BF16\ngpu_ids: all\n---\n"
                  "mixed_precision: bf16\n---\n")  # the second document is no accelerate config
    hydra = "defaults: &d\n  backend: NCCL\nrun:\n  <<: *d\n"
    report = scan(_write(tmp_path, {"a.yml": accelerate, "h.yaml": hydra}))
    assert [(f.file, f.line, f.pattern) for f in report.findings] == [
        ("a.yml", 2, "bf16-dtype"), ("a.yml", 3, "accelerate-gpu-config"), ("h.yaml", 2, "nccl-backend")]


def test_shell_commands_not_comments_echoes_or_here_documents(tmp_path):
    script = ("#!/bin/sh\n"
              "torchrun \\\n    --nproc_per_node 2 \\\n    train.py --tf32 True  # trailing comment\n"
              "echo 'CUDA_VISIBLE_DEVICES=0 nvidia-smi' && NCCL_DEBUG=INFO python x.py; nvidia-smi\n"
              "cat <<'EOF' > hostfile\nCUDA_VISIBLE_DEVICES=1 deepspeed x.py\nEOF\n"
              "x='#'; deepspeed --include localhost:0,1 t.py  # deepspeed --num_gpus 8\n"
              "sudo -u me accelerate launch t.py\n")
    assert [(line, p) for line, p, _ in _findings(tmp_path, {"run.sh": script})] == [
        (2, "rank-launcher"), (4, "tf32-argument"), (5, "nccl-env"), (5, "nvidia-smi"), (9, "rank-launcher")]


def test_new_patterns_name_the_targets_replacements():
    by = {t: {f.pattern: f for f in scan(REPO, t).findings} for t in TARGETS}
    npu, ms = by["npu"], by["mindspore"]
    assert "npu_weight_quant_batchmatmul" in npu["bnb-quantization"].replacement
    assert "npu_quant_matmul" in npu["bnb-quantization"].replacement
    assert "Golden Stick" in ms["bnb-quantization"].replacement and "Golden Stick" in ms["gptq-awq"].replacement
    assert "npu_weight_quant_batchmatmul" in npu["gptq-awq"].replacement
    assert "npu_fusion_attention" in npu["hf-flash-attention"].replacement
    assert "npu_fusion_attention" in npu["flash-attn-flag"].replacement
    assert "vllm-ascend" in npu["vllm"].replacement and "npu-smi" in npu["pynvml"].replacement
    assert "ASCEND_RT_VISIBLE_DEVICES" in npu["cuda-visible-devices"].replacement
    assert "HCCL_" in npu["nccl-env"].replacement and "torchair" in npu["torch-compile"].replacement
    assert "-m accel.migrate" in npu["rank-launcher"].replacement
    assert "allow_hf32" in npu["tf32-flags"].replacement and npu["tf32-flags"].migrate
    # what runs on Ascend as written is informational, what fails there is not
    for p in ("hf-flash-attention", "bf16-dtype", "ds-zero-offload", "ds-fused-adam", "deepspeed-package"):
        assert npu[p].severity == "informational", p
    assert npu["bnb-quantization"].severity == npu["gptq-awq"].severity == "no-equivalent"
    assert ms["bf16-dtype"].severity == npu["tf32-argument"].severity == "needs-replacement"
