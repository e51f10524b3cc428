"""Asking before something that cannot be undone (deleting pools, jobs, tasks, staged files)."""

from __future__ import annotations

import sys

import click

from node_runtime.errors import InvalidInput, MpilaunchError


def confirm(question: str, yes: bool) -> None:
    """Go on if ``yes`` or the user says so on a terminal; raise otherwise (never waits on a non-terminal stdin)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise InvalidInput(f"{question.rstrip('?')}: not confirmed (stdin is not a terminal); add --yes")
    if not click.confirm(question, default=False, err=True):
        raise MpilaunchError("not confirmed: nothing was deleted")
