"""Where a diff goes: a tar writer onto an fd or a file, compressed or not, and the read end of
the pipe that ``LayerStore.diff`` hands out."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from typing import IO, Any

from .tar import TarWriter


def tar_writer(out: IO[bytes] | int, compress: str | None) -> tuple[TarWriter, Callable[[], None]]:
    """A TarWriter onto *out*, compressing if asked, and the function that finishes it."""
    if compress in (None, "none"):
        if isinstance(out, int):
            return TarWriter(fd=out), lambda: None
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):  # BytesIO and other in-memory files
            return TarWriter(write=out.write), lambda: None
        out.flush()
        return TarWriter(fd=fd), lambda: None
    write: Callable[[bytes], object]
    if isinstance(out, int):
        fd = out

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    else:
        write = out.write
    if compress == "gzip":
        import zlib

        compressor: Any = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    else:
        import zstandard

        compressor = zstandard.ZstdCompressor(level=3).compressobj()

    def finish() -> None:
        write(compressor.flush())

    return TarWriter(write=lambda d: write(compressor.compress(d))), finish


class DiffStream(io.RawIOBase):
    """The read end of a diff pipe; end of stream re-raises the writer's error, if any."""

    def __init__(self, fd: int, thread: threading.Thread, failure: list[BaseException]) -> None:
        self._fd = fd
        self._thread = thread
        self._failure = failure

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = os.readv(self._fd, [buffer])
        if n == 0:
            self._thread.join()
            if self._failure:
                raise self._failure[0]
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self._thread.join()
        super().close()
