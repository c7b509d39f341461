"""A driver package written by someone else installs, is listed, and passes the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import install_package, run_suite

PYPROJECT = """
[project]
name = "graphdriver-tinycopy"
version = "0.1.0"
dependencies = ["graphdriver"]

[project.entry-points."graphdriver.drivers"]
tinycopy = "graphdriver_tinycopy:TinyCopy"

[project.entry-points."graphdriver"]
tinycopy-audit = "graphdriver_tinycopy.audit"

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[tool.hatch.build.targets.wheel]
packages = ["src/graphdriver_tinycopy"]
"""

DRIVER = '''
"""A third-party driver: layers are `cp -a` copies of their parent."""
import shutil
import subprocess
from pathlib import Path

from graphdriver import Capabilities, Driver, DriverUnavailable
from graphdriver.toolkit import private_dir, remove_tree, unmount_all_under


class TinyCopy(Driver):
    name = "tinycopy"
    options = {"tinycopy.reflink": "auto|always|never, passed to cp --reflink"}
    capabilities = Capabilities()

    @classmethod
    def probe(cls, home, options):
        if shutil.which("cp") is None:
            raise DriverUnavailable("tinycopy needs cp (coreutils)")

    def _dir(self, layer):
        return self.home / "layers" / layer.id

    def has_storage(self, layer):  # (cp -a into an existing directory would copy into it)
        return self._dir(layer).exists()

    def create(self, layer, parent, opts):
        target = self._dir(layer)
        private_dir(target.parent)  # 0700: other users never reach a layer's setuid files
        if parent is None:
            target.mkdir(0o755)
            target.chmod(0o755)
            return
        reflink = self.opts.get("tinycopy.reflink", "auto")
        subprocess.run(["cp", "-a", f"--reflink={reflink}", str(self._dir(parent)),
                        str(target)], check=True)

    def remove(self, layer):
        if self._dir(layer).is_dir():  # never delete what a runtime left bound inside
            unmount_all_under(self._dir(layer))
        remove_tree(self._dir(layer))  # any depth (shutil.rmtree recurses once a level)

    def mount(self, layer, chain):
        return self._dir(layer)

    def unmount(self, layer):
        pass
'''

AUDIT = '''
"""A third-party hook plugin: records layer events in the store's home."""
from graphdriver import hookimpl


@hookimpl
def graphdriver_layer_created(store, layer):
    with open(store.home / "audit.log", "a") as f:
        f.write(f"created {layer.id}\\n")
'''

SUITE = """
import sys

from graphdriver.testing import DriverConformance

sys.modules["graphdriver_vfs"] = None  # as where no other driver is installed: none is needed


class TestTinyCopy(DriverConformance):
    driver = "tinycopy"
    backing = "loop-ext4"
    options = {"tinycopy.reflink": "auto"}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_package(
        tmp_path_factory.mktemp("tinycopy"),
        PYPROJECT,
        {
            "graphdriver_tinycopy/__init__.py": DRIVER,
            "graphdriver_tinycopy/audit.py": AUDIT,
        },
    )


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site)}


def test_listed_and_usable_from_the_cli(site: Path, tmp_path: Path) -> None:
    gd = [sys.executable, "-m", "graphdriver", "--root", str(tmp_path / "root")]
    out = subprocess.run(
        [*gd, "drivers"], env=_env(site), capture_output=True, text=True, check=True
    ).stdout
    assert any(line.split()[:2] == ["tinycopy", "ok"] for line in out.splitlines()), out
    run = [*gd, "--driver", "tinycopy", "--opt", "tinycopy.reflink=auto"]
    subprocess.run([*run, "create", "base"], env=_env(site), check=True)
    subprocess.run([*run, "create", "--parent", "base", "child"], env=_env(site), check=True)
    ls = subprocess.run([*run, "ls"], env=_env(site), capture_output=True, text=True, check=True)
    assert ls.stdout.split() == ["base", "child"]
    log = (tmp_path / "root" / "tinycopy" / "audit.log").read_text()
    assert log == "created base\ncreated child\n"
    bad = subprocess.run(
        [*run.__getitem__(slice(0, -2)), "--opt", "tinycopy.nope=1", "ls"],
        env=_env(site),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "tinycopy.reflink" in bad.stderr


def test_passes_the_conformance_suite(site: Path, tmp_path: Path) -> None:
    tail = run_suite(sys.executable, tmp_path, SUITE, env=_env(site))
    assert "deselected" not in tail, tail  # a class that names no groups runs every case


BROKEN_PYPROJECT = """
[project]
name = "graphdriver-broken"
version = "0.1.0"
dependencies = ["graphdriver"]

[project.entry-points."graphdriver.drivers"]
crashprobe = "graphdriver_broken:CrashProbe"
misnamed = "graphdriver_broken:Misnamed"
nameless = "graphdriver_broken:Nameless"

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[tool.hatch.build.targets.wheel]
packages = ["src/graphdriver_broken"]
"""

BROKEN = '''
"""Third-party drivers with the bugs a driver author makes."""
from graphdriver import Capabilities, Driver


class _Nothing(Driver):
    options = {}
    capabilities = Capabilities()

    def create(self, layer, parent, opts):
        raise NotImplementedError

    def remove(self, layer):
        pass

    def mount(self, layer, chain):
        raise NotImplementedError

    def unmount(self, layer):
        pass


class CrashProbe(_Nothing):
    """probe raises what it should have turned into DriverUnavailable."""
    name = "crashprobe"

    @classmethod
    def probe(cls, home, options):
        raise PermissionError(13, "cannot read /sys/whatever")


class Misnamed(_Nothing):
    """Registered as "misnamed", names itself "other"."""
    name = "other"


class Nameless(_Nothing):
    """Sets no name at all."""
'''


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_package(
        tmp_path_factory.mktemp("broken"),
        BROKEN_PYPROJECT,
        {"graphdriver_broken/__init__.py": BROKEN},
    )


def test_a_probe_that_crashes_breaks_no_command(broken_site: Path, tmp_path: Path) -> None:
    """A driver whose probe raises anything but a GraphDriverError is unavailable, its error the
    reason, said once; the listing goes on and a create without --driver picks another one."""
    gd = [sys.executable, "-m", "graphdriver", "--root", str(tmp_path / "root")]
    env = _env(broken_site)
    listed = subprocess.run([*gd, "drivers"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert "vfs" in rows and rows["vfs"].split()[1] == "ok", listed.stdout
    assert "unavailable: its probe failed: PermissionError" in rows["crashprobe"], listed.stdout
    assert listed.stderr.count("crashprobe") == 1, listed.stderr
    assert "Traceback" not in listed.stderr
    made = subprocess.run([*gd, "create", "x"], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    ls = subprocess.run([*gd, "ls"], env=env, capture_output=True, text=True, check=True)
    assert ls.stdout.split() == ["x"]


@pytest.mark.parametrize(
    ("driver", "said"), [("misnamed", "names itself 'other'"), ("nameless", "sets no name")]
)
def test_a_driver_named_unlike_its_entry_point_is_refused_at_load(
    broken_site: Path, tmp_path: Path, driver: str, said: str
) -> None:
    """A class whose ``name`` is not its entry point's (its store would be made under the other
    name, and found under neither) fails to load, in one line, and makes no store directory."""
    root = tmp_path / "root"
    gd = [sys.executable, "-m", "graphdriver", "--root", str(root), "--driver", driver]
    out = subprocess.run([*gd, "ls"], env=_env(broken_site), capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and "entry point" in lines[0], out.stderr
    assert not (root / "other").exists() and not (root / driver).exists()
