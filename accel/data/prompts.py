"""Prompts as text: `--prompt TEXT`, `--prompts FILE.jsonl`, and a small built-in set, encoded through the
checkpoint's own tokenizer (accel.data.tokenizer).

A prompts file holds one JSON object a line, blank lines skipped:
  {"prompt": "..."}                                   plain text: the family's prefix (ChatGLM's
                                                      [gMASK] sop) then the text's ids
  {"messages": [{"role": "user", "content": "..."}]}  a chat, rendered by render_chat with the
                                                      assistant's turn opened
`--prompts builtin` takes BUILTIN_PROMPTS (Chinese, English, code; short ones and one long one).
A prompt longer than the model's context is refused, never cut (only the built-in set, probes run by
`accel conformance`, is cut to fit: see conformance.runner.checkpoint_prompts).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accel.data.tokenizer import Tokenizer, check_messages, load_tokenizer, read_json, render_chat
from accel.errors import UsageError
from accel.inputs import parse_json

# Where each family's config.json states the context length, first found wins. Qwen v1's seq_length is
# the training length that dynamic NTK stretches; max_position_embeddings is the model's own limit.
CONTEXT_KEYS: dict[str, tuple[str, ...]] = {
    "chatglm": ("seq_length",),
    "qwen": ("max_position_embeddings", "seq_length"),
    "qwen2": ("max_position_embeddings",),
    "baichuan": ("model_max_length", "max_position_embeddings"),
}
MAX_LINE = 1 << 20  # a prompts line longer than this is a mistake, not a prompt


@dataclass(frozen=True)
class Prompt:
    """Plain `text`, or chat `messages`; `where` names it in errors ("FILE line 3", "--prompt")."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    where: str = ""


_LONG = ("The history of computing is a story of layers. At the bottom sit transistors, switching on and off "
         "billions of times a second; above them, logic gates and arithmetic units; above those, instruction "
         "sets that a compiler targets; and above the compiler, languages in which people say what they "
         "mean. Each layer hides the one below it, and each was built because the layer below had become "
         "too intricate to think about directly. 计算的历史是一层又一层的抽象：晶体管之上是逻辑门，逻辑门之上是"
         "指令集，指令集之上是编译器与编程语言。每一层都隐藏了下面一层的细节。Summarise this passage in "
         "three sentences, then translate your summary into Chinese.")

BUILTIN_PROMPTS: tuple[Prompt, ...] = (
    Prompt(text="你好，请介绍一下你自己。", where="builtin prompt 1"),
    Prompt(text="The capital of France is", where="builtin prompt 2"),
    Prompt(text="def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", where="builtin prompt 3"),
    Prompt(messages=({"role": "user", "content": "用一句话解释什么是机器学习。"},), where="builtin prompt 4"),
    Prompt(messages=({"role": "system", "content": "You are a concise assistant."},
                     {"role": "user", "content": "Write a Python one-liner that reverses a string."}),
           where="builtin prompt 5"),
    Prompt(text=_LONG, where="builtin prompt 6"),
)


def _parse_line(obj: Any, where: str) -> Prompt:
    if isinstance(obj, dict) and set(obj) == {"prompt"} and isinstance(obj["prompt"], str):
        if not obj["prompt"]:
            raise UsageError(f"{where}: the prompt is empty")
        return Prompt(text=obj["prompt"], where=where)
    if isinstance(obj, dict) and set(obj) == {"messages"} and isinstance(obj["messages"], list):
        try:
            messages = check_messages(obj["messages"])
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        return Prompt(messages=tuple(messages), where=where)
    raise UsageError(f'{where} is neither {{"prompt": "..."}} nor {{"messages": [{{"role": ..., "content": ...}}]}}')


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSON-lines file (see the module docstring); one-line errors naming file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    prompts = []
    for n, line in enumerate(raw.splitlines(), 1):
        where = f"{path} line {n}"
        if not line.strip():
            continue
        if len(line) > MAX_LINE:
            raise UsageError(f"{where} is longer than {MAX_LINE} bytes")
        obj = parse_json(line, where, UsageError)
        prompts.append(_parse_line(obj, where))
    if not prompts:
        raise UsageError(f"prompts file {path} holds no prompts; write one JSON object a line, "
                         '{"prompt": "..."} or {"messages": [...]}')
    return prompts


def context_length(directory: str | Path) -> int | None:
    """The model's context length from a checkpoint directory's config.json (None when it states none)."""
    cfg = read_json(Path(directory) / "config.json")
    for key in CONTEXT_KEYS.get(str(cfg.get("model_type")), ()):
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    if prompt.messages is not None:
        return render_chat(tokenizer, list(prompt.messages))
    return [*tokenizer.prefix, *tokenizer.encode(prompt.text or "")]


def encode_prompts(directory: str | Path, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                   max_len: int | None = None, room: int = 0) -> list[list[int]]:
    """Each prompt's ids; max_len (default: the context length in directory's config.json, no limit when
    it has none) is the longest a prompt and the `room` tokens generated after it may be together."""
    limit = max_len if max_len is not None else context_length(directory)
    out = []
    for i, prompt in enumerate(prompts, 1):
        ids = encode_prompt(tokenizer, prompt)
        name = prompt.where or f"prompt {i}"
        if not ids:
            raise UsageError(f"{name} encodes to no tokens")
        if limit is not None and len(ids) + room > limit:
            after = f" and the {room} tokens generated after it pass" if room else ","
            raise UsageError(f"{name} is {len(ids)} tokens{after} the model's context is {limit}; shorten it")
        out.append(ids)
    return out


# --- the CLI's prompt options (infer, generate) -------------------------------------------------------


def add_prompt_options(p: argparse.ArgumentParser, ids_help: str) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--input-ids", metavar="IDS", help=ids_help)
    add_text_prompt_options(g, "(--model must be a directory)")


def add_text_prompt_options(g: Any, where: str) -> None:
    """--prompt and --prompts, for a command whose model(s) `where` says must be checkpoint directories."""
    g.add_argument("--prompt", metavar="TEXT", help=f"prompt text, encoded by the checkpoint's own tokenizer {where}")
    g.add_argument("--prompts", metavar="FILE.jsonl",
                   help='prompts, one JSON object a line: {"prompt": "..."} or {"messages": [{"role": ..., '
                        '"content": ...}, ...]} (a chat, rendered with the checkpoint\'s chat template or its '
                        'family\'s format); "builtin" for a small built-in set')


def given_prompts(args: argparse.Namespace) -> list[Prompt] | None:
    """The prompts of --prompt / --prompts (None when neither is given)."""
    if args.prompt is not None:
        if not args.prompt:
            raise UsageError("--prompt is empty")
        return [Prompt(text=args.prompt, where="--prompt")]
    if args.prompts is None:
        return None
    if args.prompts == "builtin" and not Path(args.prompts).exists():
        return list(BUILTIN_PROMPTS)
    return read_prompts(args.prompts)


def prompts_from_args(args: argparse.Namespace) -> tuple[Tokenizer | None, list[np.ndarray]]:
    """(tokenizer, [ids (1, S), ...]) for --input-ids / --prompt / --prompts; the tokenizer is None for ids."""
    from accel.commands._common import parse_ids

    if args.input_ids is not None:
        return None, [parse_ids(args.input_ids)]
    option = "--prompt" if args.prompt is not None else "--prompts"
    directory = Path(args.model)
    if not directory.is_dir():
        raise UsageError(f"{option} needs --model to be a checkpoint directory with its tokenizer; "
                         f"{args.model!r} is none (a preset has no tokenizer): give --input-ids")
    prompts = given_prompts(args) or []
    tokenizer = load_tokenizer(directory)
    ids = encode_prompts(directory, tokenizer, prompts)
    return tokenizer, [np.asarray([i], dtype=np.int64) for i in ids]
