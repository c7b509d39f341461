"""The ``graphdriver`` command: the CLI face of :class:`~graphdriver.store.LayerStore`.

Errors are one line on stderr and exit 1 (2 for usage), never a traceback (``--log-level debug``
shows it). ``--json`` prints machine-readable output for the inspection verbs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import click

from .cli_containers import register
from .containers import ContainerStore
from .driver import CreateOpts, parse_size
from .errors import GraphDriverError, from_oserror
from .plugins import hooks, installed_drivers, probe_drivers
from .store import LayerStore, open_store
from .volumes import VolumeStore

log = logging.getLogger("graphdriver")

DEFAULT_ROOT = "/var/lib/graphdriver"
PROGRESS_MIN = 4 << 20


@dataclass
class Context:
    root: str
    driver: str | None
    opts: dict[str, str]
    json: bool
    #: seconds to wait for the store lock (--wait); None: for ever
    wait: float | None = None
    _store: LayerStore | None = field(default=None)
    _containers: ContainerStore | None = field(default=None)
    _volumes: VolumeStore | None = field(default=None)

    def store(self) -> LayerStore:
        if self._store is None:
            self._store = open_store(self.root, self.driver, self.opts, wait=self.wait)
        return self._store

    def containers(self) -> ContainerStore:
        if self._containers is None:
            self._containers = ContainerStore(self.store())
        return self._containers

    def volumes(self) -> VolumeStore:
        """The root's volumes; needs no storage driver."""
        if self._containers is not None:
            return self._containers.volumes
        if self._volumes is None:
            self._volumes = VolumeStore(Path(self.root).absolute())
        return self._volumes

    def close(self) -> None:
        for part in (self._containers, self._volumes, self._store):
            if part is not None:
                part.close()


def _opts(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--opt")
        out[key.strip()] = value.strip()
    return out


class _Group(click.Group):
    """Turns graphdriver errors and OS errors into one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GraphDriverError as exc:
            log.debug("error", exc_info=True)
            raise _Fail(str(exc)) from None
        except OSError as exc:
            log.debug("error", exc_info=True)
            raise _Fail(str(from_oserror(exc, ctx.invoked_subcommand or "graphdriver"))) from None


class _Fail(click.ClickException):
    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"graphdriver: error: {self.format_message()}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    envvar="GRAPHDRIVER_ROOT",
    default=DEFAULT_ROOT,
    show_default=True,
    help="Directory that holds the layers (GRAPHDRIVER_ROOT).",
)
@click.option(
    "--driver",
    "-d",
    "driver",
    envvar="GRAPHDRIVER_DRIVER",
    default=None,
    help="Storage driver (default: the one with state under --root, else the first "
    "that works here: overlay, btrfs, devmapper, vfs).",
)
@click.option(
    "--opt",
    "-o",
    "opt",
    multiple=True,
    metavar="KEY=VALUE",
    help="Driver option; repeat for several.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    envvar="GRAPHDRIVER_WAIT",
    default=None,
    metavar="SECONDS",
    help="Give up (exit 1) after waiting this long for another command's lock "
    "(GRAPHDRIVER_WAIT; default: wait as long as it takes).",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.version_option(package_name="graphdriver")
@click.pass_context
def cli(
    ctx: click.Context,
    root: str,
    driver: str | None,
    opt: tuple[str, ...],
    as_json: bool,
    wait: float | None,
    log_level: str,
) -> None:
    """Copy-on-write layers for container images: create, mount, diff and apply them."""
    logging.basicConfig(level=log_level.upper(), format="graphdriver: %(levelname)s: %(message)s")
    obj = Context(root=root, driver=driver, opts=_opts(opt), json=as_json, wait=wait)
    ctx.obj = obj
    ctx.call_on_close(obj.close)


pass_ctx = click.make_pass_decorator(Context)


def _json_flag(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Context).json = True  # type: ignore[union-attr]


json_option = click.option(
    "--json", is_flag=True, expose_value=False, callback=_json_flag, help="Print JSON."
)


def _emit(ctx: Context, data: Any, text: str | None = None) -> None:
    if ctx.json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif text is not None:
        click.echo(text)


@cli.command()
@click.argument("layer_id")
@click.option("--parent", "-p", default=None, help="Layer to build on.")
@click.option("--rw", is_flag=True, help="Read-write (container) layer.")
@click.option("--size", "-s", default=None, help="Size limit (rw layers, drivers with quota).")
@click.option("--label", multiple=True, metavar="KEY=VALUE", help="Free-form label.")
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
    """Create a layer (read-only image layer unless --rw)."""
    opts = CreateOpts(size=parse_size(size) if size else None, mount_label=mount_label)
    ctx.store().create(layer_id, parent, opts, rw=rw, labels=_opts(label), volumes=volumes)
    _emit(ctx, {"id": layer_id}, layer_id)


@cli.command("rm")
@click.argument("layer_ids", nargs=-1, required=True)
@pass_ctx
def rm(ctx: Context, layer_ids: tuple[str, ...]) -> None:
    """Remove layers (refused while mounted or with children)."""
    for layer_id in layer_ids:
        ctx.store().remove(layer_id)


@cli.command()
@click.argument("layer_id")
@json_option
@pass_ctx
def mount(ctx: Context, layer_id: str) -> None:
    """Mount a layer and print the path of its root (counted; undo with umount)."""
    path = ctx.store().get(layer_id)
    _emit(ctx, {"id": layer_id, "path": str(path)}, str(path))


@cli.command()
@click.argument("layer_id")
@pass_ctx
def umount(ctx: Context, layer_id: str) -> None:
    """Release one mount reference; the last one unmounts."""
    ctx.store().put(layer_id)


@cli.command()
@click.argument("layer_id")
@json_option
@pass_ctx
def exists(ctx: Context, layer_id: str) -> None:
    """Exit 0 if the layer exists, 1 if not."""
    found = ctx.store().exists(layer_id)
    _emit(ctx, {"id": layer_id, "exists": found})
    if not found:
        sys.exit(1)


@cli.command("ls")
@json_option
@pass_ctx
def ls(ctx: Context) -> None:
    """List layers, oldest first."""
    store = ctx.store()
    if ctx.json:
        _emit(ctx, [store.metadata(i) for i in store.layers()])
        return
    for layer_id in store.layers():
        click.echo(layer_id)


@cli.command()
@click.argument("layer_id")
@pass_ctx
def inspect(ctx: Context, layer_id: str) -> None:
    """Show what the store knows about a layer (JSON)."""
    click.echo(json.dumps(ctx.store().metadata(layer_id), indent=2, default=str))


@cli.command()
@json_option
@pass_ctx
def status(ctx: Context) -> None:
    """Show the driver's status, like the storage section of docker info."""
    pairs = ctx.store().status()
    _emit(ctx, dict(pairs), "\n".join(f"{k}: {v}" for k, v in pairs))


@cli.command()
@click.argument("layer_id")
@click.option("--parent", "-p", default=None, help="Compare with this layer, not the parent.")
@click.option(
    "--output",
    "-o",
    "output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write to FILE instead of stdout.",
)
@click.option(
    "--compress", type=click.Choice(["none", "gzip", "zstd"]), default="none", show_default=True
)
@json_option
@pass_ctx
def diff(
    ctx: Context, layer_id: str, parent: str | None, output: str | None, compress: str
) -> None:
    """Write the layer's changes as an OCI layer tar.

    The diff of a layer that apply-diff filled, while it is unchanged, is the applied tar again,
    byte for byte (its sha256 is the layer's diffID); otherwise it is generated from the layer.
    --json prints which, and why, on stdout (on stderr when the tar goes to stdout).
    """
    store = ctx.store()
    with _progress(None, f"diff {layer_id}") as update:
        if output is None:
            if sys.stdout.isatty():
                raise click.UsageError(
                    "refusing to write a tar to a terminal; use -o FILE or a pipe"
                )
            sys.stdout.flush()
            result = store.export(layer_id, sys.stdout.fileno(), parent, compress, update)
        else:
            tmp = Path(output + ".partial")
            try:
                with open(tmp, "wb") as f:
                    result = store.export(layer_id, f, parent, compress, update)
                tmp.replace(output)
            finally:
                tmp.unlink(missing_ok=True)
    if ctx.json:
        report = {
            "id": layer_id,
            "exact": result.exact,
            "reason": result.reason,
            "diff_id": result.diff_id,
            "tar_size": result.tar_size,
            "compression": compress,
        }
        click.echo(json.dumps(report, indent=2), err=output is None)


@cli.command()
@click.argument("layer_id")
@click.option("--parent", "-p", default=None, help="Compare with this layer, not the parent.")
@json_option
@pass_ctx
def changes(ctx: Context, layer_id: str, parent: str | None) -> None:
    """List what the layer changed: C (modified), A (added), D (deleted)."""
    found = ctx.store().changes(layer_id, parent)
    if ctx.json:
        _emit(ctx, [{"path": c.path, "kind": c.kind.name.lower()} for c in found])
        return
    for c in found:
        click.echo(f"{c.kind.letter} {c.path}")


@cli.command("diff-size")
@click.argument("layer_id")
@click.option("--parent", "-p", default=None)
@json_option
@pass_ctx
def diff_size(ctx: Context, layer_id: str, parent: str | None) -> None:
    """Print the bytes of file data that diff would carry."""
    size = ctx.store().diff_size(layer_id, parent)
    _emit(ctx, {"id": layer_id, "size": size}, str(size))


@contextlib.contextmanager
def _progress(total: int | None, label: str) -> Iterator[Any]:
    """A tqdm byte counter on stderr when it is a terminal and the stream is large; it shows
    up only after a second, so quick operations print nothing."""
    if not sys.stderr.isatty() or (total is not None and total < PROGRESS_MIN):
        yield None
        return
    from tqdm import tqdm

    size = shutil.get_terminal_size((80, 24))
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        file=sys.stderr,
        leave=False,
        # a terminal that reports 0x0 (a fresh pty) still gets a bar; tqdm would hide it
        ncols=size.columns,
        nrows=size.lines,
        ascii=True,
        delay=float(os.environ.get("GRAPHDRIVER_PROGRESS_DELAY", "1")),
    ) as bar:
        yield bar.update


@cli.command("apply-diff")
@click.argument("layer_id")
@click.argument("source", default="-", metavar="[FILE|-]")
@json_option
@pass_ctx
def apply_diff(ctx: Context, layer_id: str, source: str) -> None:
    """Unpack an OCI layer tar (plain, gzip or zstd) into a fresh layer."""
    store = ctx.store()
    with contextlib.ExitStack() as stack:
        if source == "-":
            stream: BinaryIO = sys.stdin.buffer
            total = None
        else:
            try:
                stream = stack.enter_context(open(source, "rb"))
            except OSError as exc:
                raise from_oserror(exc, f"open {source}") from exc
            total = os.fstat(stream.fileno()).st_size
        update = stack.enter_context(_progress(total, f"apply {layer_id}"))
        result = store.apply(layer_id, stream, update)
    _emit(
        ctx,
        {
            "id": layer_id,
            "size": result.size,
            "diff_id": result.diff_id,
            "compression": result.compression,
        },
        f"{result.size} {result.diff_id}",
    )


@cli.command()
@pass_ctx
def cleanup(ctx: Context) -> None:
    """Unmount every container and layer of the store."""
    ctx.containers().cleanup()


@cli.command()
@json_option
@pass_ctx
def drivers(ctx: Context) -> None:
    """List installed drivers and whether each works here (for --root)."""
    reports = probe_drivers(Path(ctx.root).absolute(), {})
    if ctx.json:
        _emit(ctx, [r.__dict__ for r in reports])
        return
    if not installed_drivers():
        click.echo("no storage drivers installed")
    for r in reports:
        state = "ok" if r.works else f"unavailable: {r.reason}"
        click.echo(f"{r.name:<12} {state}  [{r.target}]")


register(cli, pass_ctx, json_option, _emit)


class Interrupted(BaseException):
    """SIGTERM or SIGINT, raised where the main thread is, so that the operation under way
    rolls back (or finishes) in order; like KeyboardInterrupt, no ``except Exception``
    swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: when the first SIGTERM/SIGINT arrived (monotonic seconds), or None
_interrupted_at: list[float] = []
#: a repeat within this many seconds is the same request: coreutils ``timeout`` signals the
#: command and then its process group, and a terminal's Ctrl-C reaches the whole group too
_REPEAT_GRACE = 2.0


def _interrupt(signum: int, _frame: object) -> None:
    now = time.monotonic()
    if _interrupted_at:
        if now - _interrupted_at[0] < _REPEAT_GRACE:
            return  # the rollback under way goes on
        # asked again later: end at once; the next command's recovery rolls back
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _interrupted_at.append(now)
    raise Interrupted(signum)


def main() -> None:
    """Entry point of the ``graphdriver`` script."""
    try:
        hooks().cli(cli)
    except Exception as exc:  # a plugin's broken CLI hook must not break the command
        log.warning("a plugin failed to extend the CLI: %s", exc)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        cli.main(prog_name="graphdriver", standalone_mode=True)
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
        name = signal.Signals(signum).name
        click.echo(
            f"graphdriver: interrupted by {name}; what it had half done was rolled back", err=True
        )
        sys.exit(128 + signum)
    except Exception as exc:  # a bug: still one line, the traceback at debug level
        log.debug("unexpected error", exc_info=True)
        click.echo(
            f"graphdriver: internal error: {exc!r} (run with --log-level debug for details)",
            err=True,
        )
        sys.exit(1)


class _ServeGroup(click.Group):
    """``graphdriver serve NAME``: servers that bridge the store to a container engine.

    Each is a click command named by an entry point of the group ``graphdriver.serve`` (the
    integration packages under integrations/); it is imported only when it runs, so that
    the core CLI never imports an engine's libraries (grpcio for containerd).
    """

    GROUP = "graphdriver.serve"

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        found = importlib.metadata.entry_points(group=self.GROUP)
        return {ep.name: ep for ep in sorted(found, key=lambda ep: ep.name)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._entry_points())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        ep = self._entry_points().get(cmd_name)
        if ep is None:
            return None
        command = ep.load()
        if not isinstance(command, click.Command):
            raise _Fail(f"entry point {ep.value!r} of {self.GROUP} is not a click command")
        return command


@cli.group(cls=_ServeGroup)
def serve() -> None:
    """Serve the store to a container engine (containerd's proxy snapshotter, ...).

    The servers come from integration packages (graphdriver-containerd, ...); this lists the
    installed ones. Each runs in the foreground until SIGTERM or SIGINT.
    """


@cli.command("check")
@click.option("--repair", is_flag=True, help="Fix what is safe to fix, and say what was done.")
@click.option(
    "--digests", is_flag=True, help="Also hash each applied layer's diff against its diff_id."
)
@json_option
@pass_ctx
def check(ctx: Context, repair: bool, digests: bool) -> None:
    """Check the store's records against its storage, mounts, containers and volumes.

    One line per problem (kind, layer or container, what, and whether --repair fixes it);
    exit 0 when nothing is wrong, 1 when problems remain. --json: a list of objects (kind,
    subject, what, repairable, repaired). It works on a store whose metadata.db is empty,
    damaged or lost, which every other command refuses.

    --repair rolls back operations a dead process left in flight, fixes mount counts, removes
    storage that has no record (only while the records can be trusted, never after a
    rebuild, never one that other layers are built on), drops containers whose layer is gone
    and volume references to containers that do not exist. It never deletes a layer that has
    a record. A damaged or empty database is moved aside (metadata.db.corrupt-TIME) and the
    records are rebuilt: rows that can still be read are kept, other layers are recorded from
    the driver's storage with the parent their files need (overlay knows it; vfs, btrfs and
    devmapper layers are complete copies, so they are recorded without a parent and labelled
    graphdriver.check: their diffs are then against nothing). Layers whose needed parent is
    gone are left on disk, unrecorded.

    --digests compares each applied layer's diff with its recorded diff_id; a layer applied
    from a tar that graphdriver did not write cannot be reproduced byte for byte and shows
    up as a mismatch too.
    """
    from .check import Problem, Repair, check_store

    report = check_store(
        Path(ctx.root).absolute(), ctx.driver, ctx.opts, repair=repair, digests=digests
    )
    found: list[Repair | Problem] = [*report.repaired, *report.problems]
    if ctx.json:
        _emit(ctx, [item.as_json() for item in found])
    else:
        for item in found:
            click.echo(item.line())
    if report.problems:
        sys.exit(1)
