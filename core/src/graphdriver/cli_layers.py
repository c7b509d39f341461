"""The layer verbs of ``graphdriver``: create, rm, mount, umount, exists, ls, inspect, status,
changes, diff-size, cleanup, drivers. Each is a module-level click command that the root group
(:mod:`.cli`) imports when it runs; the store is opened by the first verb that needs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_common import Context, emit, emit_done, json_option, pairs, pass_ctx
from .errors import GraphDriverError

PARENT_HELP = "Compare with this layer instead of the layer's own parent."


@click.command()
@click.argument("layer_id")
@click.option("--parent", "-p", default=None, help="Layer to build on.")
@click.option("--rw", is_flag=True, help="Read-write (container) layer.")
@click.option(
    "--size", "-s", default=None, help="Size limit, like 10G (rw layers, drivers with quota)."
)
@click.option("--label", multiple=True, metavar="KEY=VALUE", help="Free-form label; repeat.")
@click.option("--mount-label", default=None, help="SELinux context for the layer's mounts.")
@click.option(
    "--volume",
    "volumes",
    multiple=True,
    metavar="PATH",
    help="Declare PATH a volume (Dockerfile VOLUME): containers on this layer get one there.",
)
@json_option
@pass_ctx
def create(
    ctx: Context,
    layer_id: str,
    parent: str | None,
    rw: bool,
    size: str | None,
    label: tuple[str, ...],
    mount_label: str | None,
    volumes: tuple[str, ...],
) -> None:
    """Create a layer (read-only image layer unless --rw); print its id."""
    from .driver import CreateOpts, parse_size

    opts = CreateOpts(size=parse_size(size) if size else None, mount_label=mount_label)
    labels = pairs(label, "--label")
    ctx.store().create(layer_id, parent, opts, rw=rw, labels=labels, volumes=volumes)
    emit(ctx, {"id": layer_id}, layer_id)


@click.command("rm")
@click.argument("layer_ids", nargs=-1, required=True)
@json_option
@pass_ctx
def rm(ctx: Context, layer_ids: tuple[str, ...]) -> None:
    """Remove layers (refused while mounted or with children); print each id (--json: the
    list of ids)."""
    ctx.free_room()
    for layer_id in layer_ids:
        ctx.store().remove(layer_id)
        emit_done(ctx, layer_id)
    emit(ctx, list(layer_ids))


@click.command()
@click.argument("layer_id")
@json_option
@pass_ctx
def mount(ctx: Context, layer_id: str) -> None:
    """Mount a layer and print the path of its root (counted; undo with umount)."""
    path = ctx.store().get(layer_id)
    emit(ctx, {"id": layer_id, "path": str(path)}, str(path))


@click.command()
@click.argument("layer_id")
@json_option
@pass_ctx
def umount(ctx: Context, layer_id: str) -> None:
    """Release one mount reference; the last one unmounts. Prints nothing (--json: the
    references left)."""
    ctx.free_room()
    store = ctx.store()
    store.put(layer_id)
    if ctx.json:
        emit(ctx, {"id": layer_id, "mount_count": store.metadata(layer_id)["mount_count"]})


@click.command()
@click.argument("layer_id")
@json_option
@pass_ctx
def exists(ctx: Context, layer_id: str) -> None:
    """Print true and exit 0 if the layer exists; print false and exit 1 if not."""
    found = ctx.store().exists(layer_id)
    emit(ctx, {"id": layer_id, "exists": found}, "true" if found else "false")
    if not found:
        sys.exit(1)


@click.command("ls")
@json_option
@pass_ctx
def ls(ctx: Context) -> None:
    """List layer ids, oldest first (--json: each layer's full record, as inspect shows)."""
    store = ctx.store()
    ids = store.layers()
    if ctx.json:
        emit(ctx, [store.metadata(i) for i in ids])
    else:
        for layer_id in ids:
            click.echo(layer_id)


@click.command()
@click.argument("layer_id")
@json_option
@pass_ctx
def inspect(ctx: Context, layer_id: str) -> None:
    """Show what the store knows about a layer, as JSON (with or without --json)."""
    click.echo(json.dumps(ctx.store().metadata(layer_id), indent=2, default=str))


@click.command()
@json_option
@pass_ctx
def status(ctx: Context) -> None:
    """Show the driver's status, like the storage section of docker info; a layer, container
    or volume that a dead command left half-done and recovery could not fix is listed as
    "Recovery Failed" (--json: a list of them)."""
    found = ctx.store().status() + ctx.containers().recovery_failures
    if Path(ctx.root, "volumes", ".metadata.db").exists():  # none is made for status
        try:
            found += ctx.volumes().recovery_failures
        except GraphDriverError as exc:  # busy past --wait, or damaged: said, not fatal
            found.append(("Volumes", f"cannot be read: {exc}"))
    data: dict[str, object] = {k: v for k, v in found if k != "Recovery Failed"}
    if failed := [v for k, v in found if k == "Recovery Failed"]:
        data["Recovery Failed"] = failed
    emit(ctx, data, "\n".join(f"{k}: {v}" for k, v in found))


@click.command()
@click.argument("layer_id")
@click.option("--parent", "-p", default=None, help=PARENT_HELP)
@json_option
@pass_ctx
def changes(ctx: Context, layer_id: str, parent: str | None) -> None:
    """List what the layer changed: C (modified), A (added), D (deleted)."""
    found = ctx.store().changes(layer_id, parent)
    if ctx.json:
        emit(ctx, [{"path": c.path, "kind": c.kind.name.lower()} for c in found])
        return
    for c in found:
        click.echo(f"{c.kind.letter} {c.path}")


@click.command("diff-size")
@click.argument("layer_id")
@click.option("--parent", "-p", default=None, help=PARENT_HELP)
@json_option
@pass_ctx
def diff_size(ctx: Context, layer_id: str, parent: str | None) -> None:
    """Print the bytes of file data that diff would carry."""
    size = ctx.store().diff_size(layer_id, parent)
    emit(ctx, {"id": layer_id, "size": size}, str(size))


@click.command()
@json_option
@pass_ctx
def cleanup(ctx: Context) -> None:
    """Unmount every container and layer of the store. Prints nothing (--json: the layers
    still mounted, none when it worked)."""
    ctx.free_room()
    ctx.containers().cleanup()
    if ctx.json:
        store = ctx.store()
        mounted = [i for i in store.layers() if store.metadata(i)["mount_count"]]
        emit(ctx, {"root": ctx.root, "mounted": mounted})


@click.command()
@json_option
@pass_ctx
def drivers(ctx: Context) -> None:
    """List installed drivers and whether each works here (for --root, with --opt)."""
    from pathlib import Path

    from .plugins import probe_drivers

    reports = probe_drivers(Path(ctx.root).absolute(), ctx.opts)
    if ctx.json:
        emit(ctx, [r.__dict__ for r in reports])
        return
    if not reports:
        click.echo("no storage drivers installed")
    for r in reports:
        state = "ok" if r.works else f"unavailable: {r.reason}"
        click.echo(f"{r.name:<12} {state}  [{r.target}]")
