"""``fastpath.keep_heap``: an apply or a compressed diff fixes glibc malloc's thresholds, so that
the 1-2 MiB pieces a compressed layer is decoded in stay in the process's heap instead of being
mapped, faulted in and given back one by one (60,000 page faults on a 200 MB layer in a fresh
process: every CLI command); a process whose environment sets malloc's parameters keeps them.
Each case runs in a fresh interpreter: the thresholds are the process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_fastpath import _needs_the_c_loops

#: a fresh interpreter: a tiny gzip layer applied (or a gzip diff written), then whether a
#: block of 3 MiB (under HEAP_MMAP_THRESHOLD, over glibc's default and over anything freed
#: before it) got a mapping of its own, as glibc's mallinfo2 counts them
PROBE = r"""
import ctypes, gzip, io, sys, tarfile
from graphdriver.archive import apply_layer, fastpath
from graphdriver.archive.streams import tar_writer

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w") as tf:
    info = tarfile.TarInfo("f")
    info.size = 5
    tf.addfile(info, io.BytesIO(b"hello"))
if sys.argv[2] == "apply":
    apply_layer(__import__("pathlib").Path(sys.argv[1]), io.BytesIO(gzip.compress(raw.getvalue())))
else:
    writer, finish = tar_writer(io.BytesIO(), "gzip")
    finish()
before = libc.mallinfo2().hblks
block = bytearray(3 << 20)
print(libc.mallinfo2().hblks - before, fastpath.keep_heap())
"""


def _probe(tmp_path: Path, how: str, env: dict[str, str]) -> str:
    target = tmp_path / "layer"
    target.mkdir(exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(target), how],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "GLIBC_TUNABLES" and not (k.startswith("MALLOC_") and k.endswith("_"))
    }
    return {**env, **extra}


@pytest.mark.parametrize("how", ["apply", "gzip diff"])
def test_an_apply_or_a_compressed_diff_keeps_the_heap(tmp_path: Path, how: str) -> None:
    _needs_the_c_loops()
    assert _probe(tmp_path, how.split()[0], _env()) == "0 True"


@pytest.mark.parametrize(
    "setting",
    [{"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, {"MALLOC_TOP_PAD_": "131072"}],
    ids=["GLIBC_TUNABLES", "MALLOC_"],
)
def test_malloc_settings_of_the_environment_are_kept(
    tmp_path: Path, setting: dict[str, str]
) -> None:
    """glibc's own behaviour stays: the 3 MiB block is mapped, as without graphdriver."""
    _needs_the_c_loops()
    assert _probe(tmp_path, "apply", _env(**setting)) == "1 False"
