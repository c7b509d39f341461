"""The archive engine's loops in C (``_fastpath.c``), where the package was built with them
(core/hatch_build.py): the apply sandbox's runs of plain files (:mod:`.extract`) and its
record's check table (:mod:`.tarsplit`), an exact diff's look at its noted paths and its runs
of raw parts and bodies (:mod:`.exact`), and a generated diff's plain files
(:mod:`.tar_writer`). Where it was not built, the same work is done in Python, and
:data:`ENABLED` is False (a test may set it False too: it is read at each apply and diff, by
the forked sandbox as well)."""

from __future__ import annotations

__all__ = [
    "ENABLED",
    "check_rows",
    "first_changed",
    "plain_entry",
    "replay_run",
    "write_plain_files",
]

try:
    from ._fastpath import check_rows, first_changed, plain_entry, replay_run, write_plain_files
except ImportError:  # no C compiler or Python headers where it was installed
    check_rows = first_changed = plain_entry = replay_run = write_plain_files = None  # type: ignore[assignment]

#: whether the C loops run
ENABLED = write_plain_files is not None
