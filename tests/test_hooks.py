"""Hook plugins (pluggy) see and shape what the store does."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import install_package

from graphdriver import Change, LayerStore, hookimpl, open_store
from graphdriver.plugins import choose_driver, hooks


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    @hookimpl
    def graphdriver_layer_created(self, store: LayerStore, layer: Any) -> None:
        self.events.append(("created", layer.id))

    @hookimpl
    def graphdriver_layer_applied(
        self, store: LayerStore, layer: Any, size: int, diff_id: str
    ) -> None:
        self.events.append(("applied", layer.id, str(size)))

    @hookimpl
    def graphdriver_layer_removed(self, store: LayerStore, layer_id: str) -> None:
        self.events.append(("removed", layer_id))

    @hookimpl(wrapper=True)
    def graphdriver_mount(
        self, store: LayerStore, layer: Any, chain: Sequence[Any]
    ) -> Generator[None, Path, Path]:
        self.events.append(("mounting", layer.id, ",".join(r.id for r in chain)))
        path = yield
        self.events.append(("mounted", layer.id))
        return path

    @hookimpl
    def graphdriver_diff_filter(self, layer_id: str, change: Change) -> bool | None:
        return False if change.path.endswith(".secret") else None

    @hookimpl
    def graphdriver_default_driver(self, root: Path, available: Sequence[str]) -> str | None:
        return "vfs" if "vfs" in available else None


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    pm = hooks().pm
    pm.register(rec, name="test-recorder")
    try:
        yield rec
    finally:
        pm.unregister(rec)


def test_lifecycle_mount_and_filter(recorder: Recorder, tmp_path: Path) -> None:
    import io
    import tarfile

    with open_store(tmp_path, "vfs") as store:
        store.create("base")
        store.create("child", "base")
        with store.mounted("child") as root:
            (root / "keep").write_text("k")
            (root / "key.secret").write_text("s")
        assert [c.path for c in store.changes("child")] == ["/keep"]
        assert store.diff_size("child") == 1
        with store.diff("child") as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            names = [m.name for m in tf]
        assert names == ["keep"]
        store.create("fresh")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo("f")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
        store.apply_diff("fresh", io.BytesIO(buf.getvalue()))
        store.cleanup()
        for layer_id in ("fresh", "child", "base"):
            store.remove(layer_id)
    ev = recorder.events
    assert ev[:3] == [("created", "base"), ("created", "child"), ("mounting", "child", "base")]
    assert ("mounted", "child") in ev
    assert ("applied", "fresh", "3") in ev
    assert ev[-3:] == [("removed", "fresh"), ("removed", "child"), ("removed", "base")]


def test_default_driver_hook(recorder: Recorder, tmp_path: Path) -> None:
    assert choose_driver(tmp_path / "fresh") == "vfs"


BROKEN_PYPROJECT = """
[project]
name = "graphdriver-broken-hooks"
version = "0.1.0"
dependencies = ["graphdriver"]

[project.entry-points."graphdriver"]
options-bug = "graphdriver_broken:Options"
created-bug = "graphdriver_broken:Created"
mount-bug = "graphdriver_broken:Mount"
typo-bug = "graphdriver_broken:Typo"

[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[tool.hatch.build.targets.wheel]
packages = ["src/graphdriver_broken"]
"""

BROKEN = '''
"""Third-party hook plugins with bugs: each hook raises (or names no hook at all)."""
from graphdriver import hookimpl


class Options:
    @hookimpl
    def graphdriver_driver_options(driver):
        raise KeyError("audit-config")


class Created:
    @hookimpl
    def graphdriver_layer_created(store, layer):
        raise RuntimeError("audit log is full")


class Mount:
    @hookimpl(wrapper=True)
    def graphdriver_mount(store, layer, chain):
        path = yield
        raise RuntimeError(f"cannot audit {path}")


class Typo:
    @hookimpl
    def graphdriver_layer_create(store, layer):
        pass
'''


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_package(
        tmp_path_factory.mktemp("broken-hooks"),
        BROKEN_PYPROJECT,
        {"graphdriver_broken/__init__.py": BROKEN},
    )


def test_a_failing_plugin_is_unregistered_with_one_warning_and_the_command_goes_on(
    broken_site: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(broken_site)}
    gd = [sys.executable, "-m", "graphdriver", "--root", str(tmp_path / "root"), "--driver", "vfs"]
    options = "options-bug failed in graphdriver_driver_options and is unregistered: KeyError"
    typo = "typo-bug (graphdriver_broken:Typo) failed to load and is ignored: unknown hook"
    expected = {
        ("create", "base"): [
            options,
            "created-bug failed in graphdriver_layer_created and is unregistered: "
            "RuntimeError: audit log is full",
        ],
        ("mount", "base"): [
            options,
            "mount-bug failed in graphdriver_mount and is unregistered: RuntimeError: cannot audit",
        ],
        ("umount", "base"): [options],
        ("ls",): [options],
    }
    for args, warnings in expected.items():
        proc = subprocess.run([*gd, *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == len(warnings) + 1, proc.stderr  # one line per failing plugin
        for want in [typo, *warnings]:
            assert sum(want in line for line in lines) == 1, (want, proc.stderr)
        if args[0] == "mount":
            assert Path(proc.stdout.strip()).is_dir()
        if args[0] == "ls":
            assert proc.stdout.split() == ["base"]
