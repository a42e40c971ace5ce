"""`accel scan`: what ties a Python repository to CUDA, and what each tie becomes on a target.

Every *.py file under a directory (hidden directories, virtualenvs, __pycache__, site-packages and
node_modules skipped) is parsed with `ast`, never imported or run. The patterns and their per-target
severity, replacement and reason are data: accel/scan_patterns.yaml. Names are resolved through the
file's imports (`import torch as th`, `from torch import cuda`), so a local variable or function called
`cuda`, an attribute `.cuda` that is not called, and "cuda" in a comment or docstring are not findings.
A file whose text holds nothing any pattern could match (`Triggers`) is not parsed at all: most of a
large generated file's cost was the parse.
"""

from __future__ import annotations

import ast
import json
import os
import re
import stat
import tokenize
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from accel.errors import AccelError, UsageError

SEVERITIES = ("runs-via-migrate", "needs-replacement", "no-equivalent")  # least to most work
TARGETS = ("npu", "mindspore", "tvm", "xla")
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "node_modules", "venv"})
_MATCH_KINDS = frozenset({"names", "imports", "method_call", "strings", "fstrings", "compare", "calls", "decorators"})


@dataclass(frozen=True)
class Rule:
    severity: str
    replacement: str
    reason: str


@dataclass(frozen=True)
class CallMatch:
    name: str
    if_strings_end: tuple[str, ...] = ()
    if_argument: tuple[str, int] | None = None  # (keyword, position)


@dataclass(frozen=True)
class Pattern:
    id: str
    summary: str
    rules: dict[str, Rule]
    names: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    method_call: tuple[str, ...] = ()
    strings: tuple[re.Pattern[str], ...] = ()
    fstrings: tuple[str, ...] = ()
    compare: bool = False
    calls: tuple[CallMatch, ...] = ()
    decorators: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finding:
    file: str  # relative to the scanned root, with forward slashes
    line: int
    pattern: str
    severity: str
    replacement: str
    code: str  # what matched, for the text and markdown reports

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "pattern": self.pattern, "severity": self.severity,
                "replacement": self.replacement}


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AccelError(f"{where}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _pattern(entry: Any, where: str) -> Pattern:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        raise AccelError(f"{where}: each pattern needs an id, a summary, a match and targets")
    where = f"{where}: pattern {entry['id']}"
    match, targets = entry.get("match"), entry.get("targets")
    if not isinstance(match, dict) or not match or set(match) - _MATCH_KINDS:
        raise AccelError(f"{where}: match must use {', '.join(sorted(_MATCH_KINDS))}")
    if not isinstance(targets, dict) or set(targets) != set(TARGETS):
        raise AccelError(f"{where}: targets must be exactly {', '.join(TARGETS)}")
    rules = {}
    for target, rule in targets.items():
        if not isinstance(rule, dict) or rule.get("severity") not in SEVERITIES:
            raise AccelError(f"{where}: {target}: severity must be one of {', '.join(SEVERITIES)}")
        for key in ("replacement", "reason"):
            if not isinstance(rule.get(key), str) or not rule[key].strip():
                raise AccelError(f"{where}: {target}: {key} must be a non-empty string")
        rules[target] = Rule(rule["severity"], rule["replacement"].strip(), rule["reason"].strip())
    calls = []
    for call in match.get("calls", []):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise AccelError(f"{where}: calls entries are mappings with a name")
        arg = call.get("if_argument")
        calls.append(CallMatch(call["name"], _strings(call.get("if_strings_end", []), where),
                               (str(arg[0]), int(arg[1])) if arg else None))
    try:
        strings = tuple(re.compile(s) for s in _strings(match.get("strings", []), where))
    except re.error as e:
        raise AccelError(f"{where}: bad regular expression: {e}") from None
    return Pattern(
        entry["id"], str(entry.get("summary", "")), rules,
        names=_strings(match.get("names", []), where), imports=_strings(match.get("imports", []), where),
        method_call=_strings(match.get("method_call", []), where), strings=strings,
        fstrings=_strings(match.get("fstrings", []), where), compare=bool(match.get("compare", False)),
        calls=tuple(calls), decorators=_strings(match.get("decorators", []), where),
    )


def load_patterns(path: str | Path | None = None) -> list[Pattern]:
    """The pattern table (default: the reviewed accel/scan_patterns.yaml), validated."""
    if path is None:
        text = resources.files("accel").joinpath("scan_patterns.yaml").read_text(encoding="utf-8")
        where = "scan_patterns.yaml"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("patterns"), list):
        raise AccelError(f"{where}: expected a mapping with a `patterns` list")
    patterns = [_pattern(entry, where) for entry in data["patterns"]]
    ids = [p.id for p in patterns]
    if len(set(ids)) != len(ids):
        raise AccelError(f"{where}: duplicate pattern ids: {sorted(i for i, n in Counter(ids).items() if n > 1)}")
    return patterns


# --- one file ------------------------------------------------------------------------------------------


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement, nested ones too (imports are statements: no expression needs walking)."""
    for node in body:
        yield node
        for block in (getattr(node, "body", []), getattr(node, "orelse", []), getattr(node, "finalbody", []),
                      *(h.body for h in getattr(node, "handlers", [])), *(c.body for c in getattr(node, "cases", []))):
            yield from _statements(block)


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the qualified name an import bound it to."""
    out: dict[str, str] = {}
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:
                    root = a.name.split(".")[0]
                    out[root] = root
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


class _FileScanner(ast.NodeVisitor):
    def __init__(self, patterns: Sequence[Pattern], target: str, aliases: dict[str, str], file: str,
                 memo: dict[tuple[Any, ...], Pattern | None]):
        self.patterns, self.target, self.aliases, self.file = patterns, target, aliases, file
        self.memo = memo  # (kind, what matched) -> its first pattern, shared by the files of one scan
        self.compared: set[int] = set()  # ids of string nodes that are compared against
        self.findings: dict[tuple[int, str], Finding] = {}
        self.torch_bound = False  # the file assigns the name torch

    def qualname(self, node: ast.AST) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in self.aliases:
            return None
        return ".".join([self.aliases[node.id], *reversed(parts)])

    def report(self, node: ast.AST, code: str, matches: Any, key: tuple[Any, ...] | None = None) -> None:
        """The first pattern (table order) for which matches(pattern) holds becomes a finding. `key`
        says what matches depends on, when that is all it depends on: the answer is then looked up once."""
        if key is None or key not in self.memo:
            first = next((p for p in self.patterns if matches(p)), None)
            if key is None:
                return self._found(node, code, first)
            self.memo[key] = first
        self._found(node, code, self.memo[key])

    def _found(self, node: ast.AST, code: str, p: Pattern | None) -> None:
        if p is not None:
            rule = p.rules[self.target]
            line = getattr(node, "lineno", 0)
            self.findings.setdefault((line, p.id), Finding(self.file, line, p.id, rule.severity,
                                                           rule.replacement, code))

    @staticmethod
    def _under(name: str, prefixes: Sequence[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    # imports
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.report(node, f"import {a.name}", lambda p, m=a.name: self._under(m, p.imports), ("import", a.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:  # relative imports are the repository's own modules
            return
        for a in node.names:
            module = node.module if a.name == "*" else f"{node.module}.{a.name}"
            self.report(node, f"from {node.module} import {a.name}",
                        lambda p, m=module: self._under(m, p.imports), ("import", module))

    # names, calls, decorators
    def visit_Name(self, node: ast.Name) -> None:
        if node.id == "torch" and isinstance(node.ctx, ast.Store):
            self.torch_bound = True
        q = self.aliases.get(node.id)
        if q:
            self.report(node, q, lambda p: self._under(q, p.names), ("name", q))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        q = self.qualname(node)
        if q is None:
            self.generic_visit(node)
        else:  # the outermost resolved name only: torch.cuda.amp.autocast, not torch.cuda as well
            self.report(node, q, lambda p: self._under(q, p.names), ("name", q))

    def visit_Call(self, node: ast.Call) -> None:
        q = self.qualname(node.func)
        if q and ("call", q) not in self.memo:  # whether any pattern calls q at all
            self.memo["call", q] = next((p for p in self.patterns if any(c.name == q for c in p.calls)), None)
        if q and self.memo["call", q]:
            self.report(node, f"{q}(...)", lambda p: any(self._call_matches(c, q, node) for c in p.calls))
        if isinstance(node.func, ast.Attribute):
            if not (q or "").startswith("torch."):  # torch.cuda(...) is the module, not a .cuda() method
                attr = node.func.attr
                self.report(node, f".{attr}()", lambda p: attr in p.method_call, ("method", attr))
            if node.func.attr in ("startswith", "endswith"):
                self.compared.update(id(a) for a in node.args)
        self.generic_visit(node)

    def _call_matches(self, c: CallMatch, q: str, node: ast.Call) -> bool:
        if c.name != q:
            return False
        if c.if_strings_end:
            found = [n.value for a in [*node.args, *(k.value for k in node.keywords)] for n in ast.walk(a)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            if not any(s.endswith(c.if_strings_end) for s in found):
                return False
        if c.if_argument:
            keyword, position = c.if_argument
            passed = any(k.arg == keyword for k in node.keywords) or len(node.args) > position
            if not passed:
                return False
        return True

    def _decorated(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        for d in node.decorator_list:
            q = self.qualname(d.func if isinstance(d, ast.Call) else d)
            if q:
                self.report(d, f"@{q}", lambda p, q=q: q in p.decorators, ("decorator", q))
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _decorated

    # strings
    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, (ast.Constant, ast.JoinedStr)):
            return  # a docstring or a bare string statement: text, not a value
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        self.compared.update(id(o) for o in [node.left, *node.comparators])
        self.generic_visit(node)

    def visit_MatchValue(self, node: ast.MatchValue) -> None:
        self.compared.add(id(node.value))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            value, compared = node.value, id(node) in self.compared
            self.report(node, repr(value), lambda p: (compared or not p.compare)
                        and any(r.fullmatch(value) for r in p.strings), ("string", value, compared))

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        # An f-string is judged by its shape, f"cuda:{rank}" -> "cuda:{}": a log message that mentions
        # nccl is text, a device string built from a rank is a value.
        shape = "".join(str(v.value) if isinstance(v, ast.Constant) else "{}" for v in node.values)
        compared = id(node) in self.compared
        self.report(node, f"f{shape!r}", lambda p: (compared or not p.compare) and shape in p.fstrings,
                    ("fstring", shape, compared))
        for v in node.values:
            if isinstance(v, ast.FormattedValue):
                self.visit(v.value)


class Triggers:
    """What a source's text must contain for any pattern to match in it: a name's last component as a
    word (every component of a resolved name is spelled in the file, in an import or at the use), a
    method, an f-string's literal part, or what a string pattern requires. A file with none of them is
    not parsed: a string spelled with escapes or split across adjacent literals ("cu" "da") is not seen
    in it. Each is a plain substring test first, a regular expression only where that finds something."""

    def __init__(self, patterns: Sequence[Pattern]):
        words = {n.rsplit(".", 1)[-1] for p in patterns
                 for n in (*p.names, *p.imports, *p.decorators, *(c.name for c in p.calls), *p.method_call)}
        self.words = {w: re.compile(rf"\b{re.escape(w)}\b") for w in sorted(words)}
        self.pieces = sorted({max(f.split("{}"), key=len) for p in patterns for f in p.fstrings} - {""})
        self.strings = [(_required(r.pattern), r) for p in patterns for r in p.strings]

    def __call__(self, text: str) -> bool:
        return (any(w in text and r.search(text) for w, r in self.words.items())
                or any(piece in text for piece in self.pieces)
                or any((need is None or need in text) and r.search(text) for need, r in self.strings))


def _required(regex: str) -> str | None:
    """The longest literal run every match of `regex` contains, found conservatively (outside groups,
    not quantified, no alternation), or None."""
    if "|" in regex or "\\" in regex.replace("\\d", "").replace("\\w", "").replace("\\s", ""):
        return None
    runs, depth, run = [], 0, ""
    for i, ch in enumerate(regex):
        quantified = regex[i + 1: i + 2] in ("?", "*", "+", "{")
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if depth == 0 and (ch.isalnum() or ch in ":_-,") and not quantified and regex[i - 1: i] != "\\":
            run += ch
        else:
            runs.append(run)
            run = ""
    return max([*runs, run], key=len) or None


def scan_source(source: str, file: str, patterns: Sequence[Pattern], target: str,
                memo: dict[tuple[Any, ...], Pattern | None] | None = None) -> list[Finding]:
    """Findings in one file's source. Raises SyntaxError (or ValueError for NUL bytes) when it does not parse."""
    tree = ast.parse(source, filename=file)
    aliases, memo = _aliases(tree), {} if memo is None else memo
    imported = "torch" in aliases
    scanner = _FileScanner(patterns, target, {"torch": "torch", **aliases}, file, memo)
    scanner.visit(tree)
    if scanner.torch_bound and not imported:  # `torch` means torch unless the file binds it otherwise
        scanner = _FileScanner(patterns, target, aliases, file, memo)
        scanner.visit(tree)
    return sorted(scanner.findings.values(), key=lambda f: (f.line, f.pattern))


# --- a repository --------------------------------------------------------------------------------------


def _skipped(d: Path) -> bool:
    return d.name.startswith(".") or d.name in SKIP_DIRS or (d / "pyvenv.cfg").exists()


def python_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(Path(dirpath, d)))
        yield from (Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))


@dataclass
class Report:
    root: str
    target: str
    files: int = 0
    findings: list[Finding] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)  # files that could not be scanned

    def at_or_above(self, severity: str) -> list[Finding]:
        if severity == "none":
            return []
        rank = SEVERITIES.index(severity)
        return [f for f in self.findings if SEVERITIES.index(f.severity) >= rank]

    def summary(self, fail_on: str) -> dict[str, Any]:
        counts = Counter(f.severity for f in self.findings)
        return {
            "target": self.target, "files": self.files, "findings": len(self.findings),
            "by_severity": {s: counts.get(s, 0) for s in SEVERITIES},
            "by_pattern": dict(sorted(Counter(f.pattern for f in self.findings).items())),
            "warnings": self.warnings, "fail_on": fail_on, "failed": bool(self.at_or_above(fail_on)),
        }


def table_column(target: str) -> str:
    """The pattern table's column for a target: a column's name itself, or a target string as every
    other command takes it (torch:npu and torch-compile:npu -> npu, mindspore:ascend -> mindspore, ...)."""
    if target in TARGETS:
        return target
    from accel.targets import parse

    t = parse(target)  # an unknown backend or device is its one-line error
    column = t.kind if t.backend in ("torch", "torch-compile") else t.backend  # torch:npu -> npu
    if column not in TARGETS:
        raise UsageError(f"scan has no table for {target}: it lists what changes when CUDA code moves to "
                         f"torch:npu, mindspore:*, tvm:* or xla:* ({', '.join(TARGETS)} for short)")
    return column


def scan(path: str | Path, target: str = "npu", patterns: Sequence[Pattern] | None = None) -> Report:
    """Scan every Python file under `path` (a directory or one file) for `target` (see table_column)."""
    target = table_column(target)
    root = Path(path)
    if not root.exists():
        raise UsageError(f"{path} does not exist; give a repository directory or a .py file")
    patterns = load_patterns() if patterns is None else patterns
    report = Report(str(path), target)
    base = root if root.is_dir() else root.parent
    tied, memo = Triggers(patterns), {}
    for file in python_files(root):
        # a name that is not UTF-8 (its bytes kept as surrogates) is shown escaped: it still prints
        rel = file.relative_to(base).as_posix().encode("utf-8", "backslashreplace").decode("utf-8")
        report.files += 1
        try:
            st = file.stat()
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a link to /dev/zero never end
                report.warnings.append({"file": rel, "line": 0, "message": "not scanned: not a regular file"})
                continue
            if st.st_size > MAX_SOURCE_BYTES:
                report.warnings.append({"file": rel, "line": 0, "message": "not scanned: larger than "
                                        f"{MAX_SOURCE_BYTES >> 20} MB, not hand-written source"})
                continue
            with tokenize.open(file) as f:  # honours a coding cookie
                source = f.read(MAX_SOURCE_BYTES + 1)
            if tied(source):
                report.findings += scan_source(source, rel, patterns, target, memo)
        except SyntaxError as e:
            report.warnings.append({"file": rel, "line": e.lineno or 0, "message": f"not scanned: {e.msg}"})
        except (UnicodeDecodeError, ValueError, RecursionError, MemoryError, OSError) as e:
            # MemoryError: CPython's parser on expressions nested past its stack
            message = str(e)[:200] or type(e).__name__
            report.warnings.append({"file": rel, "line": 0, "message": f"not scanned: {message}"})
    return report


MAX_SOURCE_BYTES = 8 << 20  # a .py larger than this is generated or data, not code to port


# --- output --------------------------------------------------------------------------------------------


def _summary_line(s: dict[str, Any]) -> str:
    by = ", ".join(f"{n} {sev}" for sev, n in s["by_severity"].items())
    return f"{s['files']} files scanned for {s['target']}: {s['findings']} findings ({by})"


def as_json(report: Report, fail_on: str) -> str:
    return json.dumps({"findings": [f.as_json() for f in report.findings], "summary": report.summary(fail_on)},
                      indent=2)


def as_text(report: Report, fail_on: str) -> str:
    lines = [f"{f.file}:{f.line}: {f.severity}: {f.pattern}: {f.code} -> {f.replacement}" for f in report.findings]
    s = report.summary(fail_on)
    lines += [f"warning: {w['file']}:{w['line']}: {w['message']}" for w in report.warnings]
    lines.append(("" if not report.findings else "\n") + _summary_line(s))
    if s["failed"]:
        lines.append(f"{len(report.at_or_above(fail_on))} findings at or above --fail-on {fail_on}")
    return "\n".join(lines)


def as_markdown(report: Report, fail_on: str, patterns: Sequence[Pattern]) -> str:
    why = {p.id: p.rules[report.target].reason for p in patterns}
    esc = lambda t: str(t).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    s = report.summary(fail_on)
    out = [f"# accel scan: `{report.root}` for {report.target}", "", _summary_line(s), ""]
    if report.findings:
        out += ["| location | severity | pattern | code | replacement | why |", "|---|---|---|---|---|---|"]
        out += [f"| {esc(f.file)}:{f.line} | {f.severity} | {f.pattern} | `{esc(f.code)}` | {esc(f.replacement)} "
                f"| {esc(why.get(f.pattern, ''))} |" for f in report.findings]
    if report.warnings:
        out += ["", "Not scanned:", ""] + [f"- {esc(w['file'])}:{w['line']}: {esc(w['message'])}"
                                            for w in report.warnings]
    return "\n".join(out)
