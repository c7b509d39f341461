"""The shape of the ``graphdriver`` command: every verb, lazily loaded ones and the installed
servers of ``serve`` included, takes the one ``--json`` option, says what it does, has help on
every option, and gives each short option one meaning across the whole tree."""

from __future__ import annotations

from collections.abc import Iterator

import click
from click.testing import CliRunner

from graphdriver import hookimpl
from graphdriver.cli import cli, extend_by_plugins
from graphdriver.plugins import hooks


def _walk(
    group: click.Group, path: tuple[str, ...] = ("graphdriver",)
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    ctx = click.Context(group)
    yield path, group
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, f"{' '.join(path)} lists {name} but cannot load it"
        if isinstance(command, click.Group):
            yield from _walk(command, (*path, name))
        else:
            yield (*path, name), command


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option)]


def test_every_verb_takes_json_and_every_option_has_help() -> None:
    tree = list(_walk(cli))
    verbs = [(path, c) for path, c in tree if not isinstance(c, click.Group)]
    names = {" ".join(path[1:]) for path, _ in verbs}
    # the lazily loaded modules and the installed servers are in the walk
    assert {"ls", "diff", "check", "volume create", "container rm"} <= names, names
    assert any(name.startswith("serve ") for name in names), names
    problems = []
    for path, command in tree:
        where = " ".join(path)
        if not (command.help or command.short_help):
            problems.append(f"{where}: no help text")
        for option in _options(command):
            if not option.help and option.name != "help":
                problems.append(f"{where} {'/'.join(option.opts)}: no help text")
        if not isinstance(command, click.Group):
            json_opts = [o for o in _options(command) if "--json" in o.opts]
            if len(json_opts) != 1 or not json_opts[0].is_flag:
                problems.append(f"{where}: no --json flag")
    assert problems == [], "\n".join(problems)


def test_one_meaning_per_short_option() -> None:
    meanings: dict[str, set[str]] = {}
    for path, command in _walk(cli):
        for option in _options(command):
            longs = [o for o in option.opts if o.startswith("--")]
            for short in (o for o in option.opts if not o.startswith("--")):
                meanings.setdefault(short, set()).update(longs or [" ".join(path)])
    mixed = {short: sorted(longs) for short, longs in meanings.items() if len(longs) > 1}
    assert mixed == {}, mixed
    assert meanings["-o"] == {"--output"}  # the output file, never an option
    assert "-d" not in meanings or meanings["-d"] == {"--driver"}  # the storage driver only


def test_the_json_option_is_one_and_the_same() -> None:
    """One decorator: every verb's --json has the same help and sets the same flag."""
    helps = {
        o.help
        for path, c in _walk(cli)
        if path != ("graphdriver",)
        for o in _options(c)
        if "--json" in o.opts
    }
    assert len(helps) == 1, helps


class _ExtendsTheCli:
    @hookimpl
    def graphdriver_cli(self, group: click.Group) -> None:
        @group.command("hello")
        @click.option("--json", is_flag=True, help="JSON.")
        def hello(json: bool) -> None:
            """Say hello."""
            click.echo("hello")

        ls = group.get_command(click.Context(group), "ls")
        assert ls is not None
        ls.params.append(click.Option(["--audit"], is_flag=True, help="Audit."))


def test_a_cli_plugin_sees_the_lazily_loaded_commands() -> None:
    plugin = _ExtendsTheCli()
    hooks().pm.register(plugin, name="test-cli-plugin")
    try:
        extend_by_plugins()
        assert "hello" in cli.commands and "ls" in cli.commands
        result = CliRunner().invoke(cli, ["hello"])
        assert result.exit_code == 0 and result.output == "hello\n"
        assert "--audit" in CliRunner().invoke(cli, ["ls", "--help"]).output
    finally:
        hooks().pm.unregister(plugin)
        cli.commands.pop("hello", None)
        ls = cli.commands["ls"]
        ls.params[:] = [p for p in ls.params if p.name != "audit"]
