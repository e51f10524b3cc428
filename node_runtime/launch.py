"""``node-runtime launch``: on the primary, wait for every node's service, run mpirun, stop the services.

The run, in order: refuse unless this node is the primary; wait (in parallel, one deadline) until every host's
sshd answers; build the mpirun argv with :mod:`node_runtime.mpirun`; run it with output streamed and SIGTERM/SIGINT
forwarded; write ``launch-report.json`` in the working directory; stop every node's service. Remote services are
stopped through a "stop channel" per host: an ssh session opened while mpirun runs whose remote side waits for EOF
and then ends that node's sshd, so the services also go away if this process is killed outright.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mpilaunch import proc
from mpilaunch.errors import InvalidInput, MpilaunchError, ServiceError, TaskFailed
from node_runtime import sshd
from node_runtime.coordinate import prepare, service
from node_runtime.env import SECRET_VARIABLE, NodeEnvironment
from node_runtime.keys import write_private_file
from node_runtime.mpirun import (
    MpiFlavor,
    build_mpirun_argv,
    detect_flavor,
    hostfile_text,
    spec_for_node,
    ssh_wrapper_script,
)

REPORT_NAME = "launch-report.json"
DEFAULT_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Runs on each remote node in its stop channel (sshd's SetEnv gives MPILAUNCH_SERVICE_DIR and TMPDIR): wait for EOF,
# remove the node-local TMPDIR, end that node's sshd listener if the pid file still names it (sessions already open,
# like this one, finish normally), then say so.
STOPPED = b"mpilaunch-service-stopped\n"
REMOTE_STOP = ('read _ ; case $TMPDIR in */mpl-*) rm -rf "$TMPDIR" ;; esac; d=$MPILAUNCH_SERVICE_DIR; '
               'p=$(cat "$d/sshd.pid") && grep -qs "$d/sshd_config" "/proc/$p/cmdline" && kill -TERM "$p" && '
               f'rm -f "$d/sshd.pid" && echo {STOPPED.decode().strip()}')


@dataclass
class Report:
    """What launch-report.json records (never the secret: it is scrubbed before writing)."""

    hosts: Sequence[str]
    command: Sequence[str]
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    flavor: str | None = None
    ppn: int | None = None
    argv: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)
    services_stopped: dict[str, bool] = field(default_factory=dict)
    exit_code: int | None = None
    error: str | None = None

    def write(self, directory: Path, secret: str | None) -> Path:
        data: dict[str, Any] = {**self.__dict__, "finished_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        text = json.dumps(data, indent=2, default=list) + "\n"
        if secret:
            text = text.replace(secret, "<hidden>")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / REPORT_NAME
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path


def launch(env: NodeEnvironment, environ: Mapping[str, str], command: Sequence[str], *, ppn: int = 1,
           flavor: MpiFlavor | None = None, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Run ``command`` on every host of the task under mpirun; returns mpirun's exit code (128+N for signal N)."""
    if not env.is_master:
        raise InvalidInput(f"launch runs on the primary node only: this node is {env.current_address}, the primary "
                           f"is {env.master_address} (AZ_BATCH_IS_CURRENT_NODE_MASTER=false)")
    if not command:
        raise InvalidInput("launch needs a command: node-runtime launch [options] -- COMMAND ARGS...")
    started = time.monotonic()
    report = Report(hosts=list(env.hosts_primary_first), command=list(command), ppn=ppn)
    svc = _client_side(env)
    remote = [h for h in env.hosts_primary_first if h != env.current_address]
    channels: dict[str, subprocess.Popen[bytes]] = {}
    cancel = threading.Event()
    try:
        with _forwarding_signals(cancel) as forward:
            # the services are waited for while mpirun is found, detected and its argv built
            waiting = start_waiting(env.hosts_primary_first, env.ssh_port, timeout, cancel)
            mpirun = _mpirun_path()
            chosen = _detect(mpirun, flavor)
            report.flavor = chosen.value
            argv, mpirun_env = _mpirun_command(env, environ, svc, flavor=chosen, ppn=ppn, command=command,
                                               mpirun=mpirun)
            report.unreachable = waiting()
            report.timings["wait_services_s"] = round(time.monotonic() - started, 4)
            if report.unreachable:
                raise ServiceError(f"the coordination service did not answer within {timeout:g}s on "
                                   f"{len(report.unreachable)} host(s): {', '.join(report.unreachable)} (port "
                                   f"{env.ssh_port}; did 'node-runtime coordinate' succeed there?)")
            report.argv = argv
            mpirun_started = time.monotonic()
            # same process group: whoever kills our group kills mpirun too; a signal sent to us alone is forwarded
            # (a terminal's Ctrl-C then reaches mpirun twice, which Open MPI takes as one abort)
            child = proc.spawn(argv, env=mpirun_env, cwd=env.working_dir, stdin=subprocess.DEVNULL)
            forward.append(child)
            channels = {h: _open_stop_channel(svc, h) for h in remote}
            code = child.wait()
        report.timings["mpirun_s"] = round(time.monotonic() - mpirun_started, 4)
        report.exit_code = 128 - code if code < 0 else code
        return report.exit_code
    except MpilaunchError as exc:
        report.error, report.exit_code = exc.message, exc.exit_code
        raise
    finally:
        stopping = time.monotonic()
        report.services_stopped = stop_services(svc, remote, channels, skip=report.unreachable)
        report.timings["stop_services_s"] = round(time.monotonic() - stopping, 4)
        report.timings["total_s"] = round(time.monotonic() - started, 4)
        report.write(env.working_dir, env.task_secret)


def _client_side(env: NodeEnvironment) -> sshd.Service:
    """This node's service description; (re)writes the client files if coordinate did not leave them."""
    svc = service(env)
    needed = (svc.client_config, svc.files.user_key, svc.files.known_hosts)
    return svc if all(p.is_file() for p in needed) else prepare(env)


def _mpirun_path() -> str:
    found = shutil.which("mpirun")
    if found is None:
        raise InvalidInput("mpirun not found on PATH: install an MPI (Debian: openmpi-bin) on the task's image")
    return str(Path(found).absolute())


def _detect(mpirun: str, given: MpiFlavor | None) -> MpiFlavor:
    if given is not None:
        return given
    done = proc.run([mpirun, "--version"], timeout=30, check=False, env=sshd.clean_environ())
    return detect_flavor((done.stdout + done.stderr).decode(errors="replace"))


def _mpirun_command(env: NodeEnvironment, environ: Mapping[str, str], svc: sshd.Service, *, flavor: MpiFlavor,
                    ppn: int, command: Sequence[str], mpirun: str) -> tuple[list[str], dict[str, str]]:
    """The mpirun argv and its environment (never the secret; TMPDIR node-local, like on the other nodes)."""
    mpirun_env = {k: v for k, v in environ.items() if k != SECRET_VARIABLE}
    mpirun_env["TMPDIR"] = str(svc.tmp_dir)
    svc.tmp_dir.mkdir(mode=0o700, exist_ok=True)
    program = command[0] if "/" in command[0] else shutil.which(command[0], path=environ.get("PATH")) or command[0]
    hostfile = wrapper = None
    directory = svc.files.directory
    if flavor is not MpiFlavor.OPENMPI:
        wrapper = directory / "ssh-wrapper"
        write_private_file(wrapper, ssh_wrapper_script(svc.client_config).encode())
        wrapper.chmod(0o700)
    if flavor is not MpiFlavor.OPENMPI or any(":" in h for h in env.hosts):
        hostfile = directory / "hostfile"
        write_private_file(hostfile, hostfile_text(flavor, env.hosts_primary_first, ppn).encode())
    spec = spec_for_node(env, mpirun_env, flavor=flavor, ppn=ppn, command=[program, *command[1:]],
                         ssh_config=svc.client_config, as_root=os.geteuid() == 0, hostfile=hostfile,
                         ssh_wrapper=wrapper, mpirun=mpirun,
                         interface=None if flavor is MpiFlavor.OPENMPI else _interface_of(env.current_address))
    return build_mpirun_argv(spec), mpirun_env


def _interface_of(address: str) -> str | None:
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items() if any(a.address == address for a in addrs)),
                None)


def wait_for_services(hosts: Sequence[str], port: int, timeout: float,
                      cancel: threading.Event | None = None) -> list[str]:
    """Wait until every host's sshd sends its banner; returns the hosts that did not within ``timeout``."""
    return start_waiting(hosts, port, timeout, cancel)()


def start_waiting(hosts: Sequence[str], port: int, timeout: float,
                  cancel: threading.Event | None = None) -> Callable[[], list[str]]:
    """Start waiting (one thread per host, one deadline) until every host's sshd sends its banner; the returned
    function blocks until done and returns the hosts that did not answer within ``timeout``."""
    deadline = time.monotonic() + timeout
    stop = cancel or threading.Event()
    answered: set[str] = set()

    def wait(host: str) -> None:
        if _wait_one(host, port, deadline, stop):
            answered.add(host)

    threads = [threading.Thread(target=wait, args=(h,), daemon=True) for h in hosts]
    for thread in threads:
        thread.start()

    def result() -> list[str]:
        for thread in threads:
            thread.join()
        return [h for h in hosts if h not in answered]

    return result


def _wait_one(host: str, port: int, deadline: float, cancel: threading.Event) -> bool:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or cancel.is_set():
            return False
        try:
            with socket.create_connection((host, port), timeout=min(1.0, remaining)) as conn:
                if conn.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        cancel.wait(min(0.05, max(0.0, deadline - time.monotonic())))


def _open_stop_channel(svc: sshd.Service, host: str) -> subprocess.Popen[bytes]:
    """An ssh session to ``host`` that stops its service when our end of stdin closes (EOF). In its own session,
    so a Ctrl-C or a signal to our process group does not cut it short: it ends when we close it or die."""
    return proc.spawn(sshd.ssh_argv(svc, host, [REMOTE_STOP], extra=["-T"]), env=sshd.clean_environ(),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, new_session=True)


def stop_services(svc: sshd.Service, remote: Sequence[str], channels: dict[str, subprocess.Popen[bytes]],
                  skip: Sequence[str] = ()) -> dict[str, bool]:
    """Stop every node's service: remote ones through their stop channels (opened now if not yet), and ours
    while they work. A remote service counts as stopped once its channel says so; the ssh client is then ended
    rather than waited for (its teardown only waits on TCP delayed ACKs)."""
    for host in remote:
        if host not in channels and host not in skip:
            channels[host] = _open_stop_channel(svc, host)
    for channel in channels.values():
        with contextlib.suppress(OSError):
            if channel.stdin is not None:
                channel.stdin.close()
    deadline = time.monotonic() + STOP_TIMEOUT
    stopped: dict[str, bool] = {h: False for h in remote}
    stopped[svc.address] = sshd.stop(svc)
    said = _read_until_stopped(channels, deadline)
    for host, channel in channels.items():
        stopped[host] = said[host]
        if said[host]:
            channel.terminate()
        try:
            channel.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            channel.kill()
            channel.wait()
    return stopped


def _read_until_stopped(channels: Mapping[str, subprocess.Popen[bytes]], deadline: float) -> dict[str, bool]:
    """Read every stop channel's output until it says the service stopped, ends, or the deadline passes."""
    said = dict.fromkeys(channels, False)
    output = {h: b"" for h in channels}
    with selectors.DefaultSelector() as selector:
        for host, channel in channels.items():
            if channel.stdout is not None:
                selector.register(channel.stdout, selectors.EVENT_READ, host)
        while selector.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for ready, _ in selector.select(remaining):
                host = ready.data
                chunk = os.read(ready.fd, 4096)
                output[host] += chunk
                if not chunk or STOPPED in output[host]:
                    said[host] = STOPPED in output[host]
                    selector.unregister(ready.fileobj)
    for channel in channels.values():
        if channel.stdout is not None:
            channel.stdout.close()
    return said


@contextlib.contextmanager
def _forwarding_signals(cancel: threading.Event) -> Iterator[list[subprocess.Popen[bytes]]]:
    """While active, SIGTERM and SIGINT go to the processes in the yielded list (mpirun); before there is one,
    they cancel the launch (TaskFailed, exit code 128+N) so the report is written and the services stopped."""
    targets: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: object) -> None:
        if not targets:
            cancel.set()
            error = TaskFailed(f"launch interrupted by {signal.Signals(signum).name} before mpirun started")
            error.exit_code = 128 + signum
            raise error
        for child in targets:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield targets
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
