"""The hook contract: what a ``graphdriver`` plugin may implement.

Plugins register under the entry point group ``graphdriver`` and implement any of these
functions, marked with :data:`hookimpl`. Hooks are called by the core; none of them may be called
by a driver. A hook that raises a :class:`~graphdriver.GraphDriverError` refuses the operation it
was called for, with that error. Any other exception is a bug in the plugin: the plugin is
unregistered for the rest of the process with one warning naming it and the error, and the
operation goes on as if the hook had returned None (a failing wrapper passes the result through).
A plugin that fails to load, or implements a hook that is not specified here, is left out with one
warning. No plugin can make every command fail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

from .plugins import hookimpl as hookimpl  # where plugins found it before

if TYPE_CHECKING:
    import click

    from .archive import Change
    from .metadata import LayerRecord
    from .store import LayerStore

PROJECT = "graphdriver"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec(firstresult=True)
def graphdriver_default_driver(root: Path, available: Sequence[str]) -> str | None:
    """Choose the driver for a root that has no driver state yet.

    Called by :func:`graphdriver.open_store` when no ``driver`` was given and no driver has state
    under *root*. *available* lists the installed drivers that work on this host, in the built-in
    priority order. Return a name to use it, or None to let the next plugin (or the built-in
    order) decide. The first non-None result wins.
    """


@hookspec
def graphdriver_layer_created(store: LayerStore, layer: LayerRecord) -> None:
    """Called after a layer was created and committed to the metadata (state ``ready``)."""


@hookspec
def graphdriver_layer_applied(
    store: LayerStore, layer: LayerRecord, size: int, diff_id: str
) -> None:
    """Called after ``apply_diff`` unpacked a tar into *layer* and committed it."""


@hookspec
def graphdriver_layer_removed(store: LayerStore, layer_id: str) -> None:
    """Called after a layer was deleted from the driver and the metadata."""


@hookspec
def graphdriver_releasing(store: LayerStore, what: str, layer_id: str | None) -> None:
    """Called before the store lets go of what another program may be using; raise
    :class:`~graphdriver.LayerInUse` (one line: whose it is, how to release it there) to
    refuse. *what* is ``"remove"`` (layer *layer_id* and its files, after the core's own
    checks), ``"unmount"`` (the last reference of *layer_id*, but a container's own unmount)
    or ``"cleanup"`` (every mount of the store; *layer_id* None). A server that keeps layers
    for an engine refuses what it did not ask for itself (the containerd proxy: the layer of a
    snapshot, its held mount, a cleanup while it serves)."""


@hookspec(firstresult=True)
def graphdriver_mount(
    store: LayerStore, layer: LayerRecord, chain: Sequence[LayerRecord]
) -> Path | None:
    """Mount *layer* (first reference only) and return the merged root.

    The core implements this hook itself (it calls the driver). A plugin wraps it with
    ``@hookimpl(wrapper=True)`` to act around every mount, for example to set up an SELinux
    label or to audit: code before ``yield`` runs before the mount, the yield returns the path.
    """


@hookspec
def graphdriver_diff_filter(layer_id: str, change: Change) -> bool | None:
    """Return False to leave *change* out of the diff, ``changes`` and ``diff_size`` of a layer.

    Called once per entry, only when some plugin implements it. Any False drops the entry.
    """


@hookspec
def graphdriver_cli(group: click.Group) -> None:
    """Add commands (or options to existing commands) to the ``graphdriver`` CLI group."""


@hookspec
def graphdriver_driver_options(driver: str) -> Mapping[str, str] | None:
    """Extra ``--opt`` keys (key -> description) that a plugin understands for *driver*.

    Keys returned here are accepted by the option check and passed to the driver unchanged.
    """


@hookspec
def graphdriver_status(store: LayerStore) -> Sequence[tuple[str, str]] | None:
    """Extra (key, value) lines for ``graphdriver status``: what a plugin keeps about the
    store (the containerd proxy: its snapshots and whether it runs)."""
