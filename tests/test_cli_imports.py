"""A CLI call imports what it runs: ``ls``, ``mount``, ``umount`` and ``exists`` never import the
archive engine, zstandard, tqdm, grpc, stevedore or importlib.metadata, nor pluggy unless an
installed hook plugin implements a hook they call, nor the standard modules that only removing
or probing needs (shutil, tempfile, secrets and hashlib, which loads OpenSSL: 6-10 ms each
here); ``changes`` never imports the tar engine, nor apply-diff the diff engine. Behaviour, not
timing: the real command runs in a subprocess and the test reads the modules it imported."""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from graphdriver import plugins
from graphdriver.testing import Backing, backing_or_skip

#: never imported by a verb that does not read or write a tar
ENGINE = {
    "graphdriver.archive.apply",
    "graphdriver.archive.tar",
    "graphdriver.archive.tar_writer",
    "graphdriver.archive.tar_reader",
    "graphdriver.archive.streams",
    "graphdriver.archive.tarsplit",
    "graphdriver.archive.sparse",
    "graphdriver.archive.copy_up",
    "graphdriver.diffs",
    "graphdriver.applying",
    "zstandard",
    "tqdm",
    "grpc",
    "stevedore",
    "importlib.metadata",
    "shutil",
    "tempfile",
    "secrets",
    "hashlib",
}
#: the hooks that open_store, mount and umount may call
CALLED = {
    "graphdriver_driver_options",
    "graphdriver_default_driver",
    "graphdriver_mount",
    "graphdriver_releasing",
}


#: the real command, which writes the names in sys.modules to a file as the process ends
#: (python -X importtime misses what importlib.import_module imports, so it cannot tell)
RUN = """
import atexit, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sys.modules)))
from graphdriver.cli import main
main()
"""


def _imported(root: Path, driver: str, *args: str, stdin: bytes | None = None) -> set[str]:
    out = root.parent / f"modules-{root.name}.txt"
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(out), "--root", str(root), "--driver", driver, *args],
        capture_output=True, input=stdin, timeout=120, env={**os.environ},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:].decode(errors="replace")
    found = set(out.read_text().split())
    out.unlink()
    return found


def _hook_plugins_called(called: set[str] = CALLED) -> list[str]:
    """Installed hook plugins that implement a hook of *called* (the verbs' hooks: they
    need pluggy)."""
    return sorted(
        name
        for name, value in plugins.entry_point_names(plugins.HOOK_GROUP).items()
        if plugins._implemented(plugins.load_entry_point(value)) & called
    )


@pytest.fixture(scope="module")
def loop_btrfs() -> Iterator[Backing]:
    yield from backing_or_skip("loop-btrfs")


@pytest.mark.parametrize("driver", ["vfs", "overlay", "btrfs"])
def test_ls_and_mount_import_no_engine(driver: str, request: pytest.FixtureRequest) -> None:
    backing = request.getfixturevalue("loop_btrfs" if driver == "btrfs" else "loop_ext4")
    assert isinstance(backing, Backing)
    root = backing.root / f"imports-{driver}"
    root.mkdir()
    banned = set(ENGINE)
    if not _hook_plugins_called():
        banned.add("pluggy")
    gd = [sys.executable, "-m", "graphdriver", "--root", str(root), "--driver", driver]
    subprocess.run([*gd, "create", "base"], check=True, capture_output=True, timeout=120)
    try:
        for args in (("ls",), ("exists", "base"), ("mount", "base"), ("umount", "base")):
            found = _imported(root, driver, *args)
            assert "graphdriver.store" in found  # the run did open the store
            assert sorted(found & banned) == [], args
    finally:
        subprocess.run([*gd, "cleanup"], capture_output=True, timeout=120)


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_changes_and_apply_import_only_their_half(driver: str, loop_ext4: Backing) -> None:
    """``changes`` lists without the tar engine (hashlib, zstandard, the writer); apply-diff
    of a fresh layer writes without the diff engine (``diffs``: it only asks a layer mounted
    before whether it changed)."""
    root = loop_ext4.root / f"halves-{driver}"
    root.mkdir()
    gd = [sys.executable, "-m", "graphdriver", "--root", str(root), "--driver", driver]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"base\n"))
    try:
        subprocess.run([*gd, "create", "base"], check=True, capture_output=True, timeout=120)
        found = _imported(root, driver, "apply-diff", "base", stdin=buf.getvalue())
        assert "graphdriver.archive.apply" in found  # the run did apply the tar
        assert sorted(found & {"graphdriver.diffs", "graphdriver.archive.exact"}) == []
        subprocess.run([*gd, "create", "--parent", "base", "c"], check=True, capture_output=True,
                       timeout=120)  # fmt: skip
        found = _imported(root, driver, "changes", "c")
        assert "graphdriver.diffs" in found  # the run did list the changes
        banned = ENGINE - {"graphdriver.diffs"} | {"graphdriver.archive.exact"}
        assert sorted(found & banned) == []
    finally:
        subprocess.run([*gd, "cleanup"], capture_output=True, timeout=120)


def test_version_opens_nothing(tmp_path: Path) -> None:
    """``--version`` loads the installed hook plugins (one may add options) and nothing else:
    no store, no database, no pathlib; a plugin that every command loads, like the containerd
    status hook, imports what it needs when it is called."""
    found = _imported(tmp_path / "root", "vfs", "--version")
    banned = ENGINE | {"graphdriver.store", "graphdriver.metadata", "sqlite3", "pathlib", "json"}
    if not _hook_plugins_called({"graphdriver_cli"}):
        banned.add("pluggy")
    assert sorted(found & banned) == []
    assert not (tmp_path / "root").exists()
    # the hook plugins were loaded (the containerd status hook, where it is installed)
    loaded = {v.partition(":")[0] for v in plugins.entry_point_names(plugins.HOOK_GROUP).values()}
    assert loaded <= found


def test_entry_points_read_without_importlib_metadata_find_the_same() -> None:
    """The cheap reader (the dist-info dirs on sys.path) sees what importlib.metadata sees."""
    plugins.forget_entry_points()
    for group in (plugins.DRIVER_GROUP, plugins.HOOK_GROUP, "graphdriver.serve",
                  "graphdriver.volume_drivers", "console_scripts"):  # fmt: skip
        expected: dict[str, str] = {}
        for ep in importlib.metadata.entry_points(group=group):
            expected.setdefault(ep.name, ep.value)
        assert plugins.entry_point_names(group) == expected, group


def test_hook_names_are_the_specs() -> None:
    from graphdriver import hookspecs

    specs = {n for n in dir(hookspecs) if n.startswith("graphdriver_")}
    assert specs == plugins.HOOK_NAMES
