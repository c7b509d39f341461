"""overlay: each layer an overlayfs upper directory over its ancestors' directories.

On-disk layout, as Docker's overlay2 (so that people who know it feel at home)::

    <home>/<id>/diff      the layer's own files (the overlay upper dir)
    <home>/<id>/work      overlayfs's work dir
    <home>/<id>/merged    where the layer is mounted
    <home>/<id>/link      the layer's short id, 26 characters
    <home>/<id>/lower     its ancestors as l/<short>:l/<short>... nearest first
    <home>/l/<short>      -> ../<id>/diff, short paths for the classic mount option string

A layer without a parent needs no mount: its diff directory is its root. Every other layer is
mounted with its diff as upper and its ancestors' diffs as lower directories, through the new
mount API (one ``lowerdir+`` per layer, up to overlayfs's 500) or, on kernels before 6.8, the
classic mount(2) option string with relative ``l/`` paths (128 layers, Docker's limit).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from graphdriver import (
    Capabilities,
    CreateOpts,
    Driver,
    DriverUnavailable,
    InvalidLayerId,
    InvalidOption,
    LayerInfo,
    MountEntry,
)
from graphdriver.toolkit import (
    MNT_DETACH,
    MS_BIND,
    MS_RDONLY,
    MS_REMOUNT,
    bind,
    fault_point,
    fs_name,
    fsmount,
    get_quota_project,
    is_layer_id,
    is_mountpoint,
    mount,
    nearest_existing,
    overlay_changes,
    private_dir,
    project_quota_enforced,
    remove_tree,
    set_quota_limit,
    set_quota_project,
    supports_d_type,
    unmount,
    unmount_all_under,
)

from .features import cached_features, in_user_namespace, mount_from, probe_once, try_mount
from .links import checked_lower, link_files

log = logging.getLogger(__name__)

#: overlayfs's own limit on lower layers (OVL_MAX_STACK)
NEW_API_MAX_DEPTH = 500
#: Docker's limit for the one-page option string: (26 + 3) * 128 bytes of lowerdir plus room
CLASSIC_MAX_DEPTH = 128
PAGE = 4096
#: exactly 32 letters (base32, as Docker's link names): _short_id picks one by five bits
_LINK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
assert len(_LINK_ALPHABET) == 32
_UNSUPPORTED_UPPER = {
    "overlayfs",
    "aufs",
    "ecryptfs",
    "nfs",
    "zfs",
    "fuse",
    "v9fs",
    "squashfs",
    "erofs",
}


def _short_id() -> str:
    # 32 letters: a random byte's low five bits pick one without bias (secrets would import
    # hashlib and OpenSSL, 6 ms of every command)
    return "".join(_LINK_ALPHABET[b & 31] for b in os.urandom(26))


#: what the store and this driver keep in the home beside the layers' directories
_KEPT = frozenset({"l", "inflight", "lock", "metadata.db"})


def _mounted(where: str) -> bool:
    """Whether the layer at *where* (its dir) is mounted on its ``merged``: an overlay (its
    own st_dev, which ``os.path.ismount`` sees without a mountinfo scan), or a sealed bottom
    layer's read-only bind of its diff dir, on the same filesystem, which ismount does not
    see: ``merged`` then shows ``diff``'s inode."""
    merged = f"{where}/merged"
    if os.path.ismount(merged):
        return True
    try:
        seen = os.stat(merged)
    except OSError:
        return False
    try:
        diff = os.stat(f"{where}/diff")
    except FileNotFoundError:  # (a removal cut short) a bind of it is in the mount table
        return is_mountpoint(merged)
    return (seen.st_ino, seen.st_dev) == (diff.st_ino, diff.st_dev)


def _kept_name(layer_id: str) -> bool:
    """Whether *layer_id* names one of the home's own entries (``l/``, ``inflight/``, the
    store lock, ``metadata.db`` and the files beside it), which a layer of that id would
    collide with: its failed create's rollback removed them."""
    return layer_id in _KEPT or layer_id.startswith(("metadata.db.", "metadata.db-"))


class OverlayDriver(Driver):
    """Layers as overlayfs upper directories stacked on their ancestors."""

    name = "overlay"
    options = {
        "overlay.mount_api": "new (fsconfig lowerdir+, 500 layers), classic (mount(2), "
        "128 layers) or auto (new where the kernel has it)",
        "overlay.mountopt": "extra overlay mount options, comma-separated (e.g. nodev)",
        "overlay.native_diff": "auto (read the upper dir) or off (compare trees, slower)",
    }

    @classmethod
    def _basic_checks(cls, options: Mapping[str, str]) -> None:
        if os.geteuid() != 0:
            raise DriverUnavailable("overlay needs root to mount")
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["overlay"] for line in f):
                raise DriverUnavailable("the kernel has no overlay filesystem (modprobe overlay)")
        api = options.get("overlay.mount_api", "auto")
        if api not in ("auto", "new", "classic"):
            raise InvalidOption(f"overlay.mount_api must be new, classic or auto, not {api!r}")

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        cls._basic_checks(options)
        where = nearest_existing(home)
        backing = fs_name(where)
        if backing in _UNSUPPORTED_UPPER:
            raise DriverUnavailable(
                f"overlay cannot use {backing} under {where} as its upper "
                f"filesystem; put --root on xfs or ext4"
            )
        if not supports_d_type(where):
            raise DriverUnavailable(
                f"the {backing} filesystem under {where} does not return d_type (xfs made with "
                f"ftype=0?); overlay would lose files: reformat with mkfs.xfs -n ftype=1"
            )
        try_mount(where)

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        super().__init__(home, options)
        probe_once(home, lambda: self.probe(home, options), lambda: self._basic_checks(options))
        home.mkdir(parents=True, exist_ok=True)
        self.backing = fs_name(home)
        has_new_api, self.fixed_opts = cached_features(home)
        self.new_api = self._choose_api(options.get("overlay.mount_api", "auto"), has_new_api)
        why_not: dict[str, str] = {}
        native = options.get("overlay.native_diff", "auto")
        if native not in ("auto", "off"):
            raise InvalidOption(f"overlay.native_diff must be auto or off, not {native!r}")
        self.native_diff = native == "auto" and not in_user_namespace()
        if not self.native_diff:
            why_not["native_diff"] = (
                "turned off by overlay.native_diff=off"
                if native == "off"
                else "inside a user namespace the trusted.overlay xattrs cannot be read"
            )
        self.quota = self.backing == "xfs" and project_quota_enforced(home)
        if not self.quota:
            why_not["quota"] = (
                f"the root is on {self.backing}; --size needs XFS mounted with prjquota"
                if self.backing != "xfs"
                else "XFS here does not enforce project quota (mounted without prjquota, "
                "or a kernel built without XFS quota)"
            )
        self.capabilities = Capabilities(
            quota=self.quota,
            max_depth=NEW_API_MAX_DEPTH if self.new_api else CLASSIC_MAX_DEPTH,
            readonly_images=True,
            needs_root=True,
            why_not=why_not,
        )
        self.extra = [o for o in options.get("overlay.mountopt", "").split(",") if o]

    def recover(self, layers: Sequence[LayerInfo]) -> None:
        # the mounter is root (CAP_DAC_OVERRIDE), so no lower path needs traversal by others:
        # 0700 keeps a hostile layer's setuid file or device node out of other users' reach
        private_dir(self.home, self.home / "l")

    def _choose_api(self, wanted: str, have: bool) -> bool:
        if wanted == "new" and not have:
            raise DriverUnavailable(
                "overlay.mount_api=new needs Linux 6.8 or later (fsconfig lowerdir+)"
            )
        return have and wanted != "classic"

    # ---------------------------------------------------------------------------- paths

    def _dir(self, layer: LayerInfo | str) -> Path:
        return self.home / (layer if isinstance(layer, str) else layer.id)

    def _diff(self, layer: LayerInfo | str) -> Path:
        return self._dir(layer) / "diff"

    def _short(self, layer: LayerInfo | str) -> str:
        return (self._dir(layer) / "link").read_text().strip()

    # ---------------------------------------------------------------------------- lifecycle

    def create(self, layer: LayerInfo, parent: LayerInfo | None, opts: CreateOpts) -> None:
        if _kept_name(layer.id):
            raise InvalidLayerId(
                f"invalid layer id {layer.id!r}: the overlay driver keeps that name for its own "
                f"files beside the layers' directories"
            )
        d = self._dir(layer)
        d.mkdir(0o700)
        diff = d / "diff"
        diff.mkdir(0o755)
        (d / "work").mkdir(0o700)
        if parent is not None:
            # the merged root takes the upper dir's owner, mode and xattrs: inherit the
            # parent's (not overlayfs's own trusted.overlay.* on it)
            pst = os.stat(self._diff(parent))
            os.chown(diff, pst.st_uid, pst.st_gid)
            os.chmod(diff, stat.S_IMODE(pst.st_mode))
            for key in os.listxattr(self._diff(parent)):
                if not key.startswith("trusted.overlay."):
                    os.setxattr(diff, key, os.getxattr(self._diff(parent), key))
            lower = f"l/{self._short(parent)}"
            parent_lower = self._dir(parent) / "lower"
            if parent_lower.exists():
                lower += ":" + parent_lower.read_text().strip()
            (d / "lower").write_text(lower)
        else:
            os.chmod(diff, 0o755)
            os.chown(diff, 0, 0)
        short = _short_id()
        (self.home / "l").mkdir(0o700, exist_ok=True)  # recover() made it; a driver used alone
        (self.home / "l" / short).symlink_to(Path("..") / layer.id / "diff")
        (d / "link").write_text(short)
        if opts.size is not None:
            self._set_quota(layer, diff, opts.size)

    def _set_quota(self, layer: LayerInfo, diff: Path, size: int) -> None:
        if not self.quota:
            raise InvalidOption(
                f"overlay cannot limit a layer's size: {self.capabilities.why_not['quota']}"
            )
        base = get_quota_project(self.home)
        used = [int(p.read_text()) for p in self.home.glob("*/projid")]
        project = max([base, *used]) + 1
        set_quota_project(diff, project)
        set_quota_limit(self.home, project, size)
        (self._dir(layer) / "projid").write_text(str(project))

    def has_storage(self, layer: LayerInfo) -> bool:
        d = self._dir(layer)  # (a name the home keeps for itself is refused by create)
        return os.path.lexists(d) and not (_kept_name(layer.id) and not (d / "diff").is_dir())

    def remove(self, layer: LayerInfo) -> None:
        d = self._dir(layer)
        if _kept_name(layer.id) and not (d / "diff").is_dir():
            return  # the home's own entry, not a layer's (create refused the name)
        if _mounted(str(d)):
            self.unmount(layer)
        if d.is_dir() and not d.is_symlink():  # (first: a failure here leaves the layer whole)
            for where in unmount_all_under(d):  # never delete another filesystem's files
                log.warning("unmounted %s, mounted inside layer %s, to remove it", where, layer.id)
        link = d / "link"
        if link.exists():
            (self.home / "l" / link.read_text().strip()).unlink(missing_ok=True)
        projid = d / "projid"
        if projid.exists() and self.quota:
            with contextlib.suppress(OSError):
                set_quota_limit(self.home, int(projid.read_text()), 0)
        if d.exists():
            remove_tree(d)

    # ---------------------------------------------------------------------------- mounts

    def mount(self, layer: LayerInfo, chain: Sequence[LayerInfo]) -> Path:
        d = self._dir(layer)
        if not chain and not layer.sealed:  # nothing below and nothing above: the diff dir
            if not (d / "diff").is_dir():  # is the root, if it is there
                raise FileNotFoundError(errno.ENOENT, "the layer's directory is missing", str(d))
            return d / "diff"
        merged = d / "merged"
        merged.mkdir(exist_ok=True)
        if _mounted(str(d)):
            return merged
        if not chain:  # a sealed bottom layer: a read-only bind mount of its diff
            self._bind_readonly(d / "diff", merged)
            return merged
        opts = self._options(layer)
        home = str(self.home)  # plain strings: Path joins cost more than the syscalls
        lowers = [f"{home}/{p.id}/diff" for p in chain]
        if layer.sealed:  # an image layer with children: its own diff becomes a lower too
            lowers.insert(0, f"{home}/{layer.id}/diff")
        if self.new_api:
            config: list[tuple[str, str | None]] = [("lowerdir+", low) for low in lowers]
            if not layer.sealed:
                config += [
                    ("upperdir", f"{home}/{layer.id}/diff"),
                    ("workdir", f"{home}/{layer.id}/work"),
                ]
            fsmount("overlay", merged, config + opts)
        else:
            self._classic_mount(layer, merged, opts)
        return merged

    def _options(self, layer: LayerInfo) -> list[tuple[str, str | None]]:
        """The overlay mount options besides the dirs: index=off, what the probe found
        needed, the SELinux context, and ``overlay.mountopt``."""
        opts: list[tuple[str, str | None]] = [("index", "off"), *self.fixed_opts]
        if layer.mount_label:
            opts.append(("context", layer.mount_label))
        for extra in self.extra:
            key, sep, value = extra.partition("=")
            opts.append((key, value if sep else None))
        return opts

    def mount_spec(
        self, layer: LayerInfo, chain: Sequence[LayerInfo], readonly: bool
    ) -> list[MountEntry] | None:
        """What containerd's own overlayfs snapshotter returns: a bind of the diff dir for a
        layer without parents, else an overlay of the diff dir over the parents' (no upper
        dir when *readonly*: the layer's own diff dir is then the top lower). None when the
        lower dirs do not fit one page of options (containerd's mount code makes one mount(2)
        call): the caller then binds this driver's own mount (new mount API, 500 layers)."""
        diff = str(self._diff(layer))
        if not chain:
            return [MountEntry("bind", diff, ("ro" if readonly else "rw", "rbind"))]
        lowers = [str(self._diff(p)) for p in chain]
        opts = [k if v is None else f"{k}={v}" for k, v in self._options(layer)]
        if readonly:
            opts.append("lowerdir=" + ":".join([diff, *lowers]))
        else:
            work = str(self._dir(layer) / "work")
            opts += [f"workdir={work}", f"upperdir={diff}", "lowerdir=" + ":".join(lowers)]
        if len(",".join(opts)) >= PAGE:
            return None
        return [MountEntry("overlay", "overlay", tuple(opts))]

    def _bind_readonly(self, source: Path, target: Path) -> None:
        """Bind *source* read-only on *target*; a writable bind is never left behind.

        With the new mount API the detached tree is made read-only before it is attached
        (open_tree, mount_setattr, move_mount); the classic bind-then-remount unmounts the
        bind when the remount fails.
        """
        if self.new_api:
            fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                bind(str(source), fd, readonly=True)
            finally:
                os.close(fd)
            return
        mount(str(source), target, None, MS_BIND)
        try:
            fault_point("overlay.mount.readonly-remount")
            mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        except BaseException:
            unmount(target, MNT_DETACH)
            raise

    def _classic_mount(
        self, layer: LayerInfo, merged: Path, opts: list[tuple[str, str | None]]
    ) -> None:
        """mount(2) with relative l/ paths, from a child that chdirs into home."""
        lower = checked_lower(self.home, layer.id, self._short(layer) if layer.sealed else None)
        if layer.sealed:
            parts = [f"lowerdir=l/{self._short(layer)}:{lower}"]
        else:
            parts = [f"lowerdir={lower}", f"upperdir={layer.id}/diff", f"workdir={layer.id}/work"]
        data = ",".join([*parts, *(k if v is None else f"{k}={v}" for k, v in opts)])
        if len(data) >= PAGE:
            raise OSError(
                errno.E2BIG,
                f"overlay mount options of {len(data)} bytes do not fit one page; "
                f"use overlay.mount_api=new (Linux 6.8+)",
                str(merged),
            )
        mount_from(self.home, data, merged)

    def unmount(self, layer: LayerInfo) -> None:
        merged = self._dir(layer) / "merged"
        if not merged.exists():
            return
        try:
            unmount(merged, retries=20, delay=0.05)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            log.warning("layer %s still busy; detaching its mount lazily", layer.id)
            unmount(merged, MNT_DETACH)
        with contextlib.suppress(OSError):
            merged.rmdir()

    def is_mounted(self, layer: LayerInfo) -> bool | None:
        # every open asks this of every layer: strings, not Paths (500 layers: 3 ms, not 13)
        where = f"{self.home}/{layer.id}"
        mounted = _mounted(where)
        if not mounted and not os.path.exists(f"{where}/lower"):
            # a bottom layer is its own diff dir, but sealed (with children) a bind on merged,
            # which unmount removes: merged there unmounted is a bind gone (a reboot)
            return False if os.path.isdir(f"{where}/merged") else None
        return mounted

    # ---------------------------------------------------------------------------- diffs

    def changes(
        self, layer: LayerInfo, chain: Sequence[LayerInfo]
    ) -> Sequence[tuple[str, int]] | None:
        if not self.native_diff or not chain:
            return None
        lowers = [str(self._diff(p)) for p in chain]
        return overlay_changes(str(self._diff(layer)), lowers)  # Change: a (path, kind) pair

    def diff_source(self, layer: LayerInfo) -> Path | None:
        if not self.native_diff or not (self._dir(layer) / "lower").exists():
            return None
        return self._diff(layer)

    def apply_target(self, layer: LayerInfo) -> tuple[Path, str] | None:
        has_parent = (self._dir(layer) / "lower").exists()
        return self._diff(layer), "overlay" if has_parent else "delete"

    def apply_lowers(self, layer: LayerInfo) -> list[Path]:
        """The parents' diff dirs, nearest first, as the ``lower`` file names them (``l/``)."""
        if not (self._dir(layer) / "lower").exists():
            return []
        return [self.home / part for part in checked_lower(self.home, layer.id).split(":") if part]

    def stored_layers(self) -> Mapping[str, str | None]:
        """Every ``<id>/`` with a ``diff`` dir, with the parent its ``lower`` file names first
        (resolved through ``l/``; the unresolved ``l/<short>`` when that link is gone)."""
        found: dict[str, str | None] = {}
        shorts: dict[str, str] | None = None
        for entry in os.scandir(self.home):
            if not is_layer_id(entry.name) or not os.path.isdir(f"{entry.path}/diff"):
                continue
            try:
                nearest = Path(entry.path, "lower").read_text().strip().split(":")[0]
            except FileNotFoundError:
                found[entry.name] = None
                continue
            try:
                found[entry.name] = Path(os.readlink(self.home / nearest)).parent.name
            except OSError:  # a link gone (made again where it is read): by the link files
                if shorts is None:
                    shorts = {short: layer for layer, short in link_files(self.home)}
                found[entry.name] = shorts.get(nearest.removeprefix("l/"), nearest)
        return found

    def status(self) -> list[tuple[str, str]]:
        return [
            ("Backing Filesystem", self.backing),
            ("Supports d_type", _d_type(self.home)),
            ("Native Overlay Diff", str(self.native_diff).lower()),
            ("Using metacopy", "false"),
            ("Mount API", "new (fsconfig lowerdir+)" if self.new_api else "classic (mount(2))"),
            ("Max Depth", str(self.capabilities.max_depth)),
            ("Project Quota", str(self.quota).lower()),
        ]


def _d_type(home: Path) -> str:
    """``status``'s d_type line: in an empty home the probe makes a file, which a full disk
    refuses."""
    try:
        return str(supports_d_type(home)).lower()
    except OSError as exc:
        return f"unknown ({exc.strerror})"
