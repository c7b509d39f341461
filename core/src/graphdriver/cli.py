"""The ``graphdriver`` command: the CLI face of :class:`~graphdriver.store.LayerStore`.

The root group holds the options every verb shares; each verb lives in a ``cli_*`` module that
is imported only when the verb runs (:class:`~.cli_common.LazyGroup`), so that a call costs what
it does. Errors are one line on stderr and exit 1 (2 for usage), never a traceback
(``--log-level debug`` shows it). Every verb takes ``--json`` (see :mod:`.cli_common` for what
it prints); ``graphdriver --json VERB`` is the same.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Collection
from types import FrameType

import click

from .cli_common import Context, ErrorGroup, pairs
from .linux.signals import start_thread

log = logging.getLogger("graphdriver")

DEFAULT_ROOT = "/var/lib/graphdriver"

#: verb -> "module:command", imported when the verb runs
VERBS = {
    **{
        verb: f"graphdriver.cli_layers:{attr}"
        for verb, attr in {
            "create": "create",
            "rm": "rm",
            "mount": "mount",
            "umount": "umount",
            "exists": "exists",
            "ls": "ls",
            "inspect": "inspect",
            "status": "status",
            "changes": "changes",
            "diff-size": "diff_size",
            "cleanup": "cleanup",
            "drivers": "drivers",
        }.items()
    },
    "diff": "graphdriver.cli_diffs:diff",
    "apply-diff": "graphdriver.cli_diffs:apply_diff",
    "check": "graphdriver.cli_check:check",
    "volume": "graphdriver.cli_containers:volume",
    "container": "graphdriver.cli_containers:container",
    "serve": "graphdriver.cli_serve:serve",
}


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from . import __version__

        click.echo(f"graphdriver, version {__version__}")
        ctx.exit()


def _root(ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """An empty root is refused, from --root or GRAPHDRIVER_ROOT (which click would take for
    unset): the working directory would be the store (its root made private), or a command
    meant for another store (``GRAPHDRIVER_ROOT=$UNSET graphdriver rm X``) would run on the
    default one. Here, before any verb: some (volumes, check) do not open a layer store."""
    unset = os.environ.get("GRAPHDRIVER_ROOT") == "" and (
        ctx.get_parameter_source("root") == click.core.ParameterSource.DEFAULT
    )
    if not value or unset:
        raise click.BadParameter("the store's root must name a directory, not be empty")
    return value


@click.group(cls=ErrorGroup, lazy=VERBS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    envvar="GRAPHDRIVER_ROOT",
    default=DEFAULT_ROOT,
    show_default=True,
    callback=_root,
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
    "opt",
    multiple=True,
    metavar="KEY=VALUE",
    help="Storage driver option, like overlay.mountopt=nodev; repeat for several.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON, for every verb (the same as VERB --json)."
)
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
    help="What to log on stderr; debug adds the traceback of an error.",
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version,
    help="Show the version and exit.",
)
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
    obj = Context(root=root, driver=driver, opts=pairs(opt, "--opt"), json=as_json, wait=wait)
    ctx.obj = obj
    ctx.call_on_close(obj.close)


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


def _interrupt(signum: int, frame: FrameType | None) -> None:
    now = time.monotonic()
    if _interrupted_at and not _lost:  # a repeat: it never raises
        if now - _interrupted_at[0] < _REPEAT_GRACE:
            return  # the rollback under way goes on
        _end_now(signum)  # asked again later; the next command's recovery rolls back
        return
    if _where_ignored(frame):  # raised here, it would be lost
        _resend(signum)
        return
    _lost.clear()
    _interrupted_at[:] = [now]
    raise Interrupted(signum)


def _end_now(signum: int) -> None:
    """End this process by *signum*, as if it had no handler."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


#: interrupts raised where Python ignored them, being sent again until one raises where it
#: counts (not repeats, whenever they come)
_lost: list[int] = []
#: the thread that sends them, while it runs, and what it and :func:`_resend` hold
_resender: list[threading.Thread] = []
_resending = threading.RLock()
#: the hook that had the exceptions Python ignores before :func:`catch_interrupts` took them
_unraisable_before = [sys.__unraisablehook__]


def _unraisable(args: sys.UnraisableHookArgs) -> None:
    """An interrupt raised where Python ignores exceptions (a ``__del__``, a weakref callback:
    wherever the main thread was when the signal came) is not lost: it is sent again, to
    arrive where the main thread goes on (or, if that is such a place again, again)."""
    exc = args.exc_value
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        _resend(exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT))
    else:
        _unraisable_before[0](args)


def _resend(signum: int) -> None:
    """Send *signum* to the main thread again in a moment, and again (later each time) until
    it raised, from a thread of its own: sent from here, the handler would run, and raise,
    here again. Where no thread can start, end the process by it now."""
    with _resending:  # reentrant: a signal let in as the thread starts comes back here
        _lost.append(signum)
        if _resender:
            return
        main_thread = threading.main_thread().ident
        assert main_thread is not None

        def resend() -> None:
            pause = 0.01
            while True:
                time.sleep(pause)
                with _resending:
                    if not _lost:
                        _resender.clear()
                        return
                    lost = _lost[0]
                with contextlib.suppress(OSError):  # the main thread has just ended
                    signal.pthread_kill(main_thread, lost)
                pause = min(pause * 2, 1.0)

        _resender.append(threading.Thread(target=resend, name="graphdriver-resend", daemon=True))
        try:
            start_thread(_resender[0])
        except RuntimeError:  # no thread (the interpreter ends, or a pids limit)
            _resender.clear()
            _end_now(signum)
        except BaseException:  # another handler's exception: a later loss starts one
            if _resender[0].ident is None:
                _resender.clear()
            raise


def _where_ignored(frame: FrameType | None) -> bool:
    """Whether *frame* is within :func:`_unraisable` or :func:`_resend` (where a second signal
    may come), whose exceptions Python ignores."""
    while frame is not None:
        if frame.f_code in _IGNORING:
            return True
        frame = frame.f_back
    return False


_IGNORING = {_unraisable.__code__, _resend.__code__}


def catch_interrupts() -> None:
    """SIGTERM and SIGINT (unless ignored, as a shell script's background jobs do) raise
    :class:`Interrupted` where the main thread is; one raised where Python would ignore it is
    sent again."""
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored: a background job's
        signal.signal(signal.SIGINT, _interrupt)
    if sys.unraisablehook is not _unraisable:
        if _unraisable_before[0] is sys.__unraisablehook__:  # the first time only: a later
            _unraisable_before[0] = sys.unraisablehook  # hook may call this one
        sys.unraisablehook = _unraisable


def extend_by_plugins() -> None:
    """Let hook plugins add commands, or options to any command (the lazy ones are loaded
    first, only when a plugin implements ``graphdriver_cli``)."""
    from .plugins import hooks

    try:
        plugin_hooks = hooks()
        if plugin_hooks.extends_cli:
            cli.load_all()
            plugin_hooks.cli(cli)
    except Exception as exc:  # a plugin's broken CLI hook must not break the command
        log.warning("a plugin failed to extend the CLI: %s", exc)


def _flushed(code: int | str | None) -> int | str | None:
    """*code* once what is left of standard output is written; if it cannot be (a full
    disk, /dev/full), one line and status 1 where the command had succeeded, and no more
    tries: the interpreter's own flush at exit said it again ("Exception ignored") and
    exited 120. A reader that went away is SIGPIPE's silent 141."""
    try:
        sys.stdout.flush()
        return code
    except (OSError, ValueError) as exc:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
            return 128 + signal.SIGPIPE
        if code in (0, None):
            why = exc.strerror if isinstance(exc, OSError) else None
            click.echo(f"graphdriver: error: writing the output: {why or exc}", err=True)
            return 1
        return code


def _rolled_back() -> str:
    """After an interrupt: the recovery of what the command had opened, run now
    (:meth:`.Context.recover`), and how it went, for the command's last line: rolled back; or
    left to the next command's open where it could not run (another command holds the store's
    lock, a second interrupt); or what it could not undo, which ``status`` lists too."""
    ctx, Context.last = Context.last, None
    if ctx is None:
        return "was rolled back"
    try:
        failed = ctx.recover()
    except (Exception, KeyboardInterrupt, Interrupted) as exc:
        log.debug("rolling back after the interrupt: %r", exc)
        return "is rolled back by the next command"
    if failed:
        return f"could not all be rolled back ({failed[0][1]}); see `graphdriver status`"
    return "was rolled back"


def main(blocked: Collection[int] = ()) -> None:
    """Entry point of the ``graphdriver`` script. *blocked*: signals the caller blocked until
    the handlers are in place (a command server's worker), let in then."""
    # a layer's names are bytes: one that is not UTF-8 goes out as it is (surrogateescape),
    # whatever error handler the environment asked for (PYTHONIOENCODING=utf-8 says strict)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    Context.last = None
    try:
        catch_interrupts()
        if blocked:  # one that came meanwhile is raised here, and said as any other
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        extend_by_plugins()
        try:
            cli.main(prog_name="graphdriver", standalone_mode=True)
        except SystemExit as done:  # (click's way out, every time)
            raise SystemExit(_flushed(done.code)) from None
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
        name = signal.Signals(signum).name
        undo = _rolled_back()
        click.echo(f"graphdriver: interrupted by {name}; what it had half done {undo}", err=True)
        sys.exit(128 + signum)
    except Exception as exc:  # a bug: still one line, the traceback at debug level
        log.debug("unexpected error", exc_info=True)
        click.echo(
            f"graphdriver: internal error: {exc!r} (run with --log-level debug for details)",
            err=True,
        )
        sys.exit(1)
