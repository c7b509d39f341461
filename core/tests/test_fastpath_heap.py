"""``fastpath.keep_heap``: the CLI's ``apply-diff`` and ``diff`` (a process of one command, its
own or a served command's worker) fix glibc malloc's thresholds, so that the 1-2 MiB pieces a
compressed layer is decoded in stay in the process's heap instead of being mapped, faulted in
and given back one by one (60,000 page faults on a 200 MB layer in a fresh process); threshold
settings the process was started with are kept, and the library leaves malloc alone. Each case
runs in a fresh interpreter: the thresholds are the process's."""

from __future__ import annotations

import ctypes
import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_fastpath import _needs_the_c_loops

from graphdriver.testing import host_lacks

#: a fresh interpreter runs argv[1:] as CLI commands, arguments `|`-separated (or, for
#: "library", applies the tar through the library), then says whether a 3 MiB block (under
#: HEAP_MMAP_THRESHOLD, over glibc's default) got a mapping of its own, and whether 12 MiB of
#: 1 MiB blocks freed at the top of the heap (under HEAP_TRIM_THRESHOLD) stayed in it, as
#: glibc's mallinfo2 counts them
PROBE = r"""
import ctypes, os, sys
from graphdriver.archive import fastpath

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
os.environ.pop("GLIBC_TUNABLES", None)  # as a served worker's client environment may
if sys.argv[1] == "library":
    from graphdriver import open_store
    store = open_store(sys.argv[2], "vfs")
    store.create("lib", None)
    with open(sys.argv[3], "rb") as f:
        store.apply("lib", f)
else:
    from graphdriver.cli import main
    for command in sys.argv[1:]:
        sys.argv = ["graphdriver", *command.split("|")]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
before = libc.mallinfo2().hblks
block = bytearray(3 << 20)
mapped = libc.mallinfo2().hblks - before
del block
blocks = [bytearray(1 << 20) for _ in range(12)]
del blocks
kept = libc.mallinfo2().keepcost >= 8 << 20
print(mapped, kept, fastpath.keep_heap() if sys.argv[1] != "library" else fastpath._heap_kept)
"""


def _needs_mallinfo2() -> None:
    _needs_the_c_loops()
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        host_lacks("no glibc 2.33 or later (mallinfo2): the probe cannot see malloc")


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("f")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


def _probe(args: list[str], prelude: str = "", **env: str) -> str:
    clean = {
        k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")
    }
    out = subprocess.run(
        [sys.executable, "-c", prelude + PROBE, *args],
        env={**clean, "GRAPHDRIVER_SOCKET": "", **env},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[-1]


def _cli(tmp_path: Path, *commands: str) -> list[str]:
    root = f"--driver|vfs|--root|{tmp_path / 'store'}"
    return [f"{root}|{command}" for command in commands]


@pytest.mark.parametrize("how", ["apply-diff", "diff"])
def test_apply_diff_and_diff_keep_the_heap(tmp_path: Path, layer: Path, how: str) -> None:
    _needs_mallinfo2()
    commands = ["create|l"]
    if how == "apply-diff":
        commands.append(f"apply-diff|l|{layer}")
    else:
        commands.append(f"diff|l|--compress|gzip|-o|{tmp_path / 'out.tar.gz'}")
    assert _probe(_cli(tmp_path, *commands)) == "0 True True"


def test_the_library_leaves_malloc_alone(tmp_path: Path, layer: Path) -> None:
    """A long-running process (the Docker plugin, a containerd proxy) would keep up to
    16 MiB per malloc arena for good; its heap is warm after its first apply anyway."""
    _needs_mallinfo2()
    store = tmp_path / "store"
    assert _probe(["library", str(store), str(layer)]) == "1 False None"


@pytest.mark.parametrize(
    "setting",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7:glibc.malloc.mmap_threshold=131072"},
        {"MALLOC_TOP_PAD_": "131072"},
    ],
    ids=["trim_threshold", "mmap_threshold", "MALLOC_TOP_PAD_"],
)
def test_thresholds_the_process_started_with_are_kept(
    tmp_path: Path, layer: Path, setting: dict[str, str]
) -> None:
    """glibc's own behaviour stays, as without graphdriver, even where the command's
    os.environ no longer says so (the probe drops GLIBC_TUNABLES before it runs them)."""
    _needs_mallinfo2()
    args = _cli(tmp_path, "create|l", f"apply-diff|l|{layer}")
    assert _probe(args, **setting) == "1 False False"


def test_thresholds_of_the_commands_environment_are_kept(tmp_path: Path, layer: Path) -> None:
    """A served command's worker is a fork of its server: its os.environ, its client's, may
    set thresholds the server did not start with; glibc's own then stay."""
    _needs_mallinfo2()
    args = _cli(tmp_path, "create|l", f"apply-diff|l|{layer}")
    prelude = "import os; os.environ['MALLOC_TRIM_THRESHOLD_'] = '131072'\n"
    assert _probe(args, prelude) == "1 False False"


def test_other_malloc_settings_do_not_stop_it(tmp_path: Path, layer: Path) -> None:
    _needs_mallinfo2()
    args = _cli(tmp_path, "create|l", f"apply-diff|l|{layer}")
    tunables = {
        "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7",
        "MALLOC_ARENA_MAX": "4",
        "NOTE": "not glibc.malloc.trim_threshold=1",
    }
    assert _probe(args, **tunables) == "0 True True"
