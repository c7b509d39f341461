"""`graphdriver serve containerd` where it is hard: held mounts after a reboot, commits that
fail or are cut short, requests that race a commit, concurrency while the store is busy, and
odd addresses. (From a review of the proxy: each test reproduced a bug before its fix.)"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from ctd_proxy import Proxy, code, running

from graphdriver.testing import Backing

pytestmark = pytest.mark.privileged


def _fails(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def _details(err: BaseException) -> str:
    return str(err.details())  # type: ignore[attr-defined]


def _row(proxy: Proxy, key: str) -> tuple[str, str, int] | None:
    """(layer, state, held) of *key* in the proxy's catalogue, read as an operator would."""
    db = proxy.root / "containerd" / proxy.driver / "snapshots.db"
    with sqlite3.connect(db, timeout=30) as conn:
        row = conn.execute(
            "SELECT layer, state, held FROM snapshots WHERE key=?", (key,)
        ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]), int(row[2]))


def _umount(target: Path | str) -> None:
    subprocess.run(["umount", str(target)], check=True)


def _deep_chain(proxy: Proxy, depth: int = 70) -> str:
    """Committed snapshots c0..c{depth-1} (c0 holds /lowest); returns the top one's key."""
    parent = ""
    for i in range(depth):
        [m] = proxy.prepare(f"t{i}", parent)
        if i == 0:
            Path(m.source, "lowest").write_text("1")  # type: ignore[attr-defined]
        proxy.commit(f"c{i}", f"t{i}")
        parent = f"c{i}"
    return parent


# ---------------------------------------------------------------------------- held mounts


def test_held_mount_is_back_after_a_reboot(overlay: Proxy) -> None:
    """A held mount (overlay past one page; every devmapper snapshot) is the source of the bind
    containerd gets. A reboot (or `graphdriver cleanup`) unmounts it and the store's recovery
    zeroes its count, but the catalogue still says held and hands containerd a bind of an empty
    directory: the container starts on an empty rootfs."""
    top = _deep_chain(overlay)
    [m] = overlay.prepare("top", top)
    assert m.type == "bind"  # type: ignore[attr-defined]
    held = Path(m.source)  # type: ignore[attr-defined]
    assert (held / "lowest").read_text() == "1"
    overlay.stop()
    _umount(held)  # what a reboot does to every mount
    overlay.start()
    [again] = overlay.mounts("top")
    assert os.path.ismount(again.source), (  # type: ignore[attr-defined]
        f"Mounts('top') binds {again.source}, which is no longer mounted"  # type: ignore[attr-defined]
    )
    assert (Path(again.source) / "lowest").read_text() == "1"  # type: ignore[attr-defined]
    overlay.remove("top")


def test_a_failed_commit_keeps_the_active_snapshots_mount(xfs: Backing) -> None:
    """Commit releases the held mount before LayerStore.commit; when the store refuses (the
    layer is mounted by someone else too), the snapshot stays active with its mount."""
    root = xfs.root / "failed-commit"
    root.mkdir()
    with running(root / "store", "overlay", xfs.options) as proxy:
        top = _deep_chain(proxy)
        [m] = proxy.prepare("top", top)
        held = Path(m.source)  # type: ignore[attr-defined]
        row = _row(proxy, "top")
        assert row is not None
        subprocess.run(proxy.command("mount", row[0]), check=True, capture_output=True)
        err = _fails(proxy.commit, "done", "top")
        assert code(err) == grpc.StatusCode.FAILED_PRECONDITION, _details(err)
        assert "mounted" in _details(err)
        assert proxy.stat("top").kind == 2  # rolled back to active
        assert proxy.list() == sorted([*(f"c{i}" for i in range(70)), "top"])
        [again] = proxy.mounts("top")
        assert again.source == str(held)  # type: ignore[attr-defined]
        assert os.path.ismount(held), "the failed Commit unmounted the active snapshot"
        subprocess.run(proxy.command("umount", row[0]), check=True, capture_output=True)
        assert os.path.ismount(held), "the proxy's own reference was lost"
        proxy.commit("done", "top")  # and once the other user let go, it commits
        assert not os.path.ismount(held)


# ---------------------------------------------------------------------------- recovery


def test_restart_converges_when_a_recorded_commit_cannot_finish(vfs: Proxy) -> None:
    """A commit killed after it was recorded is finished at the next start with no way out: if
    it fails (here the layer is still mounted by someone else), recover() raises and the proxy
    never starts again, while a failing commit at run time is rolled back."""
    vfs.prepare("a")
    layer = _row(vfs, "a")
    assert layer is not None
    subprocess.run(vfs.command("mount", layer[0]), check=True, capture_output=True)
    vfs.stop()
    vfs.start(env={"GRAPHDRIVER_FAULT": "containerd.commit.recorded=kill"})
    assert code(_fails(vfs.commit, "c", "a")) == grpc.StatusCode.UNAVAILABLE
    assert vfs.wait_dead() == -signal.SIGKILL
    try:
        vfs.start()
    except AssertionError as exc:
        pytest.fail(f"the proxy no longer starts: {str(exc)[-400:]}")
    assert vfs.list() in (["a"], ["c"])  # rolled back or finished, either converges


# ---------------------------------------------------------------------------- races


class _StoreLock:
    """Hold the store's flock from outside, as a long `graphdriver diff` would: the proxy's
    store thread then waits, and what the worker threads did before it stays visible."""

    def __init__(self, proxy: Proxy) -> None:
        import fcntl

        self.fd = os.open(proxy.root / proxy.driver / "lock", os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _wait_for_state(proxy: Proxy, key: str, state: str) -> None:
    deadline = time.monotonic() + 30
    while (row := _row(proxy, key)) is None or row[1] != state:
        assert time.monotonic() < deadline, f"{key!r} never became {state}: {row}"
        time.sleep(0.05)


def _in_thread(fn: object, *args: object) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_the_key_being_committed_stays_taken_until_the_commit_is_done(vfs: Proxy) -> None:
    """Commit renames the row before the store work; the active key must stay taken meanwhile
    (containerd's own commit is one transaction), or a failed commit could not give it back."""
    vfs.prepare("a")
    lock = _StoreLock(vfs)
    try:
        committing, commit_errors = _in_thread(vfs.commit, "c", "a")
        _wait_for_state(vfs, "c", "committing")
        assert code(_fails(vfs.prepare, "a")) == grpc.StatusCode.ALREADY_EXISTS
        assert code(_fails(vfs.commit, "a", "c")) == grpc.StatusCode.ALREADY_EXISTS
    finally:
        lock.release()
    committing.join()
    assert not commit_errors, commit_errors
    assert vfs.list() == ["c"] and _row(vfs, "c") is not None
    assert _row(vfs, "c")[1] == "ready"  # type: ignore[index]


def test_requests_are_answered_while_the_store_is_busy(vfs: Proxy) -> None:
    """A Prepare waiting for the store (a long vfs copy, or another command holding the
    store's lock) holds up neither Stat, List, Update nor Mounts. (Usage takes the store's
    lock for a moment too, so it waits here; its walk runs on its own thread.)"""
    vfs.prepare("other")
    lock = _StoreLock(vfs)
    try:
        preparing, errors = _in_thread(vfs.prepare, "slow")
        _wait_for_state(vfs, "slow", "preparing")
        assert vfs.stat("other").kind == 2
        assert vfs.list() == ["other"]
        assert vfs.mounts("other")
        assert preparing.is_alive(), "the Prepare did not wait for the store's lock"
    finally:
        lock.release()
    preparing.join()
    assert not errors, errors
    assert vfs.list() == ["other", "slow"]


def test_snapshot_caught_mid_commit_gets_clear_messages(vfs: Proxy) -> None:
    """While a commit waits for the store, the new name is visible as committed; Remove and
    Prepare on it answer with garbled messages ("is being committing"; "not a committed
    snapshot (it is committed)")."""
    vfs.prepare("a")
    lock = _StoreLock(vfs)
    try:
        committing, _errors = _in_thread(vfs.commit, "c", "a")
        _wait_for_state(vfs, "c", "committing")
        removing = _details(_fails(vfs.remove, "c"))
        child = _details(_fails(vfs.prepare, "child", "c"))
    finally:
        lock.release()
    committing.join()
    assert removing == "snapshot 'c' is still being committed; try again", removing
    assert child == "parent 'c' is still being committed; try again", child


# ---------------------------------------------------------------------------- the process


def test_a_socket_path_too_long_for_unix_sockets_is_one_clear_line(tmp_path: Path) -> None:
    """sun_path holds 107 bytes; grpc raises RuntimeError from add_insecure_port (it never
    returns 0 as cli.py expects), so the user gets a C-core log line and 'internal error:
    RuntimeError(...)'."""
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    proxy = Proxy(tmp_path / "store", "vfs", deep / "gd.sock")
    done = subprocess.run(
        proxy.command("serve", "containerd", "--address", str(proxy.address)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphdriver: error: socket path "), lines
    assert "at most 107" in lines[0]
