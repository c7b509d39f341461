"""The apply sandbox's child process: forked by :func:`.apply.apply_layer`, it drops every fd
it was not given, chroots into the layer, runs the :class:`.extract.Extractor` on the entries
the parent parsed and sends (:mod:`.feed`), and reports the outcome on a pipe.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from dataclasses import dataclass

from ..errors import ArchiveError, UnsafeArchive, shortened
from ..linux.fds import keep_only_fds
from ..linux.libc import LIBC
from ..linux.signals import Held, release_signals
from . import tarsplit
from .copy_up import LowerDirs
from .extract import Extractor
from .feed import FedReader, StreamCut
from .tar_reader import write_all

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Sandbox:
    """What the extraction child is asked to do besides reading the tar."""

    whiteouts: str
    lower_fds: list[int]
    record: bool
    #: threads that write a run of plain files at once (:func:`.feed.writers`, read by the
    #: parent: the chrooted child sees no /proc or cgroup files)
    writers: int = 1


def run_child(  # pragma: no cover
    target: str,
    frames_fd: int,
    data_fd: int | None,
    res_fd: int,
    sandbox: Sandbox,
    held: Held,
) -> None:
    """The forked child (the handled signals blocked until SIGINT's default is back, then
    *held* is its mask): chroot into *target*, extract the entries read from *frames_fd* (a
    :class:`.feed.Feeder`'s frames) with their data from *data_fd* (the tar file) or inline,
    report one JSON line (and the record's check table) on *res_fd*, and exit."""
    code = 0
    report: dict[str, object]
    blob = b""
    reader: FedReader | None = None
    try:
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        keep_only_fds(0, 1, 2, frames_fd, res_fd, *sandbox.lower_fds, data_fd)
        release_signals(held)
        os.chroot(target)
        os.chdir("/")
        os.umask(0)
        lowers = LowerDirs(sandbox.lower_fds) if sandbox.lower_fds else None
        reader = FedReader(frames_fd, data_fd, sandbox.writers)
        recorder = tarsplit.PathRecorder() if sandbox.record else None
        size = Extractor(reader, sandbox.whiteouts, lowers, recorder).run()
        report = {"size": size}
        if recorder is not None:
            if reader.unwritten is not None:
                recorder.fail(f"the data of {reader.unwritten!r} was not written")
            blob = recorder.finish(lambda p: os.lstat(p or "/")) or b""
            report.update(no_record=recorder.failed)
    except UnsafeArchive as exc:
        report, code = {"error": str(exc), "unsafe": True}, 1
    except ArchiveError as exc:  # "cut": a consequence of the parent's error, which it reports
        cut = isinstance(exc, StreamCut) or (reader is not None and reader.ended)
        report, code = {"error": str(exc), "errno": exc.errno, "cut": cut}, 1
    except OSError as exc:
        what = f"cannot unpack the layer: {exc.strerror}"
        if exc.filename:
            what += f" ({shortened(str(exc.filename))})"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what += ": the filesystem or the layer's size limit is full"
        report, code = {"error": what, "errno": exc.errno}, 1
    except BaseException as exc:
        report, code = {"error": f"cannot unpack the layer: {exc!r}"}, 2
    try:
        write_all(res_fd, json.dumps(report).encode() + b"\n" + blob)
    finally:
        os._exit(code)
