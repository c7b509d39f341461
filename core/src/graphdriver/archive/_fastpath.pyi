# The C module _fastpath.c (compiled by core/hatch_build.py); the arguments are described there.
from collections.abc import Collection
from typing import Any

def write_plain_files(
    batch: list[tuple[tuple[Any, ...], int | None, int]],
    i: int,
    view: memoryview,
    pos: int,
    end: int,
    base: int,
    inline: bool,
    dirs: tuple[set[str], set[str], set[str]],
    created: set[str] | None,
    record: tuple[set[str], set[str], dict[str, bytes]] | None,
    root: bool,
    writers: int = 1,
    /,
) -> tuple[int, int, int]: ...
def replay_run(
    buf: bytes,
    pos: int,
    wbuf: memoryview,
    wpos: int,
    out_fd: int,
    dir: bytes,
    dir_fd: int,
    noted: dict[str, tuple[int, int, int]],
    large: int,
    /,
) -> tuple[int, int, int, int]: ...
def check_entries(
    buf: bytes,
    pos: int,
    present: dict[str, tuple[int, int, int]],
    gone: set[str],
    opaque: set[str],
    /,
) -> int: ...
def noted_split(present: dict[str, tuple[int, int, int]], /) -> tuple[list[str], list[str]]: ...
def first_changed(
    paths: list[str], i: int, top_fd: int, present: dict[str, tuple[int, int, int]], /
) -> int: ...
def plain_entry(
    path: str,
    arcname: str,
    wbuf: memoryview,
    wpos: int,
    skip: bytes,
    large: int,
    dir_fd: int,
    name: str,
    /,
) -> int: ...
def plain_run(
    changes: list[Any],
    i: int,
    root: str,
    where: str,
    dir_fd: int,
    wbuf: memoryview,
    wpos: int,
    skip: bytes,
    large: int,
    /,
) -> tuple[int, int, bool]: ...
def check_rows(paths: list[str], rows: dict[str, bytes], tag: bytes, /) -> bytes: ...
def compare_dir(
    new_fd: int,
    old_fds: tuple[int, ...],
    overlay: bool,
    full: bool,
    boundary: int,
    written: Collection[int] | None,
    /,
) -> tuple[list[tuple[str, int]], list[str]]: ...
def keep_heap(mmap_threshold: int, trim_threshold: int, /) -> bool: ...
def ustar_entry(block: bytes, pax: bytes | None, /) -> tuple[Any, ...] | None: ...
def next_entry(
    buf: bytes | bytearray | memoryview, pos: int, end: int, /
) -> tuple[tuple[Any, ...], int] | None: ...
