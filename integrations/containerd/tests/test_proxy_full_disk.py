"""The proxy started on a full disk (after a reboot, or a crash, while a container had filled
it): it gives the store's reserve back and serves, so that the removals of kubelet's garbage
collection, which free the disk, go through it. It used to exit at once, "the filesystem
holding .../metadata.db is full", and with it containerd's only way to free the disk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from ctd_proxy import Proxy, code, running

from graphdriver.testing import backing_or_skip, fill_filesystem, freed

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def _after_a_reboot(home: Path) -> None:
    """What a reboot changes for the store: the boot in the overlay probe's stamp (rewritten
    in place: the disk has no room for a new file)."""
    marker = home / "probed"
    stamp = marker.read_text()
    boot = stamp.partition(" ")[0]
    with open(marker, "r+") as f:
        f.write(("0" if boot[0] != "0" else "1") + boot[1:])


def test_a_proxy_restarted_on_a_full_disk_serves_and_frees_it(tmp_path: Path) -> None:
    for backing in backing_or_skip("loop-xfs", size=320 * MiB):
        root = backing.root / "store"
        # its socket and log in a directory of their own, as /run is for a real one
        with running(root, "overlay", backing.options, beside=tmp_path) as proxy:
            size = (root / ".reserve" / "space").stat().st_blocks * 512
            [m] = proxy.prepare("image-key")
            Path(m.source, "hostname").write_text("image\n")  # type: ignore[attr-defined]
            proxy.commit("image", "image-key")
            [m] = proxy.prepare("ctr", "image")
            options = dict(o.partition("=")[::2] for o in m.options)  # type: ignore[attr-defined]
            filler = Path(options["upperdir"]) / "filler"  # where the container's writes land
            fill_filesystem(filler)
            second = Proxy(root, "overlay", tmp_path / "second.sock", backing.options)
            second.log = tmp_path / "second.log"
            with pytest.raises(AssertionError, match="another proxy"):
                second.start()  # refused, and gives back nothing: the reserve stays
            assert "WARNING" not in second.output()
            assert (root / ".reserve" / "space").stat().st_blocks * 512 == size
            assert proxy.stop() == 0
            fill_filesystem(filler)  # what the stop freed (its databases' -wal and -shm)
            _after_a_reboot(root / "overlay")
            with pytest.raises(OSError):
                (backing.root / "one-more").mkdir()
            proxy.log.write_text("")
            proxy.start()
            assert proxy.output().splitlines()[0] == (
                f"graphdriver: WARNING: the filesystem of {root} is full: its reserve "
                f"({size >> 10} KiB, 16 inodes) was given back so that this "
                "command's records can be written; it is made again once there is room"
            ), proxy.output()
            proxy.remove("ctr")  # kubelet's garbage collection, through containerd
            assert proxy.list() == ["image"]
            assert freed(root, 200 * MiB)
            assert proxy.stop() == 0
        # the probe ran again with the room the reserve gave: its stamp is this boot's
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert (root / "overlay" / "probed").read_text().startswith(boot + " ")
        check = subprocess.run(proxy.command("check"), capture_output=True, text=True)
        assert (check.returncode, check.stdout, check.stderr) == (0, "", ""), check
        assert (root / ".reserve" / "space").stat().st_blocks * 512 == size  # made again


def test_a_running_proxy_frees_a_disk_a_container_filled(tmp_path: Path) -> None:
    """A container fills the disk while the proxy serves: what would need room is refused as
    RESOURCE_EXHAUSTED, and the Remove that frees the disk goes through (it used to be
    refused, INTERNAL, until the proxy was restarted: its catalogue was written before the
    store gave the reserve back, and containerd's garbage collection stops at such an error)."""
    for backing in backing_or_skip("loop-xfs", size=320 * MiB):
        root = backing.root / "store"
        with running(root, "overlay", backing.options, beside=tmp_path) as proxy:
            size = (root / ".reserve" / "space").stat().st_blocks * 512
            proxy.prepare("image-key")
            proxy.commit("image", "image-key")
            [m] = proxy.prepare("ctr", "image")
            options = dict(o.partition("=")[::2] for o in m.options)  # type: ignore[attr-defined]
            fill_filesystem(Path(options["upperdir"]) / "filler")
            with pytest.raises(grpc.RpcError) as refused:
                proxy.prepare("another", "image")
            assert code(refused.value) == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
            proxy.log.write_text("")
            proxy.remove("ctr")  # kubelet's garbage collection, through containerd
            assert proxy.list() == ["image"]
            assert "its reserve" in proxy.output(), proxy.output()
            assert freed(root, 200 * MiB)
            proxy.prepare("another", "image")  # room again
            proxy.remove("another")
            proxy.cleanup()
            assert proxy.stop() == 0
        check = subprocess.run(proxy.command("check"), capture_output=True, text=True)
        assert (check.returncode, check.stdout, check.stderr) == (0, "", ""), check
        subprocess.run(proxy.command("create", "again"), capture_output=True, check=True)
        assert (root / ".reserve" / "space").stat().st_blocks * 512 == size  # made again


def test_a_first_start_on_a_full_disk_serves_and_a_refused_one_takes_nothing(
    tmp_path: Path,
) -> None:
    """A store only the CLI used, on a disk that filled up: a proxy refused at once (its
    --address is a file) gives nothing back; the first one that starts makes room for its
    lock file and its catalogue, and serves."""
    for backing in backing_or_skip("loop-xfs", size=320 * MiB):
        root = backing.root / "store"
        proxy = Proxy(root, "overlay", tmp_path / "proxy.sock", backing.options)
        proxy.log = tmp_path / "proxy.log"
        try:
            subprocess.run(proxy.command("create", "image"), capture_output=True, check=True)
            size = (root / ".reserve" / "space").stat().st_blocks * 512
            fill_filesystem(backing.root / "filler")
            (tmp_path / "not-a-socket").touch()
            refused = subprocess.run(
                proxy.command("serve", "containerd", "--address", str(tmp_path / "not-a-socket")),
                capture_output=True,
                text=True,
            )
            assert refused.returncode != 0 and refused.stderr.splitlines() == [
                f"graphdriver: error: {tmp_path / 'not-a-socket'} exists and is not a socket; "
                "choose another --address"
            ], refused
            assert (root / ".reserve" / "space").stat().st_blocks * 512 == size
            assert not (root / "containerd").exists()
            proxy.start()
            assert "its reserve" in proxy.output().splitlines()[0], proxy.output()
            assert len(proxy.prepare("ctr")) == 1  # it serves, in the reserve's room
            assert proxy.stop() == 0
        finally:
            proxy.stop()
            subprocess.run(proxy.command("cleanup"), capture_output=True, check=False)
