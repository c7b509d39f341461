"""Interop with real tools: layers GNU tar and podman/buildah wrote, applied by graphdriver,
equal what those tools unpack; graphdriver's diffs unpacked by GNU tar and umoci equal the
mounted layer. Trees are compared in everything a user can see, mtimes to the nanosecond
(:func:`graphdriver.testing.trees.snapshot` with ``exact=True``).

The ``*_rediff_exactly`` tests ask for exact diffs: a layer applied from a tar re-diffs to the
same bytes (the diffID's sha256), which needs the tar-split records kept at apply-diff.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from graphdriver import LayerStore, open_store
from graphdriver.linux.mount import unmount_all_under
from graphdriver.testing import Backing, backing_or_skip, host_lacks
from graphdriver.testing.trees import assert_same_tree, make_rich, random_content, snapshot

# (driver, backing): a merged-copy driver and overlay, whose diffs come from its upper dir
STORES = [("vfs", "loop-ext4"), ("overlay", "loop-xfs")]

# 2021-02-03 04:05:06.123456789 UTC: a sub-second mtime set on purpose
NS_MTIME = 1612325106_123456789


@pytest.fixture(scope="module")
def loop_xfs() -> Iterator[Backing]:
    yield from backing_or_skip("loop-xfs")


@dataclass
class Store:
    """A layer store (the Python API, in this process) and scratch space on its backing
    (xattrs, device nodes and holes all work there)."""

    layers: LayerStore
    work: Path

    def apply(self, layer: str, tar: Path, parent: str | None = None) -> None:
        self.layers.create(layer, parent)
        with open(tar, "rb") as f:
            self.layers.apply_diff(layer, f)

    def write_diff(self, layer: str) -> Path:
        out = self.work / f"diff-{layer}.tar"
        with open(out, "wb") as f:
            self.layers.write_diff(layer, f)
        return out

    def snapshot_of(self, layer: str) -> dict[str, object]:
        root = self.layers.get(layer)
        try:
            return snapshot(root, exact=True)
        finally:
            self.layers.put(layer)


@pytest.fixture(params=STORES, ids=[d for d, _ in STORES])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    driver, kind = request.param
    backing: Backing = request.getfixturevalue(kind.replace("-", "_"))
    name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")[:80]
    root, work = backing.root / name, backing.root / f"{name}-work"
    root.mkdir()
    work.mkdir()
    try:
        with open_store(root, driver) as layers:
            try:
                yield Store(layers, work)
            finally:
                layers.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, env=env
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} failed ({proc.returncode}): {proc.stderr}"
        )
    return proc.stdout


# --- layers GNU tar wrote ---------------------------------------------------------------------

TAR_FORMATS = {
    # format -> tar options when writing; only PAX carries xattrs and sub-second mtimes
    "gnu": ["--format=gnu", "-S"],
    "pax": ["--format=pax", "--xattrs", "--xattrs-include=*", "-S"],
    "ustar": ["--format=ustar"],
}


def _tar_source(root: Path, fmt: str) -> None:
    """Every kind of entry, a sparse file, sub-second mtimes; ustar's 100-byte name and link
    fields leave out make_rich's long names."""
    make_rich(root)
    if fmt == "ustar":
        shutil.rmtree(root / ("long-" + "n" * 150))
        (root / "long-target-link").unlink()
    if fmt != "ustar":
        with open(root / "sparse", "wb") as f:
            f.seek(1 << 20)
            f.write(random_content(5000, 3))
            f.seek(4 << 20)
            f.write(b"end")
            f.truncate(6 << 20)
    os.utime(root / "etc" / "hostname", ns=(NS_MTIME, NS_MTIME))
    os.utime(root / "dangling", ns=(NS_MTIME, NS_MTIME), follow_symlinks=False)
    os.utime(root / "deep" / "a", ns=(NS_MTIME, NS_MTIME))


def _gnu_tar_layer(store: Store, fmt: str) -> Path:
    src = store.work / f"src-{fmt}"
    src.mkdir()
    _tar_source(src, fmt)
    layer = store.work / f"layer-{fmt}.tar"
    _run("tar", *TAR_FORMATS[fmt], "--numeric-owner", "-C", src, "-cf", layer, ".")
    return layer


def _gnu_tar_extract(layer: Path, into: Path) -> None:
    _run(
        "tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--same-owner", "-p",
        "-C", into, "-xf", layer, "--exclude=.wh.*",
    )  # fmt: skip


@pytest.mark.parametrize("fmt", list(TAR_FORMATS))
def test_gnu_tar_layer_applies_as_gnu_tar_extracts_it(store: Store, fmt: str) -> None:
    layer = _gnu_tar_layer(store, fmt)
    want = store.work / "extracted"
    want.mkdir()
    _gnu_tar_extract(layer, want)
    store.apply("L", layer)
    assert_same_tree(snapshot(want, exact=True), store.snapshot_of("L"), "gnu-tar/graphdriver")


@pytest.mark.parametrize("fmt", list(TAR_FORMATS))
def test_gnu_tar_layer_rediffs_exactly(store: Store, fmt: str) -> None:
    layer = _gnu_tar_layer(store, fmt)
    store.apply("L", layer)
    assert _sha256(store.write_diff("L")) == _sha256(layer)


# --- graphdriver's diffs unpacked by GNU tar and umoci ----------------------------------------


def _chain(store: Store) -> list[Path]:
    """A base and a child that deletes a lower file and directory, replaces a directory,
    chowns, sets xattrs, links to a lower file, sets a sub-second mtime; their diffs."""
    layers = store.layers
    layers.create("base")
    root = layers.get("base")
    make_rich(root)
    (root / "gone" / "sub").mkdir(parents=True)
    (root / "gone" / "sub" / "f").write_bytes(b"in a deleted dir")
    (root / "gone-file").write_bytes(b"deleted")
    (root / "replaced").mkdir()
    (root / "replaced" / "old").write_bytes(b"old")
    (root / "owned").write_bytes(b"owned")
    (root / "linktarget").write_bytes(b"linked from above")
    layers.put("base")

    layers.create("child", "base")
    root = layers.get("child")
    shutil.rmtree(root / "gone")
    (root / "gone-file").unlink()
    (root / "etc" / "empty").unlink()
    shutil.rmtree(root / "replaced")
    (root / "replaced").mkdir()
    (root / "replaced" / "new").write_bytes(b"new")
    os.chown(root / "owned", 1000, 1001)
    os.setxattr(root / "etc" / "hostname", "user.added", b"in the child")
    os.setxattr(root / "xattr-file", "user.comment", b"changed")
    os.link(root / "linktarget", root / "etc" / "link-to-lower")
    os.symlink("../linktarget", root / "etc" / "sym")
    os.mkfifo(root / "etc" / "fifo2")
    (root / "ns").write_bytes(b"sub-second")
    os.utime(root / "ns", ns=(NS_MTIME, NS_MTIME))
    os.utime(root / "etc", ns=(NS_MTIME, NS_MTIME))
    layers.put("child")
    return [store.write_diff("base"), store.write_diff("child")]


def _apply_whiteouts(layer: Path, root: Path) -> None:
    """What an OCI unpacker does before it extracts a layer: ``.wh.x`` deletes the lower
    ``x``, ``.wh..wh..opq`` empties its directory of the lower layers' entries."""
    with tarfile.open(layer) as tar:
        names = [m.name.removeprefix("./") for m in tar]
    for name in names:
        parent, _, base = name.rpartition("/")
        if base == ".wh..wh..opq":
            for entry in (root / parent).iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        elif base.startswith(".wh."):
            gone = root / parent / base.removeprefix(".wh.")
            if gone.is_dir() and not gone.is_symlink():
                shutil.rmtree(gone)
            else:
                gone.unlink()


def test_our_diffs_unpacked_by_gnu_tar_equal_the_mounted_layer(store: Store) -> None:
    diffs = _chain(store)
    unpacked = store.work / "unpacked"
    unpacked.mkdir()
    for layer in diffs:
        _apply_whiteouts(layer, unpacked)
        _gnu_tar_extract(layer, unpacked)
    assert_same_tree(
        snapshot(unpacked, exact=True), store.snapshot_of("child"), "gnu-tar/graphdriver"
    )


def _oci_layout(diffs: list[Path], layout: Path, ref: str) -> None:
    """An OCI image layout whose layers are *diffs* (uncompressed: digest = diffID)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    layers = []
    for path in diffs:
        digest, size = blob(path.read_bytes())
        layers.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}
        )
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
    }
    config_digest, config_size = blob(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers,
    }
    manifest_digest, manifest_size = blob(json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def test_our_diffs_unpacked_by_umoci_equal_the_mounted_layer(store: Store) -> None:
    umoci = shutil.which("umoci")
    if umoci is None:
        host_lacks("umoci (apt-get install umoci)", "umoci")
    diffs = _chain(store)
    layout, bundle = store.work / "layout", store.work / "bundle"
    _oci_layout(diffs, layout, "gd")
    _run(umoci, "unpack", "--image", f"{layout}:gd", bundle)
    assert_same_tree(
        snapshot(bundle / "rootfs", exact=True), store.snapshot_of("child"), "umoci/graphdriver"
    )


# --- layers podman/buildah wrote -------------------------------------------------------------

CONTAINERFILE = """\
FROM localhost/gd-base:1
RUN mkdir -p /lower/dir/sub /opq && echo a > /lower/file && echo b > /lower/dir/sub/f \\
 && echo keep > /lower/keep && echo t > /lower/linktarget && echo o > /lower/owned \\
 && echo x > /opq/old
RUN rm /lower/file && rm -r /lower/dir && chown 1000:1001 /lower/owned \\
 && touch -d "2021-02-03 04:05:06" /lower/owned \\
 && ln /lower/linktarget /lower/hardlink-to-lower && setfattr -n user.gd -v hello /lower/keep \\
 && ln -s ../lower/keep /sym && mkfifo /fifo && mknod /null c 1 3 && mknod /blk b 7 200 \\
 && rm -r /opq && mkdir /opq && echo new > /opq/new && echo h > /h1 && ln /h1 /h2 \\
 && echo c > /capfile && setcap cap_net_raw+ep /capfile
"""
BUSYBOX_APPLETS = ("sh", "cat", "rm", "chown", "ln", "mkdir", "mknod", "touch", "mkfifo", "echo")


@dataclass
class PodmanImage:
    layers: list[Path]  # uncompressed layer tars from `podman save`, lowest first
    diff_ids: list[str]  # the image config's rootfs.diff_ids
    mounted: dict[str, object]  # snapshot of `podman image mount`


def _base_rootfs(root: Path) -> None:
    """busybox-static, and setfattr and setcap with the libraries they load (no package
    manager, no network in the build)."""
    bin_ = root / "bin"
    bin_.mkdir(parents=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        host_lacks("busybox (apt-get install busybox-static)", "podman")
    shutil.copy2(busybox, bin_ / "busybox")
    for applet in BUSYBOX_APPLETS:
        (bin_ / applet).symlink_to("busybox")
    for tool, package in (("setfattr", "attr"), ("setcap", "libcap2-bin")):
        path = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if path is None:
            host_lacks(f"{tool} (apt-get install {package})", "podman")
        shutil.copy2(path, bin_ / tool)
        for word in _run("ldd", path).split():
            if word.startswith("/") and Path(word).exists():
                lib = root / word.lstrip("/")
                lib.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(word, lib)


@pytest.fixture(scope="module", params=["vfs", "overlay"], ids=lambda d: f"podman-{d}")
def podman_image(request: pytest.FixtureRequest) -> Iterator[PodmanImage]:
    """An image built by buildah from a base that podman imported, in a private podman
    storage that is taken down at the end. Its storage driver decides how layers are made:
    vfs compares trees (a replaced directory is whiteouts of each old entry, a hardlink to a
    lower file a copy), overlay reads its upper dir (an opaque whiteout, the link's target
    copied up with it)."""
    driver: str = request.param
    missing = [t for t in ("podman", "buildah") if shutil.which(t) is None]
    if missing:
        host_lacks(f"{' and '.join(missing)} (apt-get install podman buildah)", "podman")
    with tempfile.TemporaryDirectory(prefix="gd-podman-") as tmp:
        work = Path(tmp)
        (work / "xdg").mkdir()
        (work / "tmp").mkdir()
        (work / "containers.conf").write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{work}/events.log"\n'
            f'tmp_dir = "{work}/tmp"\n'
        )
        (work / "registries.conf").write_text("unqualified-search-registries = []\n")
        (work / "storage.conf").write_text(
            f'[storage]\ndriver = "{driver}"\n'
            f'runroot = "{work}/run"\ngraphroot = "{work}/storage"\n'
        )
        env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(work / "xdg"),
            "CONTAINERS_CONF": str(work / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(work / "registries.conf"),
            "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
            "TMPDIR": str(work / "tmp"),  # buildah's and podman's scratch files (else /var/tmp)
        }
        storage = [
            "--root", f"{work}/storage", "--runroot", f"{work}/run", f"--storage-driver={driver}"
        ]  # fmt: skip
        podman = ["podman", *storage, "--cgroup-manager=cgroupfs", "--events-backend=file"]
        buildah = ["buildah", *storage]
        try:
            _base_rootfs(work / "base")
            _run("tar", "--numeric-owner", "-C", work / "base", "-cf", work / "base.tar", ".")
            _run(*podman, "import", "-q", work / "base.tar", "localhost/gd-base:1", env=env)
            (work / "ctx").mkdir()
            (work / "ctx" / "Containerfile").write_text(CONTAINERFILE)
            # no --network none: buildah 1.28 refuses it with chroot isolation (and OCI
            # isolation needs a cgroup setup crun accepts); the steps reach no network and pull
            # nothing (the base is local, registries.conf lists none)
            _run(
                *buildah, "bud", "--layers", "--isolation", "chroot", "-q",
                "-t", "localhost/gd-test:1", work / "ctx", env=env,
            )  # fmt: skip
            _run(
                *podman, "save", "-q", "--format", "docker-archive",
                "-o", work / "image.tar", "localhost/gd-test:1", env=env,
            )  # fmt: skip
            archive = work / "archive"
            archive.mkdir()
            _run("tar", "-C", archive, "-xf", work / "image.tar")
            (manifest,) = json.loads((archive / "manifest.json").read_text())
            config = json.loads((archive / manifest["Config"]).read_text())
            mount = Path(_run(*podman, "image", "mount", "localhost/gd-test:1", env=env).strip())
            try:
                mounted = snapshot(mount, exact=True)
            finally:
                _run(*podman, "image", "unmount", "localhost/gd-test:1", env=env)
            yield PodmanImage(
                [archive / name for name in manifest["Layers"]],
                config["rootfs"]["diff_ids"],
                mounted,
            )
        finally:
            subprocess.run(
                [*podman, "image", "unmount", "--all"], env=env, capture_output=True, timeout=120
            )
            unmount_all_under(work)


def _apply_podman_layers(store: Store, image: PodmanImage) -> list[str]:
    ids, parent = [], None
    for n, layer in enumerate(image.layers):
        layer_id = f"p{n}"
        store.apply(layer_id, layer, parent)
        ids.append(layer_id)
        parent = layer_id
    return ids


def test_podman_layers_applied_equal_podman_image_mount(
    store: Store, podman_image: PodmanImage
) -> None:
    assert len(podman_image.layers) == 3  # the import and two RUN steps
    ids = _apply_podman_layers(store, podman_image)
    assert_same_tree(podman_image.mounted, store.snapshot_of(ids[-1]), "podman/graphdriver")


def test_podman_save_layers_rediff_exactly(store: Store, podman_image: PodmanImage) -> None:
    ids = _apply_podman_layers(store, podman_image)
    for layer_id, diff_id, tar in zip(ids, podman_image.diff_ids, podman_image.layers, strict=True):
        assert f"sha256:{_sha256(tar)}" == diff_id  # docker-archive layers are uncompressed
        assert f"sha256:{_sha256(store.write_diff(layer_id))}" == diff_id, layer_id
