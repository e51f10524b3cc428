"""The OData query subset Batch list operations take: ``$filter``, ``$select``, ``maxresults``, ``$skiptoken``.

``$filter`` grammar: comparisons ``path op literal`` (op in eq ne gt ge lt le; path dotted, e.g.
``executionInfo.exitCode``; literal a 'string', number, true/false/null or ``datetime'...'``), ``startswith(path,
'x')``, joined by ``and``/``or``/``not`` and parentheses. Anything else is a 400 naming ``$filter``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from mpilaunch.emulator.wire_errors import bad_query

Doc = dict[str, Any]
Predicate = Callable[[Doc], bool]
MAX_RESULTS = 1000

_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|datetime(?P<dt>'[^']*')|(?P<num>-?\d+(?:\.\d+)?)"
                    r"|(?P<punct>[(),])|(?P<word>[A-Za-z_$][\w.$/]*))")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: bool(a == b), "ne": lambda a, b: bool(a != b),
    "gt": lambda a, b: bool(a > b), "ge": lambda a, b: bool(a >= b),
    "lt": lambda a, b: bool(a < b), "le": lambda a, b: bool(a <= b),
}


def max_results(query: dict[str, str]) -> int:
    raw = query.get("maxresults")
    if raw is None:
        return MAX_RESULTS
    if not raw.isdigit():
        raise bad_query("maxresults", raw, f"must be an integer from 1 to {MAX_RESULTS}")
    if not 1 <= int(raw) <= MAX_RESULTS:
        raise bad_query("maxresults", raw, f"must be from 1 to {MAX_RESULTS}", code="OutOfRangeQueryParameterValue")
    return int(raw)


def skiptoken(query: dict[str, str]) -> int:
    raw = query.get("$skiptoken", "0")
    if not raw.isdigit():
        raise bad_query("$skiptoken", raw, "not a continuation token this service issued")
    return int(raw)


def select(doc: Doc, query: dict[str, str]) -> Doc:
    """Keep only the ``$select``ed top-level properties (Batch keeps ``odata`` annotations)."""
    raw = query.get("$select")
    if not raw:
        return doc
    names = {n.strip() for n in raw.split(",") if n.strip()}
    return {k: v for k, v in doc.items() if k in names or k.startswith("odata.")}


def parse_filter(text: str | None) -> Predicate:
    """Compile ``$filter`` into a predicate over REST documents."""
    if not text or not text.strip():
        return lambda _d: True
    tokens = _tokenize(text)
    parser = _Parser(tokens, text)
    pred = parser.disjunction()
    if parser.pos != len(tokens):
        raise bad_query("$filter", text, f"unexpected {tokens[parser.pos][1]!r}")
    return pred


def _tokenize(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise bad_query("$filter", text, f"cannot parse at offset {pos}")
        pos = m.end()
        kind = m.lastgroup or ""
        raw = m.group(kind)
        if kind in {"str", "dt"}:
            out.append(("lit", raw[1:-1].replace("''", "'")))
        elif kind == "num":
            out.append(("lit", float(raw) if "." in raw else int(raw)))
        elif kind == "word" and raw in ("true", "false", "null"):
            out.append(("lit", {"true": True, "false": False, "null": None}[raw]))
        else:
            out.append((kind, raw))
    return out


def _lookup(doc: Doc, path: str) -> Any:
    value: Any = doc
    for part in path.split("/" if "/" in path else "."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _either(a: Predicate, b: Predicate) -> Predicate:
    return lambda d: a(d) or b(d)


def _both(a: Predicate, b: Predicate) -> Predicate:
    return lambda d: a(d) and b(d)


class _Parser:
    def __init__(self, tokens: list[tuple[str, Any]], text: str) -> None:
        self.tokens, self.text, self.pos = tokens, text, 0

    def _peek(self) -> tuple[str, Any]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def _take(self, kind: str, value: Any = None) -> Any:
        tok = self._peek()
        if tok[0] != kind or (value is not None and tok[1] != value):
            raise bad_query("$filter", self.text, f"expected {value or kind}, found {tok[1]!r}")
        self.pos += 1
        return tok[1]

    def _chain(self, operator: str, operand: Callable[[], Predicate],
               combine: Callable[[Predicate, Predicate], Predicate]) -> Predicate:
        """``operand (operator operand)*``, combined left to right."""
        left = operand()
        while self._peek() == ("word", operator):
            self.pos += 1
            left = combine(left, operand())
        return left

    def disjunction(self) -> Predicate:
        return self._chain("or", self.conjunction, _either)

    def conjunction(self) -> Predicate:
        return self._chain("and", self.unary, _both)

    def unary(self) -> Predicate:
        tok = self._peek()
        if tok == ("word", "not"):
            self.pos += 1
            inner = self.unary()
            return lambda d: not inner(d)
        if tok == ("punct", "("):
            self.pos += 1
            inner = self.disjunction()
            self._take("punct", ")")
            return inner
        name = self._take("word")
        if name in ("startswith", "endswith"):
            self._take("punct", "(")
            path = self._take("word")
            self._take("punct", ",")
            lit = str(self._take("lit"))
            self._take("punct", ")")
            test = str.startswith if name == "startswith" else str.endswith
            return lambda d: isinstance(v := _lookup(d, path), str) and test(v, lit)
        op = self._take("word")
        if op not in _OPS:
            raise bad_query("$filter", self.text, f"unknown operator {op!r}")
        lit = self._take("lit")
        fn = _OPS[op]

        def compare(d: Doc) -> bool:
            value = _lookup(d, name)
            try:
                return fn(value, lit)
            except TypeError:
                return False

        return compare
