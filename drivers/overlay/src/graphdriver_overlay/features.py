"""What this kernel's overlayfs and the filesystem under the home can do, found by real
mounts once (per boot and filesystem for the probe, per kernel for the features), and mount(2)
with an option string of paths relative to a folder."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from graphdriver import DriverUnavailable
from graphdriver.toolkit import (
    fork_holding_signals,
    fsmount,
    mount,
    nearest_existing,
    release_signals,
    unmount,
    unmount_all_under,
)

log = logging.getLogger(__name__)


def in_user_namespace() -> bool:
    try:
        mapping = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return mapping[:3] != ["0", "0", "4294967295"]


def mount_from(cwd: Path, data: str, target: Path) -> None:
    """mount(2) an overlay whose option string uses paths relative to *cwd*.

    A forked child changes directory and mounts, so this process's cwd never moves and no
    path needs escaping (commas and colons in absolute paths would break the option string).
    """
    pid, held = fork_holding_signals()  # signals held: none is lost in an at-fork hook
    if pid == 0:  # pragma: no cover - the child only mounts (signals held: it ends by itself)
        code = 0
        try:
            os.chdir(cwd)
            mount("overlay", target, "overlay", 0, data)
        except OSError as exc:
            code = exc.errno or 1
        finally:
            os._exit(code)
    try:
        release_signals(held)  # an interrupt meanwhile raises here, once the mount is made or not
    finally:
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise OSError(code, os.strerror(code), str(target))


def cached_features(home: Path) -> tuple[bool, list[tuple[str, str | None]]]:
    """:func:`features`, probed once per kernel and kept in ``<home>/features.json``."""
    cache = home / "features.json"
    kernel = os.uname().release
    with contextlib.suppress(OSError, ValueError, KeyError):
        known = json.loads(cache.read_text())
        if known["kernel"] == kernel and known.get("probe") == PROBE:
            return bool(known["new_api"]), [(k, v) for k, v in known["fixed"]]
    new_api, fixed = features(home)
    with contextlib.suppress(OSError):  # a cache: without it the next open probes again
        cache.write_text(
            json.dumps({"kernel": kernel, "probe": PROBE, "new_api": new_api, "fixed": fixed})
        )
    return new_api, fixed


#: what :func:`features` asks, by version: a cache of an older probe is probed again
PROBE = 2
#: options passed where the kernel takes them: redirect_dir and metacopy off keep the upper
#: dir a complete record of the layer; uuid=null (Linux 6.6+, whose default uuid=auto writes
#: ``trusted.overlay.uuid`` on a new upper dir's root at its first mount, changing its ctime
#: and so losing the layer's exact diff) keeps the upper dir as the layer left it
FIXED = (("redirect_dir", "off"), ("metacopy", "off"), ("uuid", "null"))


#: the option string of a scratch overlay, relative to its folder
SCRATCH = "lowerdir=lower1:lower2,upperdir=upper,workdir=work,index=off"


@contextlib.contextmanager
def scratch_overlay(where: Path, prefix: str) -> Iterator[Path]:
    """A folder under *where* with two lower dirs, an upper, a work and a ``merged`` dir for a
    test mount; whatever was mounted in it is unmounted and the folder removed at the end.
    (shutil and tempfile are imported here: a probe runs once per kernel, not per command.)"""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    try:
        for sub in ("lower1", "lower2", "upper", "work", "merged"):
            (tmp / sub).mkdir()
        yield tmp
    finally:
        unmount_all_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def features(home: Path) -> tuple[bool, list[tuple[str, str | None]]]:
    """What this kernel's overlayfs takes, found by real mounts (fsconfig alone is no test: a
    kernel whose overlay predates the new mount API accepts any key there, then fails).

    Returns whether ``lowerdir+`` works through the new mount API (Linux 6.8+), and which of
    :data:`FIXED` to pass: redirect_dir and metacopy off keep the upper dir a complete record
    of the layer (a renamed directory is copied up, not redirected), so the native diff is
    always right; uuid=null leaves the upper dir's root as it was. Kernels that do not know
    an option do not have the feature.
    """
    with scratch_overlay(home, ".overlay-features-") as tmp:
        try:
            fsmount(
                "overlay",
                tmp / "merged",
                [
                    ("lowerdir+", str(tmp / "lower1")),
                    ("lowerdir+", str(tmp / "lower2")),
                    ("upperdir", str(tmp / "upper")),
                    ("workdir", str(tmp / "work")),
                    ("index", "off"),
                ],
            )
            unmount(tmp / "merged")
            new_api = True
        except OSError:
            new_api = False
        fixed: list[tuple[str, str | None]] = []
        for key, value in FIXED:
            try:
                mount_from(tmp, f"{SCRATCH},{key}={value}", tmp / "merged")
                unmount(tmp / "merged")
                fixed.append((key, value))
            except OSError:
                continue
        return new_api, fixed


def probe_once(home: Path, probe: Callable[[], None], checks: Callable[[], None]) -> None:
    """The full *probe* (it mounts a test overlay, and an overlay's unmount syncs its upper
    filesystem: 30-150 ms with dirty data) once per boot, kernel and filesystem, whose stamp
    ``<home>/probed`` keeps; else the cheap *checks*.

    After a reboot on a disk with no room for the test mount's directories (the probe's other
    checks write nothing where the home has entries), the test mount of an earlier boot of
    the same kernel on the same filesystem holds, until there is room: otherwise even ``ls``
    failed there. Only a full disk's errors count (ENOSPC or EDQUOT from making the
    directories: :func:`try_mount` lets them through); mount(2)'s ENOSPC (the mount table
    full) is the probe's refusal."""
    stamp = probe_stamp(home)
    marker = home / "probed"
    try:
        earlier = marker.read_text()
    except OSError:
        earlier = ""
    if earlier == stamp:
        checks()
        return
    try:
        probe()
    except OSError as exc:
        same = bool(earlier) and earlier.partition(" ")[2] == stamp.partition(" ")[2]
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not same:
            raise
        log.warning(
            "no room under %s for overlay's test mount after a reboot: the one of an earlier "
            "boot of this kernel on this filesystem holds until there is room",
            nearest_existing(home),
        )
        return
    home.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # (a full disk: the next open probes again)
        marker.write_text(probe_stamp(home))


def probe_stamp(home: Path) -> str:
    """What a successful probe holds for: this boot, this kernel, this filesystem."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot} {os.uname().release} {os.stat(nearest_existing(home)).st_dev}"


def try_mount(where: Path) -> None:
    """Mount a tiny overlay under *where*: the only sure test that overlay works there."""
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(scratch_overlay(where, ".overlay-probe-"))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # a full disk, not a driver that cannot run here (:func:`probe_once`)
            raise DriverUnavailable(f"cannot write under {where}: {exc.strerror}") from exc
        try:
            mount_from(tmp, SCRATCH, tmp / "merged")
        except OSError as exc:
            raise DriverUnavailable(
                f"a test overlay mount under {where} failed: {exc.strerror}"
            ) from exc
        unmount(tmp / "merged")
