"""containerd's ``~=`` filters are Go regular expressions: the proxy matches them as Go does,
checked against Go's own regexp package (built here; golang-go is installed for the Go suite),
and refuses what Go refuses. Before, Python's ``re`` matched nothing for ``[[:digit:]]``,
refused ``\\z`` and took lookaheads containerd would refuse."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from graphdriver_containerd.filters import Filter, FilterError, snapshot_fields
from graphdriver_containerd.re2 import Unsupported, compile_re2

SAMPLES = [
    "rx816c123", "abc", "ABC", "a{,3}", "x", "xyz", "", "a.b", "ab\n", "ab", "a-b", "a]b",
    "[x", "é", "A1_", "1", "  ", "\t", "a*", "aaa", "Abc\nx", "ctd-1", "k8s.io/x",
    "sha256:ab", "a|b", "q.e", "\x01", "café", "a&b", "~", "٣", "éb", "b\n", "xm\n",
    "\u212a", "\u017f", "a$", "a$$",
]  # fmt: skip
#: what Go and Python both take but read differently, and what both read alike
PATTERNS = [
    r"^rx816c[[:digit:]]+$", r"abc\z", r"(?i)abc", r"a|(?i)b|c", r"((?i)a)b", r"a{,3}",
    r"a{2}", r"a{2,}", r"a{1,2}b", r"\d+", r"\w+$", r"\s", r"[\d]", r"[^\w]", r"\Qa.b\E",
    r"\Qa.b", r"a\.b", r"\x{41}", r"\x41", r"\101", r"\12", r"\0", r"a*?", r"[a-]", r"[]a]",
    r"[[x]", r"[a&&b]", r"[a||b]", r"[~~]", r"(?P<n>a)b", r"(?s)a.b", r"(?m)^x$", r"ab$",
    r"^$", r"[[:alpha:][:digit:]]+", r"[[:punct:]]", r"[[:space:]]", r"(?i:ABC)", r"[\s]",
    r"\bab\b", r"(a)(?:b)", r"é", r"caf\x{e9}", r"[a-c-e]", r"[a\-z]", r"a|", r"|a", r"()",
    r"(?i)", r"\.", r"\-", r"[|]", r"[~]", r"(?i)k8s|SHA", r"(?-s:a.b)", r"x{0}", r"\A\w",
    r"(?m:a)b$", r"(?m:^a$)|b$", r"x\(?m$", r"(?m)a$|(?-m:b$)", r"\bb", r"\b", r"a\Bb",
    r"\Qa$\E?", r"\Qa$\E+$", r"(?i)\w+", r"(?i)k", r"(?i)\W",
]  # fmt: skip
#: what Go refuses, and so does the proxy
REFUSED_BY_GO = [
    r"(?=x)", r"(?!x)", r"(?<=a)b", r"(?<!a)b", r"\1", r"(a)\1", r"(?P=n)", r"a*+", r"a++",
    r"a**", r"a{2}{3}", r"x{1001}", r"\Z", r"\e", r"\u0041", r"(?#c)a", r"(?>a)", r"*a",
    r"(*)", r"[[:foo:]]", r"[a", r"a)", r"\8", r"\x{110000}", "ab\\", r"\x4", r"[[:alpha:]", r"\C",
]  # fmt: skip
#: what Go takes and the proxy cannot say in Python: refused with a reason
NOT_HERE = [r"^x\pL+$", r"[\pL]", r"(?U)a+", r"[[:^alpha:]]", r"a(?i)bc"]

GO_MATCHER = """package main

import ("bufio"; "fmt"; "os"; "regexp"; "strconv"; "strings")

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		fields := strings.Split(in.Text(), "\\t")
		var parts []string
		for _, f := range fields {
			s, err := strconv.Unquote(f)
			if err != nil { panic(err) }
			parts = append(parts, s)
		}
		re, err := regexp.Compile(parts[0])
		if err != nil { fmt.Println("refused"); continue }
		out := ""
		for _, s := range parts[1:] {
			if re.MatchString(s) { out += "1" } else { out += "0" }
		}
		fmt.Println(out)
	}
}
"""


def _go_quote(s: str) -> str:
    """*s* as a Go string literal (strconv.Unquote reads it)."""
    return '"' + "".join(_go_char(c) for c in s) + '"'


def _go_char(c: str) -> str:
    if c.isprintable() and c not in '"\\':
        return c
    return {'"': '\\"', "\\": "\\\\"}.get(c) or f"\\U{ord(c):08x}"


def _ours(pattern: str) -> str:
    try:
        compiled = compile_re2(pattern)
    except Unsupported:
        return "refused"
    return "".join("1" if compiled.search(s) else "0" for s in SAMPLES)


def test_matches_as_gos_regexp_does(tmp_path: Path) -> None:
    go = shutil.which("go")
    if go is None:
        pytest.skip("host lacks go (golang-go, which scripts/setup installs)")
    (tmp_path / "main.go").write_text(GO_MATCHER)
    env = {"GO111MODULE": "off", "GOCACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    subprocess.run(
        [go, "build", "-o", "match", "main.go"], cwd=tmp_path, check=True, env=env, timeout=300
    )
    every = PATTERNS + REFUSED_BY_GO + NOT_HERE
    lines = "".join("\t".join(_go_quote(s) for s in [p, *SAMPLES]) + "\n" for p in every)
    answers = subprocess.run(
        [str(tmp_path / "match")], input=lines, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    by_go = dict(zip(every, answers, strict=True))
    for pattern in PATTERNS:
        assert by_go[pattern] != "refused", pattern
        assert _ours(pattern) == by_go[pattern], pattern
    for pattern in REFUSED_BY_GO:
        assert (by_go[pattern], _ours(pattern)) == ("refused", "refused"), pattern
    for pattern in NOT_HERE:
        assert by_go[pattern] != "refused" and _ours(pattern) == "refused", pattern


@pytest.mark.parametrize(
    ("selector", "name", "matches"),
    [
        (r"name~=^rx816c[[:digit:]]+$", "rx816c123", True),  # Python: a set of ':' 'd' ...
        (r"name~=^rx816c[[:digit:]]+$", "rx816c12a", False),
        (r"name~=abc\z", "xabc", True),  # Python's re: a bad escape
        (r"name~=ab$", "ab\n", False),  # Python's $ matches before a final newline
        (r"name~=\d", "٣", False),  # Go's \d is ASCII
        ('name~="a{,3}"', "a{,3}", True),  # a literal to Go, a repetition to Python
        (r"name~=\12", "\n", True),  # octal to Go, a backreference to Python
    ],
)
def test_a_filter_matches_as_containerd_would(selector: str, name: str, matches: bool) -> None:
    fields = snapshot_fields(name, "active", "", {})
    assert Filter([selector]).match(fields) is matches


@pytest.mark.parametrize("pattern", [r"(?=x)", r"\1", r"a*+", r"^x\pL+$"])
def test_a_filter_go_refuses_or_that_cannot_be_said_is_invalid(pattern: str) -> None:
    with pytest.raises(FilterError, match="bad regular expression"):
        Filter([f"name~={pattern}"])
