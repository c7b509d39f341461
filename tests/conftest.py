"""Fixtures for the tests that cross packages: a loop-ext4 root and a CLI runner."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from graphdriver.testing import Backing, backing_or_skip

# the tests interrupt the commands they start: a runner started as a shell script's background
# job (SIGINT ignored) or with signals blocked would hand that on to them
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
# no command a test runs starts a command server that outlives it (tox sets this too; the
# tests of the servers start their own)
os.environ.setdefault("GRAPHDRIVER_SOCKET", "")


@pytest.fixture(scope="session")
def loop_ext4() -> Iterator[Backing]:
    yield from backing_or_skip("loop-ext4")


@dataclass
class Result:
    code: int
    out: str
    err: str
    raw: bytes


class GD:
    """Runs the real ``graphdriver`` command against one root."""

    def __init__(self, root: Path, driver: str = "vfs") -> None:
        self.root = root
        self.driver = driver
        exe = shutil.which("graphdriver", path=str(Path(sys.executable).parent))
        self.base = [exe] if exe else [sys.executable, "-m", "graphdriver"]

    def argv(self, *args: str) -> list[str]:
        return [*self.base, "--root", str(self.root), "--driver", self.driver, *args]

    def __call__(
        self, *args: str, input: bytes | None = None, check: bool = True, stdout: int | None = None
    ) -> Result:
        proc = subprocess.run(
            self.argv(*args),
            input=input,
            capture_output=stdout is None,
            stdout=stdout,
            timeout=300,
            env={**os.environ},
        )
        raw = proc.stdout or b""
        res = Result(
            proc.returncode,
            raw.decode(errors="replace"),
            (proc.stderr or b"").decode(errors="replace"),
            raw,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"graphdriver {' '.join(args)} failed ({proc.returncode}): {res.err}"
            )
        return res


@pytest.fixture
def gd(loop_ext4: Backing, request: pytest.FixtureRequest) -> Iterator[GD]:
    root = loop_ext4.root / request.node.name.replace("/", "_")[:80]
    root.mkdir()
    runner = GD(root)
    try:
        yield runner
    finally:
        subprocess.run(runner.argv("cleanup"), capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def install_package(work: Path, pyproject: str, modules: dict[str, str]) -> Path:
    """Build a package from *pyproject* and ``src/`` *modules* (path -> source) with hatchling
    and install it with uv into a target folder of its own; return that folder (for
    PYTHONPATH)."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.fail("uv is needed to install the test package; run the README's set-up")
    pkg = work / "pkg"
    for rel, source in modules.items():
        (pkg / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / "src" / rel).write_text(textwrap.dedent(source))
    (pkg / "pyproject.toml").write_text(pyproject)
    target = work / "site"
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--no-deps", "--python", sys.executable,
         "--target", str(target), str(pkg)],
        check=True,
        timeout=600,
    )  # fmt: skip
    return target


def run_suite(python: str, directory: Path, source: str, env: dict[str, str] | None = None) -> str:
    """Run a conformance test module (*source*) with *python* in a pytest of its own; assert
    it passed and return its last line."""
    (directory / "test_generated_suite.py").write_text(source)
    proc = subprocess.run(
        [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(directory),
            str(directory / "test_generated_suite.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=directory,
        timeout=900,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert " passed" in tail and "failed" not in tail, tail
    return tail
