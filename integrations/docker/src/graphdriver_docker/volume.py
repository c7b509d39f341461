"""Docker's VolumeDriver plugin over the core's VolumeStore.

Docker keeps its own list of volumes and their users; the plugin keeps the data, the options
and a mount count per mount ID (dockerd sends a fresh ID for each container's mount point and
the same one to unmount it). The counts live in the store's SQLite catalogue, so a plugin
restarted (or killed) while containers run keeps them. dockerd asks to ``Remove`` a volume
only once none of its containers uses it: mount IDs still counted then are a dead dockerd's,
released first. The store's volume driver is chosen by the option
``volume-driver`` (``local`` by default); the other options are that driver's own
(``type``, ``device``, ``o`` for ``local``).

The store's SQLite connection belongs to the thread that opened it: every call runs on one
store thread, in order, whatever connection it came on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from graphdriver import GraphDriverError, InvalidOption, serving
from graphdriver.errors import from_oserror
from graphdriver.volumes import DEFAULT_VOLUME_DRIVER, VolumeStore

from .http import Plugin, Request, Response, field_map, field_str

log = logging.getLogger("graphdriver.docker")

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
            self.store.get(name)
            # dockerd asks only once no container of its own uses the volume (its volume
            # service refuses "volume is in use" first): a mount ID still counted is one a
            # dockerd that died left, which never sends its Unmount (it does not for the
            # containers it finds dead as it starts again), so the volume could never go.
            # Docker's own local driver keeps its counts in memory: they die with dockerd
            for user in self.store.users(name):
                if user.startswith(MOUNT_PREFIX):
                    log.warning(
                        "volume %s: releasing dockerd mount ID %s, which was never unmounted "
                        "(dockerd stopped before it sent Unmount)",
                        name,
                        user.removeprefix(MOUNT_PREFIX)[:12],
                    )
                    self.store.unmount(name, user)
                    self.store.drop_refs(user)
            self.store.remove(name)  # graphdriver's own containers' uses still refuse it

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
