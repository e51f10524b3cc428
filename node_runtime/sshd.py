"""The coordination service: an sshd bound to this node's address on the task port, accepting only the task key.

Its files are the task's: ``sshd_config``, ``ssh_config``, the pid file and the log in the service directory
(``$AZ_BATCH_TASK_SHARED_DIR/.mpilaunch``, nothing secret: Batch's file APIs serve it), the keys, ``authorized_keys``
and ``known_hosts`` in a private key dir outside the node root (:func:`node_runtime.keys.private_base`), removed
with the service; nothing global except the privilege-separation directory sshd itself requires when run as root.
Works as root and as an unprivileged user (then sshd can only log in that user).

A node runs one task at a time (``taskSlotsPerNode=1``), so an mpilaunch sshd of this user found listening on our
address and port belongs to a task that ended without stopping its service (killed, timed out, failed before its
launch stopped the services): :func:`start` replaces it. Any other listener on the port is a clear error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from node_runtime import proc, tmpdirs
from node_runtime.contract import SECRET_VARIABLE
from node_runtime.errors import ServiceError
from node_runtime.fabric import NODE_FILE
from node_runtime.keys import SERVICE_DIR_NAME, KeyFiles, ensure_private_dir, private_base, write_private_file

SSHD_SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/sbin")
START_TIMEOUT = 30.0  # upper bounds (a start takes milliseconds), generous for a node loaded by a big task's ranks
VERIFY_TIMEOUT = 30.0
PRIVSEP_DIR = Path("/run/sshd")  # compiled into Debian's sshd; needed only when sshd runs as root
KEY_DIR_SUFFIX = "-keys"
"""A service's key dir is named like its TMPDIR, plus this."""
OUR_SSHD = re.compile(rf"\bsshd:? .* -f \S+/{re.escape(SERVICE_DIR_NAME)}/sshd_config ")
"""The command line (or process title) of an sshd this module started, for any task."""


@dataclass(frozen=True)
class Service:
    """One node's coordination service: where it listens, who may log in, and where its files are (``tmp_dir``: its
    sessions' TMPDIR)."""

    address: str
    port: int
    files: KeyFiles
    user: str
    tmp_dir: Path
    session_env: tuple[tuple[str, str], ...] = ()  # set for its sessions: see batch_session_environment

    @property
    def config(self) -> Path:
        return self.files.directory / "sshd_config"

    @property
    def client_config(self) -> Path:
        return self.files.directory / "ssh_config"

    @property
    def pid_file(self) -> Path:
        return self.files.directory / "sshd.pid"

    @property
    def log(self) -> Path:
        return self.files.directory / "sshd.log"

    @property
    def listen(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


def service_for(task_shared_dir: str | Path, address: str, port: int, *, node_root: Path | None = None,
                environ: Mapping[str, str] | None = None) -> Service:
    """The service of the task whose shared dir is ``task_shared_dir``, on ``address``:``port``. Its key dir is chosen
    by :func:`node_runtime.keys.private_base` from ``environ`` (default: ours), outside ``node_root`` (the node's
    ``AZ_BATCH_NODE_ROOT_DIR``, which the runtime always gives; None keeps out of no directory, for tools that only
    need the paths), and named like its TMPDIR (see :func:`node_dir_name`)."""
    directory = Path(task_shared_dir) / SERVICE_DIR_NAME
    name = node_dir_name(directory, address, port)
    private = private_base(node_root, os.environ if environ is None else environ) / f"{name}{KEY_DIR_SUFFIX}"
    return Service(address, port, KeyFiles(directory, private), current_user(), tmpdirs.base() / name,
                   batch_session_environment(os.environ if environ is None else environ))


BATCH_PREFIX = "AZ_BATCH_"
NOT_FOR_SESSIONS = frozenset({"AZ_BATCH_AUTHENTICATION_TOKEN"})  # a credential: it must not reach sshd_config


def batch_session_environment(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """This node's Batch variables (``AZ_BATCH_*`` but the authentication token), which its sshd sets for every
    session (``SetEnv``), so that the ranks mpirun starts here see their own node's. Values sshd_config cannot quote
    (a double quote, a backslash, a control character) are left out."""
    return tuple((name, value) for name, value in sorted(environ.items())
                 if name.startswith(BATCH_PREFIX) and name not in NOT_FOR_SESSIONS
                 and not re.search(r'["\\\x00-\x1f]', value))


def clean_environ() -> dict[str, str]:
    """This process's environment without the task secret: what our sshd and ssh children get."""
    return {k: v for k, v in os.environ.items() if k != SECRET_VARIABLE}


LOCAL_SHELL = "/bin/sh"
"""The shell ssh runs ``LocalCommand`` with (``$SHELL``): never the user's, which may read start-up files."""
_SHELL_STARTUP_VARIABLES = ("BASH_ENV", "ENV")


def ssh_environ() -> dict[str, str]:
    """Our ssh clients' environment: :func:`clean_environ` with ``SHELL`` = :data:`LOCAL_SHELL` and without the
    variables that name start-up files for non-interactive shells."""
    env = {k: v for k, v in clean_environ().items() if k not in _SHELL_STARTUP_VARIABLES}
    env["SHELL"] = LOCAL_SHELL
    return env


def current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def node_dir_name(service_dir: Path, address: str, port: int) -> str:
    """The name of the service's node-local dirs (``mpl-<uid>-<hash>``): its TMPDIR for the ranks and Open MPI's
    session files, and (with :data:`KEY_DIR_SUFFIX`) its key dir; unique per user, node and task.

    Short because Open MPI puts Unix sockets in the TMPDIR (108-byte limit); unique (the node's address is part of
    it, as nodes of one machine may see their task directory at the same path) so nodes that share a machine don't
    share their session directories or keys, nor remove each other's.
    """
    digest = hashlib.sha256(f"{service_dir.resolve()}\0{address}\0{port}".encode()).hexdigest()[:12]
    return f"{tmpdirs.prefix()}{digest}"


def render_sshd_config(service: Service) -> str:
    """sshd_config for the service (pure)."""
    files = service.files
    return "\n".join([
        "# mpilaunch coordination service (generated; do not edit)",
        f"ListenAddress {service.listen}",
        f"HostKey {files.host_key}",
        f"PidFile {service.pid_file}",
        f"AuthorizedKeysFile {files.authorized_keys}",
        "AuthorizedKeysCommand none",
        f"AllowUsers {service.user}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "GSSAPIAuthentication no",
        "PermitRootLogin prohibit-password",
        "PermitEmptyPasswords no",
        "PermitUserEnvironment no",
        "UsePAM no",
        # Our key files sit in a 0700 directory we own (checked in keys.ensure_private_dir), maybe below a sticky
        # /dev/shm or /tmp, our config in Batch task dirs that may be group-writable: StrictModes would reject those.
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "AllowTcpForwarding no",
        "PermitTunnel no",
        # The node's fabric detection, sent before the login: launch's masters (LogLevel INFO) learn it on the
        # login they wait for anyway; every other ssh of the task (LogLevel ERROR) does not print it.
        f"Banner {files.directory / NODE_FILE}",
        "MaxStartups 256:30:512",
        "MaxSessions 64",
        "LoginGraceTime 30",
        "KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",
        "HostKeyAlgorithms ssh-ed25519",
        "PubkeyAcceptedAlgorithms ssh-ed25519",
        # SHLVL=1: bash then runs as a nested shell and skips ~/.bashrc, which it otherwise sources for every ssh
        # command: the ranks get exactly the environment launch exports, and each hop saves the rc files' cost.
        f"SetEnv TMPDIR={service.tmp_dir} MPILAUNCH_SERVICE_DIR={files.directory} MPILAUNCH_KEY_DIR={files.private} "
        "SHLVL=1" + "".join(f' "{name}={value}"' for name, value in service.session_env),
        "LogLevel INFO",
        "",
    ])


def render_client_config(service: Service, *, connect_timeout: int = 5) -> str:
    """ssh_config for reaching any node's service: the task key, the derived known_hosts, no prompts (pure)."""
    files = service.files
    return "\n".join([
        "# mpilaunch task ssh client settings (generated; do not edit)",
        "Host *",
        f"  Port {service.port}",
        f"  User {service.user}",
        f"  IdentityFile {files.user_key}",
        "  IdentitiesOnly yes",
        "  IdentityAgent none",
        f"  UserKnownHostsFile {files.known_hosts}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  CheckHostIP no",
        "  UpdateHostKeys no",
        "  HostKeyAlgorithms ssh-ed25519",
        "  KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",
        "  BatchMode yes",
        f"  ConnectTimeout {connect_timeout}",
        "  ConnectionAttempts 1",
        "  GSSAPIAuthentication no",
        "  PasswordAuthentication no",
        "  KbdInteractiveAuthentication no",
        "  ForwardAgent no",
        "  ForwardX11 no",
        "  ServerAliveInterval 15",
        *_multiplexing(service),
        "  LogLevel ERROR",
        "",
    ])


UNIX_PATH_MAX = 108  # bytes, the terminating NUL included
LONGEST_HOST = 39  # an IPv6 address
MASTER_SUFFIX = 17  # a master creates its socket as <path>.<16 random characters>, then renames it


def control_dir(service: Service) -> Path | None:
    """Where launch's control masters listen (``cm-<host>``), or None if the node's TMPDIR is too long for a Unix
    socket path there: any ssh given a too long ControlPath dies, so then there is no multiplexing at all."""
    longest = len(os.fsencode(service.tmp_dir)) + len("/cm-") + LONGEST_HOST + MASTER_SUFFIX
    return service.tmp_dir if longest < UNIX_PATH_MAX else None


def _multiplexing(service: Service) -> list[str]:
    """The client settings that send a session through launch's master connection to its node, if there is one."""
    directory = control_dir(service)
    return [] if directory is None else [f"  ControlPath {directory}/cm-%h", "  ControlMaster no"]


def find_sshd(explicit: str | None = None) -> Path:
    """The sshd binary (absolute: sshd refuses to re-exec otherwise): ``explicit``, else PATH, else sbin dirs."""
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServiceError(f"sshd not found or not executable: {explicit}")
        return path.resolve()
    found = shutil.which("sshd") or shutil.which("sshd", path=os.pathsep.join(SSHD_SEARCH_PATH))
    if found is None:
        raise ServiceError("sshd not found on PATH or in " + ", ".join(SSHD_SEARCH_PATH)
                           + ": install openssh-server (Debian/Ubuntu) on the task's image")
    return Path(found).resolve()


def write_sshd_config(service: Service) -> bool:
    """Write sshd_config; returns True if it changed (then a running sshd must be replaced)."""
    return _write_if_changed(service.config, render_sshd_config(service))


def write_client_config(service: Service) -> None:
    """Write the ssh_config that ``ssh -F`` (ours and mpirun's) uses to reach the task's services."""
    _write_if_changed(service.client_config, render_client_config(service))


def _write_if_changed(path: Path, text: str) -> bool:
    ensure_private_dir(path.parent)
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    write_private_file(path, text.encode())
    return True


def running_pid(service: Service) -> int | None:
    """The pid of this service's sshd if it is alive (and really ours: its command line names our config)."""
    try:
        pid = int(service.pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError, IndexError):
        return None
    return pid if f" {service.config} ".encode() in cmdline else None  # sshd rewrites its title: a substring


def start(service: Service, sshd: Path) -> tuple[int, bool]:
    """Start sshd in its own session (it outlives this process); wait until it listens, then write its pid file.
    Returns its pid and whether a leftover service of an earlier task had to be stopped to free the port.

    sshd runs in the foreground (``-D``) so a failed bind is seen as its exit, with the reason in its log.
    """
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    service.pid_file.unlink(missing_ok=True)
    try:
        return _start_once(service, sshd), False
    except ServiceError:
        if not any(_terminate(pid) for pid in leftover_pids(service)):
            raise
    for directory in (service.tmp_dir, service.files.private):  # they name the dead sshd: no sweep may take them
        tmpdirs.claim(directory)
    return _start_once(service, sshd), True


def _start_once(service: Service, sshd: Path) -> int:
    node_dirs = (service.tmp_dir, service.files.private)
    with tmpdirs.locked(*(d.parent for d in node_dirs)):  # a concurrent sweep sees the dirs only with owners recorded
        service.tmp_dir.mkdir(mode=0o700, exist_ok=True)
        with service.log.open("wb") as log:
            child = proc.spawn([str(sshd), "-D", "-f", str(service.config), "-E", str(service.log)],
                               env=clean_environ(), stdout=log.fileno(), stderr=subprocess.STDOUT, new_session=True)
        for directory in node_dirs:
            tmpdirs.write_owner(directory, child.pid, service.config)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            raise ServiceError(f"sshd for {service.listen} exited with code {code} at start: {_diagnose(service)}",
                               details=_log_tail(service))
        if any(line.startswith("Server listening on") for line in _log_tail(service)):
            write_private_file(service.pid_file, f"{child.pid}\n".encode())
            return child.pid
        time.sleep(0.002)
    child.kill()
    raise ServiceError(f"sshd for {service.listen} did not start within {START_TIMEOUT:.0f}s",
                       details=_log_tail(service))


def leftover_pids(service: Service) -> list[int]:
    """The pids of mpilaunch sshds (any task's, this user's unless we are root) listening on the service's address
    and port: what a task that did not stop its service left behind. Other listeners are never returned."""
    import psutil

    pids = set()
    for conn in psutil.net_connections(kind="tcp"):
        if (conn.status == psutil.CONN_LISTEN and conn.pid is not None and conn.laddr
                and (conn.laddr.ip, conn.laddr.port) == (service.address, service.port)):
            pids.add(conn.pid)
    found = []
    for pid in sorted(pids):
        try:
            process = psutil.Process(pid)
            title, uid = " ".join(process.cmdline()) + " ", process.uids().real
        except psutil.Error:
            continue
        if OUR_SSHD.search(title) and (uid == os.getuid() or os.geteuid() == 0):
            found.append(pid)
    return found


def _log_tail(service: Service, lines: int = 8) -> list[str]:
    try:
        return service.log.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return []


def _diagnose(service: Service) -> str:
    text = "\n".join(_log_tail(service, 20))
    if "Address already in use" in text:
        return f"port {service.port} on {service.address} is already in use by another process"
    if "Cannot assign requested address" in text:
        return f"{service.address} is not an address of this node"
    return "see its log"


VERIFIED = "mpilaunch-verified"


def verify(service: Service, timeout: float = VERIFY_TIMEOUT) -> None:
    """Log in to this node's own service with OpenSSH's ``ssh`` and the task's client config: the host key must be
    the one the derived known_hosts pins and the task's user key must be accepted. No remote command runs (``-N``):
    ``LocalCommand``, which ssh runs only once logged in, says so, and the connection is then closed."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise ServiceError("ssh not found on PATH: install an ssh client (Debian: openssh-client) on the task's image")
    argv = [ssh, "-F", str(service.client_config), "-N", "-o", f"ConnectTimeout={max(1, round(timeout))}",
            "-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "PermitLocalCommand=yes",
            "-o", f"LocalCommand=echo {VERIFIED}", "-p", str(service.port), service.address]
    child = proc.spawn(argv, env=ssh_environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        said = _first_line(child, time.monotonic() + timeout)
    finally:
        child.kill()
        _, err = child.communicate()
    if said != VERIFIED:
        raise ServiceError(f"the coordination service on {service.listen} failed its check: "
                           f"{_login_failure(err.decode(errors='replace'), service, timeout, said is None)}",
                           details=_log_tail(service, 4))


def _first_line(child: subprocess.Popen[bytes], deadline: float) -> str | None:
    """``child``'s first stdout line; ``""`` if it ended without one, None if none came before ``deadline``."""
    assert child.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if selector.select(left):
                return child.stdout.readline().decode(errors="replace").strip()
    return None


def _login_failure(stderr: str, service: Service, timeout: float, timed_out: bool) -> str:
    """ssh's reason for a failed login, in our words (its own last line kept)."""
    last = (stderr.strip().splitlines() or ["no message"])[-1]
    if timed_out:
        return f"no login within {timeout:g}s ({last})"
    if "Host key verification failed" in stderr or "HOST IDENTIFICATION HAS CHANGED" in stderr:
        return f"its host key is not the task's host key ({last})"
    if "Permission denied" in stderr:
        return f"it does not accept the task's user key for {service.user} ({last})"
    return last


def ensure(service: Service, sshd: Path) -> str:
    """Make the service run and verify it: ``"running"`` (already live), ``"started"`` or ``"replaced"``."""
    write_client_config(service)
    changed = write_sshd_config(service)
    pid = running_pid(service)
    if pid is not None and not changed:
        try:
            verify(service)
            return "running"
        except ServiceError:
            pass
    replaced = stop(service, keep_keys=True)
    try:
        _, evicted = start(service, sshd)
    except ServiceError:
        stop(service)  # no service, so no keys left behind
        raise
    verify(service)
    return "replaced" if replaced or evicted or pid is not None else "started"


def stop(service: Service, timeout: float = 5.0, *, keep_keys: bool = False) -> bool:
    """Stop this service's sshd if it runs (TERM, then KILL) and remove its node-local TMPDIR and, unless
    ``keep_keys`` (to start it again), its key dir; returns whether one was running."""
    shutil.rmtree(service.tmp_dir, ignore_errors=True)
    pid = running_pid(service)
    service.pid_file.unlink(missing_ok=True)
    running = pid is not None and _terminate(pid, timeout)
    if not keep_keys:
        shutil.rmtree(service.files.private, ignore_errors=True)
    return running


def _terminate(pid: int, timeout: float = 5.0) -> bool:
    """TERM ``pid``, KILL it if still alive after ``timeout``; returns whether it was alive."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
