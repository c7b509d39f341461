"""A volume driver package written by someone else installs, is listed, and serves containers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import install_package

from graphdriver.linux.mount import mounts_under

PYPROJECT = """
[project]
name = "graphdriver-journalvol"
version = "0.1.0"
dependencies = ["graphdriver"]

[project.entry-points."graphdriver.volume_drivers"]
journal = "graphdriver_journalvol:JournalDriver"

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[tool.hatch.build.targets.wheel]
packages = ["src/graphdriver_journalvol"]
"""

DRIVER = '''
"""A third-party volume driver: a directory per volume, every call written to a journal."""
import os
import shutil

from graphdriver import InvalidOption
from graphdriver.volumes import VolumeDriver


class JournalDriver(VolumeDriver):
    name = "journal"
    options = {"journal.mode": "octal mode of the volume's directory"}

    def _log(self, *words):
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "calls.log", "a") as f:
            f.write(" ".join(words) + "\\n")

    def validate(self, options):
        mode = options.get("journal.mode", "0755")
        if not mode.isdigit():
            raise InvalidOption(f"journal.mode must be octal, not {mode!r}")

    def path(self, name, options):
        return self.home / "data" / name

    def create(self, name, options):
        self._log("create", name, options.get("journal.mode", "-"))
        self.path(name, options).mkdir(parents=True)
        os.chmod(self.path(name, options), int(options.get("journal.mode", "0755"), 8))

    def remove(self, name, options):
        self._log("remove", name)
        shutil.rmtree(self.path(name, options), ignore_errors=True)

    def mount(self, name, options):
        self._log("mount", name)
        return self.path(name, options)

    def unmount(self, name, options):
        self._log("unmount", name)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_package(
        tmp_path_factory.mktemp("journalvol"),
        PYPROJECT,
        {"graphdriver_journalvol/__init__.py": DRIVER},
    )


def test_volume_driver_package_serves_containers(site: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    base = [sys.executable, "-m", "graphdriver", "--root", str(root), "--driver", "vfs"]
    env = {**os.environ, "PYTHONPATH": str(site)}

    def gd(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*base, *args], env=env, capture_output=True, text=True)
        assert (proc.returncode == 0) == ok, proc.stderr
        return proc

    try:
        assert "journal" in gd("volume", "drivers").stdout.split()
        gd("volume", "create", "--volume-driver", "journal", "--opt", "journal.mode=0700", "v1")
        info = json.loads(gd("volume", "inspect", "v1").stdout)[0]
        home = root / "volumes" / "_drivers" / "journal"
        assert info["Driver"] == "journal" and info["Options"] == {"journal.mode": "0700"}
        assert info["Mountpoint"] == str(home / "data" / "v1")
        assert (home / "data" / "v1").stat().st_mode & 0o777 == 0o700
        err = gd("volume", "create", "--volume-driver", "journal", "--opt", "mode=1", "x", ok=False)
        assert "has no option 'mode' (its options: journal.mode)" in err.stderr
        err = gd(
            "volume",
            "create",
            "--volume-driver",
            "journal",
            "--opt",
            "journal.mode=rw",
            "x",
            ok=False,
        )
        assert err.stderr.strip() == "graphdriver: error: journal.mode must be octal, not 'rw'"
        gd("create", "img")
        gd("container", "create", "c1", "--image", "img", "-v", "v1:/data",
           "--volume-driver", "journal", "-v", "v2:/other")  # fmt: skip
        mounts = json.loads(gd("container", "inspect", "c1").stdout)[0]["Mounts"]
        assert {m["Name"]: m["Driver"] for m in mounts} == {"v1": "journal", "v2": "journal"}
        rootfs = Path(gd("container", "mount", "c1").stdout.strip())
        (rootfs / "data" / "written").write_text("through the container")
        assert (home / "data" / "v1" / "written").read_text() == "through the container"
        gd("container", "umount", "c1")
        gd("container", "rm", "c1")
        gd("volume", "rm", "v1", "v2")
        assert (home / "calls.log").read_text().splitlines() == [
            "create v1 0700",
            "create v2 -",
            "mount v1",
            "mount v2",
            "unmount v1",
            "unmount v2",
            "remove v1",
            "remove v2",
        ]
    finally:
        subprocess.run([*base, "cleanup"], env=env, capture_output=True)
        assert mounts_under(root) == []
