"""A conformance class may run a declared subset of the case groups: the others are deselected
at collection (never skipped) with one header line saying why, and a class that declares
nothing gets the whole suite, as a third-party driver package does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from graphdriver.testing import GROUPS, DriverConformance, group
from graphdriver.testing.groups import MARKER

CLASSES = """
from graphdriver.testing import DriverConformance


class TestWhole(DriverConformance):
    driver = "vfs"


class TestPart(DriverConformance):
    driver = "vfs"
    groups = {"lifecycle", "quota"}
    groups_why = "TestWhole runs the rest"
"""


def cases() -> dict[str, str | None]:
    """Every case of the suite -> its group (None when it has no mark)."""
    found: dict[str, str | None] = {}
    for name in dir(DriverConformance):
        if name.startswith("test_"):
            marks = getattr(getattr(DriverConformance, name), "pytestmark", [])
            groups = [m.kwargs.get("group") for m in marks if m.name == MARKER]
            assert len(groups) <= 1, f"{name} has several groups: {groups}"
            found[name] = groups[0] if groups else None
    return found


def run_pytest(tmp_path: Path, source: str, *args: str) -> tuple[int, str]:
    (tmp_path / "test_generated.py").write_text(source)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *args,
            "test_generated.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_every_case_has_exactly_one_known_group() -> None:
    found = cases()
    assert len(found) > 40
    assert {n for n, g in found.items() if g not in GROUPS} == set()
    assert set(found.values()) == GROUPS.keys(), "a group without cases"


def test_a_class_runs_its_groups_and_the_rest_is_deselected_with_the_reason(
    tmp_path: Path,
) -> None:
    code, out = run_pytest(tmp_path, CLASSES, "--collect-only")
    assert code == 0, out
    found = cases()
    part = sum(1 for g in found.values() if g in ("lifecycle", "quota"))
    whole = len(
        [line for line in out.splitlines() if line.startswith("test_generated.py::TestWhole::")]
    )
    left = [line for line in out.splitlines() if line.startswith("test_generated.py::TestPart::")]
    assert whole > len(found)  # every case, parametrized ones once per parameter
    assert len(left) == part, left
    assert f"{whole + part}/{2 * whole} tests collected ({whole - part} deselected)" in out
    header = [line for line in out.splitlines() if line.startswith("graphdriver: TestPart ")]
    assert len(header) == 1, out
    assert header[0].startswith(
        f"graphdriver: TestPart runs the conformance groups lifecycle, quota; "
        f"{whole - part} cases deselected (bad-input "
    ), header
    assert header[0].endswith(": TestWhole runs the rest"), header
    assert "TestWhole" not in header[0].split(":")[1]


def test_deselected_cases_are_no_skips(tmp_path: Path) -> None:
    code, out = run_pytest(tmp_path, CLASSES, "-k", "TestPart and (create_empty or max_id)")
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("1 passed, "), out
    assert "skipped" not in out and " deselected in " in out


def test_the_marker_selects_a_group(tmp_path: Path) -> None:
    code, out = run_pytest(tmp_path, CLASSES, "--collect-only", "-m", "conformance(group='depth')")
    assert code == 0, out
    assert [line for line in out.splitlines() if "::" in line] == [
        "test_generated.py::TestWhole::test_deep_chain_read"
    ]


@pytest.mark.parametrize(
    ("declared", "says"),
    [
        (
            'groups = {"lifecycle", "mounts"}\n    groups_why = "elsewhere"',
            "TestBad.groups names unknown conformance groups mounts; choose from lifecycle,",
        ),
        (
            'groups = {"quota"}',
            "TestBad runs only the conformance groups quota: say in groups_why where the "
            "others are covered",
        ),
        ('groups = "quota"', "TestBad.groups must be a set of group names, not a string"),
    ],
    ids=["unknown", "no-why", "string"],
)
def test_a_bad_declaration_stops_the_run(tmp_path: Path, declared: str, says: str) -> None:
    source = (
        "from graphdriver.testing import DriverConformance\n\n\n"
        f'class TestBad(DriverConformance):\n    driver = "vfs"\n    {declared}\n'
    )
    code, out = run_pytest(tmp_path, source, "--collect-only")
    assert code == pytest.ExitCode.USAGE_ERROR, out
    assert says in out, out


def test_an_unknown_group_name_is_refused_where_it_is_written() -> None:
    with pytest.raises(ValueError, match="unknown conformance group 'mounts'"):
        group("mounts")
