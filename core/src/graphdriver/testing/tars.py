"""Tars as other tools write them, for the conformance cases: Python's tarfile in any order
and format, and the edges of the format that real layers reach."""

from __future__ import annotations

import io
import tarfile

from .trees import random_content


def tarfile_tar(*members: tuple[str, bytes, bytes | None], **kw: object) -> bytes:
    """A tar written by Python's tarfile: (name, type, data or link name) in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", **kw) as tf:  # type: ignore[call-overload]
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = 1_600_000_000
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            if kind in (tarfile.LNKTYPE, tarfile.SYMTYPE):
                info.linkname = (data or b"").decode()
                data = None
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def edge_tars() -> dict[str, bytes]:
    """Tars other tools write, at their edges: no directory entries, odd names, a PAX global
    header, bytes after the end, no end marker, the empty layer in two spellings."""
    tars = {
        "tarfile-odd": tarfile_tar(  # no directory entries, odd names, not sorted
            ("/etc/hostname", tarfile.REGTYPE, b"box\n"),
            ("./usr/bin/tool", tarfile.REGTYPE, random_content(70_000, 5)),
            ("usr/bin/alias", tarfile.LNKTYPE, b"usr/bin/tool"),
            ("./", tarfile.DIRTYPE, None),
            ("a/" + "long-name-" * 20, tarfile.REGTYPE, b"long"),
            ("a/sym", tarfile.SYMTYPE, b"../etc/hostname"),
            format=tarfile.GNU_FORMAT,
        ),
    }
    pax_global = tars["tarfile-pax-global"] = tarfile_tar(
        ("dir", tarfile.DIRTYPE, None),
        ("dir/f", tarfile.REGTYPE, b"x" * 513),
        ("dir/empty", tarfile.REGTYPE, b""),  # (last: a header that ends in zeros)
        format=tarfile.PAX_FORMAT,
        pax_headers={"comment": "a global header"},
    )
    tars["trailing-bytes"] = pax_global + b"\0" * 9216 + b"junk after the end"
    end = len(pax_global.rstrip(b"\0"))
    # no end-of-archive marker: Go's archive/tar (dockerd) reads it, so does apply-diff
    tars["no-end-marker"] = pax_global[: end + -end % 512]
    tars["empty"] = b"\0" * 1024
    tars["zero-bytes"] = b""
    return tars
