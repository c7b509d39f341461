"""The pluggy side of :mod:`.plugins`: the plugin manager with every hook plugin loaded, each
hook guarded so that a plugin's bug unregisters it instead of failing the command. Imported only
when a hook plugin is installed (pluggy costs a CLI call a few milliseconds)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import GraphDriverError
from .plugins import DRIVER_MOUNT

if TYPE_CHECKING:
    from .metadata import LayerRecord

log = logging.getLogger("graphdriver.plugins")


def plugin_manager(project: str, plugins: Mapping[str, tuple[str, object]]) -> pluggy.PluginManager:
    """A manager with the hook specs, the core's own mount and *plugins* (name -> entry point
    value and the loaded plugin) registered, each guarded."""
    pm = pluggy.PluginManager(project)
    pm.add_hookspecs(hookspecs)
    pm.register(_CoreMount(), name="graphdriver.core")
    for name, (value, plugin) in plugins.items():
        if pm.get_plugin(name) is None and _register(pm, name, value, plugin):
            _guard(pm, name)
    return pm


def _register(pm: pluggy.PluginManager, name: str, value: str, plugin: object) -> bool:
    """Load and register one hook plugin; one that fails to (import error, a bad signature, a
    hook name that no spec has) is left out with one warning, so it breaks no command."""
    try:
        pm.register(plugin, name=name)
        pm.check_pending()  # the plugins before this one passed: only its own hooks can fail
    except Exception as exc:
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        log.warning(
            "graphdriver plugin %s (%s) failed to load and is ignored: %s", name, value, exc
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


class _CoreMount:
    """The innermost ``graphdriver_mount``: the driver's own mount, which the store passes to
    :meth:`.plugins.Hooks.mount`. Plugins wrap around it."""

    @hookspecs.hookimpl(trylast=True)
    def graphdriver_mount(
        self, store: object, layer: LayerRecord, chain: Sequence[LayerRecord]
    ) -> Path:
        return DRIVER_MOUNT.get()(layer, chain)
