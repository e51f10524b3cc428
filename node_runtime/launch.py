"""``node-runtime launch``: on the primary, wait for every node's service, run mpirun, stop the services.

The run, in order: refuse unless this node is the primary; wait (in parallel, one deadline) until every host's
sshd answers, meanwhile building the mpirun argv with :mod:`node_runtime.mpirun`; run it with output streamed and
SIGTERM/SIGINT forwarded; write ``launch-report.json`` in the working directory; stop every node's service. Remote
services are stopped through a "stop session" per host (in process, :mod:`node_runtime.sshprobe`), whose opening is
the wait for that host: its remote side waits for end-of-input and then ends that node's sshd, so the services also
go away if this process is killed outright (the kernel closes its connections).
"""

from __future__ import annotations

import contextlib
import json
import os
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
from node_runtime import sshd, sshprobe
from node_runtime.coordinate import prepare, service
from node_runtime.env import SECRET_VARIABLE, NodeEnvironment
from node_runtime.keys import derive_private_keys, load_probe_keys, write_private_file
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
# Runs on each remote node in its stop session (sshd's SetEnv gives MPILAUNCH_SERVICE_DIR and TMPDIR): wait for EOF,
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
    sessions: dict[str, StopSession] = {}
    cancel = threading.Event()
    waiting: Callable[[], dict[str, Any]] | None = None
    try:
        with _forwarding_signals(cancel) as forward:
            # the services are waited for while mpirun is found, detected and its argv built: ours until it sends
            # its banner, each remote one until a stop session to it is open (a full ssh login)
            waiting = _start_waiting(svc, env.current_address, remote, timeout, cancel,
                                     keys=_task_keys(env.task_secret))
            mpirun = _mpirun_path()
            chosen = _detect(mpirun, flavor)
            report.flavor = chosen.value
            argv, mpirun_env = _mpirun_command(env, environ, svc, flavor=chosen, ppn=ppn, command=command,
                                               mpirun=mpirun)
            answered, waiting = waiting(), None
            sessions = {h: v for h, v in answered.items() if isinstance(v, StopSession)}
            report.unreachable = [h for h in env.hosts_primary_first if h not in answered]
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
            code = child.wait()
        report.timings["mpirun_s"] = round(time.monotonic() - mpirun_started, 4)
        report.exit_code = 128 - code if code < 0 else code
        return report.exit_code
    except MpilaunchError as exc:
        report.error, report.exit_code = exc.message, exc.exit_code
        raise
    finally:
        stopping = time.monotonic()
        if waiting is not None:  # failed or interrupted while waiting: keep the sessions that opened
            cancel.set()
            sessions = {h: v for h, v in waiting().items() if isinstance(v, StopSession)}
        report.services_stopped = stop_services(svc, remote, sessions, skip=report.unreachable)
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
    answered = _until_answered(hosts, lambda h, remaining: _banner(h, port, remaining), timeout, cancel)()
    return [h for h in hosts if h not in answered]


@dataclass
class StopSession:
    """A logged-in ssh connection to a remote node running :data:`REMOTE_STOP`: it stops that node's service at
    end-of-input, which also comes when this process dies and the kernel closes the socket."""

    connection: sshprobe.Connection
    channel: int

    def stop(self, timeout: float) -> bool:
        """End its input; True once the remote side says it stopped the service."""
        self.connection.deadline = time.monotonic() + timeout
        try:
            return sshprobe.end_input_and_read(self.connection, self.channel, STOPPED)
        except ServiceError:
            return False
        finally:
            self.connection.close()


def _task_keys(secret: str | None) -> tuple[Any, Any] | None:
    """(host public key, user private key) derived from the secret, if we have it (else they are read from the
    client files per host)."""
    if secret is None:
        return None
    user, host = derive_private_keys(secret)
    return host.public_key(), user


def _start_waiting(svc: sshd.Service, local: str | None, remote: Sequence[str], timeout: float,
                   cancel: threading.Event, *, retry: bool = True,
                   keys: tuple[Any, Any] | None = None) -> Callable[[], dict[str, Any]]:
    """Start waiting for our service's banner (``local``) and for a stop session to every remote node; the
    returned function joins and returns {host: True or its StopSession} for the hosts that answered. Without
    ``retry``, one attempt per remote host (the value False marks a failed one)."""

    def attempt(host: str, remaining: float) -> Any:
        if host == local:
            return _banner(host, svc.port, remaining)
        session = _open_stop_session(svc, host, remaining, keys)
        return session if session is not None or retry else False

    return _until_answered([*([local] if local else []), *remote], attempt, timeout, cancel)


def _until_answered(hosts: Sequence[str], attempt: Callable[[str, float], Any], timeout: float,
                    cancel: threading.Event | None = None) -> Callable[[], dict[str, Any]]:
    """Retry ``attempt(host, remaining)`` per host (one thread each, one deadline) until it returns non-None; the
    returned function joins and returns {host: that value}."""
    deadline = time.monotonic() + timeout
    stop = cancel or threading.Event()
    answered: dict[str, Any] = {}

    def run(host: str) -> None:
        while not stop.is_set() and (remaining := deadline - time.monotonic()) > 0:
            value = attempt(host, remaining)
            if value is not None:
                answered[host] = value
                return
            stop.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    threads = [threading.Thread(target=run, args=(h,), daemon=True) for h in hosts]
    for thread in threads:
        thread.start()

    def result() -> dict[str, Any]:
        for thread in threads:
            thread.join()
        return dict(answered)

    return result


def _banner(host: str, port: int, remaining: float) -> bool | None:
    try:
        with socket.create_connection((host, port), timeout=min(1.0, remaining)) as conn:
            return True if conn.recv(64).startswith(b"SSH-") else None
    except OSError:
        return None


def _open_stop_session(svc: sshd.Service, host: str, remaining: float,
                       keys: tuple[Any, Any] | None = None) -> StopSession | None:
    try:
        host_key, user_key = keys or load_probe_keys(svc.files, host, svc.port)
        conn = sshprobe.login(host, svc.port, host_key=host_key, user_key=user_key, user=svc.user,
                              timeout=min(2.0, remaining))
    except ServiceError:
        return None
    try:
        return StopSession(conn, sshprobe.start_command(conn, REMOTE_STOP))
    except ServiceError:
        conn.close()
        return None


def stop_services(svc: sshd.Service, remote: Sequence[str], sessions: dict[str, StopSession],
                  skip: Sequence[str] = ()) -> dict[str, bool]:
    """Stop every node's service: remote ones through their stop sessions (opened now if not yet), and ours
    while they work. A remote service counts as stopped once its session says so."""
    missing = [h for h in remote if h not in sessions and h not in skip]
    if missing:
        opened = _start_waiting(svc, None, missing, STOP_TIMEOUT, threading.Event(), retry=False)()
        sessions.update({h: v for h, v in opened.items() if isinstance(v, StopSession)})
    stopped: dict[str, bool] = dict.fromkeys(remote, False)

    def stop(host: str, session: StopSession) -> None:
        stopped[host] = session.stop(STOP_TIMEOUT)

    threads = [threading.Thread(target=stop, args=item, daemon=True) for item in sessions.items()]
    for thread in threads:
        thread.start()
    stopped[svc.address] = sshd.stop(svc)
    for thread in threads:
        thread.join()
    return stopped


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
