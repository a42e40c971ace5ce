"""`accel scan` of the files that are not Python: requirements, pyproject.toml, JSON/YAML configs,
shell scripts and Makefiles (what is matched in each: accel/scan.py's docstring)."""

from __future__ import annotations

import bisect
import fnmatch
import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from accel.scan_table import Finding, Memo, Pattern, Table, canon, normalise

# --- requirements: requirements files, setup.py, pyproject.toml ------------------------------------------

_REQUIREMENT_NAME = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


def requirement_pattern(text: str, table: Table, memo: Memo) -> Pattern | None:
    """The first pattern that one requirement (`flash-attn>=2; python_version>'3.8'`, `x @ URL`) or pip
    option line (`--extra-index-url URL`) names: by its normalised package name or its text."""
    if ("requirement", text) not in memo:
        m = None if text.lstrip().startswith("-") else _REQUIREMENT_NAME.match(text)
        name = normalise(m.group(1)) if m else ""
        memo["requirement", text] = next(
            (p for p in table.patterns if name and any(fnmatch.fnmatchcase(name, g) for g in p.packages)
             or any(r.search(text) for r in p.requirement_text)), None)
    return memo["requirement", text]


def scan_requirements(text: str, file: str, table: Table, target: str, memo: Memo) -> list[Finding]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        requirement = re.sub(r"(^|\s)#.*", "", line).strip()  # pip: a comment starts at a # after a space
        p = requirement_pattern(requirement, table, memo) if requirement else None
        if p:
            out.append(Finding.of(p, target, file, number, requirement))
    return out


class _Lines:
    """Line numbers of text found again by regular expression, for parsers that keep no positions: each
    search goes on from the previous hit of the same expression, so a repeated string gets its own line."""

    def __init__(self, text: str):
        self.lines, self.after = text.splitlines(), dict[str, int]()

    def find(self, regex: str) -> int:
        r = re.compile(regex)
        start = self.after.get(regex, 0)
        for i in range(start, len(self.lines)):
            if r.search(self.lines[i]):
                self.after[regex] = i + 1
                return i + 1
        return 0


def scan_pyproject(text: str, file: str, table: Table, target: str, memo: Memo) -> list[Finding]:
    """[project] dependencies and optional-dependencies, [build-system] requires, [dependency-groups],
    poetry's dependency tables (keys are the names) and the index URLs of poetry and uv."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError("reading pyproject.toml needs Python 3.11 or later (tomllib)") from None
    data = tomllib.loads(text)
    lists = lambda v: v if isinstance(v, list) else []  # noqa: E731
    tables = lambda v: v if isinstance(v, dict) else {}  # noqa: E731
    project, tool = tables(data.get("project")), tables(data.get("tool"))
    poetry, uv = tables(tool.get("poetry")), tables(tool.get("uv"))
    strings = [*lists(project.get("dependencies")), *lists(tables(data.get("build-system")).get("requires")),
               *(s for group in tables(project.get("optional-dependencies")).values() for s in lists(group)),
               *(s for group in tables(data.get("dependency-groups")).values() for s in lists(group)),
               *(tables(s).get("url") for s in [*lists(poetry.get("source")), *lists(uv.get("index"))])]
    names = [*tables(poetry.get("dependencies")), *tables(poetry.get("dev-dependencies")),
             *(n for g in tables(poetry.get("group")).values() for n in tables(tables(g).get("dependencies")))]
    lines, out = _Lines(text), []
    for s in strings:
        if isinstance(s, str) and (p := requirement_pattern(s, table, memo)):
            out.append(Finding.of(p, target, file, lines.find(rf"""(["']){re.escape(s)}\1"""), s))
    for n in names:
        if p := requirement_pattern(n, table, memo):
            out.append(Finding.of(p, target, file, lines.find(rf"""^\s*["']?{re.escape(n)}["']?\s*="""), n))
    return out


# --- configs: JSON and YAML --------------------------------------------------------------------------

_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\],:]|[^\s{}\[\],:"]+')


def _json_leaves(text: str) -> tuple[set[str], list[tuple[str, Any, int]]]:
    """(top-level keys, [(dotted key path, scalar, line)]) of a JSON document. json keeps no positions:
    its tokens are walked again, a value's line being its key's (an array element's, its own)."""
    json.loads(text)  # a document json rejects is a warning, as a Python file that does not parse
    frames: list[list[Any]] = []  # per open container: [is_object, key, key's line, expecting a key]
    top: set[str] = set()
    leaves, line, pos = [], 1, 0
    for m in _JSON_TOKEN.finditer(text):
        line += text.count("\n", pos, m.start())
        pos, tok = m.start(), m.group()
        frame = frames[-1] if frames else None
        if tok in "{[":
            frames.append([tok == "{", None, line, tok == "{"])
        elif tok in "}]":
            frames.pop()
        elif tok == ",":
            if frame and frame[0]:
                frame[3] = True
        elif tok != ":":
            value = json.loads(tok)
            if frame and frame[0] and frame[3]:
                frame[1:4] = [str(value), line, False]
                if len(frames) == 1:
                    top.add(str(value))
            else:
                path = ".".join(f[1] for f in frames if f[0])
                leaves.append((path, value, frame[2] if frame and frame[0] else line))
    return top, leaves


def _yaml_leaves(root: yaml.Node) -> tuple[set[str], list[tuple[str, Any, int]]]:
    """The same for one YAML document, from the composed node tree (marks give the lines). A node shared
    through an alias is walked once."""
    mapping = isinstance(root, yaml.MappingNode)
    top = {k.value for k, _ in root.value if isinstance(k, yaml.ScalarNode)} if mapping else set()
    leaves: list[tuple[str, Any, int]] = []
    seen: set[int] = set()
    todo: list[tuple[yaml.Node, str, int]] = [(root, "", root.start_mark.line + 1)]
    while todo:
        node, path, line = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):  # pushed last to first: walked in document order
            todo += [(v, f"{path}.{k.value}" if path else str(k.value), k.start_mark.line + 1)
                     for k, v in reversed(node.value)]
        elif isinstance(node, yaml.SequenceNode):
            todo += [(v, path, v.start_mark.line + 1) for v in reversed(node.value)]
        else:
            boolean = node.tag.endswith(":bool")
            leaves.append((path, node.value.lower() in ("true", "yes", "on") if boolean else node.value, line))
    return top, leaves


def scan_config(text: str, file: str, table: Table, target: str, memo: Memo) -> list[Finding]:
    if file.endswith(".json"):
        documents = [_json_leaves(text)]
    else:
        documents = [_yaml_leaves(node) for node in yaml.compose_all(text, Loader=yaml.SafeLoader)
                     if node is not None]
    out: dict[tuple[int, str], Finding] = {}
    for top, leaves in documents:
        kinds = frozenset({"any", *(kind for kind, keys in table.documents.items() if top.intersection(keys))})
        for path, value, line in leaves:
            key = ("config", kinds, path, canon(value))
            if key not in memo:
                memo[key] = next((p for p in table.using["config"] for c in p.config if c.document in kinds
                                  and fnmatch.fnmatchcase(path, c.key)
                                  and (c.values is None or key[3] in c.values)), None)
            if p := memo[key]:
                shown = json.dumps(value) if isinstance(value, bool) or value is None else value
                out.setdefault((line, p.id), Finding.of(p, target, file, line, f"{path}: {shown}"))
    return list(out.values())


# --- shell scripts and Makefiles ---------------------------------------------------------------------------

_HEREDOC = re.compile(r"(?<!<)<<-?(?!<)\s*['\"]?(\w+)")


def _shell_commands(text: str) -> Iterator[tuple[int, list[int], str]]:
    """(line, where each further line starts in it, command) for each command of a script: lines ending
    in a backslash joined, comments dropped, split at ; & | outside quotes, here-documents skipped. A
    command that echoes or prints (echo "check nvidia-smi") is text, not a use; Make's @ and - prefixes
    are dropped."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        first, parts = i, [lines[i]]
        while parts[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        i += 1
        starts = [0]  # where each physical line begins in the joined one (a backslash becomes a space)
        for p in parts[:-1]:
            starts.append(starts[-1] + len(p))
        logical = "".join(p[:-1] + " " for p in parts[:-1]) + parts[-1]
        heredoc = None
        for offset, command in _split_commands(logical):
            heredoc = heredoc or _HEREDOC.search(command)
            stripped = command.lstrip(" \t@-")
            base = offset + len(command) - len(stripped)
            words = [w for w in stripped.split() if not re.fullmatch(r"\w+=\S*", w)]
            if stripped and words[:1] not in (["echo"], ["printf"]):
                yield first + 1, [s - base for s in starts[1:]], stripped
        if heredoc:  # its body is data, up to the terminator line
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1


def _split_commands(line: str) -> Iterator[tuple[int, str]]:
    """(offset, text) of each command of one line, up to its comment; quotes and escapes respected."""
    start, quote, i = 0, "", 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "\\":
            i += 1
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        elif ch in ";&|":
            yield start, line[start:i]
            start = i + 1
        i += 1
    yield start, line[start:i]


def scan_shell(text: str, file: str, table: Table, target: str, memo: Memo) -> list[Finding]:
    out: dict[tuple[int, str], Finding] = {}
    for first, starts, command in _shell_commands(text):
        for p in table.using["shell"]:
            for r in p.shell:
                if m := r.search(command):
                    line = first + bisect.bisect_right(starts, m.start())
                    out.setdefault((line, p.id), Finding.of(p, target, file, line, command[:120].rstrip()))
    return list(out.values())
