"""SFT data as MindRecord: jsonl in, tokenised and padded int32 rows out (MindSpore's own
`mindspore.mindrecord.FileWriter`), and a reader that feeds the same batches to training on any backend.

Input: one JSON object per line, Alpaca style (`instruction`, optional `input`, `output`) or plain text
(`text`). An Alpaca row's prompt is the Stanford Alpaca template around the instruction (and input);
its target is the output followed by the end-of-sequence token. A text row is all target.

Rows (the MindFormers layout): `input_ids`, `labels`, `attention_mask`, int32 arrays of seq_length + 1
tokens, so that a row gives seq_length inputs and their next-token targets; `index` (int64, indexed):
the source line. `labels` are the token ids with -100 (MindFormers' IGNORE_TOKEN_ID, and what
`accel.train.lm_loss` ignores) at prompt and padding positions; `attention_mask` is 1 on tokens, 0 on
padding. Rows are right-padded with the tokenizer's pad id; a sequence longer than seq_length + 1 is
truncated (and counted). The batch feeder shifts: inputs `input_ids[:, :-1]`, labels `labels[:, 1:]`.

Files: `OUT` for one shard; `OUT0` .. `OUT{N-1}` for N, each with MindRecord's `.db` index beside it.
MindRecord files record their shard names inside, so they cannot be renamed after writing: a
conversion writes into a temporary directory next to `OUT` under the final names and moves the files
into place only once every shard is committed.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accel.errors import AccelError
from accel.inputs import parse_json

# keep MindSpore's import quiet (see backends/mindspore.py); a user's own setting wins
os.environ.setdefault("GLOG_v", "3")

IGNORE_INDEX = -100
SCHEMA = {
    "input_ids": {"type": "int32", "shape": [-1]},
    "labels": {"type": "int32", "shape": [-1]},
    "attention_mask": {"type": "int32", "shape": [-1]},
    "index": {"type": "int64"},
}
# The Stanford Alpaca prompt templates, which MindFormers' Alpaca conversion also uses.
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
CHUNK = 4096  # rows tokenised and written per batch


class DataError(AccelError):
    """A dataset file that is missing, malformed, or would overwrite existing output."""


@dataclass(frozen=True)
class Sample:
    line: int  # 1-based line of the source file
    prompt: str
    response: str


@dataclass
class Summary:
    rows: int = 0
    tokens: int = 0  # real (non-padding) tokens written
    target_tokens: int = 0  # of which count in the loss (labels != -100)
    truncated: int = 0  # rows cut to seq_length + 1 tokens
    no_target: int = 0  # rows whose target lies wholly past the cut (they add nothing to the loss)
    skipped: int = 0  # malformed lines skipped (with skip_bad)
    seconds: float = 0.0
    files: tuple[str, ...] = ()


# --- reading jsonl ---------------------------------------------------------------------------------


def parse_line(text: str, line: int, where: str) -> Sample:
    """One jsonl line as a Sample; DataError naming the line when it is not a usable object."""
    obj = parse_json(text, f"{where}:{line}: the line", DataError)
    sample = _sample(obj, line, where)
    try:
        sample.prompt.encode("utf-8"), sample.response.encode("utf-8")
    except UnicodeEncodeError as e:  # "\ud800" escapes decode to a lone surrogate, which no tokenizer takes
        raise DataError(f"{where}:{line}: the text holds a lone surrogate ({e.object[e.start]!r}), not a "
                        "character") from None
    return sample


def _sample(obj: Any, line: int, where: str) -> Sample:
    if not isinstance(obj, dict):
        raise DataError(f"{where}:{line}: a line must be a JSON object, not {type(obj).__name__}")
    if "instruction" in obj or "output" in obj:
        fields = {k: obj.get(k, "") for k in ("instruction", "input", "output")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise DataError(f"{where}:{line}: field {bad[0]!r} must be a string")
        if not fields["instruction"] or not fields["output"]:
            raise DataError(f"{where}:{line}: an Alpaca row needs a non-empty instruction and output")
        template = PROMPT_INPUT if fields["input"] else PROMPT_NO_INPUT
        return Sample(line, template.format(**fields), fields["output"])
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}:{line}: field 'text' must be a non-empty string")
        return Sample(line, "", obj["text"])
    raise DataError(f"{where}:{line}: expected Alpaca fields (instruction, input, output) or text; "
                    f"found {', '.join(map(str, obj)) or 'no fields'}")


def read_jsonl(path: str | Path, skip_bad: bool = False,
               on_skip: Callable[[DataError], None] | None = None) -> Iterator[Sample]:
    """Samples of a jsonl file, blank lines ignored. A malformed line is fatal, or with `skip_bad`
    reported through `on_skip` and skipped."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory; give a .jsonl file") from None
    with f:
        try:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    yield parse_line(text, line, str(path))
                except DataError as e:
                    if not skip_bad:
                        raise
                    if on_skip is not None:
                        on_skip(e)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# --- tokenising into rows ----------------------------------------------------------------------------


@dataclass
class Rows:
    input_ids: np.ndarray  # (n, seq_length + 1) int32
    labels: np.ndarray
    attention_mask: np.ndarray
    index: np.ndarray  # (n,) source lines
    truncated: int
    no_target: int


MAX_SEQ_LENGTH = 1 << 20  # tokens a row: past the longest contexts models train at, and a row stays < 16 MB


def encode(tokenizer: Any, samples: Sequence[Sample], seq_length: int) -> Rows:
    """Tokenised, padded rows of `samples`: prompt positions and padding are -100 in the labels."""
    n, width = len(samples), seq_length + 1
    prompts = tokenizer.encode_batch([s.prompt for s in samples]) if any(s.prompt for s in samples) \
        else [[] for _ in samples]
    responses = tokenizer.encode_batch([s.response for s in samples])
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids = np.full((n, width), tokenizer.pad_id, np.int32)
    labels = np.full((n, width), IGNORE_INDEX, np.int32)
    mask = np.zeros((n, width), np.int32)
    truncated = 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens = p + r + eos
        if len(tokens) > width:
            truncated += 1
            tokens = tokens[:width]
        k, start = len(tokens), min(len(p), width)
        ids[i, :k] = tokens
        labels[i, start:k] = ids[i, start:k]
        mask[i, :k] = 1
    no_target = int(np.sum(~np.any(labels != IGNORE_INDEX, axis=1)))
    return Rows(ids, labels, mask, np.asarray([s.line for s in samples], np.int64), truncated, no_target)


# --- writing -------------------------------------------------------------------------------------------


def shard_paths(out: str | Path, shards: int) -> list[Path]:
    """The data files FileWriter makes for `out`: out itself, or out0 .. out{N-1}."""
    out = Path(out)
    return [out] if shards == 1 else [out.with_name(f"{out.name}{i}") for i in range(shards)]


def _existing_outputs(out: Path) -> list[Path]:
    """Files of an earlier conversion to `out` with any shard count (data files and .db indexes)."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(out.name) + r"\d*(\.db)?")
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def _chunks(samples: Iterator[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """items produced on a background thread: jsonl parsing and tokenisation (whose batch encode runs
    without the GIL) overlap with FileWriter's Python-side packing of the previous chunk."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                q.put(item)
        except BaseException as e:  # re-raised in the consumer, with its one-line message intact
            q.put(e)
            return
        q.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def convert(src: str | Path, out: str | Path, tokenizer: Any, seq_length: int, *, shards: int = 1,
            overwrite: bool = False, skip_bad: bool = False, on_skip: Callable[[DataError], None] | None = None,
            progress: Callable[[int, float], None] | None = None, chunk: int = CHUNK) -> Summary:
    """Convert jsonl `src` into MindRecord `out` (N shards). Nothing appears at `out` unless the whole
    conversion succeeds."""
    from mindspore.mindrecord import FileWriter

    src, out = Path(src), Path(out)
    if not 1 <= seq_length <= MAX_SEQ_LENGTH:
        raise DataError(f"seq_length must be from 1 to {MAX_SEQ_LENGTH} (2^20), not {seq_length}")
    if not 1 <= shards <= 1000:
        raise DataError(f"shards must be between 1 and 1000 (MindRecord's limit), not {shards}")
    if not out.parent.is_dir():
        raise DataError(f"output directory {out.parent} does not exist")
    if out.is_dir():
        raise DataError(f"{out} is a directory; give the output file name, e.g. {out / 'train.mindrecord'}")
    existing = _existing_outputs(out)
    # what this conversion would write or replace must not be what it reads (`--data sft1 --out sft`: sft1
    # is the name of shard 1 of "sft")
    reads = {src.resolve()} | ({Path(tokenizer.path).resolve()} if getattr(tokenizer, "path", None) else set())
    names = [f"{out.name}{i}" for i in range(shards)] if shards > 1 else [out.name]
    written = [out.parent / n for n in names] + [out.parent / f"{n}.db" for n in names] + existing
    clash = next((f for f in written if f.resolve() in reads), None)
    if clash is not None:
        raise DataError(f"{clash} is what this conversion reads (its data or tokenizer) and would be written or "
                        "replaced; give --out another name")
    if existing and not overwrite:
        raise DataError(f"{existing[0]} already exists; pass --overwrite to replace it")
    if not src.is_file():
        raise DataError(f"data file {src} does not exist")

    summary = Summary()
    start = time.perf_counter()
    from accel.staging import discard_staged, stage_dir

    try:
        tmp = stage_dir(out)
        # The writer opens its files at the first write: a file with no usable rows leaves nothing behind.
        writer = FileWriter(str(tmp / out.name), shard_num=shards, overwrite=True)
        writer.add_schema(SCHEMA, "accel_sft")
        writer.add_index(["index"])

        def skipped(e: DataError) -> None:
            summary.skipped += 1
            if on_skip is not None:
                on_skip(e)

        samples = read_jsonl(src, skip_bad, skipped)
        encoded = (encode(tokenizer, c, seq_length) for c in _chunks(samples, chunk))
        for rows in _prefetch(encoded):
            batch = [{"input_ids": rows.input_ids[i], "labels": rows.labels[i],
                      "attention_mask": rows.attention_mask[i], "index": int(rows.index[i])}
                     for i in range(len(rows.index))]
            _written(out, writer.write_raw_data, batch)
            summary.rows += len(batch)
            summary.tokens += int(rows.attention_mask.sum())
            summary.target_tokens += int((rows.labels != IGNORE_INDEX).sum())
            summary.truncated += rows.truncated
            summary.no_target += rows.no_target
            if progress is not None:
                progress(summary.rows, time.perf_counter() - start)
        if summary.rows == 0:
            raise DataError(f"{src} has no rows to convert" + (" (every line was skipped)" if summary.skipped else ""))
        if summary.target_tokens == 0:  # training on it would be loss 0, gradient 0, every step
            raise DataError(f"no row of {src} keeps a target token within --seq-length {seq_length} (each "
                            "prompt fills it): raise --seq-length or shorten the prompts")
        _written(out, writer.commit)
        for old in _existing_outputs(out):
            old.unlink()
        written = sorted(tmp.iterdir())
        for f in written:
            os.replace(f, out.parent / f.name)
        summary.files = tuple(str(out.parent / f.name) for f in written if not f.name.endswith(".db"))
    finally:
        discard_staged(out)
    summary.seconds = time.perf_counter() - start
    return summary


def _written(out: Path, write: Callable[..., Any], *args: Any) -> None:
    """write(*args), with MindSpore's FileWriter failure (a full disk: "Failed to seekp file") as one line."""
    try:
        write(*args)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.lstrip().startswith("-")]
        after = next((i + 1 for i, ln in enumerate(lines) if "Dataset Pipeline Error Message" in ln), None)
        gist = re.sub(r"^(\[[A-Za-z ]+\]\s*)+", "", lines[after] if after is not None and after < len(lines) else
                      lines[0] if lines else type(e).__name__)
        raise DataError(f"cannot write {out}: MindSpore's FileWriter failed ({gist[:160]}); check the space "
                        "left on its disk") from None


# --- reading back ----------------------------------------------------------------------------------------


def resolve(path: str | Path) -> Path:
    """A MindRecord data file: `path` itself, or its first shard when given the name passed at writing."""
    path = Path(path)
    if path.is_file():
        return path
    first = path.with_name(path.name + "0")
    if first.is_file():
        return first
    raise DataError(f"MindRecord file {path} does not exist")


def read_rows(path: str | Path) -> dict[str, np.ndarray]:
    """Every row of a MindRecord dataset (all its shards), in source order (by `index` when present), as
    (n, width) int arrays `input_ids`, `labels`, `attention_mask`. A file without labels trains on every
    token; one without attention_mask counts every token as real."""
    from mindspore.mindrecord import FileReader

    path = resolve(path)
    try:
        reader = FileReader(str(path), num_consumer=1)
    except Exception as e:  # MindSpore raises its own MRM* exception types
        raise DataError(f"{path} is not a readable MindRecord file ({str(e).splitlines()[0]})") from None
    try:
        fields = set(reader.schema())
        if "input_ids" not in fields:
            raise DataError(f"{path} has no input_ids field; its fields are {', '.join(sorted(fields))}")
        rows = list(reader.get_next())
    finally:
        reader.close()
    if not rows:
        raise DataError(f"{path} holds no rows")
    if "index" in fields:
        rows.sort(key=lambda r: int(r["index"]))
    widths = {len(r["input_ids"]) for r in rows}
    if len(widths) > 1:
        raise DataError(f"{path}: rows have different lengths {sorted(widths)[:4]}; training needs padded rows")
    ids = np.stack([r["input_ids"] for r in rows]).astype(np.int64)
    out = {"input_ids": ids,
           "labels": np.stack([r["labels"] for r in rows]).astype(np.int64) if "labels" in fields else ids.copy(),
           "attention_mask": np.stack([r["attention_mask"] for r in rows]).astype(np.int64)
           if "attention_mask" in fields else np.ones_like(ids)}
    return out


def batches(path: str | Path | dict[str, np.ndarray], batch_size: int, *, shuffle: bool = False, seed: int = 0,
            epochs: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Training batches of a MindRecord dataset, the same on every backend: `input_ids` (b, s) and
    `labels` (b, s) already shifted (labels[:, t] is the target of position t), `attention_mask` (b, s).
    Full batches only; `epochs` None repeats forever, reshuffling (seeded) each epoch when `shuffle`.
    The file is read, and checked, when this is called; `path` may also be rows `read_rows` returned."""
    if batch_size < 1:
        raise DataError(f"batch size must be 1 or more, not {batch_size}")
    rows = path if isinstance(path, dict) else read_rows(path)
    n = len(rows["input_ids"])
    if n < batch_size:
        where = "the data" if isinstance(path, dict) else str(path)
        raise DataError(f"{where} has {n} row(s), fewer than one batch of {batch_size}")
    return _batches(rows, batch_size, shuffle, seed, epochs)


def _batches(rows: dict[str, np.ndarray], batch_size: int, shuffle: bool, seed: int,
             epochs: int | None) -> Iterator[dict[str, np.ndarray]]:
    n = len(rows["input_ids"])
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(n) if shuffle else np.arange(n)
        for b in range(n // batch_size):
            pick = order[b * batch_size : (b + 1) * batch_size]
            yield {"input_ids": rows["input_ids"][pick, :-1], "labels": rows["labels"][pick, 1:],
                   "attention_mask": rows["attention_mask"][pick, :-1]}
        epoch += 1
