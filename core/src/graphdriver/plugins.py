"""Loading drivers (stevedore, one by name) and hook plugins (pluggy, all of them)."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
import pluggy

from . import hookspecs
from .errors import DriverLoadError, DriverNotFound, DriverUnavailable, GraphDriverError

if TYPE_CHECKING:
    from .archive import Change
    from .driver import Driver
    from .metadata import LayerRecord
    from .store import LayerStore

log = logging.getLogger(__name__)

DRIVER_GROUP = "graphdriver.drivers"
HOOK_GROUP = "graphdriver"
#: Docker's order: the first driver that works on the host is the default
PRIORITY = ("overlay", "btrfs", "devmapper", "vfs")


def installed_drivers() -> dict[str, str]:
    """Installed driver names -> "module:Class", read from package metadata without importing."""
    return dict(sorted(entry_point_names(DRIVER_GROUP).items(), key=lambda kv: _priority(kv[0])))


def _priority(name: str) -> tuple[int, str]:
    return (PRIORITY.index(name) if name in PRIORITY else len(PRIORITY), name)


def load_driver(name: str) -> type[Driver]:
    """Import the driver class registered as *name* (and nothing else)."""
    return cast("type[Driver]", load_plugin(DRIVER_GROUP, name, installed_drivers(), "storage"))


def entry_point_names(group: str) -> dict[str, str]:
    """Names registered in an entry point *group* -> "module:Class", without importing."""
    found: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=group):
        found.setdefault(ep.name, ep.value)
    return found


def load_plugin(group: str, name: str, known: Mapping[str, str], kind: str) -> object:
    """What the entry point *name* of *group* names, loaded with stevedore (the way every
    driver, storage or volume, is loaded); *known* are the installed names, for the error."""
    from stevedore import DriverManager  # imported late: it is slow and only needed here

    if name not in known:
        listing = ", ".join(known) or "none"
        raise DriverNotFound(f"no {kind} driver named {name!r} is installed (installed: {listing})")

    def failed(_manager: object, entrypoint: object, exc: BaseException) -> None:
        raise DriverLoadError(
            f"{kind} driver {name!r} ({known[name]}) failed to load: {exc}"
        ) from exc

    try:
        manager: Any = DriverManager(
            group, name, invoke_on_load=False, on_load_failure_callback=failed
        )
    except GraphDriverError:
        raise
    except Exception as exc:  # stevedore's own errors (conflicts, missing entry points)
        raise DriverLoadError(f"{kind} driver {name!r} cannot be loaded: {exc}") from exc
    return manager.driver


@dataclass(frozen=True)
class DriverReport:
    """One row of ``graphdriver drivers``."""

    name: str
    target: str
    works: bool
    reason: str


def probe_drivers(root: Path, options: Mapping[str, str] | None = None) -> list[DriverReport]:
    """Every installed driver with whether it works for *root* on this host, and why not."""
    out = []
    for name, target in installed_drivers().items():
        try:
            cls = load_driver(name)
            cls.probe(root / name, options or {})
        except GraphDriverError as exc:
            out.append(DriverReport(name, target, False, str(exc)))
        else:
            out.append(DriverReport(name, target, True, ""))
    return out


class Hooks:
    """A typed facade over the plugin manager, so that mypy checks every hook call."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    @property
    def _hook(self) -> Any:
        return self.pm.hook

    def default_driver(self, root: Path, available: Sequence[str]) -> str | None:
        return cast(
            "str | None",
            self._hook.graphdriver_default_driver(root=root, available=list(available)),
        )

    def layer_created(self, store: LayerStore, layer: LayerRecord) -> None:
        self._hook.graphdriver_layer_created(store=store, layer=layer)

    def layer_applied(self, store: LayerStore, layer: LayerRecord, size: int, diff_id: str) -> None:
        self._hook.graphdriver_layer_applied(store=store, layer=layer, size=size, diff_id=diff_id)

    def layer_removed(self, store: LayerStore, layer_id: str) -> None:
        self._hook.graphdriver_layer_removed(store=store, layer_id=layer_id)

    def mount(self, store: LayerStore, layer: LayerRecord, chain: Sequence[LayerRecord]) -> Path:
        return cast(
            "Path", self._hook.graphdriver_mount(store=store, layer=layer, chain=list(chain))
        )

    @property
    def filters_diff(self) -> bool:
        return bool(self._hook.graphdriver_diff_filter.get_hookimpls())

    def keep_change(self, layer_id: str, change: Change) -> bool:
        results = self._hook.graphdriver_diff_filter(layer_id=layer_id, change=change)
        return all(r is not False for r in results)

    def cli(self, group: click.Group) -> None:
        self._hook.graphdriver_cli(group=group)

    def status(self, store: LayerStore) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for lines in self._hook.graphdriver_status(store=store):
            out.extend(lines or ())
        return out

    def driver_options(self, driver: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for extra in self._hook.graphdriver_driver_options(driver=driver):
            if extra:
                out.update(extra)
        return out


_HOOKS: Hooks | None = None


def hooks() -> Hooks:
    """The process-wide plugin manager with every ``graphdriver`` plugin loaded (once)."""
    global _HOOKS
    if _HOOKS is None:
        pm = pluggy.PluginManager(HOOK_GROUP)
        pm.add_hookspecs(hookspecs)
        pm.register(_CoreMount(), name="graphdriver.core")
        for ep in importlib.metadata.entry_points(group=HOOK_GROUP):
            if pm.get_plugin(ep.name) is None and _register(pm, ep):
                _guard(pm, ep.name)
        _HOOKS = Hooks(pm)
    return _HOOKS


def _register(pm: pluggy.PluginManager, ep: importlib.metadata.EntryPoint) -> bool:
    """Load and register one hook plugin; one that fails to (import error, a bad signature, a
    hook name that no spec has) is left out with one warning, so it breaks no command."""
    try:
        pm.register(ep.load(), name=ep.name)
        pm.check_pending()  # the plugins before this one passed: only its own hooks can fail
    except Exception as exc:
        if pm.get_plugin(ep.name) is not None:
            pm.unregister(name=ep.name)
        log.warning(
            "graphdriver plugin %s (%s) failed to load and is ignored: %s", ep.name, ep.value, exc
        )
        return False
    return True


def _guard(pm: pluggy.PluginManager, name: str) -> None:
    """Make every hook of the plugin registered as *name* unregister it, with one warning line,
    when it raises anything but a GraphDriverError; the hook call then goes on without it."""
    plugin = pm.get_plugin(name)
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                # pluggy calls impl.function with the argnames it read at register time, so
                # a guard that takes *args fits in its place; pluggy types it Final
                impl.function = _guarded(pm, name, caller.name, impl)  # type: ignore[misc]


def _guarded(
    pm: pluggy.PluginManager, name: str, hook: str, impl: pluggy.HookImpl
) -> Callable[..., Any]:
    """*impl*'s function, guarded: a failure counts as "no answer" (None), and a wrapper that
    fails passes the wrapped call's result through."""
    function: Callable[..., Any] = impl.function

    def failed(exc: Exception) -> None:
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
            log.warning(
                "graphdriver plugin %s failed in %s and is unregistered: %s: %s",
                name,
                hook,
                type(exc).__name__,
                exc,
            )

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except GraphDriverError:  # a deliberate refusal of the operation
            raise
        except Exception as exc:
            failed(exc)
            return None

    def wrap(*args: Any, **kwargs: Any) -> Generator[None, Any, Any]:
        try:
            gen: Generator[None, Any, Any] = function(*args, **kwargs)
            next(gen)
        except GraphDriverError:
            raise
        except Exception as exc:  # StopIteration too: a wrapper that never yields
            failed(exc)
            return (yield)
        try:
            inner = yield
        except BaseException as raised:  # the wrapped call failed: the plugin sees it first
            try:
                gen.throw(raised)
            except StopIteration as stop:
                return stop.value
            raise raised from None  # yielded again; the call's own error stands
        try:
            gen.send(inner)
        except StopIteration as stop:
            return stop.value if impl.wrapper else None
        except GraphDriverError:
            raise
        except Exception as exc:
            failed(exc)
            return inner
        gen.close()
        failed(RuntimeError("the wrapper yielded twice"))
        return inner

    return wrap if impl.wrapper or impl.hookwrapper else call


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


class _CoreMount:
    """The innermost ``graphdriver_mount``: the driver's own mount. Plugins wrap around it."""

    @hookspecs.hookimpl(trylast=True)
    def graphdriver_mount(
        self, store: LayerStore, layer: LayerRecord, chain: Sequence[LayerRecord]
    ) -> Path:
        return store._driver_mount(layer, chain)
