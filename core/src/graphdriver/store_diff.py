"""The diff/apply half of :class:`~graphdriver.store.LayerStore`: what reads a layer's changes
(:mod:`.diffs`: changes, sizes, tar streams) and what fills a layer from a tar
(:mod:`.applying`). Both run their long work without the store lock."""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, TYPE_CHECKING, BinaryIO, cast

from .archive.changes import Change
from .errors import InvalidOption
from .lazy import LazyModule

if TYPE_CHECKING:
    from . import applying, archive, diffs
    from .store import LayerStore
else:  # the diff and apply engine is imported by the first call that needs it
    applying, archive, diffs = (
        LazyModule(f"graphdriver.{m}") for m in ("applying", "archive", "diffs")
    )


def _store(mixin: LayerDiffs) -> LayerStore:
    return cast("LayerStore", mixin)


class LayerDiffs:
    """Diffs and apply-diff; mixed into :class:`~graphdriver.store.LayerStore`."""

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        """Sorted changes of *layer_id* relative to *parent* (default: its own parent)."""
        with diffs.change_source(_store(self), layer_id, parent) as (changes, _root, _kind):
            return changes

    def diff_size(self, layer_id: str, parent: str | None = None, *, links: bool = False) -> int:
        """Bytes of file data that ``diff`` would carry; what ``apply_diff`` returns for it.
        With *links*, symlinks' targets too (Docker's DiffSize: ``docker ps -s``)."""
        with diffs.change_source(_store(self), layer_id, parent) as (changes, root, _kind):
            return archive.changes_size(root, changes, links)

    def usage(self, layer_id: str) -> tuple[int, int]:
        """(bytes, inodes) on disk of what the layer itself holds against its parent: the
        blocks and inodes of the entries it adds or changes, a sparse file's holes not
        counted (containerd's Usage, the ``du`` of a snapshot's own directory, which
        Kubernetes counts against a pod's ephemeral storage)."""
        with diffs.change_source(_store(self), layer_id, None) as (changes, root, _kind):
            return archive.changes_usage(root, changes)

    def write_diff(
        self,
        layer_id: str,
        out: IO[bytes] | int,
        parent: str | None = None,
        compress: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Write the OCI layer tar of *layer_id*'s changes to *out* (fd or binary file).

        Returns the bytes of (uncompressed) tar written.
        """
        return self.export(layer_id, out, parent, compress, progress).tar_size

    def export(
        self,
        layer_id: str,
        out: IO[bytes] | int,
        parent: str | None = None,
        compress: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> diffs.DiffResult:
        """``write_diff`` that says whether the tar is the applied one again, byte for byte
        (an applied layer that is unchanged), or generated, and why."""
        if compress not in (None, "none", "gzip", "zstd"):
            raise InvalidOption(f"unknown compression {compress!r}: use gzip, zstd or none")
        with diffs.diff_source(_store(self), layer_id, parent) as source:
            return diffs.write_tar(layer_id, source, out, compress, progress)

    def diff(self, layer_id: str, parent: str | None = None) -> BinaryIO:
        """A readable stream of the uncompressed OCI layer tar; close it when done.

        The layers it reads are referenced from now until the stream ends or is closed.
        """
        return diffs.stream(_store(self), layer_id, parent)

    def apply_diff(
        self, layer_id: str, stream: BinaryIO, progress: Callable[[int], None] | None = None
    ) -> int:
        """Unpack an OCI layer tar (plain, gzip or zstd) into a fresh layer; return its size.

        On any error the layer is rolled back to empty and the error raised; the layer's diffID
        is then in ``metadata(layer_id)["diff_id"]``.
        """
        return self.apply(layer_id, stream, progress).size

    def apply(
        self,
        layer_id: str,
        stream: BinaryIO,
        progress: Callable[[int], None] | None = None,
        *,
        exact: bool = False,
    ) -> archive.ApplyResult:
        """``apply_diff`` that also returns the diffID and compression of the tar.

        The layer is marked ``applying`` under the store lock, the tar is extracted without
        it, and the lock is taken again to mark the layer ready (or empty it again). With
        *exact* (and records kept), a tar whose diff could not be given back byte for byte (it
        names a path twice) is refused and rolled back, as dockerd refuses it.
        """
        return applying.apply(_store(self), layer_id, stream, progress, exact=exact)

    @property
    def reproduces_exact_diffs(self) -> bool:
        """Docker's ``ReproducesExactDiffs``: the diff of a layer that apply-diff filled, while
        it is unchanged, is the applied tar byte for byte (on every driver: the core keeps a
        record of each applied tar, ``archive.tarsplit``)."""
        return applying.keeps_records()
