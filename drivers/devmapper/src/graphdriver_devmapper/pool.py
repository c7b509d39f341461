"""A device-mapper thin pool: its status, its messages, and the thin devices activated from it."""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from pathlib import Path

from graphdriver.toolkit import attach_loop

from . import dmsetup

SECTOR = 512
META_BLOCK = 4096
#: 64 KiB data blocks, Docker's default
BLOCK_SECTORS = 128


@dataclass(frozen=True)
class PoolStatus:
    """The thin-pool line of ``dmsetup status``."""

    transaction_id: int
    meta_used: int
    meta_total: int
    data_used: int
    data_total: int
    mode: str
    no_space_policy: str

    @property
    def data_free_fraction(self) -> float:
        return 1 - self.data_used / self.data_total if self.data_total else 0.0


class ThinPool:
    """The pool named *name*; ``block_sectors`` is its data block size."""

    def __init__(self, name: str, block_sectors: int = BLOCK_SECTORS) -> None:
        self.name = name
        self.block_sectors = block_sectors

    @property
    def device(self) -> str:
        return f"/dev/mapper/{self.name}"

    def exists(self) -> bool:
        return dmsetup.info(self.name) is not None

    def status(self) -> PoolStatus:
        fields = dmsetup.status(self.name).split()
        if len(fields) < 8 or fields[2] != "thin-pool":
            raise dmsetup.DmsetupError(errno.EINVAL, f"{self.name} is not a thin pool")
        meta_used, meta_total = (int(x) for x in fields[4].split("/"))
        data_used, data_total = (int(x) for x in fields[5].split("/"))
        policy = next((f for f in fields if f.endswith("_if_no_space")), "queue_if_no_space")
        return PoolStatus(
            int(fields[3]),
            meta_used * META_BLOCK,
            meta_total * META_BLOCK,
            data_used * self.block_sectors * SECTOR,
            data_total * self.block_sectors * SECTOR,
            fields[7],
            policy,
        )

    def read_block_size(self) -> None:
        """Learn the data block size from the pool's table (for a pool made elsewhere)."""
        fields = dmsetup.table(self.name).split()
        self.block_sectors = int(fields[5])

    def message(self, msg: str) -> None:
        dmsetup.message(self.name, 0, msg)

    def create_thin(self, dev_id: int) -> None:
        self.message(f"create_thin {dev_id}")

    def create_snap(self, dev_id: int, origin_id: int, origin_active: str | None) -> None:
        """Snapshot *origin_id*; an active origin is suspended meanwhile (its writes flushed)."""
        held = (
            contextlib.nullcontext() if origin_active is None else dmsetup.suspended(origin_active)
        )
        with held:
            self.message(f"create_snap {dev_id} {origin_id}")

    def delete(self, dev_id: int) -> None:
        try:
            self.message(f"delete {dev_id}")
        except dmsetup.DmsetupError as exc:
            if exc.errno != errno.ENODATA:  # already gone
                raise

    def set_transaction_id(self, old: int, new: int) -> None:
        self.message(f"set_transaction_id {old} {new}")

    def activate(self, name: str, dev_id: int, size: int) -> str:
        """Activate thin device *dev_id* of *size* bytes as /dev/mapper/*name*."""
        if not is_active(name):
            dmsetup.create(name, f"0 {size // SECTOR} thin {self.device} {dev_id}")
        return f"/dev/mapper/{name}"

    def resize(self, name: str, dev_id: int, size: int) -> None:
        with dmsetup.suspended(name):
            dmsetup.reload(name, f"0 {size // SECTOR} thin {self.device} {dev_id}")


def is_active(name: str) -> bool:
    """Whether device *name* is there with a live table. One without a table is what a create
    cut short (dmsetup killed between making the device and loading its table) leaves: it
    holds nothing, and is removed so that it can be made again."""
    info = dmsetup.info(name)
    if info is not None and not info.live:
        dmsetup.remove(name)
        return False
    return info is not None


def create_loop_pool(
    name: str, data: Path, metadata: Path, data_size: int, meta_size: int
) -> ThinPool:
    """Make (or bring back) a pool on two sparse files attached to loop devices.

    The loop devices use autoclear: the pool holds them open, and they go away by themselves
    once the pool is removed, so nothing leaks if a process dies.
    """
    data.parent.mkdir(parents=True, exist_ok=True)
    fresh = not metadata.exists()
    for path, size in ((data, data_size), (metadata, meta_size)):
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size)
    if fresh:
        with open(metadata, "r+b") as f:  # a new pool needs zeroed metadata
            f.write(b"\0" * META_BLOCK)
    with attach_loop(data) as data_dev, attach_loop(metadata) as meta_dev:
        sectors = data.stat().st_size // SECTOR // BLOCK_SECTORS * BLOCK_SECTORS
        low_water = max(1, sectors // BLOCK_SECTORS // 10)
        dmsetup.create(
            name,
            f"0 {sectors} thin-pool {meta_dev.path} {data_dev.path} "
            f"{BLOCK_SECTORS} {low_water} 2 skip_block_zeroing "
            f"error_if_no_space",
        )
    return ThinPool(name)
