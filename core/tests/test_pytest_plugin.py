"""The pytest plugin graphdriver installs is loaded in every pytest session of a project that
installs graphdriver: it must leave that session's environment as it found it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

UNRELATED = """
import json
import os


def test_someone_elses_code(request):
    assert request.config.pluginmanager.has_plugin("graphdriver")
    with open({out!r}, "w") as f:
        json.dump(dict(os.environ), f)
"""

AFTER_THE_SUITE = """
import json
import os

from graphdriver.testing import DriverConformance


class TestVfs(DriverConformance):
    driver = "vfs"
    backing = "tmpdir"


def test_after_the_suite():
    with open({out!r}, "w") as f:
        json.dump(dict(os.environ), f)
"""


def _session(tmp_path: Path, source: str, *args: str) -> tuple[dict[str, str], dict[str, str]]:
    """Run *source* as a test file in a pytest session of its own, without XDG_CACHE_HOME or
    GRAPHDRIVER_REQUIRE; return the environment it was given and the one its test saw."""
    out = tmp_path / "environ.json"
    test = tmp_path / "test_elsewhere.py"
    test.write_text(source.format(out=str(out)))
    env = {
        k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "GRAPHDRIVER_REQUIRE")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), str(test), *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    seen = json.loads(out.read_text())

    def own(environ: dict[str, str]) -> dict[str, str]:  # pytest's own variables aside
        return {k: v for k, v in environ.items() if not k.startswith("PYTEST_")}

    return own(env), own(seen)


def test_an_unrelated_session_sees_its_environment_unchanged(tmp_path: Path) -> None:
    given, seen = _session(tmp_path, UNRELATED)
    assert seen == given


def test_the_suite_restores_the_environment_after_its_cases(tmp_path: Path) -> None:
    # a case that opens a store (and so loads the driver through stevedore) runs first
    given, seen = _session(
        tmp_path, AFTER_THE_SUITE, "-k", "test_ls_lists_exactly_what_exists or after_the_suite"
    )
    assert seen == given
