"""Docker's GraphDriver plugin (moby's ``daemon/graphdriver/proxy.go``) over a LayerStore.

dockerd names every layer itself (64 hex digits, ``<hex>-init`` for a container's init layer):
these ids are the store's layer ids, so ``graphdriver ls`` shows dockerd's layers. ``Create``
makes an image layer, ``CreateReadWrite`` a container's (``StorageOpt size=`` is the layer's
size limit, where the driver has quota); ``Get`` mounts and counts, ``Put`` releases one
count; ``Diff`` streams the raw layer tar; ``ApplyDiff`` unpacks the request's raw tar into a
layer dockerd has just created (a tar that fails leaves the layer empty again). ``Remove`` of a
layer that does not exist succeeds, as with dockerd's own drivers (dockerd retries removals it
thinks failed). ``Init``'s ``Home`` is ignored: the layers live under the store's root.

The store and its SQLite connection belong to the thread that opened them: every call runs on
one store thread, in order; a Diff's tar is read on the connection's thread while others run,
and an ApplyDiff runs on a store of its own in the connection's thread (its body may be slow).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from graphdriver import (
    ArchiveError,
    CreateOpts,
    InvalidOption,
    LayerNotFound,
    LayerStore,
    open_store,
    serving,
    validate_id,
)
from graphdriver.driver import parse_size
from graphdriver.errors import from_oserror
from graphdriver.toolkit import SqliteSchema, sqlite_open, sqlite_transaction

from .http import BadRequest, Body, Plugin, RawResponse, Request, Response, field_map, field_str

log = logging.getLogger("graphdriver.docker")

T = TypeVar("T")
KIND = "GraphDriver"
#: bytes of a Diff's tar sent per chunk
CHUNK = 1 << 20


class _BodyReader(io.RawIOBase):
    """A request body as a binary stream (what ``LayerStore.apply_diff`` reads)."""

    def __init__(self, body: Body) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)


#: the magic numbers of what ``LayerStore.apply`` would decompress (anything else that is
#: no tar fails as one)
_COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}


def _refuse_compressed(stream: io.BufferedReader[_BodyReader]) -> None:
    """ApplyDiff's body is an uncompressed tar (dockerd decompresses what it pulls or loads,
    and hashes what it sends): a compressed one is refused, as dockerd's own drivers refuse
    it, rather than unpacked under a diffID that its Diff would never match."""
    head = stream.peek(4)[:4]
    for magic, name in _COMPRESSED.items():
        if head.startswith(magic):
            raise ArchiveError(
                f"ApplyDiff takes an uncompressed tar; this one is {name}-compressed (dockerd "
                f"hashed the compressed bytes, which a diff of the layer would never give back)"
            )


_GETS_SCHEMA = SqliteSchema(
    1,
    "CREATE TABLE IF NOT EXISTS gets "
    "(layer TEXT PRIMARY KEY, count INTEGER NOT NULL, boot TEXT NOT NULL);",
    label="the Docker graph plugin's gets",
)


def _boot() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


class _Gets:
    """How many of a layer's mounts are dockerd's (its Gets not yet put back), kept in SQLite
    across restarts of dockerd and of the plugin (not of the machine: a reboot took every
    mount); used on the store thread only. Never more than the store counts (brought down to
    its counts as the plugin starts and at each Get and Put). A ``graphdriver cleanup`` while
    dockerd has layers mounted takes them from under its containers, and its counts with
    them: a Get dockerd still counts then may release a mount someone takes after it."""

    def __init__(self, path: Path, store: LayerStore) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db, _ = sqlite_open(path, _GETS_SCHEMA)
        self.store, self.boot = store, _boot()
        with sqlite_transaction(self.db):  # a reboot took every mount: no Get is left
            self.db.execute("DELETE FROM gets WHERE boot!=?", (self.boot,))
        for (layer,) in self.db.execute("SELECT layer FROM gets").fetchall():
            self.add(layer, 0)

    def mounted(self, layer: str) -> int:
        """The store's count of *layer*'s mounts (0 for a layer it does not have)."""
        if not self.store.exists(layer):
            return 0
        return int(str(self.store.metadata(layer)["mount_count"]))

    def count(self, layer: str) -> int:
        row = self.db.execute("SELECT count FROM gets WHERE layer=?", (layer,)).fetchone()
        return 0 if row is None else int(row[0])

    def add(self, layer: str, n: int) -> None:
        """*n* more of *layer*'s mounts are dockerd's, at most as many as the store counts."""
        cap = self.mounted(layer)
        with sqlite_transaction(self.db):
            self.db.execute(
                "INSERT INTO gets (layer, count, boot) VALUES (?, min(?, ?), ?) ON "
                "CONFLICT(layer) DO UPDATE SET count = min(count + excluded.count, ?)",
                (layer, n, cap, self.boot, cap),
            )
            self.db.execute("DELETE FROM gets WHERE layer=? AND count<=0", (layer,))

    def forget(self, layer: str) -> None:
        with sqlite_transaction(self.db):
            self.db.execute("DELETE FROM gets WHERE layer=?", (layer,))


def _metadata_value(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


class GraphPlugin:
    """The GraphDriver endpoints of one store (root and driver)."""

    def __init__(
        self,
        root: Path,
        driver: str | None,
        options: Mapping[str, str],
        wait: float | None = None,
    ) -> None:
        self._owner = serving.StoreThread(
            "layers", lambda: open_store(root, driver, options, wait=wait)
        )
        self.store: LayerStore = self._owner.store
        try:
            where = root / "docker" / f"graph-{self.store.name}.db"
            self._gets: _Gets = self._owner.call(_Gets, where, self.store)
        except BaseException:
            self._owner.close()
            raise
        #: how an ApplyDiff opens a store of its own (the same root, driver and options)
        self._open: Callable[[], LayerStore] = lambda: open_store(
            root, self.store.name, options, wait=wait
        )

    def close(self) -> None:
        """Let the call under way finish, then close the store (mounts stay)."""
        try:
            self._owner.call(self._gets.db.close)
        finally:
            self._owner.close()

    def _call(self, doing: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store thread; an OSError becomes a one-line store error."""
        try:
            return self._owner.call(fn, *args)
        except OSError as exc:
            raise from_oserror(exc, doing) from exc

    def plugin(self) -> Plugin:
        json_calls: dict[str, Callable[[dict[str, Any]], Response]] = {
            "Init": self.init,
            "Create": lambda args: self.create(args, rw=False),
            "CreateReadWrite": lambda args: self.create(args, rw=True),
            "Remove": self.remove,
            "Get": self.get,
            "Put": self.put,
            "Exists": self.exists,
            "Status": self.status,
            "GetMetadata": self.get_metadata,
            "Cleanup": self.cleanup,
            "Diff": self.diff,
            "Changes": self.changes,
            "DiffSize": self.diff_size,
            "Capabilities": self.capabilities,
        }

        def json_endpoint(
            fn: Callable[[dict[str, Any]], Response],
        ) -> Callable[[Request], Response]:
            return lambda request: fn(request.json())

        endpoints: dict[str, Callable[[Request], Response]] = {
            f"/{KIND}.{name}": json_endpoint(fn) for name, fn in json_calls.items()
        }
        endpoints[f"/{KIND}.ApplyDiff"] = self.apply_diff
        return Plugin(KIND, endpoints)

    # ------------------------------------------------------------------------------ helpers

    @staticmethod
    def _id(args: Mapping[str, Any], key: str = "ID") -> str:
        return validate_id(field_str(args, key))

    @staticmethod
    def _parent(args: Mapping[str, Any], key: str = "Parent") -> str | None:
        parent = field_str(args, key, required=False)
        return validate_id(parent, "parent id") if parent else None

    # ------------------------------------------------------------------------------ endpoints

    def init(self, args: dict[str, Any]) -> Response:
        opts = args.get("Opts") or []
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise BadRequest("Opts must be a list of strings")
        if opts:
            raise InvalidOption(
                f"dockerd's --storage-opt ({', '.join(opts)}) is not taken by this plugin: give "
                f"driver options to `graphdriver --opt KEY=VALUE serve`"
            )
        if args.get("UIDMaps") or args.get("GIDMaps"):
            raise InvalidOption(
                "this plugin does not support user namespace remapping (--userns-remap)"
            )
        home = args.get("Home")
        log.info("Init from dockerd (Home %s); the layers are kept in %s", home, self.store.home)
        return {}

    def create(self, args: dict[str, Any], *, rw: bool) -> Response:
        layer_id, parent = self._id(args), self._parent(args)
        size: int | None = None
        for key, value in field_map(args, "StorageOpt").items():
            if key.lower() == "size":
                size = parse_size(value)
            else:
                raise InvalidOption(
                    f"unknown storage option {key!r} for layer {layer_id[:12]}: use size="
                )
        label = field_str(args, "MountLabel", required=False) or None
        opts = CreateOpts(size=size, mount_label=label)
        fn = self.store.create_rw if rw else self.store.create
        self._call(f"create layer {layer_id}", fn, layer_id, parent, opts)
        return {}

    def remove(self, args: dict[str, Any]) -> Response:
        """dockerd removes a layer once it is done with it: mounts of its own still counted
        are those of a dockerd that died before it put them back (it never does, for the
        containers it finds dead as it starts again), released first, as moby's drivers
        remove a mounted layer. A mount someone else holds (``graphdriver mount``) still
        refuses the removal."""
        layer_id = self._id(args)

        def remove() -> None:
            left = min(self._gets.count(layer_id), self._gets.mounted(layer_id))
            if left:
                log.warning(
                    "layer %s: releasing %d mount(s) dockerd never put back (it stopped "
                    "before it did)",
                    layer_id[:12],
                    left,
                )
            for _ in range(left):
                self.store.put(layer_id)
                self._gets.add(layer_id, -1)  # (a removal refused after: none released twice)
            # as with dockerd's own drivers, a layer already gone is removed
            with contextlib.suppress(LayerNotFound):
                self.store.remove(layer_id)
            self._gets.forget(layer_id)

        self._call(f"remove layer {layer_id}", remove)
        return {}

    def get(self, args: dict[str, Any]) -> Response:
        layer_id = self._id(args)

        def get() -> Path:
            path = self.store.get(layer_id)
            try:
                self._gets.add(layer_id, 1)
            except BaseException:
                self.store.put(layer_id)
                raise
            return path

        return {"Dir": str(self._call(f"mount layer {layer_id}", get))}

    def put(self, args: dict[str, Any]) -> Response:
        layer_id = self._id(args)

        def put() -> None:
            self.store.put(layer_id)
            self._gets.add(layer_id, -1)

        self._call(f"unmount layer {layer_id}", put)
        return {}

    def exists(self, args: dict[str, Any]) -> Response:
        layer_id = field_str(args, "ID")
        return {"Exists": self._call(f"look up layer {layer_id}", self.store.exists, layer_id)}

    def status(self, args: dict[str, Any]) -> Response:
        pairs = self._call("status of the store", self.store.status)
        return {"Status": [[k, v] for k, v in pairs]}

    def get_metadata(self, args: dict[str, Any]) -> Response:
        layer_id = self._id(args)
        meta = self._call(f"metadata of layer {layer_id}", self.store.metadata, layer_id)
        return {"Metadata": {k: _metadata_value(v) for k, v in meta.items() if v is not None}}

    def cleanup(self, args: dict[str, Any]) -> Response:
        """dockerd's shutdown: nothing to unmount. It has put back what its stopped containers
        got; what it keeps (live-restore) must stay mounted, and what others mounted is not
        dockerd's (the store's ``cleanup`` unmounted both: a restored container's next Get
        then made a second overlay on the same upper directory, and a ``graphdriver mount``
        lost its mount under its user). moby's overlay2 and vfs unmount no layer either."""
        log.info("Cleanup from dockerd: the layers' mounts stay")
        return {}

    def diff(self, args: dict[str, Any]) -> Response:
        layer_id, parent = self._id(args), self._parent(args)
        stream = self._call(f"diff of layer {layer_id}", self.store.diff, layer_id, parent)

        def chunks() -> Iterator[bytes]:
            try:
                while data := stream.read(CHUNK):
                    yield data
            finally:
                stream.close()

        return RawResponse(chunks())

    def changes(self, args: dict[str, Any]) -> Response:
        layer_id, parent = self._id(args), self._parent(args)
        found = self._call(f"changes of layer {layer_id}", self.store.changes, layer_id, parent)
        return {"Changes": [{"Path": c.path, "Kind": int(c.kind)} for c in found]}

    def diff_size(self, args: dict[str, Any]) -> Response:
        layer_id, parent = self._id(args), self._parent(args)
        # a symlink counts its target, as in moby's ChangesSize and overlay2's DiffSize
        size = self._call(
            f"diff size of layer {layer_id}",
            lambda: self.store.diff_size(layer_id, parent, links=True),
        )
        return {"Size": size}

    def apply_diff(self, request: Request) -> Response:
        """On a store of its own, opened in this connection's thread: the body comes as fast
        as dockerd sends it, and a slow or stalled upload holds up no other call (on the
        store thread, one held up every call, Get and Exists included, until it ended)."""
        layer_id = self._id(request.query, "id")
        parent = self._parent(request.query, "parent")
        try:
            with contextlib.closing(self._open()) as store:
                recorded = store.metadata(layer_id)["parent"]
                if parent is not None and recorded != parent:
                    has = f"parent {recorded!r}" if recorded else "no parent"
                    raise InvalidOption(f"ApplyDiff: layer {layer_id!r} has {has}, not {parent!r}")
                stream = io.BufferedReader(_BodyReader(request.body), CHUNK)
                _refuse_compressed(stream)
                # dockerd hashed what it sends; the promise of ReproducesExactDiffs is that
                # Diff gives those bytes back: a tar it could not give back is refused, as
                # dockerd's own drivers (their tar-split) refuse it
                return {"Size": store.apply(layer_id, stream, exact=True).size}
        except OSError as exc:
            raise from_oserror(exc, f"apply a diff to layer {layer_id}") from exc

    def capabilities(self, args: dict[str, Any]) -> Response:
        return {"Capabilities": {"ReproducesExactDiffs": self.store.reproduces_exact_diffs}}
