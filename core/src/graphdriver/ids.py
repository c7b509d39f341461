"""Names the store accepts (layer ids, container and volume names), and its private folders."""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from .errors import InvalidLayerId

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


def validate_id(layer_id: str, what: str = "layer id") -> str:
    """Return *layer_id* if it is ``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}``, else InvalidLayerId."""
    if not isinstance(layer_id, str) or not _ID.match(layer_id):
        shown = repr(layer_id) if len(str(layer_id)) <= 40 else repr(str(layer_id)[:40]) + "..."
        raise InvalidLayerId(
            f"invalid {what} {shown}: use 1-128 characters of A-Z a-z 0-9 _ . -, "
            f"starting with a letter or digit"
        )
    return layer_id


def container_path(path: str) -> str:
    """*path* as a clean absolute path inside a container; ValueError says what is wrong."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{path!r} has a '..' component")
    if not parts:
        raise ValueError("a volume cannot be mounted at '/'")
    return "/" + "/".join(parts)


def private_dir(path: Path) -> None:
    """Make *path* (mode 0700), or take group and other access away from an existing one: a
    layer may hold a hostile tar's device nodes and setuid files (CVE-2021-41091)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if not st.st_mode & 0o077:
        return
    if st.st_mode & stat.S_ISVTX:  # /tmp and the like: shared by others, never ours to close
        log.warning("%s is a shared directory; give the store a directory of its own", path)
        return
    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
