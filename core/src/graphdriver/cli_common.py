"""What every module of the ``graphdriver`` command shares: the context object (the store,
containers and volumes of ``--root``, opened on first use), the one ``--json`` option, output,
``KEY=VALUE`` parsing, one-line errors, and the group that imports a verb's module only when
that verb runs.

Output rule, for every verb: without ``--json`` the text is for people (ids or names, one per
line; nothing for a verb that only acts); with ``--json`` stdout is one JSON document, the full
record of each thing the text names (``ls --json``: each layer's ``inspect``), or
``{"id": ..., ...}`` saying what was done.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
from typing import IO, TYPE_CHECKING, Any, ClassVar

import click

from .errors import GraphDriverError, from_oserror

if TYPE_CHECKING:
    from pathlib import Path

    from .containers import ContainerStore
    from .store import LayerStore
    from .volumes import VolumeStore

log = logging.getLogger("graphdriver")


class Context:
    """The root group's options; the integrations' ``serve`` commands read them too."""

    #: the Context of the command this process runs (the CLI's own, or a served command's
    #: worker's): what an interrupt rolls back (:meth:`recover`)
    last: ClassVar[Context | None] = None

    def __init__(
        self,
        root: str,
        driver: str | None,
        opts: dict[str, str],
        json: bool = False,
        wait: float | None = None,
    ) -> None:
        self.root = root
        self.driver = driver
        self.opts = opts
        self.json = json
        #: seconds to wait for the store lock (--wait); None: for ever
        self.wait = wait
        self._store: LayerStore | None = None
        self._containers: ContainerStore | None = None
        self._volumes: VolumeStore | None = None
        Context.last = self

    def store(self) -> LayerStore:
        if self._store is None:
            from .store import open_store

            one_command()
            self._store = open_store(self.root, self.driver, self.opts, wait=self.wait)
        return self._store

    def containers(self) -> ContainerStore:
        if self._containers is None:
            from .containers import ContainerStore

            self._containers = ContainerStore(self.store())
        return self._containers

    def volumes(self) -> VolumeStore:
        """The root's volumes; needs no storage driver."""
        if self._containers is not None:
            return self._containers.volumes
        if self._volumes is None:
            from pathlib import Path

            from .volumes import VolumeStore

            one_command()
            self._volumes = VolumeStore(Path(self.root).absolute(), wait=self.wait)
        return self._volumes

    def free_room(self, *dirs: Path) -> None:
        """Before a verb that frees space (``rm``, ``umount``, ``cleanup``, ``prune``) opens
        anything, and before a server that may free it (an engine's, whose databases are
        those in *dirs*) opens its store: on a disk too full to record it, the store's reserve
        is given back (:mod:`graphdriver.reserve`)."""
        from pathlib import Path

        from .reserve import release_all_if_full

        release_all_if_full(Path(self.root).absolute(), dirs)

    def close(self) -> None:
        for part in (self._containers, self._volumes, self._store):
            if part is not None:
                part.close()

    def recover(self) -> list[tuple[str, str]]:
        """Open again what the command had opened (closed by then), without waiting for the
        store's lock, and close it: that runs the recovery the next command's open would. After
        an interrupt (SIGTERM, Ctrl-C), so that a container or volume command stopped between
        two of its steps (a layer mounted and not yet counted, a container left creating or
        removing) is rolled back now, as an interrupted ``apply-diff`` rolls itself back.
        Returns what that recovery could not do and the command's own open had not found
        undone already (as ``status`` lists it)."""
        containers, store, volumes = self._containers, self._store, self._volumes
        before: set[tuple[str, str]] = set()
        for part in (containers, volumes, containers and containers.opened_volumes()):
            before.update(part.recovery_failures if part is not None else ())
        self.close()
        self._store = self._containers = self._volumes = None
        self.wait = 0.0
        failed: list[tuple[str, str]] = []
        try:
            if containers is not None:
                reopened = self.containers()
                failed += reopened.recovery_failures + reopened.volumes.recovery_failures
            elif store is not None:
                self.store()
            if volumes is not None and containers is None:
                failed += self.volumes().recovery_failures
        finally:
            self.close()
        return [f for f in dict.fromkeys(failed) if f not in before]


pass_ctx = click.make_pass_decorator(Context)


def _json_flag(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        obj = ctx.find_object(Context)
        if obj is not None:
            obj.json = True


#: the ``--json`` option of every verb (the root group's ``--json`` does the same for all)
json_option = click.option(
    "--json",
    is_flag=True,
    expose_value=False,
    callback=_json_flag,
    help="Print one JSON document on stdout instead of text.",
)


def emit(ctx: Context, data: Any, text: str | None = None) -> None:
    """*data* as JSON with ``--json``, else *text* (nothing when None)."""
    if ctx.json:
        import json

        click.echo(json.dumps(data, indent=2, default=str))
    elif text is not None:
        click.echo(text)


def announce(text: str, **fields: object) -> None:
    """A server's line once it serves: ``graphdriver: TEXT`` on stderr, or with ``--json`` one
    JSON object on stdout, ``{"serving": true, FIELDS...}``, for a script that waits for it;
    and systemd's ``READY=1`` where it waits for it (:func:`notify_ready`)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(Context) if ctx is not None else None
    if obj is not None and obj.json:
        import json

        click.echo(json.dumps({"serving": True, **fields}, default=str))
    else:
        click.echo(f"graphdriver: {text}", err=True)
    notify_ready(text)


def notify_ready(status: str) -> None:
    """Tell the service manager that started this server (a ``Type=notify`` unit: the socket
    in ``NOTIFY_SOCKET``) that it serves, so that what it is ordered before (containerd, whose
    CRI forgets every image it cannot check with its snapshotter as it starts) waits for it;
    the variable goes, for no child to say it again. A failure is one warning: serving goes on."""
    path = os.environ.pop("NOTIFY_SOCKET", "")
    if not path:
        return
    import socket

    address = "\0" + path[1:] if path.startswith("@") else path  # (an abstract socket)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(f"READY=1\nSTATUS={status}".encode(errors="replace"))
    except OSError as exc:
        log.warning("cannot tell the service manager that this server is ready: %s", exc)


def emit_done(ctx: Context, name: str) -> None:
    """The text line of one thing a verb of several did (a removed id), as it is done; the
    verb emits the JSON of all of them at the end."""
    if not ctx.json:
        click.echo(name)


def pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments of *option* as a dict; a usage error for anything else."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint=option)
        out[key.strip()] = value.strip()
    return out


#: the verbs that only read the records (and the layers: a diff saves a container's work
#: from a full disk): on a disk with no room for SQLite's ``-wal`` they read the databases as
#: no one changes them, and recover nothing (``sqlite.reads_only``; ``check`` says so itself,
#: without ``--repair`` and ``--digests``)
READ_VERBS = {
    ("ls",), ("inspect",), ("exists",), ("status",), ("diff",), ("changes",), ("diff-size",),
    ("container", "ls"), ("container", "inspect"), ("volume", "ls"), ("volume", "inspect"),
}  # fmt: skip


def one_command(reads_only: bool | None = None) -> None:
    """Before a verb opens a database: this process runs one command (``sqlite.one_command``;
    not for the integrations' ``serve`` verbs, which hold theirs); *reads_only*: whether the
    command only reads (None: whether its verb is one of :data:`READ_VERBS`)."""
    from . import sqlite

    if reads_only is None:
        verb: list[str] = []
        ctx = click.get_current_context(silent=True)
        while ctx is not None and ctx.parent is not None:  # (the root's name: the program's)
            verb.insert(0, ctx.info_name or "")
            ctx = ctx.parent
        reads_only = tuple(verb) in READ_VERBS
    if reads_only:
        sqlite.reads_only()
    else:
        sqlite.one_command()


class Fail(click.ClickException):
    """One line, ``graphdriver: error: ...``, and exit status 1."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"graphdriver: error: {self.format_message()}", err=True)


class LazyGroup(click.Group):
    """A group whose commands are imported when they run (or when help lists them): *lazy*
    maps a command name to ``"module:attr"``."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, _, attr = self.lazy[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):
            raise Fail(f"{self.lazy[cmd_name]!r} is not a click command")
        self.add_command(command, cmd_name)
        return command

    def load_all(self) -> None:
        """Import every lazy command (for a plugin that extends existing commands)."""
        ctx = click.Context(self)
        for name in list(self.lazy):
            self.get_command(ctx, name)


class ErrorGroup(LazyGroup):
    """The root group: graphdriver errors and OS errors become one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (GraphDriverError, OSError) as exc:
            log.debug("error", exc_info=True)
            if exc.errno == errno.EPIPE and _stdout_gone():
                # its reader went away (`graphdriver ls | head -1`, `diff L | head -c 10`): no
                # message, and the status of a command killed by SIGPIPE, as a Unix tool's;
                # what is left to print, and the flush at exit, go nowhere
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                ctx.exit(128 + 13)  # SIGPIPE
            if isinstance(exc, GraphDriverError):
                raise Fail(str(exc)) from None
            raise Fail(str(from_oserror(exc, ctx.invoked_subcommand or "graphdriver"))) from None


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader closed it (poll's POLLERR) or a socket
    whose peer did (POLLHUP)."""
    import select  # (a C module)

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        gone = select.POLLERR | select.POLLHUP
        return any(events & gone for _fd, events in poller.poll(0))
    except (OSError, ValueError):  # no stdout, or closed
        return False
