"""``mpilaunch emulator serve``: run the local Batch emulator in the foreground."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from mpilaunch.emulator import defaults
from node_runtime.errors import InvalidInput

DEFAULT_DATA = Path(".mpilaunch") / "emulator"


@click.group()
def emulator() -> None:
    """The local Azure Batch emulator (the unmodified azure-batch SDK drives it)."""


@emulator.command()
@click.option("--host", default=defaults.HOST, show_default=True, help="Address to listen on.")
@click.option("--port", default=defaults.PORT, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0 = any free port; the chosen one is printed).")
@click.option("--data", "data_dir", default=str(DEFAULT_DATA), show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="State directory (SQLite + node roots).")
@click.option("--account", default=defaults.ACCOUNT, show_default=True, help="Batch account name.")
@click.option("--key", default=defaults.KEY, help="Account key, base64 [default: the documented dev key].")
@click.option("--accept-bearer", is_flag=True, help="Also accept any 'Bearer' token (testing Entra code paths).")
@click.option("--no-execute", is_flag=True, help="Serve the API only: store tasks but never run them.")
@click.option("--nodes", "node_kind", type=click.Choice(["auto", "docker", "process"]), default="auto",
              show_default=True, help="'docker': container pools get docker containers of the pool's image and VM "
              "pools (metadata mpilaunch-emulator-nodes=vm) containers of --vm-image; 'auto': the same when the "
              "docker engine answers, else such pools are refused; 'process': container pools get process nodes, "
              "VM pools are refused. Other pools always get process nodes.")
@click.option("--docker-scope", default="mpilaunch", show_default=True,
              help="Label value (org.mpilaunch.emulator=SCOPE) of this emulator's docker containers and networks.")
@click.option("--vm-image", default=defaults.VM_IMAGE, show_default=True, envvar=defaults.VM_IMAGE_VARIABLE,
              show_envvar=True, help="Image of VM pools' nodes (a bare OS, built by scripts/build-vm-image).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request (method, path, status, time) to stderr.")
def serve(*, host: str, port: int, data_dir: Path, account: str, key: str, accept_bearer: bool,
          no_execute: bool, node_kind: str, docker_scope: str, vm_image: str, verbose: bool) -> None:
    """Serve the Batch REST API until Ctrl-C or SIGTERM; state persists in DATA."""
    import logging

    from mpilaunch.emulator.nodes.choose import describe, make_provider
    from mpilaunch.emulator.server import EmulatorServer

    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", level=logging.WARNING)
    if verbose:
        logging.getLogger("mpilaunch.emulator").setLevel(logging.INFO)

    if not account or not account.replace("-", "").isalnum():
        raise InvalidInput(f"--account {account!r}: use letters and digits")
    provider = None if no_execute else make_provider(node_kind, docker_scope=docker_scope, vm_image=vm_image)
    try:
        server = EmulatorServer(data_dir, host=host, port=port, account=account, key=key, bearer=accept_bearer,
                                execute=not no_execute, provider=provider)
    except ValueError as exc:
        raise InvalidInput(f"--key: {exc}") from exc
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.start()
    try:
        click.echo(f"Batch emulator listening on {server.endpoint}")
        click.echo(f"  account: {account}")
        click.echo(f"  key:     {key}")
        click.echo(f"  data:    {data_dir.resolve()}")
        if provider is not None:
            click.echo(f"  nodes:   {describe(provider)}")
        click.echo("Stop with Ctrl-C.", nl=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("emulator stopped")
