"""``graphdriver check``: the store's records against its storage, with ``--repair``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli_common import Context, emit, json_option, one_command, pass_ctx


@click.command("check")
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

    # (--digests mounts layers to hash them, and unmounts those no record counts)
    one_command(reads_only=not (repair or digests))
    report = check_store(
        Path(ctx.root).absolute(), ctx.driver, ctx.opts, repair=repair, digests=digests
    )
    found: list[Repair | Problem] = [*report.repaired, *report.problems]
    if ctx.json:
        emit(ctx, [item.as_json() for item in found])
    else:
        for item in found:
            click.echo(item.line())
    if report.problems:
        sys.exit(1)
