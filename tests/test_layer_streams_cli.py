"""Layers as real tools write them, through the CLI: the empty layer, padded and corrupt
compressed streams; errors in one line that name the format and the offset."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import GD
from test_bad_input import one_line_error

from graphdriver.testing.cases_bad_input import bad_layers


def _gzip(data: bytes) -> bytes:
    return subprocess.run(["gzip", "-n", "-c"], input=data, capture_output=True, check=True).stdout


def test_empty_layer_and_padded_gzip_apply(gd: GD) -> None:
    gd("create", "unchanged")
    empty = gd("diff", "unchanged").raw
    assert empty == b"\0" * 1024
    gd("create", "copy")
    gd("apply-diff", "copy", input=_gzip(empty) + b"\0" * 1024)
    meta = json.loads(gd("inspect", "copy").out)
    assert meta["unpacked_size"] == 0


def test_corrupt_and_trailing_garbage_in_one_line(gd: GD) -> None:
    gd("create", "x")
    err = one_line_error(gd("apply-diff", "x", input=b"\x1f\x8b" + b"\x99" * 2000, check=False))
    assert "corrupt gzip stream at byte" in err and "empty" not in err
    layer = _gzip(b"\0" * 1024)
    err = one_line_error(gd("apply-diff", "x", input=layer + b"junk", check=False))
    assert f"trailing data at byte {len(layer)}" in err
    meta = json.loads(gd("inspect", "x").out)
    assert meta["diff_id"] is None


@pytest.mark.parametrize(
    "case", ["sparse-past-end", "sparse-many-tib", "zstd-absurd-skippable-frame"]
)
def test_bad_sparse_file_and_skippable_frame_in_one_line(gd: GD, case: str) -> None:
    data, says = bad_layers()[case]
    gd("create", "x")
    assert says in one_line_error(gd("apply-diff", "x", input=data, check=False))
    assert gd("changes", "x").out == ""


def _bomb(kind: str, size: int, name: str = "zeros") -> bytes:
    """A layer of one file of *size* zero bytes, compressed: a few hundred KiB of gzip or a few
    KiB of zstd that decode to *size* bytes."""
    import zlib

    import zstandard

    header = tarfile.TarInfo(name)
    header.size = size
    zeros = b"\0" * (1 << 20)
    if kind == "gzip":
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        parts = [packer.compress(header.tobuf())]
        parts += [packer.compress(zeros) for _ in range(size // len(zeros))]
        return b"".join([*parts, packer.compress(b"\0" * 1024), packer.flush()])
    packer = zstandard.ZstdCompressor(level=19).compressobj()
    parts = [packer.compress(header.tobuf())]
    parts += [packer.compress(zeros) for _ in range(size // len(zeros))]
    return b"".join([*parts, packer.compress(b"\0" * 1024), packer.flush()])


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_compression_bomb_is_decoded_in_bounded_memory(gd: GD, tmp_path: Path, kind: str) -> None:
    """What a small stream decodes to is handed on in bounded pieces: apply-diff's peak memory
    stays far below the size of the layer, whatever the ratio (a zstd block of one repeated
    byte is 4 bytes for 128 KiB)."""
    size = 256 << 20
    layer = tmp_path / "bomb"
    layer.write_bytes(_bomb(kind, size))
    assert layer.stat().st_size < 512 << 10  # the decoder takes it in one read
    gd("create", "x")
    # the peak RSS of a process carries its parent's at the exec (the kernel keeps the old
    # mm's high-water mark): the CLI is run from a small Python, not from this large one
    with layer.open("rb") as stdin:
        peak = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, *gd.argv("apply-diff", "x")],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert peak.returncode == 0, peak.stderr
    assert int(peak.stdout) < 128 << 10, f"peak RSS {int(peak.stdout) >> 10} MiB"
    meta = json.loads(gd("inspect", "x").out)
    assert meta["unpacked_size"] == size
    # refused at its first entry: the decoding thread, waiting for room, is stopped
    gd("create", "y")
    bad = gd("apply-diff", "y", input=_bomb(kind, size, "../zeros"), check=False)
    assert "../zeros" in one_line_error(bad)
    assert gd("changes", "y").out == ""


#: runs argv[1:] and prints its peak RSS in KiB, exiting as it did
_PEAK_RSS = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""
