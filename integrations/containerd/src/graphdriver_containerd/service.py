"""The gRPC face of :class:`~graphdriver_containerd.snapshotter.Snapshotter`:
``containerd.services.snapshots.v1.Snapshots`` as containerd's proxy plugin calls it.

Errors carry the status codes containerd's ``errdefs.FromGRPC`` maps back to its own
(NotFound, AlreadyExists, FailedPrecondition, InvalidArgument), so that its "already exists"
and retry logic works; anything else is UNKNOWN with the error's one line.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from graphdriver import GraphDriverError, MountEntry

from .api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from .api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .api.containerd.types import mount_pb2
from .snapshotter import Info, Snapshotter, translate

log = logging.getLogger("graphdriver.containerd")

#: how many List results go in one streamed message
LIST_BATCH = 100

_KIND = {"view": pb.VIEW, "active": pb.ACTIVE, "committed": pb.COMMITTED}

F = TypeVar("F", bound=Callable[..., Any])


def _mounts(mounts: list[MountEntry]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=_KIND[info.kind],
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def _rpc(method: F) -> F:
    """Turn a SnapshotError, or a store's or the catalogue's error, into its status code and
    message; log every call at debug."""

    @functools.wraps(method)
    def wrapper(self: Service, request: Any, context: grpc.ServicerContext) -> Any:
        log.debug("%s %s", method.__name__, str(request).replace("\n", " ")[:300])
        try:
            return method(self, request, context)
        except (GraphDriverError, OSError) as exc:  # the store's, or the catalogue's
            error = translate(exc)
            code = getattr(grpc.StatusCode, error.code)
            if code == grpc.StatusCode.UNKNOWN:
                log.error("%s: %s", method.__name__, error)
            context.abort(code, str(error))
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]


class Service(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    @_rpc
    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels), readonly=True)
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.MountsResponse(mounts=_mounts(self.sn.mounts(request.key)))

    @_rpc
    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.StatSnapshotResponse(info=_info(self.sn.stat(request.key)))

    @_rpc
    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.sn.update(request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=_info(info))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            found = [_info(i) for i in self.sn.walk(list(request.filters))]
        except (GraphDriverError, OSError) as exc:
            error = translate(exc)
            context.abort(getattr(grpc.StatusCode, error.code), str(error))
        for start in range(0, len(found), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=found[start : start + LIST_BATCH])

    @_rpc
    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        size, inodes = self.sn.usage(request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    @_rpc
    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.sn.cleanup()
        return empty_pb2.Empty()


def add_to_server(snapshotter: Snapshotter, server: grpc.Server) -> None:
    pb_grpc.add_SnapshotsServicer_to_server(Service(snapshotter), server)  # type: ignore[no-untyped-call]
