"""The store lock is held only for state transitions: long streams run beside other commands,
and a command that must wait says for whom, and gives up after --wait."""

from __future__ import annotations

import io
import os
import select
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from conftest import GD

from graphdriver import open_store
from graphdriver.testing.trees import random_content


def _bounded(argv: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Run *argv* in a session of its own; on timeout kill the whole session (a hung pipe)."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{shlex.join(argv)[:200]} hung for {timeout} s") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _fill(gd: GD, layer: str, files: int, size: int) -> None:
    path = Path(gd("mount", layer).out.strip())
    for i in range(files):
        (path / f"f{i:03d}").write_bytes(random_content(size, i))
    gd("umount", layer)


def test_diff_piped_into_apply_diff_on_one_root(gd: GD) -> None:
    """A 100 MB layer through `diff a | apply-diff b`, and through apply_diff(b, diff(a)) in
    one process: neither waits for the other's lock."""
    gd("create", "a")
    _fill(gd, "a", 100, 1 << 20)
    gd("create", "b")
    pipe = f"{shlex.join(gd.argv('diff', 'a'))} | {shlex.join(gd.argv('apply-diff', 'b'))}"
    res = _bounded(["bash", "-o", "pipefail", "-c", pipe], timeout=240)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().split()[0] == str(100 << 20)
    want = gd("changes", "a").out
    assert len(want.splitlines()) == 100
    assert gd("changes", "b").out == want
    gd("create", "c")
    script = (
        "import sys; from graphdriver import open_store\n"
        "with open_store(sys.argv[1], 'vfs') as s:\n"
        "    print(s.apply_diff('c', s.diff('a')))\n"
    )
    res = _bounded([sys.executable, "-c", script, str(gd.root)], timeout=240)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().strip() == str(100 << 20)
    assert gd("changes", "c").out == want


def _tar_of(files: int, size: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for i in range(files):
            info = tarfile.TarInfo(f"f{i:03d}")
            info.size = size
            tf.addfile(info, io.BytesIO(random_content(size, i)))
    return out.getvalue()


def _wait_for(pred, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_commands_run_beside_an_apply_diff_of_a_slow_stdin(gd: GD) -> None:
    """`ls`, `inspect`, `exists`, `mount` of another layer while an apply-diff reads a pipe
    that is fed slowly: each needs the lock for well under 1 s (--wait 1 would fail)."""
    gd("create", "other")
    gd("create", "--parent", "other", "other-child")
    gd("create", "slow")
    start = time.monotonic()
    gd("ls")
    baseline = time.monotonic() - start
    data = _tar_of(20, 64 << 10)
    proc = subprocess.Popen(
        gd.argv("apply-diff", "slow"), stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(data[:100_000])
        proc.stdin.flush()
        _wait_for(lambda: "apply-diff" in gd("inspect", "slow", check=False).err)
        for args in (
            ["ls"],
            ["inspect", "other"],
            ["exists", "other"],
            ["mount", "other-child"],
            ["umount", "other-child"],
        ):
            start = time.monotonic()
            res = gd("--wait", "1", *args)
            took = time.monotonic() - start
            assert res.code == 0
            assert took < baseline * 3 + 1, f"{args} took {took:.1f} s"
        assert gd("ls").out.split() == ["other", "other-child"]  # slow is not ready yet
        assert proc.poll() is None
        proc.stdin.write(data[100_000:])
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(gd("changes", "slow").out.splitlines()) == 20


def test_a_held_lock_is_named_and_wait_gives_up(gd: GD) -> None:
    gd("create", "base")
    with open_store(gd.root, "vfs") as store:
        with store.locked("an earlier holder " + "x" * 2000):  # its words are not left over
            pass
        with store.locked("a test holding the lock"):
            start = time.monotonic()
            res = gd("--wait", "1", "create", "x", check=False)
            assert time.monotonic() - start < 30
            assert res.code == 1
            lines = res.err.strip().splitlines()
            assert len(lines) == 1, res.err
            assert f"pid {os.getpid()} (a test holding the lock)" in lines[0]
            assert "xxx" not in lines[0] and "--wait" in lines[0]
            # without --wait: after 2 s one line says whom it waits for, then it goes on
            proc = subprocess.Popen(gd.argv("create", "y"), stderr=subprocess.PIPE)
            assert proc.stderr is not None
            ready, _, _ = select.select([proc.stderr], [], [], 60)
            assert ready, "no message while waiting for the lock"
            line = proc.stderr.readline().decode()
            assert "waiting for the lock" in line and f"pid {os.getpid()}" in line, line
            assert "xxx" not in line
    assert proc.wait(timeout=60) == 0
    assert gd("ls").out.split() == ["base", "y"]
