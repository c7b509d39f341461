"""The ``l/`` links: ``<home>/l/<short>`` -> ``../<id>/diff``, the short paths a classic mount's
option string and apply-diff's lower dirs go through (the layer's ``lower`` file names them,
its ``link`` file its own). A link that went missing (containers/storage #326: a copy without
symlinks, a hand) is made again where one is read, as containers/storage does at mount, not
at every open (500 layers: 5 ms each time)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from graphdriver.toolkit import is_layer_id

log = logging.getLogger("graphdriver_overlay")


def checked_lower(home: Path, layer_id: str, own: str | None = None) -> str:
    """The ``lower`` file of *layer_id* (its parents' links, nearest first, ``:`` between),
    once each link it names, and ``l/<own>`` if given (a sealed layer's), is there."""
    lower = (home / layer_id / "lower").read_text().strip()
    names = [part for part in lower.split(":") if part]
    if own is not None:
        names.append(f"l/{own}")
    if not all(os.path.lexists(f"{home}/{name}") for name in names):
        repair(home)
    return lower


def repair(home: Path) -> None:
    """Make again every layer's link that is missing, by each layer's ``link`` file (a link
    that names a layer is not proof of its own: a create cut between the two leaves one)."""
    with os.scandir(home / "l") as entries:
        links = {entry.name for entry in entries if entry.is_symlink()}
    for layer_id, short in link_files(home):
        if short not in links:
            log.warning("recreating missing link l/%s for layer %s", short, layer_id)
            with contextlib.suppress(FileExistsError):  # made meanwhile (an apply)
                (home / "l" / short).symlink_to(Path("..") / layer_id / "diff")


def link_files(home: Path) -> Iterator[tuple[str, str]]:
    """(layer id, short id) from every layer's ``link`` file, read with bare os calls (500
    layers: 3 ms; 23 through pathlib); a layer directory without one yet (a create cut short)
    is passed over."""
    with os.scandir(home) as layers:
        for entry in layers:
            if not is_layer_id(entry.name):
                continue
            try:
                fd = os.open(f"{entry.path}/link", os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                short = os.read(fd, 256).decode(errors="surrogateescape").strip()
            finally:
                os.close(fd)
            if short:
                yield entry.name, short
