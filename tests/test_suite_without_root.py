"""A driver author without root runs the conformance suite on ``tmpdir``: the cases that need
root skip, saying "needs root: <why>", none fails; GRAPHDRIVER_REQUIRE=root fails them again.

The suite runs as a real unprivileged user (``runuser``), in a pytest of its own.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver.testing import host_lacks, needs_root

#: every Debian/Ubuntu system has it; the test adds no user to the host
USER = "nobody"

SUITE = """
from graphdriver.testing import DriverConformance


class TestVfsAsAUser(DriverConformance):
    driver = "vfs"
    backing = "tmpdir"
"""

#: a skip the suite may report besides "needs root": a capability vfs does not declare
NOT_DECLARED = re.compile(r"driver vfs does not declare ")


@pytest.fixture(scope="module")
def user() -> str:
    needs_root("the test runs the suite as another user (runuser)")
    if shutil.which("runuser") is None:
        host_lacks("runuser (util-linux) to run the suite as an unprivileged user")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        host_lacks(f"a user {USER!r} to run the suite as")
    return USER


def _as(user: str, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv],
        capture_output=True, text=True, timeout=900, cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def workdir(user: str) -> Iterator[Path]:
    """A folder the user owns (pytest's own tmp_path is root's alone)."""
    work = Path(tempfile.mkdtemp(prefix="gd-nonroot-"))
    try:
        entry = pwd.getpwnam(user)
        os.chown(work, entry.pw_uid, entry.pw_gid)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _copy_packages(dest: Path) -> None:
    """Copy into *dest* (the user's site-packages) what the suite imports: graphdriver, the
    vfs driver, pytest and what they require, modules and dist-info (entry points) alike; an
    editable install's source folders (its .pth lines) are copied whole. The user then reads
    nothing below root's folders (a tox env's .tox is 0700, a pyenv lives in /root)."""
    todo, seen = ["graphdriver", "graphdriver-vfs", "pytest"], set()
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [
            m[0] for r in dist.requires or [] if (m := re.match(r"[\w.-]+", r)) and "extra" not in r
        ]
        for file in dist.files or []:
            src = Path(str(dist.locate_file(file)))
            if file.parts[0] == ".." or "__pycache__" in file.parts or not src.is_file():
                continue
            if file.suffix == ".pth":
                for line in src.read_text().splitlines():
                    if line and not line.startswith(("#", "import")) and Path(line).is_dir():
                        shutil.copytree(line, dest, dirs_exist_ok=True, ignore=_NOT_SOURCE)
                continue
            (dest / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / file)


_NOT_SOURCE = shutil.ignore_patterns("__pycache__", "*.egg-info")


@pytest.fixture(scope="module")
def python(user: str, workdir: Path) -> str:
    """An interpreter the user can run that imports this environment's packages: this one, or,
    when it lives under a folder only root may enter (a pyenv in /root, a tox env), a venv of
    the system's Python of the same version holding copies of the packages the suite needs."""
    probe = "import graphdriver.testing, graphdriver_vfs, pytest"
    if _as(user, sys.executable, "-c", probe).returncode == 0:
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system is None:
        host_lacks(f"{sys.executable} is out of {user}'s reach and there is no system {version}")
    venv = workdir / "venv"
    made = _as(user, system, "-m", "venv", "--without-pip", str(venv))
    assert made.returncode == 0, made.stderr
    own = str(venv / "bin" / "python")
    purelib = _as(user, own, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    _copy_packages(Path(purelib.stdout.strip()))
    for path in [workdir, *workdir.rglob("*")]:
        os.lchown(path, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    reach = _as(user, own, "-c", probe)
    assert reach.returncode == 0, f"user {user} cannot import the copied packages: {reach.stderr}"
    return own


def _suite(user: str, python: str, work: Path, *args: str, require: str = "") -> tuple[int, str]:
    (work / "test_as_a_user.py").write_text(SUITE)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
           "TMPDIR": str(work), "GRAPHDRIVER_REQUIRE": require}  # fmt: skip
    proc = _as(
        user, "env", "-i", *(f"{k}={v}" for k, v in env.items()),
        python, "-m", "pytest", "-q", "-rsfE", "-p", "no:cacheprovider", "--rootdir", str(work),
        str(work / "test_as_a_user.py"), *args,
        cwd=work,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def test_cases_that_need_root_skip_and_say_why(user: str, python: str, workdir: Path) -> None:
    code, out = _suite(user, python, workdir)
    tail = out.strip().splitlines()[-1]
    assert code == 0, out[-5000:]
    assert " passed" in tail and "failed" not in tail and "error" not in tail, tail
    reasons = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", out, re.MULTILINE)
    root = [why for _, why in reasons if why.startswith("needs root: ")]
    assert root, out[-3000:]
    others = [why for _, why in reasons if not why.startswith("needs root: ")]
    assert all(NOT_DECLARED.match(why) for why in others), others
    assert f" {sum(int(n) for n, _ in reasons)} skipped" in f" {tail}", tail


def test_require_root_turns_those_skips_into_failures(
    user: str, python: str, workdir: Path
) -> None:
    code, out = _suite(
        user, python, workdir,
        "-k", "test_create_empty or test_ls_lists_exactly_what_exists", require="root",
    )  # fmt: skip
    assert code == 1, out[-3000:]
    assert "1 failed, 1 passed" in out.strip().splitlines()[-1], out[-3000:]
    assert (
        "needs root: a new layer's root is owned by 0:0 only when root makes it "
        "(GRAPHDRIVER_REQUIRE requires root)"
    ) in out
