"""``node-runtime launch``: on the primary, wait for every node's service, run mpirun, stop the services.

The run, in order: refuse unless this node is the primary; close the gate (a lock file that every ssh of mpirun must
take, shared, before it connects: :func:`node_runtime.mpirun.ssh_command`) and open a control master to every
remote node (:mod:`node_runtime.masters`: its login is the wait for that node's service, mpirun's sessions to that
node then go through it, and it stops that node's service at the end, even if launch is killed); meanwhile find
mpirun, detect its flavor, build its argv and start it: it starts up while the services are awaited, but cannot
reach another node before the gate opens. Once every service answered, open the gate (else kill mpirun and what it
started, before it reached any node, and name the silent hosts); forward SIGTERM/SIGINT, stop every node's service,
and write ``launch-report.json`` in the working directory.

Every rank runs behind :mod:`node_runtime.ranktap` (a Python program through :mod:`node_runtime.rankmain`, so that
an uncaught exception on any rank ends the job); mpirun's output goes through :mod:`node_runtime.output` (raw to our
stdout/stderr, tagged to ``ranks.log``), watched by :mod:`node_runtime.failure`, whose first failure (which rank, on
which node, how) goes into the report and, in one line, to stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from node_runtime import fabric, output, proc, ranktap, sshd, watchdog
from node_runtime.contract import (
    DEFAULT_FABRIC,
    LAUNCH_REPORT_NAME,
    NODE_ADDRESS_VARIABLE,
    RANKS_LOG_NAME,
    SECRET_VARIABLE,
    MpiFlavor,
)
from node_runtime.coordinate import prepare, service
from node_runtime.env import NodeEnvironment
from node_runtime.errors import CommandFailed, HangDetected, InvalidInput, MpilaunchError, ServiceError, TaskFailed
from node_runtime.failure import Analyzer
from node_runtime.keys import forget_secret, write_private_file
from node_runtime.masters import Masters
from node_runtime.mpirun import (
    aborts_on_exception,
    build_mpirun_argv,
    hostfile_text,
    python_rank_command,
    spec_for_node,
    ssh_wrapper_script,
    tap_command,
    with_runtime_environment,
)

REPORT_NAME = LAUNCH_REPORT_NAME
DEFAULT_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL = 0.05
WAIT_NOTICE = 5.0  # seconds of waiting for the services after which launch says whom it waits for


@dataclass
class Report:
    """What launch-report.json records (never the secret: it is scrubbed before writing)."""

    hosts: Sequence[str]
    command: Sequence[str]
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    flavor: str | None = None
    ppn: int | None = None
    fabric: dict[str, Any] = field(default_factory=dict)  # the choice, its reason and what drives it
    layout: dict[str, Any] = field(default_factory=dict)  # ranks per node, threads per rank, binding
    nodes: dict[str, Any] = field(default_factory=dict)  # every node's fabric detection
    argv: list[str] = field(default_factory=list)
    rank_command: list[str] = field(default_factory=list)  # what runs on every rank (behind the tap)
    abort_on_exception: bool | None = None  # a Python program: whether it runs through node_runtime.rankmain
    ranks_log: str | None = None  # every rank's lines, tagged (contract.RANKS_LOG_NAME), once mpirun started
    output_bytes: dict[str, int] = field(default_factory=dict)  # raw bytes the ranks (and MPI) wrote, per stream
    first_failure: dict[str, Any] | None = None  # which rank failed first, where, how (node_runtime.failure)
    timings: dict[str, float] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)
    services_stopped: dict[str, bool] = field(default_factory=dict)
    exit_code: int | None = None
    error: str | None = None

    def failed(self, error: MpilaunchError) -> None:
        """launch ends with ``error`` (the watchdog's :class:`HangDetected` is the first failure too)."""
        self.error, self.exit_code = error.message, error.exit_code
        if isinstance(error, HangDetected):
            self.first_failure = _failure_of("hang", error.message)

    def write(self, directory: Path, secret: str | None) -> Path:
        finished = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        data: dict[str, Any] = {**self.__dict__, "finished_at": finished}
        text = json.dumps(data, indent=2, default=list) + "\n"
        if secret:
            text = text.replace(secret, "<hidden>")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / REPORT_NAME
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path


def launch(env: NodeEnvironment, environ: Mapping[str, str], command: Sequence[str], *, ppn: int | None = None,
           threads: int | None = None, flavor: MpiFlavor | None = None, fabric_request: str = DEFAULT_FABRIC,
           allow_small_shm: bool = False, timeout: float = DEFAULT_TIMEOUT,
           hang_timeout: float | None = None, abort_on_exception: bool = True) -> int:
    """Run ``command`` on every host of the task under mpirun (``ppn`` ranks per node, default: the node's physical
    cores / ``threads``; the fabric :func:`node_runtime.fabric.choose` picks for ``fabric_request``); returns
    mpirun's exit code (128+N for signal N). With ``hang_timeout`` (seconds), :mod:`node_runtime.watchdog` ends a
    job without output or checkpoint for that long (:class:`~node_runtime.errors.HangDetected`). A Python program
    runs through :mod:`node_runtime.rankmain` (an uncaught exception on any rank ends the job) unless
    ``abort_on_exception`` is False; every rank's output goes through :mod:`node_runtime.output` (raw to our
    stdout/stderr, tagged to ranks.log) and the first failure into the report (:mod:`node_runtime.failure`)."""
    if not env.is_primary:
        raise InvalidInput(f"launch runs on the primary node only: this node is {env.current_address}, the primary "
                           f"is {env.primary_address} (AZ_BATCH_IS_CURRENT_NODE_MASTER=false)")
    if not command:
        raise InvalidInput("launch needs a command: node-runtime launch [options] -- COMMAND ARGS...")
    started = time.monotonic()
    environ = with_runtime_environment(environ, sys.prefix, sys.base_prefix)  # the ranks' python3 is ours
    report = Report(hosts=list(env.hosts_primary_first), command=list(command))
    svc = _client_side(env)
    forget_secret()  # the keys are on disk: launch, which lives as long as the job, does not show the secret
    masters = Masters(svc, [h for h in env.hosts_primary_first if h != env.current_address], timeout)
    # in the service directory, the same path on every node like ssh_config; a launch's own (an mpirun of an earlier
    # launch that still runs holds its gate)
    gate = _Gate(svc.files.directory / f"gate-{os.getpid()}.lock")
    child: subprocess.Popen[bytes] | None = None
    ranks: _RankOutput | None = None
    with _forwarding_signals() as signals:
        try:
            with signals.deferring():  # a signal must not leave a half-started wait behind
                gate.hold()
                masters.start()
            mpirun = _mpirun_path()
            chosen = _detect(mpirun, flavor)
            report.flavor = chosen.value
            node, choice, placement = _plan(env, svc, report, fabric_request=fabric_request, ppn=ppn,
                                            threads=threads, shared_machine=NODE_ADDRESS_VARIABLE in environ)
            argv, mpirun_env = _mpirun_command(env, environ, svc, flavor=chosen, placement=placement, choice=choice,
                                               command=command, mpirun=mpirun,
                                               gate=gate.path if masters.hosts else None,
                                               abort_on_exception=abort_on_exception, report=report)
            with signals.deferring():  # a signal must not come between the start and `child` knowing it
                child, ranks = _spawn(argv, mpirun_env, env, placement.ppn)
            report.argv, report.ranks_log = argv, RANKS_LOG_NAME
            silent = _wait_for_services(svc, masters, child, started, timeout)
            report.unreachable = [h for h in env.hosts_primary_first if h in silent]
            report.timings["wait_services_s"] = round(time.monotonic() - started, 4)
            if report.unreachable and child.poll() is None:  # (an mpirun that ended already says why itself)
                raise ServiceError(f"the coordination service did not answer within {timeout:g}s on "
                                   f"{len(report.unreachable)} host(s): {', '.join(report.unreachable)} (port "
                                   f"{env.ssh_port}; did 'node-runtime coordinate' succeed there?); mpirun was "
                                   "stopped before it reached any node",
                                   details=[f"{h}: {masters.failures[h]}" for h in report.unreachable
                                            if h in masters.failures])
            if child.poll() is None:
                _check_nodes(report, {svc.address: node, **{h: m.node for h, m in masters.opened.items()}},
                             placement.ppn, allow_small_shm)
            through = time.monotonic()
            with signals.deferring():
                # same process group: whoever kills our group kills mpirun too; a signal sent to us alone is
                # forwarded (a terminal's Ctrl-C then reaches mpirun twice, which Open MPI takes as one abort)
                signals.targets.append(child)
                gate.open()
            with watchdog.watching(hang_timeout, env.working_dir, svc, child, list(masters.opened)):
                code = child.wait()  # (HangDetected at the end of the block if the watchdog ended the job)
            report.timings["mpirun_s"] = round(time.monotonic() - through, 4)
            report.exit_code = 128 - code if code < 0 else code
            return report.exit_code
        except MpilaunchError as exc:
            report.failed(exc)
            raise
        finally:
            signals.deferred = True  # from here on a signal is only noted: the clean-up must end
            _wind_up(report, svc, masters, gate, child)
            _conclude(report, ranks, started, env)


def _client_side(env: NodeEnvironment) -> sshd.Service:
    """This node's service description; (re)writes the client files if coordinate did not leave them."""
    svc = service(env)
    if not (svc.files.user_key.is_file() and svc.files.known_hosts.is_file()):
        return prepare(env)
    sshd.write_client_config(svc)  # unless it is current already
    return svc


def _plan(env: NodeEnvironment, svc: sshd.Service, report: Report, *, fabric_request: str, ppn: int | None,
          threads: int | None, shared_machine: bool) -> tuple[fabric.NodeFabric, fabric.FabricChoice, fabric.Layout]:
    """This node's detection, the fabric and the layout, chosen from it (every other node must agree: checked at
    the gate), recorded in the report and said once on stderr. Nodes that share one machine (the emulator's, which
    say their address in MPILAUNCH_NODE_ADDRESS) share its cores and are not bound."""
    node = _own_node(env, svc)
    choice = fabric.choose(fabric_request, node)
    cores = max(1, node.physical_cores // len(env.hosts)) if shared_machine else node.physical_cores
    placement = fabric.layout(cores, ppn, threads, shared=shared_machine)
    report.ppn, report.fabric, report.layout = placement.ppn, _as_dict(choice), _as_dict(placement)
    print(f"node-runtime: launch: {choice.describe()}; {placement.describe(len(env.hosts))}", file=sys.stderr,
          flush=True)
    return node, choice, placement


def _own_node(env: NodeEnvironment, svc: sshd.Service) -> fabric.NodeFabric:
    """This node's fabric detection, as coordinate recorded it (detected now if it did not)."""
    with contextlib.suppress(OSError):
        node = fabric.read_node((svc.files.directory / fabric.NODE_FILE).read_text())
        if node is not None:
            return node
    return fabric.detect(env.current_address, sshd.clean_environ(), env.node_shared_dir)


def _as_dict(value: fabric.FabricChoice | fabric.Layout) -> dict[str, Any]:
    return {name: list(v) if isinstance(v, tuple) else v for name, v in value.__dict__.items()}


def _check_nodes(report: Report, nodes: Mapping[str, fabric.NodeFabric | None], ppn: int,
                 allow_small_shm: bool) -> None:
    """Record every node's detection; refuse nodes that differ in what they offer MPI, and (unless allowed) a
    /dev/shm too small for ``ppn`` ranks; mpirun, still at the gate, has reached no node."""
    report.nodes = {h: None if n is None else n.to_dict() for h, n in nodes.items()}
    odd = fabric.disagreements(nodes)
    if odd:
        raise ServiceError("the nodes differ in what they offer MPI (fabric, MPI, cores): refusing to launch on an "
                           "uneven pool; mpirun was stopped before it reached any node", details=odd)
    small = fabric.shm_problems(nodes, ppn)
    if small and not allow_small_shm:
        raise ServiceError(f"{fabric.SHM_MOUNT} is too small for {ppn} ranks per node on {len(small)} node(s); "
                           "mpirun was stopped before it reached any node", details=[*small, fabric.shm_fix(ppn)])
    for problem in small:
        print(f"node-runtime: launch: warning: {problem} (going on: --allow-small-shm)", file=sys.stderr, flush=True)


def _mpirun_path() -> str:
    found = shutil.which("mpirun")
    if found is None:
        raise InvalidInput("mpirun not found on PATH: install an MPI (Debian: openmpi-bin) on the task's image")
    return str(Path(found).absolute())


def _detect(mpirun: str, given: MpiFlavor | None) -> MpiFlavor:
    if given is not None:
        return given
    done = proc.run([mpirun, "--version"], timeout=30, check=False, env=sshd.clean_environ())
    return fabric.detect_flavor((done.stdout + done.stderr).decode(errors="replace"))


def _mpirun_command(env: NodeEnvironment, environ: Mapping[str, str], svc: sshd.Service, *, flavor: MpiFlavor,
                    placement: fabric.Layout, choice: fabric.FabricChoice, command: Sequence[str], mpirun: str,
                    gate: Path | None = None, abort_on_exception: bool = True,
                    report: Report | None = None) -> tuple[list[str], dict[str, str]]:
    """The mpirun argv and its environment (never the secret; TMPDIR node-local, like on the other nodes); with a
    ``gate``, mpirun's ssh commands wait at it (:func:`node_runtime.mpirun.ssh_command`). Every rank runs behind
    :mod:`node_runtime.ranktap`; a Python program through :mod:`node_runtime.rankmain` (see :func:`_rank_command`)."""
    if gate is not None and shutil.which("flock", path=environ.get("PATH")) is None:
        raise InvalidInput("flock not found on PATH: install util-linux on the task's image")
    mpirun_env = {k: v for k, v in environ.items() if k != SECRET_VARIABLE}
    mpirun_env["TMPDIR"] = str(svc.tmp_dir)
    svc.tmp_dir.mkdir(mode=0o700, exist_ok=True)
    program = command[0] if "/" in command[0] else shutil.which(command[0], path=environ.get("PATH")) or command[0]
    rank_command = _rank_command([program, *command[1:]], mpirun_env, abort_on_exception, env.working_dir)
    if report is not None:
        report.rank_command = rank_command
        report.abort_on_exception = aborts_on_exception(rank_command)
    hostfile = wrapper = None
    directory = svc.files.directory
    if flavor is not MpiFlavor.OPENMPI:
        wrapper = directory / "ssh-wrapper"
        write_private_file(wrapper, ssh_wrapper_script(svc.client_config, gate).encode())
        wrapper.chmod(0o700)
    if flavor is not MpiFlavor.OPENMPI or any(":" in h for h in env.hosts):
        hostfile = directory / "hostfile"
        write_private_file(hostfile, hostfile_text(flavor, env.hosts_primary_first, placement.ppn).encode())
    spec = spec_for_node(env, mpirun_env, flavor=flavor, ppn=placement.ppn, command=rank_command,
                         ssh_config=svc.client_config, as_root=os.geteuid() == 0, hostfile=hostfile,
                         ssh_wrapper=wrapper, gate=gate, mpirun=mpirun,
                         interface=None if flavor is MpiFlavor.OPENMPI else choice.interface, fabric=choice,
                         threads=placement.threads, bind=placement.bind,
                         tap=tap_command(sys.executable, Path(ranktap.__file__)))
    return build_mpirun_argv(spec), mpirun_env


def _rank_command(command: list[str], environ: Mapping[str, str], abort_on_exception: bool,
                  cwd: Path) -> list[str]:
    """``command`` (its program resolved), or, for a Python program when ``abort_on_exception``, the same through
    :mod:`node_runtime.rankmain` (:func:`node_runtime.mpirun.python_rank_command`) if that interpreter can import
    it (the runtime's own can; another is asked, once, on this node, in the ranks' working directory ``cwd``);
    else ``command`` and a warning."""
    rewritten = python_rank_command(command) if abort_on_exception else None
    if rewritten is None:
        return command
    if _imports_runtime(command[0], environ, cwd):
        return rewritten
    print(f"node-runtime: launch: warning: {command[0]} cannot import node_runtime (it is not the runtime's "
          "Python): it runs as given, and an uncaught exception on one rank will not end the job (run the "
          "runtime's python3, or add -m mpi4py)", file=sys.stderr, flush=True)
    return command


def _imports_runtime(python: str, environ: Mapping[str, str], cwd: Path) -> bool:
    """Whether ``python`` can import :mod:`node_runtime.rankmain`: ours and those of our virtual environment's
    ``bin`` can (by where they are, not what they point to: a venv's python3 is often a link to the system's, which
    cannot); another is asked."""
    where = Path(python).absolute()
    if where == Path(sys.executable).absolute() or os.path.realpath(where.parent) == os.path.realpath(
            Path(sys.prefix) / "bin"):
        return True
    try:
        done = proc.run([python, "-c", "import node_runtime.rankmain"], timeout=60, check=False, env=environ,
                        cwd=cwd if cwd.is_dir() else None)
    except CommandFailed:  # it cannot even start here: mpirun will say so, rank by rank
        return False
    return done.returncode == 0


@dataclass
class _RankOutput:
    pump: output.Pump
    analyzer: Analyzer


def _spawn(argv: list[str], environ: Mapping[str, str], env: NodeEnvironment,
           ppn: int) -> tuple[subprocess.Popen[bytes], _RankOutput]:
    """Start mpirun with its stdout and stderr on the output pump (which owns copies of the pipes' descriptors;
    the originals are closed here), the first-failure analyzer watching. ranks.log is opened first: a working
    directory that cannot take it fails the launch before mpirun runs."""
    log = output.RanksLog(env.working_dir / RANKS_LOG_NAME)
    try:
        child = proc.spawn(argv, env=environ, cwd=env.working_dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    except BaseException:
        log.close()
        raise
    assert child.stdout is not None and child.stderr is not None
    fds = os.dup(child.stdout.fileno()), os.dup(child.stderr.fileno())
    child.stdout.close()
    child.stderr.close()
    child.stdout = child.stderr = None
    analyzer = Analyzer(env.hosts_primary_first, ppn)
    return child, _RankOutput(output.Pump(*fds, env.working_dir, observer=analyzer, log=log).start(), analyzer)


def _conclude(report: Report, ranks: _RankOutput | None, started: float, env: NodeEnvironment) -> None:
    """The end of every launch: the ranks' output drained, the first failure found, the report written."""
    _finish_output(report, ranks)
    report.timings["total_s"] = round(time.monotonic() - started, 4)
    report.write(env.working_dir, env.task_secret)


def _finish_output(report: Report, ranks: _RankOutput | None) -> None:
    """Drain mpirun's output, then record the first failure (unless the job succeeded) and say it in one line."""
    if ranks is not None:
        ranks.pump.finish()
        report.output_bytes = dict(ranks.pump.bytes)
    if report.first_failure is not None or report.exit_code in (None, 0):
        return
    seen = ranks is not None and ranks.analyzer.first() is not None
    if report.error and not seen:  # launch's own failure (already said as the error)
        report.first_failure = _failure_of("launch", report.error)
        return
    report.first_failure = ranks.analyzer.first_failure(report.exit_code) if ranks is not None else None
    if report.first_failure is not None:
        print(f"node-runtime: launch: first failure: {report.first_failure['summary']} (every rank's lines: "
              f"{RANKS_LOG_NAME})", file=sys.stderr, flush=True)


def _failure_of(how: str, summary: str | None) -> dict[str, Any]:
    """A first failure that is launch's own (``launch``: it refused or could not start the job; ``hang``)."""
    return {"rank": None, "node": None, "how": how, "exit_code": None, "signal": None, "signal_name": None,
            "exception": None, "evidence": [], "detail": None, "summary": summary or how, "stderr_tail": []}


def _wind_up(report: Report, svc: sshd.Service, masters: Masters, gate: _Gate,
             child: subprocess.Popen[bytes] | None) -> None:
    """Whatever happened: stop waiting, kill an mpirun still held at the gate, stop every node's service."""
    stopping = time.monotonic()
    masters.cancel()
    if child is not None and not gate.is_open:
        _kill_gated(child)
    gate.release()
    masters.wait()
    report.services_stopped = stop_services(svc, masters)
    report.timings["stop_services_s"] = round(time.monotonic() - stopping, 4)


def _wait_for_services(svc: sshd.Service, masters: Masters, child: subprocess.Popen[bytes], started: float,
                       timeout: float) -> list[str]:
    """Wait until every remote node answered or gave up (``masters.finished``) and this node's sshd runs (its pid
    file names a live sshd of our config: coordinate checked it with a login, and mpirun does not connect to it),
    or until mpirun ended on its own; returns the hosts that did not answer. A wait longer than
    :data:`WAIT_NOTICE` seconds says on stderr whom it waits for."""
    own = noticed = False

    def silent() -> list[str]:
        return [*([] if own else [svc.address]), *masters.silent()]

    while True:
        own = own or sshd.running_pid(svc) is not None
        waited = time.monotonic() - started
        if child.poll() is not None or (masters.finished.is_set() and (own or waited >= timeout)):
            return silent()
        if not noticed and waited >= WAIT_NOTICE:
            noticed = True
            reasons = [f"{h}: {masters.failures[h]}" for h in silent() if h in masters.failures]
            print(f"node-runtime: launch: still waiting (up to {timeout:g}s) for the coordination service on "
                  f"{', '.join(silent())}" + (f" ({'; '.join(reasons)})" if reasons else ""), file=sys.stderr,
                  flush=True)
        if own:
            masters.finished.wait(POLL)  # returns as soon as the last node answered
        else:
            time.sleep(POLL)


class _Gate:
    """A lock file: mpirun's ssh commands wait for a shared lock on it, which they get once we no longer hold it
    exclusively (:meth:`hold`, then :meth:`open`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.is_open = False
        self._fd: int | None = None

    def hold(self) -> None:
        """Take the lock exclusively: whatever waits at the gate (mpirun's ssh commands) waits until :meth:`open`."""
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)  # not inherited by children (PEP 446)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ServiceError(f"{self.path} is locked by another process (an mpirun of an earlier launch that "
                               "is still running?)") from exc

    def open(self) -> None:
        """Let go of the exclusive lock: the waiting ssh commands get their shared locks and go on."""
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.is_open = True

    def release(self) -> None:
        """Let go of the file and remove it (open or not: call it only once whatever waits at the gate is gone)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _kill_gated(child: subprocess.Popen[bytes]) -> None:
    """Kill an mpirun that never got through the gate, and everything it started (its ssh commands wait at the gate):
    nothing of it reached another node, so nothing is left anywhere."""
    import psutil

    if child.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGSTOP)  # no new children while we collect them
        try:
            family = psutil.Process(child.pid).children(recursive=True)
        except psutil.Error:
            family = []
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()
        child.kill()
    child.wait()


def stop_services(svc: sshd.Service, masters: Masters) -> dict[str, bool]:
    """Stop every node's service: the remote ones through their masters, ours meanwhile. A remote service counts as
    stopped once its master's session says so; one that never answered cannot be stopped (False)."""
    stopped = dict.fromkeys(masters.hosts, False)
    remote = threading.Thread(target=lambda: stopped.update(masters.stop(STOP_TIMEOUT)), daemon=True)
    remote.start()
    stopped[svc.address] = sshd.stop(svc)
    remote.join()
    return stopped


@dataclass
class _Signals:
    """What SIGTERM and SIGINT do while :func:`_forwarding_signals` is active."""

    targets: list[subprocess.Popen[bytes]] = field(default_factory=list)  # forwarded to these (mpirun), once any
    deferred: bool = False  # now is no time to act on a signal: keep it in ``pending``
    pending: int | None = None

    def deliver(self, signum: int) -> None:
        """Forward the signal to the targets; without any, end the launch (:class:`TaskFailed`, exit 128+N)."""
        if not self.targets:
            raise _interrupted(signum)
        for child in self.targets:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Within the block a signal is only kept (so mpirun cannot start, or pass the gate, unbeknown to us); after
        it, a kept one is delivered."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            self.deliver(signum)


def _interrupted(signum: int) -> TaskFailed:
    error = TaskFailed(f"launch interrupted by {signal.Signals(signum).name} while waiting for the coordination "
                       "services, before mpirun reached any node")
    error.exit_code = 128 + signum
    return error


@contextlib.contextmanager
def _forwarding_signals() -> Iterator[_Signals]:
    """While active, SIGTERM and SIGINT go to the processes in ``targets`` (mpirun, once through the gate); before
    there is one, they end the launch (TaskFailed, exit code 128+N): mpirun is killed, the report written and the
    services stopped. Set ``deferred`` for good to make them wait for the end (the clean-up)."""
    state = _Signals()

    def forward(signum: int, _frame: object) -> None:
        if state.deferred:
            state.pending = signum
        else:
            state.deliver(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
