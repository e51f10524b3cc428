"""What the user asks for: an MPI run on N nodes, as a frozen, validated dataclass (no Azure import; validation only
checks that the inputs exist).

:func:`TaskSpec.validate` applies the Batch *Add Task* rules that we can check before any network call, so a bad
spec fails fast with a message naming the offending value. Everything else about the wire format lives in
:mod:`mpilaunch.client.taskbuild`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from mpilaunch.client.checkpoint import parse_location
from node_runtime import durations
from node_runtime.contract import DEFAULT_FABRIC, DEFAULT_SSH_PORT, FABRICS, FLAVORS
from node_runtime.errors import InvalidInput, InvalidRequest

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_DISPLAY_NAME = 1024
BIND_SOURCES = ("Shared", "Startup", "VfsMounts", "Task", "JobPrep", "Applications")
RESERVED_ENV_PREFIXES = ("AZ_BATCH_", "MPILAUNCH_", "CCP_")


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid Batch id (job, task, pool), else raise naming it."""
    if not ID_RE.match(value):
        raise InvalidRequest(
            f"invalid {kind} id {value!r}: use 1-64 characters, letters, digits, '-' or '_'")
    return value


@dataclass(frozen=True)
class BindMount:
    """A host path (one of Batch's ContainerHostDataPath names) mounted into the task container."""

    source: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> BindMount:
        """Parse ``SOURCE`` or ``SOURCE:ro`` / ``SOURCE:rw`` (case-insensitive source name)."""
        name, _, mode = text.partition(":")
        match = [s for s in BIND_SOURCES if s.lower() == name.strip().lower()]
        if not match or mode not in ("", "ro", "rw"):
            raise InvalidInput(f"invalid bind mount {text!r}: expected SOURCE[:ro|:rw] with SOURCE one of "
                               f"{', '.join(BIND_SOURCES)}")
        return cls(match[0], mode == "ro")


@dataclass(frozen=True)
class HostMount:
    """Any host path mounted into the task container (a docker ``--mount`` in the container run options)."""

    source: str
    target: str
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> HostMount:
        """Parse ``HOST:CONTAINER[:ro|:rw]`` (absolute paths, no commas)."""
        parts = text.split(":")
        mode = parts.pop() if len(parts) == 3 else ""
        if len(parts) != 2 or mode not in ("", "ro", "rw") or not all(p.startswith("/") for p in parts) or \
                any("," in p for p in parts):
            raise InvalidInput(f"invalid mount {text!r}: expected HOST:CONTAINER[:ro|:rw] with absolute paths "
                               f"and no commas")
        return cls(parts[0], parts[1], mode == "ro")

    def option(self) -> str:
        """The docker option: ``--mount type=bind,source=S,target=T[,readonly]``."""
        return f"--mount=type=bind,source={self.source},target={self.target}{',readonly' if self.read_only else ''}"


@dataclass(frozen=True)
class Registry:
    """A private container registry; either a username/password or a node identity (ARM resource id)."""

    server: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity: str | None = None


@dataclass(frozen=True)
class ContainerSpec:
    """Run every instance inside ``image`` (the pool must have a container configuration)."""

    image: str
    bind_mounts: tuple[BindMount, ...] = ()
    registry: Registry | None = None
    run_options: str = ""
    host_mounts: tuple[HostMount, ...] = ()

    @property
    def all_run_options(self) -> str:
        """``run_options`` followed by one quoted ``--mount`` per host mount."""
        return " ".join([self.run_options, *(shlex.quote(m.option()) for m in self.host_mounts)]).strip()


@dataclass(frozen=True)
class TaskSpec:
    """One MPI program run as a multi-instance task.

    ``argv`` is what rank processes execute (e.g. ``("python3", "app.py")``). ``inputs`` are local files or
    directories every node receives in its task directory; ``primary_inputs`` go to the primary only. ``outputs``
    are file patterns (relative to the working directory) uploaded from the primary when the task ends. ``env``
    holds the user's variables, exported to every rank. ``checkpoint_url`` is the ``--checkpoint`` location
    (see :mod:`mpilaunch.client.checkpoint`); :meth:`Launcher.build` adds the SAS a Blob location needs.
    """

    job_id: str
    task_id: str
    nodes: int
    argv: tuple[str, ...]
    ppn: int | None = None
    mpi: str | None = None
    fabric: str = DEFAULT_FABRIC  # auto | ucx | tcp (see docs/fabric.md)
    threads_per_rank: int | None = None  # hybrid MPI+OpenMP: OMP_NUM_THREADS per rank
    inputs: tuple[Path, ...] = ()
    primary_inputs: tuple[Path, ...] = ()
    outputs: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    container: ContainerSpec | None = None
    wall_time: timedelta | None = None
    hang_timeout: timedelta | None = None  # launch --hang-timeout: no output and no checkpoint for this long ends it
    abort_on_exception: bool = True  # a Python program runs through node_runtime.rankmain (launch's default)
    retries: int = 0
    elevated: bool = False
    display_name: str | None = None
    ssh_port: int = DEFAULT_SSH_PORT
    checkpoint_url: str | None = field(default=None, repr=False)
    upload_logs: bool = True

    def validate(self) -> TaskSpec:
        """Raise :class:`InvalidInput` / :class:`InvalidRequest` listing every problem; return self if fine."""
        problems: list[str] = []
        for kind, value in (("job", self.job_id), ("task", self.task_id)):
            try:
                check_id(kind, value)
            except InvalidRequest as exc:
                problems.append(exc.message)
        if self.nodes < 1:
            problems.append(f"nodes must be >= 1, got {self.nodes}")
        if not self.argv or not self.argv[0]:
            problems.append("the command to run is empty")
        if any("\0" in a for a in self.argv):
            problems.append("a command argument contains a NUL character")
        if self.ppn is not None and self.ppn < 1:
            problems.append(f"processes per node must be >= 1, got {self.ppn}")
        problems += _placement_problems(self.threads_per_rank, self.fabric)
        if self.mpi is not None and self.mpi not in FLAVORS:
            problems.append(f"unknown MPI flavor {self.mpi!r}: expected one of {', '.join(FLAVORS)}")
        if self.display_name is not None and len(self.display_name) > MAX_DISPLAY_NAME:
            problems.append(f"display name is {len(self.display_name)} characters long, the limit is "
                            f"{MAX_DISPLAY_NAME}")
        if self.retries < -1:
            problems.append(f"retries must be -1 (unlimited) or >= 0, got {self.retries}")
        problems += _time_problems(self.wall_time, self.hang_timeout)
        if not 1 <= self.ssh_port <= 65535:
            problems.append(f"ssh port must be in 1..65535, got {self.ssh_port}")
        problems += _checkpoint_problems(self.checkpoint_url)
        problems += _env_problems(self.env)
        problems += _path_problems(self.inputs + self.primary_inputs)
        problems += [f"output pattern {p!r} must be a relative path" for p in self.outputs
                     if not p or p.startswith("/")]
        if problems:
            raise InvalidInput(f"invalid task spec ({len(problems)} problem(s))", details=problems)
        return self


def _placement_problems(threads_per_rank: int | None, fabric: str) -> list[str]:
    problems = []
    if threads_per_rank is not None and threads_per_rank < 1:
        problems.append(f"threads per rank must be >= 1, got {threads_per_rank}")
    if fabric not in FABRICS:
        problems.append(f"unknown fabric {fabric!r}: expected one of {', '.join(FABRICS)}")
    return problems


def _time_problems(wall_time: timedelta | None, hang_timeout: timedelta | None) -> list[str]:
    problems = []
    if wall_time is not None and wall_time <= timedelta(0):
        problems.append(f"wall time must be positive, got {wall_time}")
    if hang_timeout is not None and hang_timeout < timedelta(seconds=1):
        problems.append(f"hang timeout must be at least 1s, got {hang_timeout}")
    return problems


def _checkpoint_problems(location: str | None) -> list[str]:
    try:
        if location is not None:
            parse_location(location)
    except InvalidInput as exc:
        return [exc.message]
    return []


def _env_problems(env: tuple[tuple[str, str], ...]) -> list[str]:
    problems = []
    seen: set[str] = set()
    for name, _value in env:
        if not ENV_NAME_RE.match(name):
            problems.append(f"invalid environment variable name {name!r}")
        elif name.upper().startswith(RESERVED_ENV_PREFIXES):
            problems.append(f"environment variable {name!r} is reserved (prefixes "
                            f"{', '.join(RESERVED_ENV_PREFIXES)} are set by Batch and mpilaunch)")
        if name in seen:
            problems.append(f"environment variable {name!r} is given twice")
        seen.add(name)
    return problems


def _path_problems(paths: tuple[Path, ...]) -> list[str]:
    problems = [f"input {str(p)!r} does not exist" for p in paths if not p.exists()]
    names: dict[str, Path] = {}
    for p in paths:
        if p.name in names and names[p.name] != p:
            problems.append(f"inputs {str(names[p.name])!r} and {str(p)!r} would land at the same path {p.name!r}")
        names[p.name] = p
    return problems


def parse_env(items: tuple[str, ...] | list[str]) -> tuple[tuple[str, str], ...]:
    """Parse ``NAME=VALUE`` strings (``NAME`` alone is not accepted: be explicit about what ranks see)."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput(f"invalid environment setting {item!r}: expected NAME=VALUE")
        out.append((name, value))
    return tuple(out)


def parse_duration(text: str) -> timedelta:
    """Parse ``90s``, ``45m``, ``2h30m``, ``1d``, or ``HH:MM:SS`` (:func:`node_runtime.durations.parse_duration`:
    the nodes read ``--hang-timeout`` with it)."""
    return timedelta(seconds=durations.parse_duration(text))
