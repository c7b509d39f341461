"""``graphdriver diff`` and ``graphdriver apply-diff``: OCI layer tars out of and into the
store, with a progress bar on a terminal (tqdm, imported only then)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import click

from .cli_common import Context, emit, json_option, pass_ctx
from .cli_layers import PARENT_HELP
from .errors import InvalidOption, from_oserror
from .linux.signals import FdReader

PROGRESS_MIN = 4 << 20


@contextlib.contextmanager
def _progress(total: int | None, label: str) -> Iterator[Any]:
    """A tqdm byte counter on stderr when it is a terminal and the stream is large; it shows
    up only after a second, so quick operations print nothing."""
    if not sys.stderr.isatty() or (total is not None and total < PROGRESS_MIN):
        yield None
        return
    import shutil

    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: signals go to the main thread
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


@click.command()
@click.argument("layer_id")
@click.option("--parent", "-p", default=None, help=PARENT_HELP)
@click.option(
    "--output",
    "-o",
    "output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="Write to FILE instead of stdout ('-' is stdout, as for apply-diff).",
)
@click.option(
    "--compress",
    type=click.Choice(["none", "gzip", "zstd"]),
    default="none",
    show_default=True,
    help="Compress the tar.",
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
    _one_command_heap()
    store = ctx.store()
    if output == "-":
        output = None
    with _progress(None, f"diff {layer_id}") as update:
        if output is None:
            if sys.stdout.isatty():
                raise click.UsageError(
                    "refusing to write a tar to a terminal; use -o FILE or a pipe"
                )
            sys.stdout.flush()
            result = store.export(layer_id, sys.stdout.fileno(), parent, compress, update)
        elif not _regular_or_missing(output):  # /dev/null, a FIFO: written, never replaced
            with open(output, "wb") as f:
                result = store.export(layer_id, f, parent, compress, update)
        else:  # a file appears whole or not at all; a symlink's target is the file written
            real = os.path.realpath(output)
            tmp = Path(real + ".partial")
            try:
                with open(tmp, "wb") as f:
                    result = store.export(layer_id, f, parent, compress, update)
                tmp.replace(real)
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


def _one_command_heap() -> None:
    """This process runs one command and ends (the CLI's, or a served command's worker): the
    archive engine's large blocks stay in its heap (graphdriver.archive.fastpath.keep_heap)."""
    from .archive import fastpath

    fastpath.keep_heap()


def _pipe_like(stream: BinaryIO) -> int | None:
    """The fd of *stream* if it is open on something other than a regular file (a pipe,
    socket, terminal), else None (a file, or a stream of no fd: one a caller put in place of
    ``sys.stdin``)."""
    try:
        fd = stream.fileno()
        return None if stat.S_ISREG(os.fstat(fd).st_mode) else fd
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return None


def _regular_or_missing(path: str) -> bool:
    """Whether *path* (through symlinks) is a regular file or nothing yet."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


@click.command("apply-diff")
@click.argument("layer_id")
@click.argument("source", default="-", metavar="[FILE|-]")
@json_option
@pass_ctx
def apply_diff(ctx: Context, layer_id: str, source: str) -> None:
    """Unpack an OCI layer tar (plain, gzip or zstd) into a fresh layer; print its size and
    diffID."""
    _one_command_heap()
    store = ctx.store()
    with contextlib.ExitStack() as stack:
        if source == "-":
            if sys.stdin is None:
                raise InvalidOption("apply-diff -: standard input is closed; give the tar as FILE")
            stream: BinaryIO = sys.stdin.buffer
            total = None
            fd = _pipe_like(stream)
            if fd is not None:  # a Ctrl-C while its writer stalls ends the command
                stream = io.BufferedReader(FdReader(fd))
        else:
            try:
                stream = stack.enter_context(open(source, "rb"))
            except OSError as exc:
                raise from_oserror(exc, f"open {source}") from exc
            total = os.fstat(stream.fileno()).st_size
        update = stack.enter_context(_progress(total, f"apply {layer_id}"))
        result = store.apply(layer_id, stream, update)
    emit(
        ctx,
        {
            "id": layer_id,
            "size": result.size,
            "diff_id": result.diff_id,
            "compression": result.compression,
        },
        f"{result.size} {result.diff_id}",
    )
