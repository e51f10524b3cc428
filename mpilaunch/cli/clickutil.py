"""Click plumbing of the mpilaunch CLI: lazily imported subcommands and friendly error reporting."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import click

from node_runtime.errors import MpilaunchError, failed, interrupted


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when used, so ``--help`` stays fast.

    ``lazy`` maps a command name to ``"package.module:attribute"``.
    """

    def __init__(self, *args: Any, lazy: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module_name, attr = self.lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


def run_cli(group: click.Command, prog_name: str, argv: list[str] | None = None) -> int:
    """Run a click group, turning :class:`MpilaunchError` into ``prog: error: message`` and its exit code."""
    try:
        result = group.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except MpilaunchError as exc:
        return failed(prog_name, exc)
    except click.exceptions.Abort:
        return interrupted(prog_name)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return result if isinstance(result, int) else 0


def entry_point(group: click.Command, prog_name: str) -> Callable[[], None]:
    """Build a console-script ``main()`` for ``group``."""

    def main() -> None:
        sys.exit(run_cli(group, prog_name))

    return main
