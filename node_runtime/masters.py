"""The remote nodes' services seen from the primary: one OpenSSH control master per remote node.

A master is ``ssh -M -S <control socket> HOST <SESSION>`` with the task's ``ssh_config``, and it does three jobs:

- its login is launch's wait for that node's service: the host key is pinned by the derived known_hosts and the
  task's user key must be accepted. Once logged in (and listening on its control socket), ssh runs its
  ``LocalCommand``, which says :data:`LOGGED_IN`; ssh exiting instead, with its reason, is a failed attempt. Before
  that, during the login, ssh prints the service's banner: the node's fabric detection, the line ``coordinate``
  wrote to :data:`node_runtime.fabric.NODE_FILE` (``Banner`` in the node's ``sshd_config``; ssh shows banners at
  ``LogLevel INFO``, which masters get, and mpirun's ssh, at ``ERROR``, does not). So the detection costs the wait
  nothing: a session that printed it would answer only a round trip after the login;
- mpirun's own ssh connections to that node go through its control socket (``ControlPath`` in ``ssh_config``)
  instead of logging in again, so the wait costs mpirun nothing (unless the node's TMPDIR is too long for a Unix
  socket path: see :func:`node_runtime.sshd.control_dir`; then mpirun logs in itself);
- its session is that node's stop switch: it waits for end-of-input, then ends the node's sshd listener (sessions
  already open, like mpirun's, finish normally), says :data:`STOPPED` and removes the node's TMPDIR and key dir
  (``MPILAUNCH_KEY_DIR``, which the service's sshd sets for its sessions like TMPDIR). End-of-input
  also comes when launch dies, however it dies (its end of the socket closes), so the remote services never
  outlive the launch.

Each master's stdin, stdout and stderr are one socket of a socketpair (one descriptor per node on our side).
Masters run in their own session: a terminal's Ctrl-C reaches mpirun, not the switches.

No user shell start-up file runs: ssh runs ``LocalCommand`` with ``$SHELL -c``, and bash with a socket as stdin
takes itself for an ssh session and sources ``/etc/bash.bashrc`` and ``~/.bashrc`` (``BASH_ENV`` too), once per
remote node (seen: a ``pyenv rehash`` there serialised 99 logins on one lock). The masters' ssh therefore gets
``SHELL=/bin/sh`` (a POSIX sh reads no start-up file with ``-c``) and no ``BASH_ENV``/``ENV``; the remote side's
sessions get ``SHLVL=1`` from the service's sshd_config (see :func:`node_runtime.sshd.render_sshd_config`).

The wait's deadline grows with the number of remote nodes: :func:`node_runtime.coordinate.wait_timeout`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from node_runtime import proc
from node_runtime.coordinate import wait_timeout
from node_runtime.errors import InvalidInput
from node_runtime.fabric import NodeFabric, read_node
from node_runtime.sshd import Service, control_dir, ssh_environ

LOGGED_IN = "mpilaunch-logged-in"
STOPPED = "mpilaunch-service-stopped"
# The remote session: at end-of-input, end the node's sshd listener if its pid file still names it, say so, then
# clean up (the pid file, the node-local TMPDIR and key dir) in the background, so the session ends at once.
SESSION = ('read _ ; d=$MPILAUNCH_SERVICE_DIR; read p < "$d/sshd.pid" && '
           f'grep -qs "$d/sshd_config" "/proc/$p/cmdline" && kill -TERM "$p" && echo {STOPPED}; '
           '{ rm -f "$d/sshd.pid"; for t in "$TMPDIR" "$MPILAUNCH_KEY_DIR"; do case $t in */mpl-*) rm -rf "$t" ;; '
           'esac; done; } </dev/null >/dev/null 2>&1 &')
RETRY_PAUSE = 0.2  # between attempts at a node that did not answer (its service may still be starting)
CONNECT_TIMEOUT = 5.0


def control_path(service: Service, host: str) -> Path | None:
    """The control socket of the master to ``host`` (``ssh_config``'s ``ControlPath`` names the same file), or None
    without multiplexing."""
    directory = control_dir(service)
    return None if directory is None else directory / f"cm-{host}"


@dataclass
class Master:
    """A logged-in master: its process and our end of its stdin/stdout/stderr."""

    host: str
    process: subprocess.Popen[bytes]
    end: socket.socket
    node: NodeFabric | None  # what the node's coordinate detected (its banner; None if it recorded nothing)

    def stop(self, timeout: float) -> bool:
        """End its input; True once the remote side says it stopped the service. The master then exits."""
        deadline = time.monotonic() + timeout
        try:
            self.end.shutdown(socket.SHUT_WR)
            said = _read_until(self.end, lambda seen: STOPPED.encode() in seen, deadline)
        except OSError:
            said = b""
        finally:
            self.end.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(max(0.1, deadline - time.monotonic()))
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        return STOPPED.encode() in said


@dataclass
class Masters:
    """Open a master to every host of ``hosts`` in parallel (a thread each), retrying until the deadline,
    :attr:`deadline_s` = :func:`~node_runtime.coordinate.wait_timeout` of ``timeout`` and the number of hosts.

    ``finished`` is set once every host answered or gave up; :meth:`silent` names those that did not answer,
    :meth:`cancel` ends the waiting early, :meth:`wait` joins the threads, :meth:`stop` stops every opened master's
    node.
    """

    service: Service
    hosts: Sequence[str]
    timeout: float
    opened: dict[str, Master] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # host: ssh's last words, for a node that never answered
    finished: threading.Event = field(default_factory=threading.Event)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _attempts: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _pending: int = 0

    @property
    def deadline_s(self) -> float:
        """Seconds the masters keep trying, from :meth:`start`: ``timeout``, grown with the number of hosts."""
        return wait_timeout(self.timeout, len(self.hosts))

    def start(self) -> None:
        ssh = shutil.which("ssh")
        if ssh is None:
            raise InvalidInput("ssh not found on PATH: install an ssh client (Debian: openssh-client) on the task's "
                               "image")
        self.service.tmp_dir.mkdir(mode=0o700, exist_ok=True)
        deadline = time.monotonic() + self.deadline_s
        self._pending = len(self.hosts)
        if not self.hosts:
            self.finished.set()
        for host in self.hosts:
            thread = threading.Thread(target=self._open, args=(ssh, host, deadline), daemon=True)
            thread.start()
            self._threads.append(thread)

    def silent(self) -> list[str]:
        """The hosts that have not answered (yet), in ``hosts`` order."""
        return [h for h in self.hosts if h not in self.opened]

    def wait(self) -> None:
        """Join the openers."""
        for thread in self._threads:
            thread.join()

    def cancel(self) -> None:
        """Stop waiting: attempts under way are killed, none is started again (opened masters stay)."""
        self._cancelled.set()
        with self._lock:
            for attempt in self._attempts.values():
                with contextlib.suppress(ProcessLookupError):
                    attempt.kill()

    def stop(self, timeout: float) -> dict[str, bool]:
        """Stop the services of every opened master (in parallel); {host: whether it said it stopped}."""
        stopped = dict.fromkeys(self.opened, False)

        def run(master: Master) -> None:
            stopped[master.host] = master.stop(timeout)

        threads = [threading.Thread(target=run, args=(m,), daemon=True) for m in self.opened.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return stopped

    def _open(self, ssh: str, host: str, deadline: float) -> None:
        try:
            while not self._cancelled.is_set() and (remaining := deadline - time.monotonic()) > 0:
                master = self._attempt(ssh, host, remaining)
                if master is not None:
                    self.opened[host] = master
                    return
                self._cancelled.wait(min(RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
        except Exception as exc:  # a thread has nobody to raise to: the host is reported with it
            self.failures[host] = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self.finished.set()

    def _attempt(self, ssh: str, host: str, remaining: float) -> Master | None:
        path = control_path(self.service, host)
        if path is not None:
            path.unlink(missing_ok=True)  # a master refuses an existing socket (one a killed launch left)
        ours, theirs = socket.socketpair()
        multiplexing = [] if path is None else ["-M", "-S", str(path), "-o", "ControlPersist=no"]
        argv = [ssh, "-F", str(self.service.client_config), *multiplexing, "-o", "LogLevel=INFO",
                "-o", "PermitLocalCommand=yes",
                "-o", f"LocalCommand=echo {LOGGED_IN}",
                "-o", f"ConnectTimeout={math.ceil(min(CONNECT_TIMEOUT, remaining))}", host, SESSION]
        with self._lock:
            if self._cancelled.is_set():
                ours.close()
                theirs.close()
                return None
            try:
                process = proc.spawn(argv, env=ssh_environ(), stdin=theirs.fileno(), stdout=theirs.fileno(),
                                     stderr=theirs.fileno(), new_session=True)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            self._attempts[host] = process
        said = _read_until(ours, lambda seen: LOGGED_IN.encode() in seen, time.monotonic() + remaining)
        with self._lock:
            del self._attempts[host]
        if LOGGED_IN.encode() in said:
            banner = said.decode(errors="replace").splitlines()
            return Master(host, process, ours, next(filter(None, map(read_node, banner)), None))
        ours.close()
        if process.poll() is None:
            process.kill()
        process.wait()
        lines = said.decode(errors="replace").strip().splitlines()
        if lines:
            self.failures[host] = lines[-1]
        elif host not in self.failures:  # an attempt cut short at the deadline must not hide an earlier reason
            self.failures[host] = ("no answer before the deadline" if process.returncode < 0
                                   else f"ssh exited with code {process.returncode}")
        return None


def _read_until(end: socket.socket, done: Callable[[bytes], bool], deadline: float) -> bytes:
    """What ``end`` says until ``done`` of it, end-of-file, or ``deadline``."""
    seen = b""
    with contextlib.suppress(OSError):
        while not done(seen) and (remaining := deadline - time.monotonic()) > 0:
            end.settimeout(remaining)
            chunk = end.recv(4096)
            if not chunk:
                break
            seen += chunk
    return seen
