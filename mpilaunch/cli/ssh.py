"""``mpilaunch ssh``: a shell (or one command) on a task's node, or any pool node, through Batch's remote login."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import click

from mpilaunch.cli import cliopts

MAX_EXPIRY = timedelta(days=365)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("task_id", required=False)
@click.argument("command", nargs=-1)
@click.option("--job", default=cliopts.DEFAULT_JOB, show_default=True, envvar="MPILAUNCH_JOB", help="Job id.")
@click.option("--instance", type=int, default=0, show_default=True,
              help="Which instance's node (0 = the primary).")
@click.option("--pool", "pool_id", help="With --node: log in to this pool's node instead of a task's.")
@click.option("--node", "node_id", help="With --pool: the node id (mpilaunch pool show lists them).")
@click.option("--admin", is_flag=True, help="Make the temporary node user an administrator (sudo).")
@click.option("--expiry", default="2h", show_default=True,
              help="The node user expires after this (e.g. 30m, 2h, 1d) if it is not deleted at the end.")
@click.option("--tty/--no-tty", "-t/-T", default=None,
              help="Force a terminal for the session, or none [default: a terminal for an interactive shell].")
@click.option("-o", "--ssh-option", "ssh_options", multiple=True, metavar="OPTION=VALUE",
              help="Extra ssh option (repeatable), e.g. -o LocalForward=8888:localhost:8888.")
@cliopts.connection_options
def ssh(**opts: Any) -> int:
    """Open a shell on the node of TASK's instance (or run COMMAND there) as a temporary node user.

    \b
      mpilaunch ssh TASK                      a login shell in the task's working directory on the primary's node
      mpilaunch ssh TASK --instance 2         ... on instance 2's node
      mpilaunch ssh TASK -- nvidia-smi        run one command there (its exit status is ours)
      mpilaunch ssh --pool P --node ID -- df -h

    Batch adds the user (your fresh Ed25519 key, an expiry, not an administrator unless --admin), says where to
    connect, and OpenSSH's ssh connects; the user is deleted when the session ends (Ctrl-C too). If this client
    dies first, the user remains until it expires (Batch keeps Linux expiries to the day).
    """
    from mpilaunch.client import nodelogin
    from mpilaunch.client.spec import parse_duration
    from node_runtime.errors import InvalidInput

    command = tuple(opts["command"])
    if opts["pool_id"] or opts["node_id"]:
        if not (opts["pool_id"] and opts["node_id"]):
            raise InvalidInput("--pool and --node go together (or give a TASK instead)")
        if opts["task_id"]:  # `ssh --pool P --node N -- cmd`: the first word is the command's
            command = (opts["task_id"], *command)
        target = nodelogin.Target(opts["pool_id"], opts["node_id"])
    elif not opts["task_id"]:
        raise InvalidInput("give a TASK (its node), or --pool and --node")
    expiry = parse_duration(opts["expiry"])
    if not 0 < expiry.total_seconds() <= MAX_EXPIRY.total_seconds():
        raise InvalidInput(f"--expiry {opts['expiry']!r}: must be longer than 0s and at most {MAX_EXPIRY.days}d (the "
                           "node user is a temporary one)")
    for option in opts["ssh_options"]:
        if "=" not in option:
            raise InvalidInput(f"--ssh-option {option!r}: expected OPTION=VALUE")

    launch = cliopts.launcher(opts)
    if not (opts["pool_id"] and opts["node_id"]):
        target = nodelogin.target_for(launch.results(cliopts.ref(opts)), opts["instance"])
    code, report = nodelogin.open_session(launch, target, command, admin=opts["admin"], expiry=expiry,
                                          tty=opts["tty"], options=opts["ssh_options"], note=cliopts.note,
                                          check_pool=not opts["local"])
    if opts["output"] == "json":  # stdout is the session's: the summary goes to stderr
        click.echo(json.dumps(report), err=True)
    elif code == 255 and not opts["local"]:
        cliopts.note(f"ssh could not connect or log in (exit 255): is SSH reachable on the pool's nodes? "
                     f"See {nodelogin.NAT_DOC}")
    return code
