"""``graphdriver volume ...`` and ``graphdriver container ...``: Docker's volume and container
storage verbs on top of a layer store, as two module-level click groups (the root group imports
this module when one of them runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .cli_common import Context, emit, emit_done, json_option, pairs, pass_ctx
from .errors import NotFound
from .volumes import DEFAULT_VOLUME_DRIVER, installed_volume_drivers

if TYPE_CHECKING:
    from .volumes import VolumeRecord, VolumeStore


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


@click.group()
def volume() -> None:
    """Managed volumes: <root>/volumes/<name>/_data (driver local, or a plugin)."""


@volume.command("create")
@click.argument("name", required=False)
@click.option(
    "--volume-driver",
    "driver",
    default=DEFAULT_VOLUME_DRIVER,
    show_default=True,
    help="Volume driver (see volume drivers).",
)
@click.option("--label", multiple=True, metavar="KEY=VALUE", help="Free-form label; repeat.")
@click.option(
    "--opt", "opt", multiple=True, metavar="KEY=VALUE", help="Volume driver option; repeat."
)
@json_option
@pass_ctx
def volume_create(
    ctx: Context, name: str | None, driver: str, label: tuple[str, ...], opt: tuple[str, ...]
) -> None:
    """Create a volume (a random 64-hex name when NAME is left out)."""
    rec = ctx.volumes().create(
        name, driver, labels=pairs(label, "--label"), options=pairs(opt, "--opt")
    )
    emit(ctx, ctx.volumes().inspect(rec.name), rec.name)


def _matches(store: VolumeStore, rec: VolumeRecord, filters: dict[str, list[str]]) -> bool:
    for key, wanted in filters.items():
        for value in wanted:
            if key == "dangling":
                if (value.lower() in ("1", "true")) == bool(store.users(rec.name)):
                    return False
            elif (key == "driver" and rec.driver != value) or (
                key == "name" and value not in rec.name
            ):
                return False
            elif key == "label":
                k, sep, v = value.partition("=")
                if k not in rec.labels or (sep and rec.labels[k] != v):
                    return False
    return True


@volume.command("ls")
@click.option("--quiet", "-q", is_flag=True, help="Only names.")
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help="dangling=true|false, driver=D, name=PART, label=K[=V]; repeat for several.",
)
@json_option
@pass_ctx
def volume_ls(ctx: Context, quiet: bool, filters: tuple[str, ...]) -> None:
    """List volumes, oldest first."""
    wanted: dict[str, list[str]] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or key not in ("dangling", "driver", "name", "label"):
            raise click.BadParameter(
                f"{item!r}: filters are dangling=, driver=, name=, label=",
                param_hint="--filter",
            )
        wanted.setdefault(key, []).append(value)
    store = ctx.volumes()
    recs = [r for r in store.all() if _matches(store, r, wanted)]
    if ctx.json:
        emit(ctx, [store.inspect(r.name) for r in recs])
    elif quiet:
        for r in recs:
            click.echo(r.name)
    else:
        click.echo(f"{'DRIVER':<12}VOLUME NAME")
        for r in recs:
            click.echo(f"{r.driver:<12}{r.name}")


@volume.command("drivers")
@json_option
@pass_ctx
def volume_drivers(ctx: Context) -> None:
    """List installed volume drivers."""
    found = installed_volume_drivers()
    emit(ctx, found, "\n".join(f"{n:<12} {t}" for n, t in found.items()))


@volume.command("inspect")
@click.argument("names", nargs=-1, required=True)
@json_option
@pass_ctx
def volume_inspect(ctx: Context, names: tuple[str, ...]) -> None:
    """Show volumes as JSON (with or without --json)."""
    click.echo(json.dumps([ctx.volumes().inspect(n) for n in names], indent=2))


@volume.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--force",
    "-f",
    is_flag=True,
    help="Remove even if stopped containers use it; a missing volume is no error.",
)
@json_option
@pass_ctx
def volume_rm(ctx: Context, names: tuple[str, ...], force: bool) -> None:
    """Remove volumes and their data (refused while a container uses them); print each name
    (--json: the list of names)."""
    ctx.free_room()
    for name in names:
        try:
            ctx.volumes().remove(name, force=force)
        except NotFound:
            if not force:
                raise
        emit_done(ctx, name)
    emit(ctx, list(names))


@volume.command("prune")
@click.option("--all", "-a", "all_volumes", is_flag=True, help="Named volumes too.")
@click.option("--label", multiple=True, metavar="KEY=VALUE", help="Only with this label.")
@click.option("--force", "-f", is_flag=True, help="Accepted for Docker habits; no prompt.")
@json_option
@pass_ctx
def volume_prune(ctx: Context, all_volumes: bool, label: tuple[str, ...], force: bool) -> None:
    """Remove anonymous volumes no container uses (all unused ones with --all)."""
    ctx.free_room()
    removed = ctx.volumes().prune(all_volumes=all_volumes, labels=pairs(label, "--label"))
    total = sum(size for _name, size in removed)
    text = "\n".join([*(n for n, _ in removed), f"Total reclaimed space: {_human(total)}"])
    emit(ctx, {"VolumesDeleted": [n for n, _ in removed], "SpaceReclaimed": total}, text)


@click.group()
def container() -> None:
    """Containers: a read-write layer on an image plus its volumes."""


@container.command("create")
@click.argument("name")
@click.option("--image", "-i", required=True, help="Layer to build on.")
@click.option(
    "--volume",
    "-v",
    "specs",
    multiple=True,
    metavar="SPEC",
    help="NAME:/path[:ro], /host/path:/path[:ro] or /path (anonymous); repeat.",
)
@click.option(
    "--volumes-from",
    multiple=True,
    metavar="CONTAINER[:ro|:rw]",
    help="Mount every volume of another container; repeat.",
)
@click.option(
    "--volume-driver",
    default=DEFAULT_VOLUME_DRIVER,
    show_default=True,
    help="Driver for volumes -v creates.",
)
@json_option
@pass_ctx
def container_create(
    ctx: Context,
    name: str,
    image: str,
    specs: tuple[str, ...],
    volumes_from: tuple[str, ...],
    volume_driver: str,
) -> None:
    """Create a container's read-write layer on an image and record its volumes."""
    info = ctx.containers().create(name, image, specs, volumes_from, volume_driver=volume_driver)
    emit(ctx, info, name)


@container.command("mount")
@click.argument("name")
@json_option
@pass_ctx
def container_mount(ctx: Context, name: str) -> None:
    """Mount the root filesystem with every volume in it; print the root."""
    root: Path = ctx.containers().mount(name)
    emit(ctx, {"Name": name, "Root": str(root)}, str(root))


@container.command("umount")
@click.argument("name")
@json_option
@pass_ctx
def container_umount(ctx: Context, name: str) -> None:
    """Release one mount; the last one unbinds the volumes and unmounts the root. Prints
    nothing (--json: whether it is still mounted)."""
    ctx.free_room()
    store = ctx.containers()
    store.unmount(name)
    if ctx.json:
        emit(ctx, {"Name": name, "Mounted": store.inspect(name)["Mounted"]})


@container.command("ls")
@json_option
@pass_ctx
def container_ls(ctx: Context) -> None:
    """List containers, oldest first."""
    store = ctx.containers()
    infos = [store.inspect(n) for n in store.names()]
    if ctx.json:
        emit(ctx, infos)
        return
    click.echo(f"{'NAME':<20}{'IMAGE':<20}{'MOUNTED':<9}VOLUMES")
    for i in infos:
        click.echo(
            f"{i['Name']:<20}{i['Image']:<20}{'yes' if i['Mounted'] else 'no':<9}{len(i['Mounts'])}"
        )


@container.command("inspect")
@click.argument("names", nargs=-1, required=True)
@json_option
@pass_ctx
def container_inspect(ctx: Context, names: tuple[str, ...]) -> None:
    """Show containers as JSON (with or without --json)."""
    click.echo(json.dumps([ctx.containers().inspect(n) for n in names], indent=2))


@container.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--volumes", is_flag=True, help="Also remove its anonymous volumes.")
@click.option("--force", "-f", is_flag=True, help="Unmount a mounted container first.")
@json_option
@pass_ctx
def container_rm(ctx: Context, names: tuple[str, ...], volumes: bool, force: bool) -> None:
    """Remove containers: the read-write layer's data goes, named volumes stay; print each
    name (--json: the list of names)."""
    ctx.free_room()
    for name in names:
        ctx.containers().remove(name, volumes=volumes, force=force)
        emit_done(ctx, name)
    emit(ctx, list(names))
