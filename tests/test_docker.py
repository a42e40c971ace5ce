"""docker/: each image installs accel-port with the project's own pins and smoke-tests `accel targets`; the
base-image versions (Python, CUDA, CANN) agree with constraints.txt, pyproject.toml and the pairing table."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "docker"
IMAGES = ("cpu", "cuda", "ascend")


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement(name: str) -> SpecifierSet:
    meta = project()
    for req in [*meta["dependencies"], *(r for reqs in meta["optional-dependencies"].values() for r in reqs)]:
        parsed = Requirement(req)
        if parsed.name.lower() == name:
            return parsed.specifier
    raise AssertionError(f"{name} is not a requirement of pyproject.toml")


def parse(image: str) -> dict:
    """ARG defaults (before and after FROM), FROM images, and RUN commands with continuations joined."""
    text = (DOCKER / f"{image}.Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    logical = re.sub(r"\\\n\s*", " ", code)
    out: dict = {"args": {}, "global_args": set(), "from": [], "run": [], "copy": []}
    seen_from = False
    for line in logical.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ARG":
            name, _, default = rest.partition("=")
            out["args"][name] = default
            if not seen_from:
                out["global_args"].add(name)
        elif word == "FROM":
            seen_from = True
            out["from"].append(rest)
        elif word in ("RUN", "COPY"):
            out[word.lower()].append(rest)
    return out


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


@pytest.mark.parametrize("image", IMAGES)
def test_installs_the_project_with_its_pins_and_smoke_tests(image):
    d = parse(image)
    assert any("pyproject.toml" in c and "constraints.txt" in c for c in d["copy"])
    installs = [r for r in d["run"] if "pip install" in r]
    assert installs and all("-c constraints.txt" in r for r in installs if '".[' in r)
    assert any(re.search(r"\baccel targets$", r) for r in d["run"]), "no `accel targets` smoke test"
    for used in re.findall(r"\$\{(\w+)\}", " ".join(d["from"])):
        assert used in d["global_args"] and d["args"][used], f"FROM uses {used} without a default ARG"


@pytest.mark.parametrize("image", IMAGES)
def test_no_version_is_pinned_twice(image):
    """Package versions come from constraints.txt at build time; a literal pin that disagrees would drift."""
    constraints = pins()
    for run in parse(image)["run"]:
        for name, version in re.findall(r"([A-Za-z][\w.-]*)==([0-9][\w.]*)", run):
            key = name.lower().replace("_", "-")
            assert key not in constraints or constraints[key] == version, f"{name}=={version} in {image}"


@pytest.mark.parametrize("image", IMAGES)
def test_torch_version_comes_from_constraints_and_meets_pyproject(image):
    runs = " ".join(parse(image)["run"])
    m = re.search(r"TORCH_VERSION=\"\$\((sed [^)]*constraints\.txt)\)\"", runs)
    assert m, "torch's version must be read from constraints.txt"
    version = subprocess.run(m.group(1), shell=True, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert version.strip() == pins()["torch"] and Version(version.strip()) in requirement("torch")
    assert '"torch==${TORCH_VERSION}"' in runs


@pytest.mark.parametrize("image", IMAGES)
def test_python_matches_constraints_and_requires_python(image):
    python = parse(image)["args"]["PYTHON_VERSION"]
    header = re.search(r"Python (\d+\.\d+)", (ROOT / "constraints.txt").read_text())
    assert header and python == header.group(1)
    assert Version(python + ".0") in SpecifierSet(project()["requires-python"])


def test_cuda_wheel_index_matches_the_base_image():
    args = parse("cuda")["args"]
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_CUDA"] == f"cu{major}{minor}"
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in " ".join(parse("cuda")["run"])
    assert expand(parse("cuda")["from"][0], args) == f"nvidia/cuda:{args['CUDA_VERSION']}-runtime-ubuntu22.04"


def pairing() -> dict[str, str]:
    """The `default` row of docker/README.md's Ascend pairing table."""
    lines = (DOCKER / "README.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| image | torch | torch_npu |"))
    names = [c.strip() for c in lines[header].strip("|").split("|")]
    row = next(line for line in lines[header:] if line.startswith("| default |"))
    return dict(zip(names, (c.strip() for c in row.strip("|").split("|"))))


def test_ascend_pairing_agrees_with_constraints_dockerfile_and_pyproject():
    row, constraints, args = pairing(), pins(), parse("ascend")["args"]
    assert row["torch"] == constraints["torch"]
    assert Version(row["torch_npu"]).release == Version(constraints["torch"]).release  # torch_npu follows torch
    assert Version(row["torch_npu"]) in requirement("torch-npu")
    assert row["MindSpore"] == constraints["mindspore"] and Version(row["MindSpore"]) in requirement("mindspore")
    assert row["CANN"] == args["CANN_VERSION"] and row["Python"] == args["PYTHON_VERSION"]
    runs = " ".join(parse("ascend")["run"])
    assert '"torch-npu==${TORCH_VERSION}.*"' in runs and "whl/cpu" in runs  # torch_npu needs the CPU torch
    image = expand(parse("ascend")["from"][0], args)
    assert image == f"quay.io/ascend/cann:{row['CANN']}-{args['CANN_CHIP']}-ubuntu22.04-py{row['Python']}"


def test_ascend_cann_is_one_the_installed_mindspore_accepts():
    spec = importlib.util.find_spec("mindspore")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mindspore is not installed")
    checker = Path(spec.submodule_search_locations[0], "run_check", "_check_version.py").read_text()
    ascend = checker[checker.index("class AscendEnvChecker"):]
    supported = re.findall(r'"(\d+\.\d+)"', re.search(r"self\.version = \[([^\]]*)\]", ascend).group(1))
    cann = pairing()["CANN"]
    assert ".".join(cann.split(".")[:2]) in supported, f"MindSpore accepts CANN {supported}, not {cann}"
