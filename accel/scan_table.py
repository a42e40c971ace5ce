"""The `accel scan` pattern table: accel/scan_patterns.yaml loaded and checked, and the findings it
makes (what each kind of match means is in that file's header)."""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from accel.errors import AccelError

SEVERITIES = ("informational", "runs-via-migrate", "needs-replacement", "no-equivalent")  # least to most work
TARGETS = ("npu", "mindspore", "tvm", "xla")
TORCH_COLUMNS = ("npu",)  # the columns whose target is a torch device: only there can accel.migrate run code
FILE_KINDS = ("setup", "python", "requirements", "pyproject", "config", "shell")
_MATCH_KINDS = frozenset({"names", "imports", "method_call", "strings", "fstrings", "compare", "calls",
                          "decorators", "keywords", "packages", "requirement_text", "config", "shell"})
Memo = dict[tuple[Any, ...], Any]  # (kind, what matched) -> what the table makes of it, for one scan's files


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
class KeywordMatch:
    name: str  # a keyword argument or string dict key, * and ? as in fnmatch
    values: tuple[Any, ...] | None = None  # constants it must equal (True is not 1); None with no value_names: any
    value_names: tuple[str, ...] = ()  # or qualified names it must be (torch.bfloat16)
    unless_call: tuple[str, ...] = ()  # not when passed to a call under these names (ipex_llm's own 4-bit)

    def matches(self, name: str, value: tuple[Any, ...], call: str | None = None) -> bool:
        """`value`: ("constant", type name, v), ("name", qualified name) or ("other",); `call`: the
        qualified name of the call it is passed to, where known."""
        if not fnmatch.fnmatchcase(name, self.name):
            return False
        if call and any(call == u or call.startswith(u + ".") for u in self.unless_call):
            return False
        if self.values is None and not self.value_names:
            return True
        if value[0] == "constant":
            return any(type(c) is type(value[2]) and c == value[2] for c in self.values or ())
        return value[0] == "name" and value[1] in self.value_names


@dataclass(frozen=True)
class ConfigMatch:
    key: str  # dotted path from the document's root, * and ? as in fnmatch (a * crosses dots)
    values: tuple[str, ...] | None  # casefolded scalars (true, cpu); None: any value
    document: str  # "any" or a kind of the table's `documents`


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
    compare: str = ""  # "any": only compared strings; "device": only those compared against a torch device
    calls: tuple[CallMatch, ...] = ()
    decorators: tuple[str, ...] = ()
    keywords: tuple[KeywordMatch, ...] = ()
    packages: tuple[str, ...] = ()  # PEP 503-normalised names, * and ? as in fnmatch
    requirement_text: tuple[re.Pattern[str], ...] = ()
    config: tuple[ConfigMatch, ...] = ()
    shell: tuple[re.Pattern[str], ...] = ()


@dataclass(frozen=True)
class Guards:
    """What makes code optional: it runs only where an import succeeded or a package was found."""

    exceptions: frozenset[str]  # a try whose handler catches one of these guards its body and else
    calls: re.Pattern[str]  # an if whose test calls a function so named (last component) guards its body
    names: frozenset[str]  # an if whose test reads one of these names (TYPE_CHECKING) guards its body


@dataclass
class Table:
    """accel/scan_patterns.yaml, validated: the patterns and what says which files and code they apply to."""

    patterns: tuple[Pattern, ...]
    files: dict[str, tuple[str, ...]]  # kind -> file name globs, in the order they are tried
    documents: dict[str, tuple[str, ...]]  # config document kind -> top-level keys that identify it
    guards: Guards
    _globs: list[tuple[int, str, re.Pattern[str]]] = field(init=False, repr=False)
    using: dict[str, tuple[Pattern, ...]] = field(init=False, repr=False)  # match kind -> its patterns, in order

    def __post_init__(self) -> None:
        self._globs = [(g.count("/") + 1, kind, re.compile(fnmatch.translate(g)))
                       for kind, globs in self.files.items() for g in globs]
        self.using = {kind: tuple(p for p in self.patterns if getattr(p, kind)) for kind in _MATCH_KINDS}

    def kind(self, path: str) -> str | None:
        """The kind of a file by its path relative to the scanned root (a glob with / matches its tail)."""
        parts = path.split("/")
        for depth, kind, glob in self._globs:
            if glob.match("/".join(parts[-depth:])):
                return kind
        return None


@dataclass(frozen=True)
class Finding:
    file: str  # relative to the scanned root, with forward slashes
    line: int
    pattern: str
    severity: str
    replacement: str
    code: str  # what matched, for the text and markdown reports
    migrate: bool  # accel.migrate handles it: the rule's severity is runs-via-migrate
    guard: int = 0  # the line of the optional-import guard that makes it informational, 0 if none

    @classmethod
    def of(cls, p: Pattern, target: str, file: str, line: int, code: str, guard: int = 0) -> Finding:
        rule = p.rules[target]
        return cls(file, line, p.id, "informational" if guard else rule.severity, rule.replacement, code,
                   rule.severity == "runs-via-migrate", guard)

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "pattern": self.pattern, "severity": self.severity,
                "replacement": self.replacement, "migrate": self.migrate, "guard": self.guard or None}


# --- the table -----------------------------------------------------------------------------------------


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AccelError(f"{where}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _regexes(value: Any, where: str) -> tuple[re.Pattern[str], ...]:
    try:
        return tuple(re.compile(s) for s in _strings(value, where))
    except re.error as e:
        raise AccelError(f"{where}: bad regular expression: {e}") from None


def _scalars(value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, list) or not all(isinstance(v, (bool, int, float, str)) for v in value):
        raise AccelError(f"{where}: values must be a list of constants, got {value!r}")
    return tuple(value)


def canon(value: Any) -> str:
    """A config scalar as the table compares it: JSON's and YAML's true is "true", case does not count."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value).casefold()


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _entries(value: Any, where: str, required: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(e, dict) and isinstance(e.get(required), str)
                                              for e in value):
        raise AccelError(f"{where}: entries are mappings with a {required}")
    return value


def _pattern(entry: Any, where: str, documents: dict[str, tuple[str, ...]]) -> Pattern:
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
        if rule["severity"] == "runs-via-migrate" and target not in TORCH_COLUMNS:
            raise AccelError(f"{where}: {target}: runs-via-migrate is for torch targets "
                             f"({', '.join(TORCH_COLUMNS)})")
        for key in ("replacement", "reason"):
            if not isinstance(rule.get(key), str) or not rule[key].strip():
                raise AccelError(f"{where}: {target}: {key} must be a non-empty string")
        rules[target] = Rule(rule["severity"], rule["replacement"].strip(), rule["reason"].strip())
    calls = []
    for call in _entries(match.get("calls", []), f"{where}: calls", "name"):
        arg = call.get("if_argument")
        calls.append(CallMatch(call["name"], _strings(call.get("if_strings_end", []), where),
                               (str(arg[0]), int(arg[1])) if arg else None))
    keywords = []
    for k in _entries(match.get("keywords", []), f"{where}: keywords", "name"):
        names = _strings(k.get("value_names", []), where)
        values = _scalars(k["values"], where) if "values" in k else (() if names else None)
        keywords.append(KeywordMatch(k["name"], values, names, _strings(k.get("unless_call", []), where)))
    config = []
    for c in _entries(match.get("config", []), f"{where}: config", "key"):
        document = c.get("in", "any")
        if document != "any" and document not in documents:
            raise AccelError(f"{where}: config `in` must be any or one of {', '.join(documents)}, "
                             f"got {document!r}")
        values = tuple(canon(v) for v in _scalars(c["values"], where)) if "values" in c else None
        config.append(ConfigMatch(c["key"], values, document))
    compare = match.get("compare", False)
    if compare not in (True, False, "device"):
        raise AccelError(f"{where}: compare must be true or device, got {compare!r}")
    return Pattern(
        entry["id"], str(entry.get("summary", "")), rules,
        names=_strings(match.get("names", []), where), imports=_strings(match.get("imports", []), where),
        method_call=_strings(match.get("method_call", []), where),
        strings=_regexes(match.get("strings", []), where), fstrings=_strings(match.get("fstrings", []), where),
        compare="any" if compare is True else compare or "",
        calls=tuple(calls), decorators=_strings(match.get("decorators", []), where), keywords=tuple(keywords),
        packages=tuple(normalise(n) for n in _strings(match.get("packages", []), where)),
        requirement_text=_regexes(match.get("requirement_text", []), where), config=tuple(config),
        shell=_regexes(match.get("shell", []), where),
    )


def load_table(path: str | Path | None = None) -> Table:
    """The pattern table (default: the reviewed accel/scan_patterns.yaml), validated."""
    if path is None:
        text = resources.files("accel").joinpath("scan_patterns.yaml").read_text(encoding="utf-8")
        where = "scan_patterns.yaml"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("patterns"), list):
        raise AccelError(f"{where}: expected a mapping with a `patterns` list")
    files, documents, guards = data.get("files"), data.get("documents"), data.get("guards")
    if not isinstance(files, dict) or list(files) != list(FILE_KINDS):
        raise AccelError(f"{where}: files must map {', '.join(FILE_KINDS)} (in this order) to file name globs")
    if not isinstance(documents, dict) or "any" in documents:
        raise AccelError(f"{where}: documents must map config kinds (not `any`) to their top-level keys")
    if not isinstance(guards, dict) or set(guards) != {"exceptions", "calls", "names"}:
        raise AccelError(f"{where}: guards must list exceptions, calls and names")
    documents = {kind: _strings(keys, f"{where}: documents") for kind, keys in documents.items()}
    patterns = [_pattern(entry, where, documents) for entry in data["patterns"]]
    ids = [p.id for p in patterns]
    if len(set(ids)) != len(ids):
        raise AccelError(f"{where}: duplicate pattern ids: {sorted(i for i, n in Counter(ids).items() if n > 1)}")
    calls = "|".join(f"(?:{r.pattern})" for r in _regexes(guards["calls"], f"{where}: guards"))
    return Table(tuple(patterns), {kind: _strings(g, f"{where}: files") for kind, g in files.items()}, documents,
                 Guards(frozenset(_strings(guards["exceptions"], where)), re.compile(calls),
                        frozenset(_strings(guards["names"], where))))
