"""containerd's filter language, for ``List`` (``ctr snapshots ls`` filters, garbage collection).

A filter is ``selector ("," selector)*``, all of which must match; several filters match when
any does. A selector is ``fieldpath [op value]`` with ``op`` one of ``==``, ``!=``, ``~=``
(a regular expression); without ``op`` it tests that the field is present. Fields are
``[A-Za-z0-9_]+`` or double-quoted, joined by ``.``; values run to the next ``,`` or space, or
are double-quoted (``~=`` also takes ``/re/`` and ``|re|``; a Go regular expression, matched as Go
would: :mod:`.re2`). For snapshots the fields are
``kind``, ``name``, ``parent`` and ``labels.<key>``, as containerd's metadata adaptor has them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .re2 import Unsupported, compile_re2

Fields = Callable[[Sequence[str]], "tuple[str, bool]"]


class FilterError(ValueError):
    """A filter that does not parse (containerd answers InvalidArgument)."""


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    op: str  # "?" (present), "==", "!=", "~="
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, fields: Fields) -> bool:
        value, present = fields(self.fieldpath)
        if self.op == "?":
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_DIGITS = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> FilterError:
        return FilterError(f"filter {self.text!r}: {what} at position {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self, alternatives: bool) -> str:
        quote = self.text[self.pos]
        if quote != '"' and not alternatives:
            raise self.fail("invalid quote")
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.fail("quoted literal not terminated")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            out.append(self.escape(quote))

    def escape(self, quote: str) -> str:
        if self.pos >= len(self.text):
            raise self.fail("quoted literal not terminated")
        ch = self.text[self.pos]
        self.pos += 1
        if ch in _ESCAPES:
            return _ESCAPES[ch]
        if ch in ("\\", quote):
            return ch
        if ch in "01234567":
            base, count, digits = 8, 2, ch
        elif ch in _DIGITS:
            (base, count), digits = _DIGITS[ch], ""
        else:
            raise self.fail("illegal escape sequence")
        digits += self.text[self.pos : self.pos + count]
        self.pos += count
        try:
            return chr(int(digits, base))
        except ValueError:
            raise self.fail("illegal numeric escape sequence") from None

    def field(self) -> str:
        ch = self.peek()
        if ch in ('"', "/", "|"):
            return self.quoted(alternatives=False)
        m = re.compile(r"[A-Za-z0-9_]+").match(self.text, self.pos)
        if m is None:
            raise self.fail("expected a field or a quoted field")
        self.pos = m.end()
        return m.group()

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        if self.peek() in ("", ","):
            return Selector(tuple(path), "?")
        m = re.compile(r"[=!~]+").match(self.text, self.pos)
        if m is None or m.group() not in ("==", "!=", "~="):
            raise self.fail('expected an operator ("==", "!=" or "~=")')
        self.pos = m.end()
        op = m.group()
        ch = self.peek()
        if ch in ('"', "/", "|"):
            value = self.quoted(alternatives=op == "~=")
        else:
            v = re.compile(r"[^,\s]+").match(self.text, self.pos)
            if v is None:
                raise self.fail("expected a value")
            self.pos = v.end()
            value = v.group()
        if op != "~=":
            return Selector(tuple(path), op, value)
        try:
            return Selector(tuple(path), op, value, compile_re2(value))
        except Unsupported as exc:
            raise self.fail(f"bad regular expression {value!r} ({exc})") from None

    def parse(self) -> list[Selector]:
        selectors = [self.selector()]
        while self.peek() == ",":
            self.pos += 1
            selectors.append(self.selector())
        if self.peek():
            raise self.fail(f"unexpected input {self.text[self.pos]!r}")
        return selectors


class Filter:
    """Filters as ``List`` receives them: any of them matches, all selectors of one must."""

    def __init__(self, filters: Sequence[str]) -> None:
        # an empty filter matches everything (containerd's Parse("") is Always)
        self.everything = not filters or any(not f for f in filters)
        self.any = [_Parser(f).parse() for f in filters if f]

    def match(self, fields: Fields) -> bool:
        if self.everything:
            return True
        return any(all(s.match(fields) for s in sel) for sel in self.any)


def snapshot_fields(name: str, kind: str, parent: str, labels: Mapping[str, str]) -> Fields:
    """The fields a snapshot filter can name, as containerd's ``adaptSnapshot``."""

    def fields(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return kind, True
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "labels":
            key = ".".join(path[1:])
            return (labels[key], True) if labels and key in labels else ("", False)
        return "", False

    return fields
