"""Finding and loading plugins: drivers (one by name, from its entry point) and hook plugins.

Entry points are read from the ``entry_points.txt`` of the distributions on ``sys.path`` (a
directory listing and a few small reads, once per process), not through
:mod:`importlib.metadata`, which costs a CLI call more than the call itself. pluggy is imported
only when a hook plugin is installed (or a caller asks for :attr:`Hooks.pm`); with none, the hook
calls are the core's own defaults.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from .errors import DriverLoadError, DriverNotFound, DriverUnavailable, GraphDriverError

if TYPE_CHECKING:
    from pathlib import Path

    import click
    import pluggy

    from .archive.changes import Change
    from .driver import Driver
    from .metadata import LayerRecord
    from .store import LayerStore

log = logging.getLogger(__name__)

DRIVER_GROUP = "graphdriver.drivers"
HOOK_GROUP = "graphdriver"
#: Docker's order: the first driver that works on the host is the default
PRIORITY = ("overlay", "btrfs", "devmapper", "vfs")

#: group -> name -> "module:attr", for every distribution on sys.path (read once)
_ENTRY_POINTS: dict[str, dict[str, str]] | None = None
#: (group, name) -> "dist (module:attr)" of every distribution that registers it, where
#: more than one does (loading such a driver is an error, as it was with stevedore)
_CONFLICTS: dict[tuple[str, str], list[str]] = {}
_SECTION = re.compile(r"^\[\s*([^\]]+?)\s*\]$")


def _read_entry_points() -> dict[str, dict[str, str]]:
    """Every entry point of every distribution on ``sys.path``; like importlib.metadata, the
    first distribution of a name on the path wins and the first entry point of a name too.
    A name that two distributions register is noted in :data:`_CONFLICTS`."""
    found: dict[str, dict[str, str]] = {}
    owners: dict[tuple[str, str], list[str]] = {}
    seen: set[str] = set()
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            if not dot or suffix not in ("dist-info", "egg-info"):
                continue
            dist = stem.split("-", 1)[0].lower().replace("-", "_").replace(".", "_")
            if dist in seen:
                continue
            seen.add(dist)
            try:
                fd = os.open(os.path.join(entry or ".", name, "entry_points.txt"), os.O_RDONLY)
            except OSError:
                continue
            try:
                text = os.read(fd, 1 << 20).decode("utf-8", "replace")
            finally:
                os.close(fd)
            _parse(text, found, owners, stem)
    _CONFLICTS.clear()
    _CONFLICTS.update((key, dists) for key, dists in owners.items() if len(dists) > 1)
    return found


def _parse(
    text: str, found: dict[str, dict[str, str]], owners: dict[tuple[str, str], list[str]], dist: str
) -> None:
    group: dict[str, str] | None = None
    name = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        section = _SECTION.match(line)
        if section:
            name = section.group(1)
            group = found.setdefault(name, {})
        elif group is not None and "=" in line:
            key, _, value = (part.strip() for part in line.partition("="))
            group.setdefault(key, value)
            dists = owners.setdefault((name, key), [])
            if not dists or not dists[-1].startswith(f"{dist} "):
                dists.append(f"{dist} ({value})")


def entry_point_names(group: str) -> dict[str, str]:
    """Names registered in an entry point *group* -> "module:attr", without importing."""
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        _ENTRY_POINTS = _read_entry_points()
    return dict(_ENTRY_POINTS.get(group, {}))


def forget_entry_points() -> None:
    """Read the entry points again on next use (after installing a package in this process)."""
    global _ENTRY_POINTS
    _ENTRY_POINTS = None


def load_entry_point(value: str) -> object:
    """What an entry point value ("module:attr.attr [extras]") names, imported."""
    module, _, attrs = value.partition("[")[0].strip().partition(":")
    obj: object = importlib.import_module(module.strip())
    for attr in filter(None, attrs.strip().split(".")):
        obj = getattr(obj, attr)
    return obj


def installed_drivers() -> dict[str, str]:
    """Installed driver names -> "module:Class", read from package metadata without importing."""
    return dict(sorted(entry_point_names(DRIVER_GROUP).items(), key=lambda kv: _priority(kv[0])))


def _priority(name: str) -> tuple[int, str]:
    return (PRIORITY.index(name) if name in PRIORITY else len(PRIORITY), name)


def load_driver(name: str) -> type[Driver]:
    """Import the driver class registered as *name* (and nothing else); a class whose ``name``
    is not its entry point's (its store would live under the wrong directory) is refused."""
    known = installed_drivers()
    cls = cast("type[Driver]", load_plugin(DRIVER_GROUP, name, known, "storage"))
    own = getattr(cls, "name", None)
    if own != name:
        said = f"names itself {own!r}" if isinstance(own, str) else "sets no name"
        raise DriverLoadError(
            f"storage driver {name!r} ({known[name]}) {said}: a driver class's `name` must be "
            f"the name of its entry point in {DRIVER_GROUP}"
        )
    return cls


def load_plugin(group: str, name: str, known: Mapping[str, str], kind: str) -> object:
    """What the entry point *name* of *group* names (the way every driver, storage or volume,
    is loaded); *known* are the installed names, for the error."""
    if name not in known:
        listing = ", ".join(known) or "none"
        raise DriverNotFound(f"no {kind} driver named {name!r} is installed (installed: {listing})")
    entry_point_names(group)  # the conflicts are noted as the entry points are read
    if (group, name) in _CONFLICTS:
        raise DriverLoadError(
            f"{kind} driver {name!r} is installed by several distributions: "
            f"{', '.join(_CONFLICTS[group, name])}; uninstall all but one"
        )
    try:
        return load_entry_point(known[name])
    except GraphDriverError:
        raise
    except Exception as exc:  # an ImportError, a missing attribute, an error in the module
        raise DriverLoadError(
            f"{kind} driver {name!r} ({known[name]}) failed to load: {exc}"
        ) from exc


@dataclass(frozen=True)
class DriverReport:
    """One row of ``graphdriver drivers``."""

    name: str
    target: str
    works: bool
    reason: str


def probe_drivers(root: Path, options: Mapping[str, str] | None = None) -> list[DriverReport]:
    """Every installed driver with whether it works for *root* on this host, and why not;
    each is probed with the *options* it declares (``overlay.mountopt`` goes to overlay)."""
    out = []
    for name, target in installed_drivers().items():
        try:
            cls = load_driver(name)
            cls.probe(root / name, {k: v for k, v in (options or {}).items() if k in cls.options})
        except GraphDriverError as exc:
            out.append(DriverReport(name, target, False, str(exc)))
        except Exception as exc:
            # a driver's bug breaks no command: it is unavailable, the others go on (as a hook
            # plugin that fails to load is left out)
            reason = f"its probe failed: {type(exc).__name__}: {exc}"
            log.warning("storage driver %s (%s) is left out: %s", name, target, reason)
            out.append(DriverReport(name, target, False, reason))
        else:
            out.append(DriverReport(name, target, True, ""))
    return out


#: the driver's own mount, for the innermost graphdriver_mount of the call under way
DRIVER_MOUNT: contextvars.ContextVar[Callable[[LayerRecord, Sequence[LayerRecord]], Path]] = (
    contextvars.ContextVar("graphdriver_driver_mount")
)

#: the hooks of hookspecs.py (a test checks the two agree)
HOOK_NAMES = frozenset(
    {
        "graphdriver_default_driver",
        "graphdriver_layer_created",
        "graphdriver_layer_applied",
        "graphdriver_layer_removed",
        "graphdriver_releasing",
        "graphdriver_mount",
        "graphdriver_diff_filter",
        "graphdriver_cli",
        "graphdriver_driver_options",
        "graphdriver_status",
    }
)
#: the attribute a hook implementation carries: pluggy's ``<project>_impl``, its options
IMPL_MARK = f"{HOOK_GROUP}_impl"
_F = TypeVar("_F", bound=Callable[..., Any])


@overload
def hookimpl(function: _F, /) -> _F: ...
@overload
def hookimpl(
    *,
    wrapper: bool = False,
    hookwrapper: bool = False,
    optionalhook: bool = False,
    tryfirst: bool = False,
    trylast: bool = False,
    specname: str | None = None,
) -> Callable[[_F], _F]: ...
def hookimpl(
    function: _F | None = None,
    /,
    *,
    wrapper: bool = False,
    hookwrapper: bool = False,
    optionalhook: bool = False,
    tryfirst: bool = False,
    trylast: bool = False,
    specname: str | None = None,
) -> _F | Callable[[_F], _F]:
    """Marks a hook implementation, as pluggy's ``HookimplMarker("graphdriver")`` does (the
    same options, the same mark), without importing pluggy: a plugin module costs a command
    nothing until one of its hooks is called."""
    opts = {
        "wrapper": wrapper,
        "hookwrapper": hookwrapper,
        "optionalhook": optionalhook,
        "tryfirst": tryfirst,
        "trylast": trylast,
        "specname": specname,
    }

    def mark(func: _F) -> _F:
        setattr(func, IMPL_MARK, opts)
        return func

    return mark if function is None else mark(function)


def _implemented(plugin: object) -> set[str]:
    """The hook names *plugin* marks implementations of."""
    return {
        name
        for name in dir(plugin)
        if name.startswith(f"{HOOK_GROUP}_") and hasattr(getattr(plugin, name, None), IMPL_MARK)
    }


class Hooks:
    """A typed facade over the hook plugins, so that mypy checks every hook call. The plugin
    manager (pluggy) is made only when a hook that some plugin implements is called; any other
    call is what it is with no plugin."""

    def __init__(
        self,
        plugins: Mapping[str, tuple[str, object]] | None = None,
        pm: pluggy.PluginManager | None = None,
    ) -> None:
        #: name -> (entry point value, the loaded plugin)
        self._plugins = dict(plugins or {})
        self._implemented = set().union(*(_implemented(p) for _v, p in self._plugins.values()))
        self._pm = pm
        if self._implemented - HOOK_NAMES:
            self._manager()  # pluggy names the plugin with a hook no spec has, and drops it

    @property
    def implemented(self) -> frozenset[str]:
        """The hooks some plugin implements."""
        return frozenset(self._implemented)

    @property
    def pm(self) -> pluggy.PluginManager:
        """The pluggy manager (made on first use: registering a plugin at run time needs it)."""
        return self._manager()

    def _manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            from .plugin_manager import plugin_manager

            self._pm = plugin_manager(HOOK_GROUP, self._plugins)
        return self._pm

    def _hook(self, name: str) -> Any:
        """pluggy's caller of hook *name*, or None when no plugin implements it."""
        if self._pm is None and name not in self._implemented:
            return None
        return getattr(self._manager().hook, name)

    def default_driver(self, root: Path, available: Sequence[str]) -> str | None:
        hook = self._hook("graphdriver_default_driver")
        if hook is None:
            return None
        return cast("str | None", hook(root=root, available=list(available)))

    def layer_created(self, store: LayerStore, layer: LayerRecord) -> None:
        hook = self._hook("graphdriver_layer_created")
        if hook is not None:
            hook(store=store, layer=layer)

    def layer_applied(self, store: LayerStore, layer: LayerRecord, size: int, diff_id: str) -> None:
        hook = self._hook("graphdriver_layer_applied")
        if hook is not None:
            hook(store=store, layer=layer, size=size, diff_id=diff_id)

    def layer_removed(self, store: LayerStore, layer_id: str) -> None:
        hook = self._hook("graphdriver_layer_removed")
        if hook is not None:
            hook(store=store, layer_id=layer_id)

    def releasing(self, store: LayerStore, what: str, layer_id: str | None = None) -> None:
        hook = self._hook("graphdriver_releasing")
        if hook is not None:
            hook(store=store, what=what, layer_id=layer_id)

    def mount(
        self,
        store: LayerStore,
        layer: LayerRecord,
        chain: Sequence[LayerRecord],
        driver_mount: Callable[[LayerRecord, Sequence[LayerRecord]], Path],
    ) -> Path:
        """Mount *layer* with *driver_mount* (the store's own mount), wrapped by the plugins."""
        hook = self._hook("graphdriver_mount")
        if hook is None:
            return driver_mount(layer, chain)
        token = DRIVER_MOUNT.set(driver_mount)
        try:
            return cast("Path", hook(store=store, layer=layer, chain=list(chain)))
        finally:
            DRIVER_MOUNT.reset(token)

    @property
    def filters_diff(self) -> bool:
        hook = self._hook("graphdriver_diff_filter")
        return hook is not None and bool(hook.get_hookimpls())

    def keep_change(self, layer_id: str, change: Change) -> bool:
        hook = self._hook("graphdriver_diff_filter")
        if hook is None:
            return True
        return all(r is not False for r in hook(layer_id=layer_id, change=change))

    @property
    def extends_cli(self) -> bool:
        hook = self._hook("graphdriver_cli")
        return hook is not None and bool(hook.get_hookimpls())

    def cli(self, group: click.Group) -> None:
        hook = self._hook("graphdriver_cli")
        if hook is not None:
            hook(group=group)

    def status(self, store: LayerStore) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        hook = self._hook("graphdriver_status")
        for lines in hook(store=store) if hook is not None else ():
            out.extend(lines or ())
        return out

    def driver_options(self, driver: str) -> dict[str, str]:
        out: dict[str, str] = {}
        hook = self._hook("graphdriver_driver_options")
        for extra in hook(driver=driver) if hook is not None else ():
            if extra:
                out.update(extra)
        return out


_HOOKS: Hooks | None = None


def hooks() -> Hooks:
    """The process-wide hooks, with every ``graphdriver`` plugin loaded (once). A plugin that
    fails to import is left out with one warning, so it breaks no command."""
    global _HOOKS
    if _HOOKS is None:
        plugins: dict[str, tuple[str, object]] = {}
        for name, value in entry_point_names(HOOK_GROUP).items():
            try:
                plugins[name] = (value, load_entry_point(value))
            except Exception as exc:
                log.warning(
                    "graphdriver plugin %s (%s) failed to load and is ignored: %s", name, value, exc
                )
        _HOOKS = Hooks(plugins)
    return _HOOKS


def available_for(root: Path) -> list[str]:
    """Installed drivers that work for *root*, in priority order."""
    return [r.name for r in probe_drivers(root) if r.works]


def choose_driver(root: Path) -> str:
    """Docker's rule: the driver with state under *root*, else a plugin's choice, else the
    first that works here in the order overlay, btrfs, devmapper, vfs."""
    present = sorted(p.parent.name for p in root.glob("*/metadata.db")) if root.is_dir() else []
    if len(present) > 1:
        raise GraphDriverError(
            f"{root} holds state of several drivers ({', '.join(present)}); "
            f"choose one with --driver"
        )
    if present:
        return present[0]
    available = available_for(root)
    chosen = hooks().default_driver(root, available)
    if chosen:
        return chosen
    if not available:
        raise DriverUnavailable(
            f"no installed storage driver works for {root} on this host; see `graphdriver drivers`"
        )
    return available[0]
