"""Layers as real tools write them, through the CLI: the empty layer, padded and corrupt
compressed streams; errors in one line that name the format and the offset."""

from __future__ import annotations

import json
import subprocess

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
