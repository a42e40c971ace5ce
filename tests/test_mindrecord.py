"""`accel mindrecord`: jsonl to MindRecord that MindSpore's own FileReader and MindDataset read back with
the expected schema and rows (checked against tokenizations done here, with the tokenizers and
sentencepiece packages directly), truncation, bad input as one-line errors with no output left behind,
and training from the result on torch and mindspore."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from accel.cli import main
from tests.conftest import run_cli

SEQ = 48
# The Stanford Alpaca prompts, written out here as the format defines them.
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
WORDS = "the a cat dog sat on mat and ran fast red blue tree house car big small write list name".split()
ROWS = [
    {"instruction": "name a big red car", "input": "", "output": "the car is red"},
    {"instruction": "write a list", "input": "cat dog tree", "output": "cat and dog sat on the mat"},
    {"text": "the small cat ran fast on the mat"},
    {"instruction": "list a house", "output": "a blue house and a tree"},
    {"text": "big dog"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A BPE tokenizer.json trained here: <pad> = 0, </s> = 1, under 256 ids (the tiny presets' vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(WORDS), WITH_INPUT, NO_INPUT] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.save(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() <= 256
    return d


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def expected_row(tok, row, width):
    """(input_ids, labels, attention_mask, untruncated length) of one jsonl object, tokenised here with
    `tokenizers` itself."""
    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    if "text" in row:
        prompt, target = [], enc(row["text"]) + [1]
    else:
        template = WITH_INPUT if row.get("input") else NO_INPUT
        prompt = enc(template.format(instruction=row["instruction"], input=row.get("input", "")))
        target = enc(row["output"]) + [1]
    full = len(prompt + target)
    tokens = (prompt + target)[:width]
    n = len(tokens)
    ids = np.array(tokens + [0] * (width - n))
    labels = np.array([-100] * min(len(prompt), n) + tokens[len(prompt):] + [-100] * (width - n))
    return ids, labels, np.array([1] * n + [0] * (width - n)), full


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_shards_read_back_by_filereader_and_minddataset(tok_dir, tmp_path):
    import mindspore.dataset as ds
    from mindspore.mindrecord import FileReader
    from tokenizers import Tokenizer

    src = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    out = tmp_path / "sft.mindrecord"
    r = run_cli("mindrecord", "--data", str(src), "--tokenizer", str(tok_dir / "tokenizer.json"), "--out", str(out),
                "--seq-length", str(SEQ), "--shards", "2", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["rows"] == 5 and summary["skipped"] == 0 and summary["eos_id"] == 1 and summary["pad_id"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.jsonl", "sft.mindrecord0", "sft.mindrecord0.db",
                                                         "sft.mindrecord1", "sft.mindrecord1.db"]

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    expected = {line: expected_row(tok, row, SEQ + 1) for line, row in enumerate(ROWS, start=1)}
    assert summary["truncated"] == sum(e[3] > SEQ + 1 for e in expected.values()) == 1
    assert summary["tokens"] == sum(int(e[2].sum()) for e in expected.values())

    reader = FileReader(str(out) + "0")
    schema = reader.schema()
    for field in ("input_ids", "labels", "attention_mask"):
        assert schema[field] == {"type": "int32", "shape": [-1]}
    assert schema["index"] == {"type": "int64"}
    rows = {int(row["index"]): row for row in reader.get_next()}
    reader.close()
    assert sorted(rows) == [1, 2, 3, 4, 5]  # both shards, read through the first
    for line, (ids, labels, mask, _) in expected.items():
        assert rows[line]["input_ids"].dtype == np.int32
        np.testing.assert_array_equal(rows[line]["input_ids"], ids)
        np.testing.assert_array_equal(rows[line]["labels"], labels)
        np.testing.assert_array_equal(rows[line]["attention_mask"], mask)
    assert (expected[2][1][:10] == -100).all() and (expected[3][1][:5] != -100).all()  # prompt masked, text not

    dataset = ds.MindDataset(str(out) + "0", columns_list=["input_ids", "labels", "attention_mask", "index"],
                             shuffle=False)
    assert dataset.get_dataset_size() == 5
    seen = 0
    for item in dataset.create_dict_iterator(output_numpy=True, num_epochs=1):
        ids, labels, _, _ = expected[int(item["index"])]
        np.testing.assert_array_equal(item["input_ids"], ids)
        np.testing.assert_array_equal(item["labels"], labels)
        seen += 1
    assert seen == 5


def test_sentencepiece_model_and_truncation(tmp_path, capsys):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    long_text = " ".join(WORDS * 3)
    rows = [{"text": "big red car"}, {"text": long_text},
            {"instruction": " ".join(WORDS * 4), "output": "the cat"}]  # prompt alone past the window
    src = write_jsonl(tmp_path / "plain.jsonl", rows)
    out = tmp_path / "plain.mindrecord"
    code, stdout, err = cli(capsys, "mindrecord", "--data", str(src), "--tokenizer", str(tmp_path / "sp.model"),
                            "--out", str(out), "--seq-length", "16")
    assert code == 0, err
    assert "truncated 2" in stdout and "without target 1" in stdout and "rows 3" in stdout
    from accel.data.mindrecord import read_rows

    got = read_rows(out)
    eos = sp.eos_id()
    short = sp.encode("big red car") + [eos]
    np.testing.assert_array_equal(got["input_ids"][0], short + [eos] * (17 - len(short)))  # pad falls back to eos
    np.testing.assert_array_equal(got["labels"][0], short + [-100] * (17 - len(short)))
    np.testing.assert_array_equal(got["input_ids"][1], sp.encode(long_text)[:17])  # cut to seq_length + 1
    assert got["attention_mask"][1].all() and (got["labels"][2] == -100).all()


def test_malformed_lines_are_fatal_or_skipped(tok_dir, tmp_path, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2], raw_lines=['{"instruction": "x", "output": ', "",
                                                                   '{"question": "where"}', '["a", "list"]'])
    out = tmp_path / "bad.mindrecord"
    args = ["mindrecord", "--data", str(src), "--tokenizer", str(tok_dir), "--out", str(out), "--seq-length", "32"]
    one_line_error(*cli(capsys, *args)[::2], "bad.jsonl:3: the line is not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing written, no temp dir left
    code, stdout, err = cli(capsys, *args, "--skip-bad-lines", "--json")
    assert code == 0, err
    skipped = err.splitlines()
    assert len(skipped) == 3 and [":3:" in skipped[0], ":5:" in skipped[1], ":6:" in skipped[2]] == [True] * 3
    assert "Alpaca fields" in skipped[1] and "JSON object" in skipped[2]
    summary = json.loads(stdout)
    assert summary["rows"] == 2 and summary["skipped"] == 3


def test_bad_input_is_a_one_line_error_with_no_output(tok_dir, tmp_path, capsys):
    src = write_jsonl(tmp_path / "ok.jsonl", ROWS)
    out = tmp_path / "ok.mindrecord"
    args = ["mindrecord", "--data", str(src), "--out", str(out), "--seq-length", "32"]
    one_line_error(*cli(capsys, *args, "--tokenizer", str(tmp_path / "nope.json"))[::2], "nope.json does not exist")
    one_line_error(*cli(capsys, *args, "--tokenizer", str(src))[::2], "unknown tokenizer format")
    bogus = tmp_path / "broken.json"
    bogus.write_text("{}")
    one_line_error(*cli(capsys, *args, "--tokenizer", str(bogus))[::2], "not a valid tokenizer.json")
    one_line_error(*cli(capsys, "mindrecord", "--data", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tok_dir),
                        "--out", str(out), "--seq-length", "32")[::2], "missing.jsonl does not exist")
    one_line_error(*cli(capsys, *args, "--tokenizer", str(tok_dir), "--shards", "0")[::2], "between 1 and 1000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "ok.jsonl"]


def test_existing_output_is_refused_unless_overwrite(tok_dir, tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "d.mindrecord"
    args = ["mindrecord", "--data", str(src), "--tokenizer", str(tok_dir), "--out", str(out), "--seq-length", "32"]
    assert cli(capsys, *args, "--shards", "2")[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    one_line_error(*cli(capsys, *args)[::2], "d.mindrecord0 already exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert cli(capsys, *args, "--overwrite")[0] == 0
    # the two shards of the first run are gone, replaced by one file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.mindrecord", "d.mindrecord.db"]
    from accel.data.mindrecord import read_rows

    assert len(read_rows(out)["input_ids"]) == 5


def test_training_from_converted_data_on_both_backends(tok_dir, tmp_path, capsys):
    from accel.data.mindrecord import batches
    from accel.models import from_preset
    from accel.targets import open_target
    from accel.train import train

    rows = [{"instruction": " ".join(WORDS[i:i + 4]), "input": "", "output": " ".join(WORDS[i + 4:i + 9])}
            for i in range(8)]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "t.mindrecord"
    assert cli(capsys, "mindrecord", "--data", str(src), "--tokenizer", str(tok_dir), "--out", str(out),
               "--seq-length", "40")[0] == 0
    first = next(batches(out, 4))
    ids, labels = first["input_ids"], first["labels"]
    assert ids.shape == labels.shape == (4, 40)
    kept = labels != -100
    # shifted: the target of position t is the token at t + 1, and only response tokens are targets
    np.testing.assert_array_equal(labels[:, :-1][kept[:, :-1]], ids[:, 1:][kept[:, :-1]])
    assert kept.any(axis=1).all() and not kept[:, :20].any()

    model, params = from_preset("qwen2-tiny", seed=0)
    losses = {}
    for target in ("torch:cpu", "mindspore:cpu"):
        backend = open_target(target, policy={})
        losses[target] = [r.loss for r in train(model, backend, params, batches(out, 4), 3, 1e-2)]
    np.testing.assert_allclose(losses["mindspore:cpu"], losses["torch:cpu"], rtol=1e-4)
    assert losses["torch:cpu"][2] < losses["torch:cpu"][0]  # two epochs over 8 rows: the loss falls

    code, stdout, err = cli(capsys, "train", "--model", "qwen2-tiny", "--data", str(out), "--target", "mindspore:cpu",
                            "--steps", "3", "--lr", "1e-2", "--batch-size", "4", "--json")
    assert code == 0, err
    cli_losses = [json.loads(line)["loss"] for line in stdout.splitlines()[:3]]
    np.testing.assert_allclose(cli_losses, losses["mindspore:cpu"], rtol=1e-6)


def test_data_with_no_target_token_is_refused_by_mindrecord_and_train(tok_dir, tmp_path, capsys):
    from accel.errors import UsageError
    from accel.models import from_preset
    from accel.targets import open_target
    from accel.train import train

    rows = [{"instruction": " ".join(WORDS[:12]), "input": "", "output": " ".join(WORDS[12:16])}] * 3
    src = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "long.mindrecord"
    code, _, err = cli(capsys, "mindrecord", "--data", str(src), "--tokenizer", str(tok_dir), "--out", str(out),
                       "--seq-length", "4")  # every prompt fills the 4 positions: no response token remains
    one_line_error(code, err, "keeps a target token", "--seq-length 4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.jsonl"]

    model, params = from_preset("qwen2-tiny", seed=0)
    masked = {"input_ids": np.ones((2, 8), np.int64), "labels": np.full((2, 8), -100, np.int64)}
    with pytest.raises(UsageError, match="batch 1 has no target token"):
        list(train(model, open_target("torch:cpu", policy={}), params, [masked], 1, 1e-2))


def test_lines_no_tokenizer_could_take_are_named(tok_dir, tmp_path, capsys):
    raw = ['{"text": "a\\ud800b"}', "[" * 100000, '{"text": 1' + "0" * 5000 + "}"]
    for i, line in enumerate(raw):
        src = write_jsonl(tmp_path / f"bad{i}.jsonl", ROWS[:1], raw_lines=[line])
        code, _, err = cli(capsys, "mindrecord", "--data", str(src), "--tokenizer", str(tok_dir),
                           "--out", str(tmp_path / f"bad{i}.mindrecord"), "--seq-length", "32")
        one_line_error(code, err, f"bad{i}.jsonl:2:", "lone surrogate" if i == 0 else "not valid JSON")
    assert not list(tmp_path.glob("*.mindrecord*"))


def test_the_output_never_replaces_the_data_it_reads(tok_dir, tmp_path, capsys):
    src = write_jsonl(tmp_path / "sft1", ROWS)
    before = (src.read_bytes(), src.stat().st_mtime_ns)
    for out, extra in [(tmp_path / "sft1", ["--overwrite"]), (tmp_path / "sft", ["--overwrite", "--shards", "2"]),
                       (tmp_path / "sft", ["--overwrite"])]:
        code, _, err = cli(capsys, "mindrecord", "--data", str(src), "--tokenizer", str(tok_dir), "--out", str(out),
                           "--seq-length", "32", *extra)
        one_line_error(code, err, "is what this conversion reads")
        assert (src.read_bytes(), src.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft1"]


def test_a_terminated_conversion_leaves_nothing_and_a_killed_ones_leftover_is_swept(tok_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    rows = [{"instruction": " ".join(WORDS[i % 20:i % 20 + 6]), "input": "", "output": " ".join(WORDS[:12])}
            for i in range(60000)]
    src = write_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "out"
    out.mkdir()
    args = [sys.executable, "-m", "accel.cli", "mindrecord", "--data", str(src), "--tokenizer", str(tok_dir),
            "--out", str(out / "big.mindrecord"), "--seq-length", "64"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list(out.glob(".big.mindrecord.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion ended before its temporary output appeared"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated by SIGTERM" in err, err
    assert list(out.iterdir()) == []

    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)  # killed outright: no cleanup can run
    while not list(out.glob(".big.mindrecord.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert list(out.glob(".big.mindrecord.*.tmp"))
    small = write_jsonl(tmp_path / "small.jsonl", ROWS)
    code = subprocess.run([*args[:5], str(small), *args[6:]], capture_output=True).returncode
    assert code == 0 and not list(out.glob(".*.tmp"))  # the next run swept it


def test_a_full_disk_under_filewriter_is_one_line_and_leaves_nothing(tok_dir, tmp_path):
    """RLIMIT_FSIZE makes MindSpore's FileWriter hit EFBIG past 256 KiB, as on a full disk."""
    src = write_jsonl(tmp_path / "many.jsonl", ROWS * 400)
    out = tmp_path / "many.mindrecord"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, 1 << 18)); "
            "from accel.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "mindrecord", "--data", str(src), "--tokenizer", str(tok_dir),
                        "--out", str(out), "--seq-length", "128"], capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("[")]  # MindSpore's log
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("accel mindrecord: error: ") and str(out) in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.jsonl"]
