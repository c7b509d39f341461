"""TarWriter.copy_from on real files: the bytes asked for, or as many as the file still has
(a file that shrank while it was archived), through the buffer and through sendfile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from graphdriver.archive.tar import CHUNK
from graphdriver.archive.tar_writer import KERNEL_COPY, TarWriter


@pytest.mark.parametrize("size", [1, 5000, KERNEL_COPY + 3, CHUNK + 7], ids=str)
@pytest.mark.parametrize("shrank", [False, True], ids=["whole", "shrank"])
@pytest.mark.parametrize("to_fd", [True, False], ids=["fd", "callable"])
def test_copy_from_gives_the_bytes_the_file_has(
    tmp_path: Path, size: int, shrank: bool, to_fd: bool
) -> None:
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data[: size // 2] if shrank else data)
    out = tmp_path / "out"
    got: list[bytes] = []
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    src_fd = os.open(src, os.O_RDONLY)
    try:
        writer = TarWriter(fd=fd) if to_fd else TarWriter(write=got.append)
        writer.write_raw(b"head" * 1000)  # the buffer is not empty when a body starts
        copied = writer.copy_from(src_fd, 0, size)
        writer.flush()
    finally:
        os.close(src_fd)
        os.close(fd)
    expected = data[: size // 2] if shrank else data
    assert copied == len(expected)
    written = out.read_bytes() if to_fd else b"".join(got)
    assert written == b"head" * 1000 + expected
