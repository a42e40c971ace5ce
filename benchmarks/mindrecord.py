"""MindRecord conversion speed: `accel mindrecord`'s converter against a straightforward one-row-at-a-time
FileWriter loop, on the same synthetic Alpaca-style jsonl, tokenizer and seq_length, in one run.

    .venv/bin/python benchmarks/mindrecord.py --rows 100000

The baseline is what a first script does: for each line, json.loads, Tokenizer.encode of the prompt and
of the output, pad with Python lists, `write_raw_data([row])`. Both write the same rows (checked on a
sample), so the ratio measures the conversion, not a difference in output.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel.data import mindrecord, tokenizer  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from it an be this which or are have not had his "
         "but were their one all new more can has been would who other will they into its some time two also "
         "first after may only when most over such many these then year state city world water about people "
         "between under three during while where both through system group number school part known before "
         "model data train language answer question write explain list describe give summary example").split()


def synthetic(path: Path, rows: int, seed: int = 0) -> None:
    """Alpaca-style rows: instruction 6-20 words, input empty or 5-40 words, output 10-120 words."""
    r = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))

    with open(path, "w") as f:
        for _ in range(rows):
            row = {"instruction": words(6, 20), "input": words(5, 40) if r.random() < 0.4 else "",
                   "output": words(10, 120)}
            f.write(json.dumps(row) + "\n")


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [mindrecord.PROMPT_INPUT, mindrecord.PROMPT_NO_INPUT, " ".join(WORDS)] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))


def baseline(src: Path, out: Path, tok_path: Path, seq_length: int) -> int:
    """One row at a time: encode, pad in Python, write_raw_data([row])."""
    from mindspore.mindrecord import FileWriter
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|endoftext|>")
    width = seq_length + 1
    writer = FileWriter(str(out), shard_num=1, overwrite=True)
    writer.add_schema(mindrecord.SCHEMA, "baseline")
    writer.add_index(["index"])
    rows = 0
    with open(src) as f:
        for line, text in enumerate(f, start=1):
            obj = json.loads(text)
            template = mindrecord.PROMPT_INPUT if obj.get("input") else mindrecord.PROMPT_NO_INPUT
            prompt = tok.encode(template.format(**obj), add_special_tokens=False).ids
            tokens = (prompt + tok.encode(obj["output"], add_special_tokens=False).ids + [eos])[:width]
            labels = [-100] * min(len(prompt), width) + tokens[len(prompt):]
            n_pad = width - len(tokens)
            writer.write_raw_data([{
                "input_ids": np.array(tokens + [pad] * n_pad, np.int32),
                "labels": np.array(labels + [-100] * n_pad, np.int32),
                "attention_mask": np.array([1] * len(tokens) + [0] * n_pad, np.int32),
                "index": line,
            }])
            rows += 1
    writer.commit()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--shards", type=int, default=1, help="shards of the converter's output")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as d:
        d_path = Path(d)
        src, tok_path = d_path / "alpaca.jsonl", d_path / "tokenizer.json"
        synthetic(src, args.rows)
        make_tokenizer(tok_path)

        start = time.perf_counter()
        n = baseline(src, d_path / "baseline.mindrecord", tok_path, args.seq_length)
        base_s = time.perf_counter() - start

        tok = tokenizer.load(tok_path)
        start = time.perf_counter()
        summary = mindrecord.convert(src, d_path / "accel.mindrecord", tok, args.seq_length, shards=args.shards)
        ours_s = time.perf_counter() - start
        assert summary.rows == n

        ours = mindrecord.read_rows(d_path / "accel.mindrecord")
        theirs = mindrecord.read_rows(d_path / "baseline.mindrecord")
        for key in ("input_ids", "labels", "attention_mask"):
            np.testing.assert_array_equal(ours[key][::97], theirs[key][::97], err_msg=key)

    print(f"rows {n:,}, seq_length {args.seq_length}, truncated {summary.truncated:,}, "
          f"tokens {summary.tokens:,}, shards {args.shards}")
    print(f"baseline (row at a time)   {base_s:8.2f} s  {n / base_s:10,.0f} rows/s")
    print(f"accel mindrecord           {ours_s:8.2f} s  {n / ours_s:10,.0f} rows/s")
    print(f"speed-up                   {base_s / ours_s:8.2f}x")


if __name__ == "__main__":
    main()
