"""Outside data, generated: nested, oversized and mistyped config.json files and command-line numbers.
Whatever comes in, what comes out is a model, or one of our errors (an AccelError, or argparse's usage
error, exit 2): never another exception. Configs start from each family's real config.json layout
(tests/hf_fixtures.py, transformers' Qwen2Config) and have fields replaced, removed or added."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accel import cli
from accel.errors import AccelError
from tests.hf_fixtures import baichuan_config, chatglm_config, qwen_config

PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def qwen2_config() -> dict:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128).to_dict()


BASES = [chatglm_config(), qwen_config(), baichuan_config("7b"), baichuan_config("13b"), qwen2_config()]
FIELDS = sorted({k for b in BASES for k in b} | {"rope_scaling", "head_dim", "rope_parameters"})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["2", "1e9", "linear", "", "NaN", "chatglm", "qwen2", "baichuan"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=8)


@st.composite
def config_texts(draw) -> str:
    cfg = dict(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(FIELDS))
        if draw(st.integers(0, 5)) == 0:
            cfg.pop(key, None)
        else:
            cfg[key] = draw(values)
    text = json.dumps(cfg, allow_nan=True)
    tail = draw(st.sampled_from(["", "deep", "digits", "cut"]))
    if tail == "deep":  # past any parser's recursion limit
        text = text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif tail == "digits":
        text = text[:-1] + ', "num_hidden_layers": ' + "9" * 5000 + "}"
    elif tail == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    return text


WORK = Path(tempfile.mkdtemp(prefix="accel-props-"))


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(WORK, ignore_errors=True)


@PROPERTY
@given(config_texts())
def test_any_config_json_is_a_model_or_a_model_error(text):
    from accel.models import config_from_pretrained

    d = WORK / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(text)
    try:
        model = config_from_pretrained(d)
    except AccelError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return
    spec = model.param_spec()  # bounded: the ranges checked keep this a table of shapes, built at once
    assert all(all(isinstance(n, int) and n > 0 for n in p.shape) for p in spec.values())


# --- command-line numbers -------------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(-(2**80), 2**80).map(str), st.integers(-2, 70).map(lambda e: f"1{'0' * e}"),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["inf", "-inf", "nan", "1e400", "1" + "0" * 400, "0x10", "1_000", " 3", "٣", "", "-0", "1e-400",
                     "2GB", "1" + "0" * 400 + "GB", "0GB", "-1MB", "1.5TB", "GB", "1 2", "1,2", "3,-1", ",",
                     "99999999999999999999", "1,,2"]),
    st.text(max_size=8),
)

MISSING = "/nonexistent/accel-props"
# command, the options that take a number, the rest of a command line whose inputs do not exist
COMMANDS = [
    ("generate", ["--max-new-tokens", "--input-ids", "--seed"], ["--model", MISSING]),
    ("infer", ["--input-ids", "--seed"], ["--model", MISSING]),
    ("train", ["--steps", "--lr", "--weight-decay", "--batch-size", "--lora-rank", "--lora-alpha"],
     ["--model", MISSING, "--data", MISSING + ".mindrecord"]),
    ("mindrecord", ["--seq-length", "--shards"], ["--data", MISSING + ".jsonl", "--tokenizer", MISSING,
                                                    "--out", MISSING + ".out"]),
    ("convert", ["--max-shard-size"], ["--from", f"safetensors:{MISSING}", "--to", f"npz:{MISSING}.npz"]),
    ("launch", ["--nproc", "--nnodes", "--node-rank", "--master-port"], ["--", "python", MISSING + ".py"]),
]


@PROPERTY
@given(st.sampled_from(COMMANDS), st.data())
def test_any_number_on_the_command_line_is_a_value_or_one_of_our_errors(command, data):
    name, options, rest = command
    argv = [name, *rest]
    for option in data.draw(st.lists(st.sampled_from(options), min_size=1, max_size=3, unique=True)):
        argv[1:1] = [option, data.draw(numbers)]
    if name == "launch" and "--nproc" not in argv:
        argv[1:1] = ["--nproc", "1"]
    if name == "train" and "--steps" not in argv:
        argv[1:1] = ["--steps", "1"]
    if name == "mindrecord" and "--seq-length" not in argv:
        argv[1:1] = ["--seq-length", "8"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: usage and one error line
            assert e.code == 2, (argv, err.getvalue())
            assert err.getvalue().strip().splitlines()[-1].startswith("accel"), (argv, err.getvalue())
            return
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"accel {name}: error: "), (argv, code, lines)
