"""``graphdriver serve NAME``: servers that bridge the store to a container engine."""

from __future__ import annotations

import click

from .cli_common import Fail, json_option
from .plugins import entry_point_names, load_entry_point

SERVE_GROUP = "graphdriver.serve"


class ServeGroup(click.Group):
    """Each server is a click command named by an entry point of the group
    ``graphdriver.serve`` (the integration packages under integrations/); it is imported only
    when it runs, so that the core CLI never imports an engine's libraries (grpcio for
    containerd). Every server gets the one ``--json`` option of the CLI."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(entry_point_names(SERVE_GROUP))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        value = entry_point_names(SERVE_GROUP).get(cmd_name)
        if value is None:
            return None
        command = load_entry_point(value)
        if not isinstance(command, click.Command):
            raise Fail(f"entry point {value!r} of {SERVE_GROUP} is not a click command")
        if not any(p.name == "json" for p in command.params):
            json_option(command)
        return command


@click.group(cls=ServeGroup)
def serve() -> None:
    """Serve the store to a container engine (containerd's proxy snapshotter, ...).

    The servers come from integration packages (graphdriver-containerd, ...); this lists the
    installed ones. Each runs in the foreground until SIGTERM or SIGINT.
    """
