"""Docker's VolumeDriver plugin over the core's VolumeStore.

Docker keeps its own list of volumes and their users; the plugin keeps the data, the options
and a mount count per mount ID (dockerd sends a fresh ID for each container's mount point and
the same one to unmount it). The counts live in the store's SQLite catalogue, so a plugin
restarted (or killed) while containers run keeps them, and ``Remove`` of a volume some mount
ID still holds is refused. The store's volume driver is chosen by the option
``volume-driver`` (``local`` by default); the other options are that driver's own
(``type``, ``device``, ``o`` for ``local``).

The store's SQLite connection belongs to the thread that opened it: every call runs on one
store thread, in order, whatever connection it came on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from graphdriver import GraphDriverError, InUse, InvalidOption, serving
from graphdriver.errors import from_oserror
from graphdriver.volumes import DEFAULT_VOLUME_DRIVER, VolumeStore

from .http import Plugin, Request, Response, field_map, field_str

T = TypeVar("T")
#: an endpoint that takes the request's JSON object
JsonCall = Callable[[dict[str, Any]], Response]

KIND = "VolumeDriver"
#: the Create option that picks the store's volume driver (not passed on to it)
DRIVER_OPTION = "volume-driver"
#: how a Docker mount ID is recorded as a user of a volume (``<engine>:<id>``, as the store's
#: references are ``<driver>:<container>``)
MOUNT_PREFIX = "docker:"


class VolumePlugin:
    """The VolumeDriver endpoints of one root's VolumeStore."""

    def __init__(self, root: Path) -> None:
        self._owner = serving.StoreThread("volumes", lambda: VolumeStore(root))
        self.store: VolumeStore = self._owner.store

    def close(self) -> None:
        """Let the call under way finish, then close the store."""
        self._owner.close()

    def _call(self, doing: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store thread; an OSError becomes a one-line store error."""
        try:
            return self._owner.call(fn, *args)
        except OSError as exc:
            raise from_oserror(exc, doing) from exc

    def plugin(self) -> Plugin:
        endpoints: dict[str, JsonCall] = {
            "Create": self.create,
            "Remove": self.remove,
            "Mount": self.mount,
            "Unmount": self.unmount,
            "Path": self.path,
            "Get": self.get,
            "List": self.list,
            "Capabilities": self.capabilities,
        }

        def json_endpoint(
            fn: Callable[[dict[str, Any]], Response],
        ) -> Callable[[Request], Response]:
            return lambda request: fn(request.json())

        return Plugin(
            KIND, {f"/{KIND}.{name}": json_endpoint(fn) for name, fn in endpoints.items()}
        )

    # ------------------------------------------------------------------------------ endpoints

    def create(self, args: dict[str, Any]) -> Response:
        name = field_str(args, "Name")
        options = field_map(args, "Opts")
        driver = options.pop(DRIVER_OPTION, DEFAULT_VOLUME_DRIVER)
        if not driver:
            raise InvalidOption(f"option {DRIVER_OPTION} is empty")
        self._call(
            f"create volume {name}",
            lambda: self.store.create(name, driver, options=options, anonymous=False),
        )
        return {}

    def remove(self, args: dict[str, Any]) -> Response:
        name = field_str(args, "Name")

        def remove() -> None:
            rec = self.store.get(name)
            held = [u for u in self.store.users(name) if u.startswith(MOUNT_PREFIX)]
            if rec.mount_count and held:  # else the store says who holds it
                ids = ", ".join(u.removeprefix(MOUNT_PREFIX)[:12] for u in held)
                raise InUse(
                    f"volume {name!r} is mounted ({rec.mount_count} mount(s), dockerd mount "
                    f"ID(s) {ids}); it can be removed once they are unmounted"
                )
            self.store.remove(name)

        self._call(f"remove volume {name}", remove)
        return {}

    def mount(self, args: dict[str, Any]) -> Response:
        name, mount_id = field_str(args, "Name"), field_str(args, "ID")
        path = self._call(f"mount volume {name}", self.store.mount, name, MOUNT_PREFIX + mount_id)
        return {"Mountpoint": str(path)}

    def unmount(self, args: dict[str, Any]) -> Response:
        name, mount_id = field_str(args, "Name"), field_str(args, "ID")

        def unmount() -> None:
            self.store.get(name)  # an unknown volume is an error; an unknown ID is not
            self.store.unmount(name, MOUNT_PREFIX + mount_id)
            # the ID is the mount point's own: once unmounted it is not a user any more
            self.store.drop_refs(MOUNT_PREFIX + mount_id)

        self._call(f"unmount volume {name}", unmount)
        return {}

    def path(self, args: dict[str, Any]) -> Response:
        name = field_str(args, "Name")
        return {"Mountpoint": self._call(f"path of volume {name}", self._mountpoint, name)}

    def _mountpoint(self, name: str) -> str:
        rec = self.store.get(name)
        if rec.mount_count and rec.mountpoint:
            return rec.mountpoint
        return str(self.store.driver(rec.driver).path(rec.name, rec.options))

    def _volume(self, name: str) -> dict[str, Any]:
        info = self.store.inspect(name)
        status = {
            "Driver": info["Driver"],
            "Options": info["Options"],
            "MountCount": info["MountCount"],
            **info["Status"],
        }
        return {
            "Name": name,
            "Mountpoint": self._mountpoint(name),
            "CreatedAt": info["CreatedAt"],
            "Status": status,
        }

    def get(self, args: dict[str, Any]) -> Response:
        name = field_str(args, "Name")
        return {"Volume": self._call(f"get volume {name}", self._volume, name)}

    def list(self, args: dict[str, Any]) -> Response:
        def every() -> list[dict[str, Any]]:
            found = []
            for rec in self.store.all():
                try:
                    found.append({"Name": rec.name, "Mountpoint": self._mountpoint(rec.name)})
                except GraphDriverError:  # removed meanwhile, or its driver is gone
                    found.append({"Name": rec.name, "Mountpoint": ""})
            return found

        return {"Volumes": self._call("list volumes", every)}

    def capabilities(self, args: dict[str, Any]) -> Response:
        # local: the data is on this machine, dockerd may not share it with other nodes
        return {"Capabilities": {"Scope": "local"}}
