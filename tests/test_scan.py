"""`accel scan`: planted CUDA ties are found at the right line, look-alikes are not, the table is reviewed."""

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
from accel.scan import SEVERITIES, TARGETS, load_patterns, scan
from tests.conftest import run_cli

REPO = Path(__file__).parent / "fixtures" / "scan_repo"
TABLE = Path(__file__).parents[1] / "accel" / "scan_patterns.yaml"
EXPECT = re.compile(r"#\s*expect:\s*([\w\-, ]+)$")


def planted(root: Path = REPO) -> set[tuple[str, int, str]]:
    """(file, line, pattern) for every `# expect: pattern` marker in the fixture repository."""
    out = set()
    for file in root.rglob("*.py"):
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if m := EXPECT.search(line):
                out |= {(file.relative_to(root).as_posix(), number, p.strip()) for p in m.group(1).split(",")}
    return out


def table() -> dict[str, dict]:
    return {p["id"]: p for p in yaml.safe_load(TABLE.read_text())["patterns"]}


def run(*args: str, capsys) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().out


def test_finds_every_planted_tie_at_its_line_and_nothing_else():
    expected = planted()
    assert len(expected) >= 30 and {p for *_, p in expected} == set(table())  # one of each pattern, at least
    found = {(f.file, f.line, f.pattern) for f in scan(REPO).findings}
    assert found - expected == set(), "false positives"
    assert expected - found == set(), "missed"


def test_look_alikes_are_not_findings():
    findings = scan(REPO).findings
    assert not [f for f in findings if f.file == "utils/lookalikes.py"]
    train = (REPO / "train.py").read_text().splitlines()
    for f in findings:
        if f.file == "train.py":
            assert "look-alike" not in train[f.line - 1]


@pytest.mark.parametrize("target", TARGETS)
def test_severity_and_replacement_come_from_the_table(target):
    rules = table()
    report = scan(REPO, target)
    assert report.findings
    for f in report.findings:
        rule = rules[f.pattern]["targets"][target]
        assert (f.severity, f.replacement) == (rule["severity"], rule["replacement"].strip())


def test_replacements_name_the_target_api():
    by_pattern = {t: {f.pattern: f for f in scan(REPO, t).findings} for t in TARGETS}
    assert "torch_npu.npu_fusion_attention" in by_pattern["npu"]["flash-attn"].replacement
    assert "mindspore.ops.flash_attention_score" in by_pattern["mindspore"]["flash-attn"].replacement
    assert "torch_npu.npu_rms_norm" in by_pattern["npu"]["apex-normalization"].replacement
    assert by_pattern["npu"]["bitsandbytes"].severity == "no-equivalent"
    assert by_pattern["npu"]["torch-cuda-api"].severity == "runs-via-migrate"
    assert by_pattern["mindspore"]["torch-cuda-api"].severity == "needs-replacement"
    assert by_pattern["npu"]["cuda-string-compare"].severity == "needs-replacement"


def test_the_table_is_reviewed_data():
    patterns = load_patterns()
    assert [p.id for p in patterns] == list(table())
    for p in patterns:
        assert set(p.rules) == set(TARGETS)
        for rule in p.rules.values():
            assert rule.severity in SEVERITIES and len(rule.reason) > 15 and rule.replacement


def test_a_broken_table_is_rejected(tmp_path):
    data = yaml.safe_load(TABLE.read_text())
    del data["patterns"][0]["targets"]["npu"]["reason"]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(AccelError, match="torch-cuda-api: npu: reason"):
        load_patterns(tmp_path / "t.yaml")
    data = yaml.safe_load(TABLE.read_text())
    data["patterns"][1]["targets"]["npu"]["severity"] = "maybe"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(AccelError, match="severity must be one of"):
        load_patterns(tmp_path / "t.yaml")


def test_migrate_claims_match_what_accel_migrate_maps():
    """What the table calls runs-via-migrate under torch.cuda is exactly what accel.migrate patches."""
    import torch

    from accel import migrate

    listed = set(table()["torch-cuda-api"]["match"]["names"])
    amp = {"torch.cuda.amp.autocast", "torch.cuda.amp.GradScaler"}  # mapped through autocast/GradScaler.__init__
    assert listed - amp == {f"torch.cuda.{name}" for name in migrate.CUDA_API}
    originals = {name: getattr(torch.cuda, name) for name in migrate.CUDA_API}
    migrate.enable("torch:cpu")
    try:
        assert all(getattr(torch.cuda, name) is not original for name, original in originals.items())
    finally:
        migrate.disable()


def test_json_output(capsys):
    code, out = run("scan", str(REPO), "--format", "json", "--fail-on", "none", capsys=capsys)
    data = json.loads(out)
    assert code == 0 and set(data) == {"findings", "summary"}
    assert all(set(f) == {"file", "line", "pattern", "severity", "replacement"} for f in data["findings"])
    assert {(f["file"], f["line"], f["pattern"]) for f in data["findings"]} == planted()
    summary = data["summary"]
    assert summary["findings"] == len(data["findings"]) == sum(summary["by_severity"].values())
    assert summary["files"] == len(list(REPO.rglob("*.py"))) and summary["target"] == "npu"
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
    assert md.startswith("# accel scan:") and "| location | severity | pattern |" in md
    assert "jax.nn.dot_product_attention" in md


def test_unparsable_files_are_warnings_and_junk_directories_are_skipped(tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo)
    (repo / "broken.py").write_text("import torch\ndef f(:\n    torch.cuda.synchronize()\n")
    (repo / "latin.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8 and no coding cookie
    tie = "import torch\ntorch.cuda.synchronize()\n"
    for junk in (".git", ".venv/lib", "__pycache__", "node_modules/pkg", "site-packages", "env_custom"):
        (repo / junk).mkdir(parents=True, exist_ok=True)
        (repo / junk / "tie.py").write_text(tie)
    (repo / "env_custom" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    code, out = run("scan", str(repo), "--format", "json", "--fail-on", "none", capsys=capsys)
    summary = json.loads(out)["summary"]
    assert code == 0
    assert {(w["file"], w["line"]) for w in summary["warnings"]} == {("broken.py", 2), ("latin.py", 0)}
    assert summary["files"] == len(list(REPO.rglob("*.py"))) + 2
    assert {(f["file"], f["line"], f["pattern"]) for f in json.loads(out)["findings"]} == planted()
    _, text = run("scan", str(repo), "--fail-on", "none", capsys=capsys)
    assert "warning: broken.py:2: not scanned" in text


def test_a_single_file_and_bad_paths(tmp_path, capsys):
    code, out = run("scan", str(REPO / "quant.py"), "--format", "json", capsys=capsys)
    assert code == 1 and json.loads(out)["findings"][0]["file"] == "quant.py"
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
    that finding; text that holds the table's words only inside other words, or no tie, does not."""
    from accel.scan import Triggers, scan_source

    patterns = load_patterns()
    tied = Triggers(patterns)
    for file, line, pattern in planted():
        text = (REPO / file).read_text()
        assert tied(text), file
        assert any(f.line == line and f.pattern == pattern for f in scan_source(text, file, patterns, "npu"))
    for text in ("x = [1, 2.5, 'tok_1', \"w\"]\n" * 1000, "import torch\ny = torch.zeros(3)\n",
                 "def load_table(): return {'amplitude': 1}\n"):  # `amp`, `load` only inside other words
        assert not tied(text), text
    assert tied("z = 'cuda:nccl'\n") and tied("torch.cuda.amp.autocast()\n") and tied('d = f"cuda:{rank}"\n')


def test_a_file_that_assigns_torch_has_no_implicit_torch(tmp_path):
    from accel.scan import scan_source

    patterns = load_patterns()
    assert [f.pattern for f in scan_source("torch.cuda.synchronize()\n", "a.py", patterns, "npu")]
    assert not scan_source("torch = object()\ntorch.cuda.synchronize()\n", "b.py", patterns, "npu")
    assert scan_source("import torch\ntorch = torch\ntorch.cuda.synchronize()\n", "c.py", patterns, "npu")


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
