"""Outside data coming in: one way to read JSON at every boundary (config.json, index files, tokenizer
files, adapter configs, jsonl lines, golden manifests), with one-line errors that name the file and say
what is wrong with it in words (not a parser's traceback, not a RecursionError or a digit-limit
ValueError), raised as the caller's error class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accel.errors import AccelError


def parse_json(text: str | bytes, where: str, error: type[AccelError]) -> Any:
    """The value `text` holds; `error("{where} is not valid JSON (why)")` when it holds none."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        why = f"{e.msg} at line {e.lineno} column {e.colno}"
    except UnicodeDecodeError:
        why = "not UTF-8"
    except RecursionError:
        why = "nested deeper than a parser's stack allows"
    except ValueError as e:  # Python refuses integers past its digit limit (4300) before anything else
        why = "an integer too long to read" if "digits" in str(e) else str(e).splitlines()[0][:120]
    raise error(f"{where} is not valid JSON ({why})") from None


def read_json_object(path: Path, error: type[AccelError], what: str = "") -> dict[str, Any]:
    """The JSON object in the file at `path`; `error` when it cannot be read, is not JSON or holds
    something else (a list, a number). `what` names the file's role in the messages."""
    where = f"{path}{f' ({what})' if what else ''}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{where} cannot be read: {e.strerror or e}") from None
    value = parse_json(raw, where, error)
    if not isinstance(value, dict):
        raise error(f"{where} does not hold a JSON object")
    return value
