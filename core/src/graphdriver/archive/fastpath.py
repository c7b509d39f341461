"""The archive engine's loops in C (``_fastpath.c``), where the package was built with them
(core/hatch_build.py): the apply sandbox's runs of plain files (:mod:`.extract`) and its
record's check table (:mod:`.tarsplit`), an exact diff's look at its noted paths and its runs
of raw parts and bodies (:mod:`.exact`), and a generated diff's plain files
(:mod:`.tar_writer`); and :func:`keep_heap`, glibc malloc's thresholds fixed for the archive
engine's pieces. Where it was not built, the same work is done in Python, and
:data:`ENABLED` is False (a test may set it False too: it is read at each apply and diff, by
the forked sandbox as well)."""

from __future__ import annotations

import os

__all__ = [
    "ENABLED",
    "check_rows",
    "first_changed",
    "keep_heap",
    "plain_entry",
    "replay_run",
    "write_plain_files",
]

try:
    from ._fastpath import check_rows, first_changed, plain_entry, replay_run, write_plain_files
    from ._fastpath import keep_heap as _keep_heap
except ImportError:  # no C compiler or Python headers where it was installed
    check_rows = first_changed = plain_entry = replay_run = write_plain_files = None  # type: ignore[assignment]
    _keep_heap = None  # type: ignore[assignment]

#: whether the C loops run
ENABLED = write_plain_files is not None

#: blocks below this come from malloc's heaps, not a mapping each: above a decoded piece
#: (streams.PLAIN_PIECE, 2 MiB, and a zstd block)
HEAP_MMAP_THRESHOLD = 4 << 20
#: free memory a heap keeps at its top before it gives it back to the kernel
HEAP_TRIM_THRESHOLD = 16 << 20
#: None until keep_heap ran in this process (or the one it was forked from), then its answer
_heap_kept: bool | None = None


def keep_heap() -> bool:
    """Fix glibc malloc's thresholds (:data:`HEAP_MMAP_THRESHOLD`, :data:`HEAP_TRIM_THRESHOLD`)
    for this process, once; whether they are ours.

    A compressed layer's apply decodes it in pieces of up to 2 MiB, made and freed by the
    hundred. glibc's defaults (a mapping of its own for a block of 128 KiB or more, raised
    only after such a block is freed, and a heap's free top over twice that given back) hand
    those pages back to the kernel and fault them in again: in a fresh process, which every
    CLI command and every served one is, a 200 MB zstd or gzip layer took 60,000 page faults
    and 0.25-0.5 s more than the same apply a second time in one process. The price is up to
    16 MiB of freed memory a heap may keep. A process whose environment sets malloc's
    parameters itself (``GLIBC_TUNABLES=glibc.malloc.*``, ``MALLOC_*_``) keeps them; without
    glibc or the C module nothing changes."""
    global _heap_kept
    if _heap_kept is None:
        tuned = "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            k.startswith("MALLOC_") and k.endswith("_") for k in os.environ
        )
        _heap_kept = (
            not tuned
            and _keep_heap is not None
            and _keep_heap(HEAP_MMAP_THRESHOLD, HEAP_TRIM_THRESHOLD)
        )
    return _heap_kept
