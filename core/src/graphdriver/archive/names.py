"""Where a tar entry goes in the layer: its name cleaned as Docker and containerd clean it, and
where its data is written. The parent (:mod:`.apply`, :mod:`.feed`) and the sandbox
(:mod:`.extract`) decide with the same functions."""

from __future__ import annotations

from ..errors import UnsafeArchive
from . import whiteout
from .tar import TarEntry


def clean_name(raw: str) -> str:
    """The entry name as a path relative to the layer's root ("" for the root itself).

    Cleaned as Docker and containerd do: ``.`` parts and empty parts go, a leading ``/`` is
    the layer's root (``/``, ``./`` and ``.`` name the root, ``/etc/x`` is ``etc/x``), and
    ``..`` is resolved lexically; a ``..`` that climbs above the root is refused.
    """
    name = raw[2:] if raw.startswith("./") else raw
    name = name.rstrip("/")
    if name and name[0] not in "./" and "/." not in name and "//" not in name:
        return name  # the common case: nothing to clean, nothing that can climb
    absolute = raw.startswith("/")
    parts: list[str] = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        elif not absolute:  # "/.." is "/" (as in a path), "../x" leaves the layer
            raise UnsafeArchive(f"tar entry {raw!r} points outside the layer ('..')")
    return "/".join(parts)


def body_path(e: TarEntry) -> str | None:
    """Where the extractor writes the data of the entry *e*: a regular file's path in the
    layer, or None (not a regular file, a whiteout, the root, or a name it refuses). The
    parent decides with it which data to send (:mod:`.feed`); :meth:`.Extractor.entry` sorts
    entries the same way."""
    if not e.is_file:
        return None
    try:
        name = clean_name(e.name)
    except UnsafeArchive:
        return None  # the sandbox refuses it and says why
    if not name or name.rpartition("/")[2].startswith(whiteout.PREFIX):
        return None
    return name
