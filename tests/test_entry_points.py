"""Drivers found from their distributions' entry points however they were installed: the
reader of plugins.py (no importlib.metadata, no stevedore) against real dist-info directories on
the interpreter's path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

DRIVER = """
from graphdriver_vfs import VfsDriver


class Driver(VfsDriver):
    name = "{name}"
    WHO = "{who}"
"""


def _dist(site: Path, dist: str, version: str, drivers: dict[str, str], code: str = "") -> None:
    """A distribution as a wheel installs it: its module and its dist-info directory."""
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {dist}_mod:Driver\n" for name in drivers)
    (info / "entry_points.txt").write_text(f"[graphdriver.drivers]\n{lines}")
    module = code or DRIVER.format(name=next(iter(drivers)), who=f"{dist}-{version}")
    (site / f"{dist}_mod.py").write_text(textwrap.dedent(module))


def _run(root: Path, driver: str, *args: str, path: list[Path]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
    cmd = [sys.executable, "-m", "graphdriver", "--root", str(root), "--driver", driver, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_a_driver_name_two_distributions_register_is_an_error(tmp_path: Path) -> None:
    """As with stevedore's DriverManager: which one loads is not left to the order of sys.path."""
    one, two = tmp_path / "one", tmp_path / "two"
    _dist(one, "gd_first", "1.0", {"twice": ""})
    _dist(two, "gd_second", "1.0", {"twice": ""})
    proc = _run(tmp_path / "root", "twice", "ls", path=[one, two])
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "'twice'" in proc.stderr and "gd_first" in proc.stderr and "gd_second" in proc.stderr
    assert not (tmp_path / "root" / "twice").exists()


def test_two_versions_of_one_distribution_the_first_on_the_path_wins(tmp_path: Path) -> None:
    """Two copies of one distribution (a user site over the system's): no conflict, the first on
    sys.path is the one, as importlib.metadata has it."""
    new, old = tmp_path / "new", tmp_path / "old"
    _dist(new, "gd_ver", "2.0", {"ver": ""})
    _dist(old, "gd_ver", "1.0", {"ver": ""})
    for path, who in (([new, old], "gd_ver-2.0"), ([old, new], "gd_ver-1.0")):
        code = "from graphdriver.plugins import load_driver; print(load_driver('ver').WHO)"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == who


def test_a_driver_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _dist(site, "gd_broken", "1.0", {"broken": ""}, code="import no_such_module_here\n")
    proc = _run(tmp_path / "root", "broken", "ls", path=[site])
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "'broken'" in proc.stderr and "no_such_module_here" in proc.stderr


def test_a_driver_in_the_user_site_is_found(tmp_path: Path) -> None:
    base = tmp_path / "userbase"
    code = "import site, sys; print(site.getusersitepackages())"
    env = dict(os.environ, PYTHONUSERBASE=str(base))
    user_site = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    _dist(Path(user_site), "gd_user", "1.0", {"usersite": ""})
    cmd = [sys.executable, "-m", "graphdriver", "--root", str(tmp_path / "root"), "drivers"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    in_user_site = subprocess.run(
        [sys.executable, "-c", "import site; print(site.ENABLE_USER_SITE)"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    assert proc.returncode == 0, proc.stderr
    # a venv without system site-packages has no user site (as pip and importlib.metadata)
    assert ("usersite" in proc.stdout) == (in_user_site == "True"), proc.stdout
