"""`accel scan`: what ties a repository to CUDA, and what each tie becomes on a target.

Files are read, never imported or run (hidden directories, virtualenvs, __pycache__, site-packages and
node_modules skipped); the table's `files` section says which kind each file name is:

- Python (*.py) is parsed with `ast`. Names are resolved through the file's imports (`import torch as th`,
  `from torch import cuda`), so a local variable or function called `cuda`, an attribute `.cuda` that is
  not called, and "cuda" in a comment or docstring are not findings. Keyword arguments and string-keyed
  dict entries are matched by name and constant value (`load_in_8bit=True`; `load_in_8bit=False` is not).
  In setup.py, the requirement strings given to setup() are matched as a requirements file's lines.
- requirements files, pyproject.toml dependencies: package names compared PEP 503-normalised.
- JSON and YAML: DeepSpeed and accelerate configs (told apart by their top-level keys), and backend
  settings in any config. A finding's line is its key's line (JSON's found by a tokenizer, YAML's from
  the parser's marks).
- Shell scripts and Makefiles: commands, with comments and what echo/printf print left out.

The patterns and their per-target severity, replacement and reason are data: accel/scan_patterns.yaml.
A CUDA tie inside an optional-import guard (`try: import x / except ImportError`, `if is_x_available():`,
the table's `guards`) is informational: the code already runs without it. A Python or config file whose
text holds nothing any pattern could match (`Triggers`) is not parsed at all: most of a large generated
file's cost was the parse.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import stat
import tokenize
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from accel.errors import UsageError
from accel.scan_files import requirement_pattern, scan_config, scan_pyproject, scan_requirements, scan_shell
from accel.scan_table import SEVERITIES, TARGETS, CallMatch, Finding, Memo, Pattern, Table, load_table

__all__ = ["SEVERITIES", "TARGETS", "Report", "Triggers", "as_json", "as_markdown", "as_text", "load_table",
           "scan", "scan_source", "table_column"]

SKIP_DIRS = frozenset({"__pycache__", "site-packages", "node_modules", "venv"})
_SETUP_KEYWORDS = ("install_requires", "extras_require", "setup_requires", "tests_require")

# --- Python --------------------------------------------------------------------------------------------


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


def _device_valued(node: ast.AST) -> bool:
    """x.device, x.device.type, dev.type, str(x.device): what torch reports, which says "npu" under accel
    run (migrate maps what reaches torch, not what torch.device says), unlike the script's own string."""
    if isinstance(node, ast.Call) and _last_name(node.func) == "str" and len(node.args) == 1:
        node = node.args[0]
    return isinstance(node, ast.Attribute) and node.attr in ("device", "type")


def _last_name(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


class _FileScanner(ast.NodeVisitor):
    def __init__(self, table: Table, target: str, aliases: dict[str, str], file: str,
                 memo: Memo, tree: ast.Module):
        self.table, self.using, self.guards, self.target = table, table.using, table.guards, target
        self.aliases, self.file = aliases, file
        self.memo = memo  # (kind, what matched) -> its first pattern, shared by the files of one scan
        self.compared: dict[int, str] = {}  # id of a string node compared against -> "device" or "value"
        self.subjects: list[str] = []  # for each match statement being visited: its subject's kind
        self.findings: dict[tuple[int, str], Finding] = {}
        self.torch_bound = False  # the file assigns the name torch
        self.guard = 0  # line of the innermost optional-import guard around the code being visited
        self.setup = file.rsplit("/", 1)[-1] == "setup.py"
        self.module_values = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign)
                              for t in n.targets if isinstance(t, ast.Name)} if self.setup else {}

    def qualname(self, node: ast.AST) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in self.aliases:
            return None
        return ".".join([self.aliases[node.id], *reversed(parts)])

    def report(self, node: ast.AST, code: str, kind: str, matches: Any, key: tuple[Any, ...] | None = None) -> None:
        """The first pattern (table order) using match `kind` for which matches(pattern) holds becomes a
        finding. `key` says what matches depends on, when that is all it depends on: the answer is then
        looked up once."""
        if key is None or key not in self.memo:
            first = next((p for p in self.using[kind] if matches(p)), None)
            if key is None:
                return self._found(node, code, first)
            self.memo[key] = first
        self._found(node, code, self.memo[key])

    def _found(self, node: ast.AST, code: str, p: Pattern | None) -> None:
        if p is not None:
            line = getattr(node, "lineno", 0)
            self.findings.setdefault((line, p.id), Finding.of(p, self.target, self.file, line, code, self.guard))

    @staticmethod
    def _under(name: str, prefixes: Sequence[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    # optional-import guards
    def _block(self, body: list[ast.stmt], guard: int) -> None:
        outer = self.guard
        self.guard = outer or guard
        for node in body:
            self.visit(node)
            if not self.guard and self._leaves_unless_available(node):
                self.guard = node.lineno  # `if not is_x_available(): return`: the rest runs only with x
        self.guard = outer

    def _leaves_unless_available(self, node: ast.stmt) -> bool:
        return (isinstance(node, ast.If) and not node.orelse and isinstance(node.test, ast.UnaryOp)
                and isinstance(node.test.op, ast.Not) and any(self._is_guard(n) for n in ast.walk(node.test))
                and isinstance(node.body[-1], (ast.Return, ast.Raise)))

    def _is_guard(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Call):
            name = _last_name(node.func)
            return bool(name and self.guards.calls.fullmatch(name))
        return _last_name(node) in self.guards.names

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        negated = isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)
        guarded = any(self._is_guard(n) for n in ast.walk(node.test))
        self._block(node.body, node.lineno if guarded and not negated else 0)
        self._block(node.orelse, node.lineno if guarded and negated else 0)  # if not is_x_available(): ... else

    def visit_Try(self, node: ast.Try | ast.TryStar) -> None:
        caught = [n for h in node.handlers if h.type is not None
                  for n in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])]
        guard = node.lineno if any(_last_name(n) in self.guards.exceptions for n in caught) else 0
        self._block(node.body, guard)
        for handler in node.handlers:  # the fallback runs where the import failed: not optional
            self.visit(handler)
        self._block(node.orelse, guard)
        self._block(node.finalbody, 0)

    visit_TryStar = visit_Try

    # imports
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.report(node, f"import {a.name}", "imports", lambda p, m=a.name: self._under(m, p.imports),
                        ("import", a.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:  # relative imports are the repository's own modules
            return
        for a in node.names:
            module = node.module if a.name == "*" else f"{node.module}.{a.name}"
            self.report(node, f"from {node.module} import {a.name}", "imports",
                        lambda p, m=module: self._under(m, p.imports), ("import", module))

    # names, calls, decorators, keywords
    def visit_Name(self, node: ast.Name) -> None:
        if node.id == "torch" and isinstance(node.ctx, ast.Store):
            self.torch_bound = True
        q = self.aliases.get(node.id)
        if q:
            self.report(node, q, "names", lambda p: self._under(q, p.names), ("name", q))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        q = self.qualname(node)
        if q is None:
            self.generic_visit(node)
        else:  # the outermost resolved name only: torch.cuda.amp.autocast, not torch.cuda as well
            self.report(node, q, "names", lambda p: self._under(q, p.names), ("name", q))

    def visit_Call(self, node: ast.Call) -> None:
        q = self.qualname(node.func)
        if q and ("call", q) not in self.memo:  # whether any pattern calls q at all
            self.memo["call", q] = next((p for p in self.using["calls"] if any(c.name == q for c in p.calls)), None)
        if q and self.memo["call", q]:
            self.report(node, f"{q}(...)", "calls", lambda p: any(self._call_matches(c, q, node) for c in p.calls))
        if isinstance(node.func, ast.Attribute):
            if not (q or "").startswith("torch."):  # torch.cuda(...) is the module, not a .cuda() method
                attr = node.func.attr
                self.report(node, f".{attr}()", "method_call", lambda p: attr in p.method_call, ("method", attr))
            if node.func.attr in ("startswith", "endswith"):
                for a in node.args:
                    self._compare(a, _device_valued(node.func.value))
        for k in node.keywords:
            if k.arg:
                self._keyword(k, k.arg, k.value, q)
        if self.setup and _last_name(node.func) == "setup":
            self._setup(node)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                self._keyword(key, key.value, value)
        self.generic_visit(node)

    def _keyword(self, at: ast.AST, name: str, value: ast.expr, call: str | None = None) -> None:
        """f(name=value) (`call`: f's qualified name, where resolved) or {"name": value}."""
        if ("keyword", name) not in self.memo:  # whether any pattern names this keyword at all
            self.memo["keyword", name] = any(fnmatch.fnmatchcase(name, k.name)
                                             for p in self.using["keywords"] for k in p.keywords)
        if not self.memo["keyword", name]:
            return
        if isinstance(value, ast.Constant):
            v: tuple[Any, ...] = ("constant", type(value.value).__name__, value.value)
            shown = repr(value.value)
        else:
            q = self.qualname(value)
            v, shown = (("name", q), q) if q else (("other",), "...")
        self.report(at, f"{name}={shown}", "keywords", lambda p: any(k.matches(name, v, call) for k in p.keywords),
                    ("keyword", name, v, call))

    def _setup(self, node: ast.Call) -> None:
        """setup(install_requires=[...], extras_require={...}): each requirement string, module-level
        names they are given through (REQUIRED = [...]) included."""
        seen: set[str] = set()
        todo = [k.value for k in node.keywords if k.arg in _SETUP_KEYWORDS]
        while todo:
            for n in ast.walk(todo.pop()):
                if isinstance(n, ast.Name) and n.id in self.module_values and n.id not in seen:
                    seen.add(n.id)
                    todo.append(self.module_values[n.id])
                elif isinstance(n, ast.Constant) and isinstance(n.value, str):
                    self._found(n, n.value.strip(), requirement_pattern(n.value, self.table, self.memo))

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
                self.report(d, f"@{q}", "decorators", lambda p, q=q: q in p.decorators, ("decorator", q))
        for field_name, value in ast.iter_fields(node):
            if field_name == "body":
                self._block(value, 0)  # statements in order, so an early-return guard covers what follows
            else:
                for child in value if isinstance(value, list) else [value]:
                    if isinstance(child, ast.AST):
                        self.visit(child)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _decorated

    # strings
    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, (ast.Constant, ast.JoinedStr)):
            return  # a docstring or a bare string statement: text, not a value
        self.generic_visit(node)

    def _compare(self, node: ast.AST, device: bool) -> None:
        """Mark a compared operand (each element of a literal list, tuple or set: `t in ["cuda", "xpu"]`)."""
        for n in node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else [node]:
            if self.compared.get(id(n)) != "device":
                self.compared[id(n)] = "device" if device else "value"

    def visit_Compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        device = any(_device_valued(o) for o in operands)
        for o in operands:
            self._compare(o, device)
        self.generic_visit(node)

    def visit_Match(self, node: ast.Match) -> None:
        self.subjects.append("device" if _device_valued(node.subject) else "value")
        self.generic_visit(node)
        self.subjects.pop()

    def visit_MatchValue(self, node: ast.MatchValue) -> None:
        self._compare(node.value, self.subjects[-1] == "device")
        self.generic_visit(node)

    @staticmethod
    def _compared_ok(p: Pattern, compared: str | None) -> bool:
        return not p.compare or (compared is not None and p.compare in ("any", compared))

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            value, compared = node.value, self.compared.get(id(node))
            self.report(node, repr(value), "strings", lambda p: self._compared_ok(p, compared)
                        and any(r.fullmatch(value) for r in p.strings), ("string", value, compared))

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        # An f-string is judged by its shape, f"cuda:{rank}" -> "cuda:{}": a log message that mentions
        # nccl is text, a device string built from a rank is a value.
        shape = "".join(str(v.value) if isinstance(v, ast.Constant) else "{}" for v in node.values)
        compared = self.compared.get(id(node))
        self.report(node, f"f{shape!r}", "fstrings", lambda p: self._compared_ok(p, compared) and shape in p.fstrings,
                    ("fstring", shape, compared))
        for v in node.values:
            if isinstance(v, ast.FormattedValue):
                self.visit(v.value)


def _scan_python(source: str, file: str, table: Table, target: str, memo: Memo) -> list[Finding]:
    tree = ast.parse(source, filename=file)
    aliases = _aliases(tree)
    scanner = _FileScanner(table, target, {"torch": "torch", **aliases}, file, memo, tree)
    scanner.visit(tree)
    if scanner.torch_bound and "torch" not in aliases:  # `torch` means torch unless the file binds it otherwise
        scanner = _FileScanner(table, target, aliases, file, memo, tree)
        scanner.visit(tree)
    return list(scanner.findings.values())


# --- one file --------------------------------------------------------------------------------------------


class Triggers:
    """What a file's text must contain for any pattern to match in it. Python: a name's root and last
    component as a word (every component of a resolved name is spelled in the file, in an import or at the
    use), a method or keyword, an f-string's or keyword glob's literal part, or what a string pattern
    requires; a string spelled with escapes or split across adjacent literals ("cu" "da") is not seen in
    it. Configs: a top-level key that identifies a document kind, or a value (or key) an `any`-document
    entry needs. setup.py, requirements, pyproject and shell files are small and always read. Each is a
    plain substring test first (a name's root once for all its names), a regular expression only where
    that finds something."""

    def __init__(self, table: Table):
        patterns = table.patterns
        globs = {k.name for p in patterns for k in p.keywords if re.search(r"[*?\[]", k.name)}
        words = {(n.split(".")[0], n.rsplit(".", 1)[-1]) for p in patterns
                 for n in (*p.names, *p.imports, *p.decorators, *(c.name for c in p.calls))}
        words |= {(w, w) for p in patterns for w in (*p.method_call, *(k.name for k in p.keywords)) if w not in globs}
        self.words: dict[str, list[tuple[str, re.Pattern[str]]]] = {}  # a root -> (word, its regex) under it
        for root, w in sorted(words):
            self.words.setdefault(root, []).append((w, re.compile(rf"\b{re.escape(w)}\b")))
        self.pieces = sorted(({max(f.split("{}"), key=len) for p in patterns for f in p.fstrings}
                              | {_literal(g) for g in globs}) - {""})
        regexes = {r.pattern: r for p in patterns for r in p.strings}  # three patterns share cuda(:\d+)?
        self.strings = [(_required(r.pattern), r) for r in regexes.values()]
        anywhere = {v for p in patterns for c in p.config if c.document == "any"
                    for v in c.values or [_literal(c.key)]}
        self.keys = sorted({k for keys in table.documents.values() for k in keys})
        self.values = re.compile("|".join(re.escape(v) for v in sorted(anywhere)) or "(?!)", re.IGNORECASE)

    def __call__(self, text: str, kind: str = "python") -> bool:
        if kind == "config":
            return any(k in text for k in self.keys) or bool(self.values.search(text))
        if kind != "python":
            return True
        return (any(root in text and any(w in text and r.search(text) for w, r in words)
                    for root, words in self.words.items())
                or any(piece in text for piece in self.pieces)
                or any((need is None or need in text) and r.search(text) for need, r in self.strings))


def _literal(glob: str) -> str:
    """The longest run of a glob that every match spells (within one dotted component)."""
    return max(re.split(r"[*?\[\].]", glob), key=len)


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


_READERS = {"setup": _scan_python, "python": _scan_python, "requirements": scan_requirements,
            "pyproject": scan_pyproject, "config": scan_config, "shell": scan_shell}


def scan_source(source: str, file: str, table: Table, target: str,
                memo: Memo | None = None, kind: str | None = None) -> list[Finding]:
    """Findings in one file's text, read as `kind` (default: what its name says, Python if nothing).
    Raises SyntaxError, ValueError (NUL bytes, JSON or TOML that does not parse) or yaml.YAMLError."""
    read = _READERS[kind or table.kind(file) or "python"]
    findings = read(source, file, table, target, {} if memo is None else memo)
    return sorted(findings, key=lambda f: (f.line, f.pattern))


# --- a repository --------------------------------------------------------------------------------------


def _skipped(d: Path) -> bool:
    return d.name.startswith(".") or d.name in SKIP_DIRS or (d / "pyvenv.cfg").exists()


def source_files(root: Path, table: Table) -> Iterator[tuple[Path, str]]:
    """(file, kind) of every file under root that the table reads; a file given itself is read by its
    kind, Python if its name says none."""
    if root.is_file():
        yield root, table.kind(root.as_posix()) or "python"
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(Path(dirpath, d)))
        rel = Path(dirpath).relative_to(root).as_posix()
        for f in sorted(filenames):
            kind = table.kind(f if rel == "." else f"{rel}/{f}")
            if kind:
                yield Path(dirpath, f), kind


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


def scan(path: str | Path, target: str = "npu", table: Table | None = None) -> Report:
    """Scan every file the table reads under `path` (a directory or one file) for `target` (see table_column)."""
    target = table_column(target)
    root = Path(path)
    if not root.exists():
        raise UsageError(f"{path} does not exist; give a repository directory or a file")
    table = load_table() if table is None else table
    report = Report(str(path), target)
    base = root if root.is_dir() else root.parent
    tied, memo = Triggers(table), Memo()
    for file, kind in source_files(root, table):
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
            if kind in ("setup", "python"):
                with tokenize.open(file) as f:  # honours a coding cookie
                    source = f.read(MAX_SOURCE_BYTES + 1)
            else:
                with open(file, encoding="utf-8-sig") as f:
                    source = f.read(MAX_SOURCE_BYTES + 1)
            if tied(source, kind):
                report.findings += scan_source(source, rel, table, target, memo, kind)
        except SyntaxError as e:
            report.warnings.append({"file": rel, "line": e.lineno or 0, "message": f"not scanned: {e.msg}"})
        except yaml.MarkedYAMLError as e:
            line = e.problem_mark.line + 1 if e.problem_mark else 0
            report.warnings.append({"file": rel, "line": line, "message": f"not scanned: {e.problem or e}"})
        except (UnicodeDecodeError, ValueError, RecursionError, MemoryError, OSError, yaml.YAMLError) as e:
            # MemoryError: CPython's parser on expressions nested past its stack
            message = str(e)[:200] or type(e).__name__
            report.warnings.append({"file": rel, "line": 0, "message": f"not scanned: {message}"})
    return report


MAX_SOURCE_BYTES = 8 << 20  # a file larger than this is generated or data, not code to port


# --- output --------------------------------------------------------------------------------------------


def _summary_line(s: dict[str, Any]) -> str:
    by = ", ".join(f"{n} {sev}" for sev, n in s["by_severity"].items())
    return f"{s['files']} files scanned for {s['target']}: {s['findings']} findings ({by})"


def _guarded(f: Finding) -> str:
    return f"optional: guarded at line {f.guard}, the code runs without it" if f.guard else ""


def as_json(report: Report, fail_on: str) -> str:
    return json.dumps({"findings": [f.as_json() for f in report.findings], "summary": report.summary(fail_on)},
                      indent=2)


def as_text(report: Report, fail_on: str) -> str:
    lines = [f"{f.file}:{f.line}: {f.severity}: {f.pattern}: {f.code} -> {f.replacement}"
             + (f" ({_guarded(f)})" if f.guard else "") for f in report.findings]
    s = report.summary(fail_on)
    lines += [f"warning: {w['file']}:{w['line']}: {w['message']}" for w in report.warnings]
    lines.append(("" if not report.findings else "\n") + _summary_line(s))
    if s["failed"]:
        lines.append(f"{len(report.at_or_above(fail_on))} findings at or above --fail-on {fail_on}")
    return "\n".join(lines)


def as_markdown(report: Report, fail_on: str, table: Table) -> str:
    why = {p.id: p.rules[report.target].reason for p in table.patterns}
    esc = lambda t: str(t).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    s = report.summary(fail_on)
    out = [f"# accel scan: `{report.root}` for {report.target}", "", _summary_line(s), ""]
    if report.findings:
        out += ["| location | severity | migrate | pattern | code | replacement | why |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {esc(f.file)}:{f.line} | {f.severity} | {'yes' if f.migrate else 'no'} | {f.pattern} "
                f"| `{esc(f.code)}` | {esc(f.replacement)} | {esc(_guarded(f) or why.get(f.pattern, ''))} |"
                for f in report.findings]
    if report.warnings:
        out += ["", "Not scanned:", ""] + [f"- {esc(w['file'])}:{w['line']}: {esc(w['message'])}"
                                            for w in report.warnings]
    return "\n".join(out)
