"""Forks and threads that lose no signal.

Python runs a signal's handler (one written in Python: the CLI's, a server's) in the main thread
only, between bytecodes. Three things lose it:

- ``os.fork()`` runs the at-fork hooks registered in Python (logging takes its lock before the
  fork and releases it after, in both processes). A handler that raises (the CLI's SIGINT and
  SIGTERM handlers do, as ``KeyboardInterrupt`` does) and runs inside one raises where Python
  ignores exceptions: the interrupt is gone, and logging's lock may stay taken.
  :func:`fork_holding_signals` blocks those signals in the calling thread around the fork, and
  each process lets them in again with :func:`release_signals` when it is ready for one.
  Signals without a Python handler (faults among them) are left alone, here as below.
- The kernel gives a signal sent to the process to any thread that does not block it, when
  the main thread momentarily does (glibc blocks every signal in a thread while it creates
  another). Received by another thread, it does not interrupt the main thread's blocking
  read, and Python 3.11 does not even look for it until the main thread next makes a call
  that checks: a Ctrl-C during an ``apply-diff`` that waits for its input is never seen.
  :func:`start_thread` starts a thread with those signals blocked in it, so that only the
  main thread ever receives one.
- A signal that arrives just before the main thread enters a blocking read (after Python last
  looked for one) does not interrupt it: its handler runs when the read returns, which for
  a pipe whose writer has stalled is never. :class:`FdReader` waits for input in slices.
"""

from __future__ import annotations

import io
import os
import select
import signal
import threading

#: a thread's signal mask, as it was before it blocked every signal
Held = set[int]


def fork_holding_signals() -> tuple[int, Held]:
    """``os.fork()``'s pid, and the mask to give :func:`release_signals`; the signals that
    have a Python handler are blocked in the calling thread (and so in the child) when it
    returns, in both processes."""
    held = _block_handled()
    try:
        pid = os.fork()
    except BaseException:
        release_signals(held)
        raise
    return pid, held


def release_signals(held: Held) -> None:
    """Restore the signal mask *held* that :func:`fork_holding_signals` returned: a signal
    that arrived while it was blocked is handled here (its handler may raise)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, held)


def start_thread(thread: threading.Thread) -> None:
    """Start *thread* with the signals that have a Python handler blocked in it (a thread
    inherits the mask of the one that starts it): such a signal sent to the process then goes
    to the main thread, or waits for it. A program the thread runs starts with them blocked
    too (pending, across exec): a Ctrl-C or ``timeout`` to the group does not cut it short
    (the unmount that ends a diff's stream), the command's rollback waits for it. One that
    came while this ran is handled as it returns (its handler may raise: the thread runs
    then; raised before, it did not start)."""
    held = _block_handled()
    try:
        thread.start()
    finally:
        release_signals(held)


class FdReader(io.RawIOBase):
    """A raw reader of the pipe, socket or terminal *fd* (not closed with it) that waits for
    input in slices of :data:`SLICE` seconds: a signal whose handler did not run because it
    came just before the wait is handled at the end of the slice, not when input comes."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while True:
            while not self._poll.poll(SLICE_MS):
                # pending handlers run here: a no-op whose C code runs them, whichever thread
                # the signal went to (Python 3.11 looks for one only when the main thread got it)
                signal.pthread_sigmask(signal.SIG_BLOCK, ())
            try:
                return os.readv(self._fd, [buffer])
            except BlockingIOError:  # an O_NONBLOCK fd another reader emptied meanwhile
                continue


#: how long a signal may wait for a read it came just before (seconds)
SLICE = 0.2
SLICE_MS = int(SLICE * 1000)


def _block_handled() -> Held:
    """Block, in this thread, the signals whose handler is Python code (only the main thread
    runs those; the others, and faults, stay as they are); the mask before. A handler may run
    in the call that blocks them (one whose signal came just before) and raise: the mask is
    put back first."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # changes nothing
    handled = [s for s in _CATCHABLE if callable(signal.getsignal(s))]
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    except BaseException:
        release_signals(held)
        raise
    return held


#: what a handler can be set for (SIGKILL and SIGSTOP cannot have one)
_CATCHABLE = sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
