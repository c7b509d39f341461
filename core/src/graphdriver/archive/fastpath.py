"""The archive engine's loops in C (``_fastpath.c``), where the package was built with them
(core/hatch_build.py): the apply sandbox's runs of plain files (:mod:`.extract`) and its
record's check table (:mod:`.tarsplit`, which an exact diff reads back so too), an exact
diff's look at its noted paths and its runs of raw parts and bodies (:mod:`.exact`), a
generated diff's plain files (:mod:`.tar_writer`), the apply parent's plain headers
(:mod:`.tar_reader`) and a tree compare's entries of each directory (:mod:`.changes`); and
:func:`keep_heap`, glibc malloc's thresholds fixed for the archive engine's pieces in a
process of one command. Where it was not built, the same work is done in Python, and
:data:`ENABLED` is False (a test may set it False too: it is read at each apply and diff, by
the forked sandbox as well)."""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = [
    "ENABLED",
    "check_entries",
    "check_rows",
    "compare_dir",
    "first_changed",
    "keep_heap",
    "next_entry",
    "noted_split",
    "plain_entry",
    "plain_run",
    "replay_run",
    "ustar_entry",
    "write_plain_files",
]

try:
    from ._fastpath import (
        check_entries,
        check_rows,
        compare_dir,
        first_changed,
        next_entry,
        noted_split,
        plain_entry,
        plain_run,
        replay_run,
        ustar_entry,
        write_plain_files,
    )
    from ._fastpath import keep_heap as _keep_heap
except ImportError:  # no C compiler or Python headers where it was installed
    check_rows = first_changed = plain_entry = replay_run = write_plain_files = None  # type: ignore[assignment]
    check_entries = noted_split = compare_dir = plain_run = None  # type: ignore[assignment]
    ustar_entry = next_entry = None  # type: ignore[assignment]
    _keep_heap = None  # type: ignore[assignment]

#: whether the C loops run
ENABLED = write_plain_files is not None

#: blocks below this come from malloc's heaps, not a mapping each: above a decoded piece
#: (streams.PLAIN_PIECE, 2 MiB, and a zstd block)
HEAP_MMAP_THRESHOLD = 4 << 20
#: free memory a heap keeps at its top before it gives it back to the kernel
HEAP_TRIM_THRESHOLD = 16 << 20
#: malloc settings of the environment that keep_heap's would override (GLIBC_TUNABLES names,
#: and the older variables): each fixes the thresholds glibc otherwise adjusts itself
THRESHOLD_TUNABLES = ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max")
THRESHOLD_VARIABLES = tuple(f"MALLOC_{name.upper()}_".encode() for name in THRESHOLD_TUNABLES)
_TUNABLE_NAMES = tuple(f"glibc.malloc.{name}".encode() for name in THRESHOLD_TUNABLES)
#: None until keep_heap ran in this process (or the one it was forked from), then its answer
_heap_kept: bool | None = None


def keep_heap() -> bool:
    """Fix glibc malloc's thresholds (:data:`HEAP_MMAP_THRESHOLD`, :data:`HEAP_TRIM_THRESHOLD`)
    for the rest of this process, once; whether they are ours. For a process that runs one
    command and ends (the CLI's, a served command's worker: ``apply-diff`` and ``diff``
    call it); the library never does.

    A compressed layer's apply decodes it in pieces of up to 2 MiB, made and freed by the
    hundred, and a compressed diff makes a block per write. glibc's defaults (a mapping of its
    own for a block of 128 KiB or more until a larger one is freed, and a heap's free top over
    twice that given back) hand those pages back to the kernel and fault them in again: a
    fresh process applying a 200 MB zstd or gzip layer took 60,000 page faults and 0.25-0.5 s
    more than the same apply a second time in one process. The price, up to 16 MiB of freed
    memory kept per malloc arena, is why a long-running process should not: its heap is warm
    after its first apply anyway. Thresholds set in the environment are kept
    (``GLIBC_TUNABLES=glibc.malloc.trim_threshold=...`` and the like, ``MALLOC_TOP_PAD_``,
    ...): those the process started with, what glibc read (/proc/self/environ; a command
    server is started with its first client's, and a client whose differ has a server of its
    own), and those of the command's environment (a served worker, a fork of the server,
    takes its client's). Without glibc or the C module nothing changes."""
    global _heap_kept
    if _heap_kept is None:
        now = (os.fsencode(f"{k}={v}") for k, v in os.environ.items())
        _heap_kept = (
            _keep_heap is not None
            and not _thresholds_set(_starting_environment())
            and not _thresholds_set(now)
            and _keep_heap(HEAP_MMAP_THRESHOLD, HEAP_TRIM_THRESHOLD)
        )
    return _heap_kept


def _starting_environment() -> list[bytes]:
    """The entries (``NAME=value``) of the environment this process was started with
    (execve's), as glibc read it; ld.so may have cut GLIBC_TUNABLES into pieces in place, one
    entry each (``GLIBC_TUNABLES=a=1:b=2`` reads ``GLIBC_TUNABLES=a=1``, ``b=2``)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _thresholds_set(entries: Iterable[bytes]) -> bool:
    """Whether environment *entries* set one of malloc's thresholds."""
    for entry in entries:
        name, _, value = entry.partition(b"=")
        if name in THRESHOLD_VARIABLES:
            return True
        if name == b"GLIBC_TUNABLES":
            tunables = value.split(b":")
        elif name.startswith(b"glibc."):  # a piece ld.so cut off GLIBC_TUNABLES
            tunables = [entry]
        else:
            continue
        if any(t.partition(b"=")[0] in _TUNABLE_NAMES for t in tunables):
            return True
    return False
