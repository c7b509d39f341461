"""containerd's ``~=`` filters are Go regular expressions (RE2 syntax, Go's ``regexp``): this
turns one into a Python pattern that matches what Go's would, or refuses it as Go does.

What differs, and how it is handled:

- **Go has, Python lacks or reads otherwise:** POSIX classes in brackets (``[[:digit:]]``),
  ``\\z``, ``\\Q...\\E``, ``\\x{10FFFF}``, octal ``\\12`` (a backreference to Python),
  ``(?<name>...)`` (Python 3.11: ``(?P<name>...)``), ``x{,3}`` (a literal to Go, a repetition
  to Python), ASCII-only ``\\d``, ``\\w`` and ``\\s`` (Unicode to Python): translated.
- **Python has, Go refuses:** lookarounds, backreferences, atomic groups, conditionals,
  comments, possessive repetitions (``a*+``): refused, as containerd refuses them.
- **Read alike but for a fold:** with ``(?i)``, Python's case folding takes the dotless i and
  the dotted I (U+0131, U+0130) for i and I, which Go's simple folding does not (Kelvin's K
  and the long s fold alike in both).
- **Go has, Python cannot say:** Unicode classes (``\\pL``), negated POSIX classes, the
  ungreedy flag ``U``, flags set within a sequence (``a(?i)b``): refused, saying so
  (containerd would take them).
"""

from __future__ import annotations

import re

#: POSIX classes as Go's regexp/syntax has them (ASCII)
_POSIX = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
#: Go's Perl classes (ASCII), in brackets and alone
_PERL = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\\t\\n\\f\\r "}
_W = "[0-9A-Za-z_]"
_BOUNDARY = f"(?-i:(?<={_W})(?!{_W})|(?<!{_W})(?={_W}))"
_NOT_BOUNDARY = f"(?-i:(?<={_W})(?={_W})|(?<!{_W})(?!{_W}))"
_REPEAT = re.compile(r"\{(\d+)(,(\d*))?\}")
_OCTAL = re.compile(r"[0-7]{1,3}")
_GROUP_REFUSED = {
    "=": "lookahead",
    "!": "negative lookahead",
    "<=": "lookbehind",
    "<!": "negative lookbehind",
    "P=": "backreference",
    ">": "atomic group",
    "(": "conditional",
    "#": "comment",
}


class Unsupported(ValueError):
    """A pattern Go refuses, or one this translation cannot give the same meaning."""


def compile_re2(pattern: str) -> re.Pattern[str]:
    """*pattern*, a Go regular expression, as a Python one with the same matches."""
    try:
        return re.compile(_Translation(pattern).run())
    except re.error as exc:
        raise Unsupported(str(exc)) from None


class _Translation:
    def __init__(self, pattern: str) -> None:
        self.src = pattern
        self.pos = 0
        self.out: list[str] = []
        self.repeatable = False  # the last item can take a repetition (``*`` alone cannot)
        self.fresh = True  # at the start of the pattern, of a group or of an alternative
        self.depth = 0  # groups open
        #: the depths at which a Go ``(?flags)`` opened a Python ``(?flags:``, closed at the
        #: end of that group (Go's flags last to the end of the group they are set in)
        self.flag_groups: list[int] = []
        #: whether Go's multi-line mode is on, per group open: Go's $ is the text's end (\z)
        #: but in multi-line mode; Python's also matches before a final newline
        self.multiline = [False]

    def run(self) -> str:
        while self.pos < len(self.src):
            ch = self.src[self.pos]
            fresh, self.fresh = self.fresh, ch == "|"
            if ch == "\\":
                self.out.append(self.escape(in_class=False))
                self.repeatable = True
            elif ch == "[":
                self.out.append(self.bracket())
                self.repeatable = True
            elif ch == "(":
                self.out.append(self.group(fresh))
            elif ch == ")":
                self.pos += 1
                self.out.append(self.close(self.depth) + ")")
                self.depth -= 1
                if len(self.multiline) > 1:
                    self.multiline.pop()
                self.repeatable = True
            elif ch in "*+?{":
                self.out.append(self.repetition(ch))
            else:
                self.pos += 1
                self.out.append(r"\Z" if ch == "$" and not self.multiline[-1] else ch)
                self.repeatable = ch != "|"
        return "".join(self.out) + self.close(0)

    def close(self, depth: int) -> str:
        """The ``)`` of the flag groups opened in the group being closed."""
        n = 0
        while self.flag_groups and self.flag_groups[-1] == depth:
            self.flag_groups.pop()
            n += 1
        return ")" * n

    def repetition(self, ch: str) -> str:
        text = ch
        if ch == "{":
            m = _REPEAT.match(self.src, self.pos)
            if m is None:  # not a repetition to Go: a literal brace
                self.pos += 1
                self.repeatable = True
                return "\\{"
            if any(int(n) > 1000 for n in (m.group(1), m.group(3)) if n):
                raise Unsupported(f"invalid repeat count {m.group()!r} (Go's limit is 1000)")
            text = m.group()
            self.pos = m.end() - 1
        if not self.repeatable:
            raise Unsupported(f"missing argument to repetition operator {text!r}")
        self.pos += 1
        if self.src.startswith("?", self.pos):  # lazy: Go has it too
            text += "?"
            self.pos += 1
        if self.pos < len(self.src) and self.src[self.pos] in "*+?{":
            nested = self.src[self.pos]
            raise Unsupported(f"invalid nested repetition operator {text + nested!r}")
        self.repeatable = False
        return text

    def group(self, fresh: bool) -> str:
        self.pos += 1
        self.repeatable = False
        self.fresh = True
        if not self.src.startswith("?", self.pos):
            self.depth += 1
            self.multiline.append(self.multiline[-1])
            return "("
        rest = self.src[self.pos + 1 :]
        for opener, what in _GROUP_REFUSED.items():
            if rest.startswith(opener):
                raise Unsupported(f"{what}s are not in Go's regular expressions: (?{opener}")
        named = re.match(r"P?<([A-Za-z0-9_]+)>", rest)
        if named is not None:  # Go's (?<name>...) too; Python 3.11 has (?P<name>...) only
            self.pos += 1 + named.end()
            self.depth += 1
            self.multiline.append(self.multiline[-1])
            return f"(?P<{named.group(1)}>"
        m = re.match(r"([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])", rest)
        if m is None:
            raise Unsupported(f"invalid or unsupported group {('(?' + rest)[:10]!r}")
        if set(m.group(1) + (m.group(2) or "")) - set("ims"):
            raise Unsupported(f"flags {m.group()[:-1]!r}: Go's U (ungreedy) has no equivalent")
        self.pos += 1 + m.end()
        multiline = ("m" in m.group(1) or self.multiline[-1]) and "m" not in (m.group(2) or "")
        if m.group(3) == ":":
            self.depth += 1
            self.multiline.append(multiline)
            return "(?" + m.group()
        # (?flags): to the end of the enclosing group, so only where that is what Python's
        # (?flags: ... ) would hold: at the start of a group or of an alternative
        if not fresh:
            raise Unsupported(f"flags {m.group()!r} within a sequence: not supported here")
        self.fresh = True
        self.flag_groups.append(self.depth)
        self.multiline[-1] = multiline  # to the end of the enclosing group
        return "(?" + m.group()[:-1] + ":"

    def escape(self, in_class: bool) -> str:
        src, at = self.src, self.pos + 1
        if at >= len(src):
            raise Unsupported("trailing backslash at end of expression")
        ch = src[at]
        self.pos = at + 1
        if ch == "Q" and not in_class:
            end = src.find("\\E", self.pos)
            literal = src[self.pos :] if end < 0 else src[self.pos : end]
            self.pos = len(src) if end < 0 else end + 2
            return re.escape(literal)  # atoms: a repetition after it takes the last, as in Go
        if ch in _PERL:  # ASCII (with (?i), what folds into it: Kelvin's K, the long s)
            return _PERL[ch] if in_class else f"[{_PERL[ch]}]"
        if ch in "DWS":
            if in_class:
                raise Unsupported(f"\\{ch} in brackets: not translated here")
            return f"[^{_PERL[ch.lower()]}]"
        if ch in "bB" and not in_class:  # Go's word boundaries are ASCII ones
            return _BOUNDARY if ch == "b" else _NOT_BOUNDARY
        if ch == "z" and not in_class:
            return r"\Z"
        if ch == "x" and not src.startswith("{", self.pos):
            digits = src[self.pos : self.pos + 2]
            if len(digits) < 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise Unsupported(f"invalid escape sequence \\x{digits}")
            self.pos += 2
            return _literal(int(digits, 16))
        if ch == "x":
            end = src.find("}", self.pos)
            digits = src[self.pos + 1 : end] if end > 0 else ""
            if not digits or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise Unsupported(f"invalid escape sequence \\x{{{digits}")
            self.pos = end + 1
            return _literal(int(digits, 16))
        if ch in "01234567":
            m = _OCTAL.match(src, at)
            assert m is not None
            if ch != "0" and len(m.group()) == 1:
                raise Unsupported(f"backreferences are not in Go's regular expressions: \\{ch}")
            self.pos = m.end()
            return _literal(int(m.group(), 8))
        if ch in "89":
            raise Unsupported(f"backreferences are not in Go's regular expressions: \\{ch}")
        if ch in "pP":
            raise Unsupported(f"\\{ch} (a Unicode class) is not supported here")
        if ch in "aftnrv" or (ch == "A" and not in_class) or (ch.isascii() and not ch.isalnum()):
            return "\\" + ch
        raise Unsupported(f"invalid escape sequence \\{ch}")

    def bracket(self) -> str:
        src = self.src
        self.pos += 1
        out = ["["]
        if src.startswith("^", self.pos):
            out.append("^")
            self.pos += 1
        first = True
        while True:
            if self.pos >= len(src):
                raise Unsupported(f"missing closing ]: {src!r}")
            ch = src[self.pos]
            if ch == "]" and not first:
                self.pos += 1
                out.append("]")
                return "".join(out)
            first = False
            if src.startswith("[:", self.pos):
                end = src.find(":]", self.pos + 2)
                name = src[self.pos + 2 : end] if end > 0 else ""
                if name.startswith("^"):
                    raise Unsupported(f"negated POSIX class [:{name}:] is not supported here")
                if name in _POSIX:
                    out.append(_POSIX[name])
                    self.pos = end + 2
                    continue
                if end > 0:
                    raise Unsupported(f"invalid character class range [:{name}:]")
            if ch == "\\":
                out.append(self.escape(in_class=True))
                continue
            # a Go literal that Python 3.11 takes for a set operation, or warns about
            out.append("\\" + ch if ch in "[&~|-" and not _is_range(src, self.pos, out) else ch)
            self.pos += 1


def _is_range(src: str, pos: int, out: list[str]) -> bool:
    """Whether the '-' at *pos* joins a range (Go: between two items, not at the ends)."""
    return (
        src[pos] == "-"
        and out[-1] not in ("[", "^")
        and pos + 1 < len(src)
        and src[pos + 1] != "]"
        and not src.startswith("-", pos + 1)
    )


def _literal(code: int) -> str:
    if code > 0x10FFFF:
        raise Unsupported(f"escape sequence of {code:#x}: past Unicode")
    return re.escape(chr(code))
