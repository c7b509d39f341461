"""No signal is lost (``graphdriver.linux.signals`` and the CLI's handlers): one that comes
during a fork, to a thread other than the main one, just before a blocking read, or while a
``__del__`` runs, still interrupts the command. Each case runs in a process of its own (its
handlers and signal masks are its own), first the way Python does it alone, which loses the
signal, then the way graphdriver does."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

#: what each case starts from, whatever the runner's signals (a background job's SIGINT is
#: ignored; a runner may block some)
_FRESH = """
import signal as _signal
_signal.signal(_signal.SIGINT, _signal.default_int_handler)
_signal.pthread_sigmask(_signal.SIG_SETMASK, ())
"""


def _run(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _FRESH + textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _outcome(out: str) -> tuple[str, int]:
    """("interrupted" or what else the case printed, after how many seconds)."""
    what, seconds = out.split()
    return what, int(seconds)


_HANDLER = """
    import os, signal, sys, threading, time
    class Caught(BaseException):
        pass
    def handler(signum, frame):
        raise Caught()
    signal.signal(signal.SIGUSR1, handler)
"""


@pytest.mark.parametrize("held", [False, True])
def test_a_signal_during_a_fork_is_raised_once_the_fork_is_done(held: bool) -> None:
    # the signal comes in an at-fork hook, as it may while logging's hooks run
    proc = _run(
        _HANDLER
        + f"""
    from graphdriver.linux.signals import fork_holding_signals, release_signals
    os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGUSR1))
    try:
        if {held}:
            pid, mask = fork_holding_signals()
            if pid == 0:
                os._exit(0)
            release_signals(mask)
        else:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
        os.waitpid(pid, 0)
        print("not interrupted")
    except Caught:
        os.waitpid(pid, 0)
        print("interrupted")
    """
    )
    assert proc.returncode == 0, proc.stderr
    if held:
        assert (proc.stdout, proc.stderr) == ("interrupted\n", "")
    else:  # Python alone: the handler's exception is ignored in the hook; the fork goes on
        assert proc.stdout == "not interrupted\n"
        assert "Exception ignored" in proc.stderr


def test_threads_started_by_graphdriver_leave_handled_signals_to_the_main_thread() -> None:
    # the signals with a Python handler (SIGINT's is Python's own) are blocked in the thread;
    # the others, faults among them, are not
    proc = _run(
        _HANDLER
        + """
    signal.signal(signal.SIGTERM, handler)
    from graphdriver.linux.signals import start_thread
    def blocked():
        for line in open(f"/proc/self/task/{threading.get_native_id()}/status"):
            if line.startswith("SigBlk:"):
                print(line.split()[1])
    for start in (threading.Thread.start, start_thread):
        thread = threading.Thread(target=blocked)
        start(thread) if start is start_thread else thread.start()
        thread.join()
    """
    )
    assert proc.returncode == 0, proc.stderr
    plain, ours = (int(mask, 16) for mask in proc.stdout.split())
    assert plain == 0
    assert ours == sum(1 << (s - 1) for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM))


@pytest.mark.parametrize("reader", ["os.read", "FdReader"])
def test_a_signal_that_came_before_a_blocking_read_ends_it(reader: str) -> None:
    # the main thread has the signal blocked, so the kernel gives it to another thread while
    # the main one reads: its handler is due, but nothing wakes the main thread (the same as
    # a signal that came just before the read); a writer unblocks the read after 5 s
    proc = _run(
        _HANDLER
        + f"""
    from graphdriver.linux.signals import FdReader
    r, w = os.pipe()
    threading.Timer(5, os.write, (w, b"late")).start()
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    start = time.monotonic()
    try:
        if "{reader}" == "FdReader":
            FdReader(r).readinto(bytearray(4))
        else:
            os.read(r, 4)
        print("read", round(time.monotonic() - start), flush=True)
    except Caught:
        print("interrupted", round(time.monotonic() - start), flush=True)
    os._exit(0)
    """
    )
    assert proc.returncode == 0, proc.stderr
    what, seconds = _outcome(proc.stdout)
    if reader == "FdReader":  # within a slice
        assert what == "interrupted" and seconds < 3, proc.stdout
    else:  # the handler ran only once the data came
        assert seconds >= 4, proc.stdout


@pytest.mark.parametrize("case", ["python", "hooked", "second-signal-in-the-hook"])
def test_an_interrupt_raised_in_a_finalizer_is_sent_again(case: str) -> None:
    # Ctrl-C while a __del__ runs: Python ignores what the handler raises there
    proc = _run(
        f"""
    import os, signal, time
    from graphdriver import cli
    if "{case}" == "python":
        signal.signal(signal.SIGINT, cli._interrupt)
    else:
        cli.catch_interrupts()
    if "{case}" == "second-signal-in-the-hook":  # as `timeout` signals the command, then its group
        start_thread = cli.start_thread
        def second_then_start(thread):
            cli.start_thread = start_thread
            os.kill(os.getpid(), signal.SIGTERM)
            start_thread(thread)
        cli.start_thread = second_then_start
    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
    start = time.monotonic()
    try:
        Finalized()
        time.sleep(5)
        print("slept", round(time.monotonic() - start))
    except cli.Interrupted:
        print("interrupted", round(time.monotonic() - start))
    """
    )
    assert proc.returncode == 0, proc.stderr
    what, seconds = _outcome(proc.stdout)
    if case == "python":
        assert (what, seconds) == ("slept", 5)
        assert "Exception ignored" in proc.stderr
    else:
        assert what == "interrupted" and seconds < 3, proc.stdout
        assert proc.stderr == ""
