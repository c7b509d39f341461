"""Hook plugins (pluggy) see and shape what the store does."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

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
