"""Each distribution builds its own wheel, and the wheels work installed (not editable)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import run_suite

from graphdriver.testing import host_lacks
from graphdriver.testing.require import required
from graphdriver.toolkit import device_mapper_missing

REPO = Path(__file__).resolve().parents[1]

SUITE = """
from graphdriver.testing import DriverConformance


class TestVfsFromWheel(DriverConformance):
    driver = "vfs"
    backing = "tmpdir"


class TestOverlayFromWheel(DriverConformance):
    driver = "overlay"
    backing = "loop-ext4"
"""


@pytest.fixture(scope="module")
def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        pytest.fail("uv is needed to build the wheels; run the README's set-up")
    return found


def _compiles_with_python_h() -> bool:
    """Whether the build hook's compiler ($CC or Python's) compiles against Python.h here."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc[0]) is None:
        return False
    include = sysconfig.get_paths()["include"]
    probe = [*cc, *shlex.split(os.environ.get("CFLAGS", "")), "-fsyntax-only", "-I", include]
    done = subprocess.run(
        [*probe, "-x", "c", "-"], input="#include <Python.h>\n", capture_output=True, text=True
    )
    return done.returncode == 0


def test_wheels_build_install_and_pass_the_suite(uv: str, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [uv, "build", "--all-packages", "--wheel", "-o", str(dist)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == [
        "graphdriver",
        "graphdriver_btrfs",
        "graphdriver_containerd",
        "graphdriver_devmapper",
        "graphdriver_docker",
        "graphdriver_overlay",
        "graphdriver_vfs",
    ]
    # core's wheel carries the C fast path built for this Python (core/hatch_build.py), or,
    # where nothing can compile it, is pure Python
    built = _compiles_with_python_h()
    if not built and "fastpath" in required():
        host_lacks("no C compiler that compiles with Python.h (gcc, python3-dev)", "fastpath")
    core_wheel = next(dist.glob("graphdriver-*.whl"))
    py_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    tag = f"-{py_tag}-{py_tag}-{platform}.whl" if built else "-py3-none-any.whl"
    assert core_wheel.name.endswith(tag), core_wheel.name
    with zipfile.ZipFile(core_wheel) as whl:
        names = whl.namelist()
    has_module = any(n.startswith("graphdriver/archive/_fastpath.cpython-") for n in names)
    assert has_module == built, names
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            py,
            *(str(p) for p in dist.glob("*.whl")),
            "pytest",
        ],
        check=True,
        timeout=600,
    )
    out = subprocess.run(
        [str(venv / "bin" / "graphdriver"), "--root", str(tmp_path / "root"), "drivers"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    # the root is on the temp dir's filesystem, not btrfs: listed, with the reason
    has_dm = device_mapper_missing() is None
    assert rows == {
        "overlay": "ok",
        "btrfs": "unavailable:",
        "devmapper": "ok" if has_dm else "unavailable:",
        "vfs": "ok",
    }, out
    assert "needs its root on btrfs" in out
    # the containerd bridge: its command is listed, and its generated gRPC code is in the wheel
    served = subprocess.run(
        [str(venv / "bin" / "graphdriver"), "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "containerd" in served
    subprocess.run([py, "-c", "import graphdriver_containerd.service"], check=True)
    # the Docker plugins: the volume plugin's command is listed and imports from the wheel
    assert "docker-volume" in served
    subprocess.run([py, "-c", "import graphdriver_docker.volume"], check=True)
    fast = f"from graphdriver.archive import fastpath; assert fastpath.ENABLED is {built}"
    subprocess.run([py, "-c", fast], check=True, cwd=tmp_path)
    run_suite(py, tmp_path, SUITE)
