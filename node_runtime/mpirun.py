"""Pure builders of the ``mpirun`` command line for Open MPI, MPICH and Intel MPI (no I/O here).

The launch module tells the flavor from ``mpirun --version`` (:func:`~node_runtime.fabric.detect_flavor`), builds a
:class:`LaunchSpec` (see :func:`spec_for_node`), runs :func:`build_mpirun_argv` with the environment
:func:`ranks_environment` returns, and writes :func:`hostfile_text` / :func:`ssh_wrapper_script` where the spec says.
``MPILAUNCH_TASK_SECRET`` can never be exported: :func:`ranks_environment` drops it and :class:`LaunchSpec` refuses it.
MPICH and Intel MPI pass the whole environment by default, so their command lines name the variables to pass
(``-genvlist``; ``-genvnone`` if none).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from node_runtime.addresses import interface_networks, parse_address
from node_runtime.contract import NODE_ADDRESS_VARIABLE, SECRET_VARIABLE, MpiFlavor
from node_runtime.env import VARIABLE_NAME, NodeEnvironment
from node_runtime.errors import InvalidInput
from node_runtime.fabric import PLAIN_TCP, FabricChoice, mpi_settings

#: Variables the ranks always get when the launching process has them.
RANK_VARIABLES = ("PATH", "VIRTUAL_ENV", "PYTHONPATH", "LD_LIBRARY_PATH")
#: Never exported: the secret, and this node's own address (wrong on every other node).
NEVER_EXPORTED = frozenset({SECRET_VARIABLE, NODE_ADDRESS_VARIABLE})
THREADS_VARIABLE = "OMP_NUM_THREADS"  # set to --threads-per-rank when given (instead of the exported one)
#: Never exported either: every rank has its own node's Batch variables (its node's sshd sets them for the session
#: that starts it, see node_runtime.sshd.batch_session_environment); the primary's would be wrong elsewhere.
NODE_OWN_PREFIX = "AZ_BATCH_"


def ranks_environment(environ: Mapping[str, str], export_names: Iterable[str] = ()) -> dict[str, str]:
    """What the ranks must see of ``environ``: :data:`RANK_VARIABLES`, every ``MPILAUNCH_*`` variable and
    ``export_names`` — never :data:`NEVER_EXPORTED` nor ``AZ_BATCH_*``. Names absent from ``environ`` are left out."""
    export_names = tuple(export_names)
    if SECRET_VARIABLE in export_names:
        raise InvalidInput(f"{SECRET_VARIABLE} can never be exported to the ranks")
    names = [*RANK_VARIABLES, *sorted(n for n in environ if n.startswith("MPILAUNCH_")), *export_names]
    return {name: environ[name] for name in dict.fromkeys(names)
            if name in environ and name not in NEVER_EXPORTED and not name.startswith(NODE_OWN_PREFIX)}


def with_runtime_environment(environ: Mapping[str, str], prefix: str, base_prefix: str) -> dict[str, str]:
    """``environ`` with the runtime's virtual environment (``prefix``, when it is not ``base_prefix``: ``sys.prefix``
    and ``sys.base_prefix``) first on ``PATH`` and as ``VIRTUAL_ENV``, so that the ranks' ``python3`` is the one
    that has mpi4py (a pool's ``--install-runtime`` venv); unchanged outside a virtual environment."""
    out = dict(environ)
    if prefix == base_prefix:
        return out
    bin_dir = str(Path(prefix) / "bin")
    path = [p for p in out.get("PATH", "").split(":") if p and p != bin_dir]
    out["PATH"] = ":".join([bin_dir, *path])
    out["VIRTUAL_ENV"] = prefix
    return out


@dataclass(frozen=True)
class LaunchSpec:
    """Everything :func:`build_mpirun_argv` needs; invalid values raise :class:`InvalidInput` naming them."""

    flavor: MpiFlavor
    hosts: tuple[str, ...]  # primary first: rank 0 runs there
    ppn: int  # processes per node
    command: tuple[str, ...]  # the program and its arguments (program path absolute, ideally)
    ssh_config: Path  # the task's ssh client config (port, key, known_hosts)
    working_dir: Path
    environment_names: tuple[str, ...] = ()  # exported by name: the keys of ranks_environment()
    hostfile: Path | None = None  # use this hostfile (see hostfile_text) instead of listing hosts
    ssh_wrapper: Path | None = None  # MPICH/Intel MPI: executable running `ssh -F ssh_config "$@"`
    gate: Path | None = None  # a lock file: each ssh of mpirun waits for a shared lock on it (see ssh_command)
    interface: str | None = None  # MPICH/Intel MPI: network interface name (-iface)
    as_root: bool = False
    mpirun: str = "mpirun"
    extra_args: tuple[str, ...] = ()  # appended before the command, as given
    fabric: FabricChoice = PLAIN_TCP
    threads: int | None = None  # OpenMP threads per rank: sets OMP_NUM_THREADS (None: 1 core per rank, not set)
    bind: bool = False  # bind each rank to `threads` cores
    tap: tuple[str, ...] = ()  # in front of the command on every rank: node_runtime.ranktap (see tap_command)

    def __post_init__(self) -> None:
        problems = [*_host_problems(self.hosts), *_spec_problems(self)]
        if problems:
            raise InvalidInput(f"invalid launch ({len(problems)} problem(s))", details=problems)

    @property
    def cores_per_rank(self) -> int:
        return 1 if self.threads is None else self.threads

    @property
    def threads_env(self) -> tuple[tuple[str, str], ...]:
        """``OMP_NUM_THREADS`` when threads per rank were given."""
        return () if self.threads is None else ((THREADS_VARIABLE, str(self.threads)),)

    @property
    def exported(self) -> tuple[str, ...]:
        """The names exported from the primary (the thread count launch sets is not one of them)."""
        return tuple(n for n in self.environment_names if not (self.threads and n == THREADS_VARIABLE))

    @property
    def np(self) -> int:
        """Total number of ranks."""
        return len(self.hosts) * self.ppn

    @property
    def networks(self) -> str:
        """The CIDR(s) MPI traffic is restricted to, comma-separated."""
        return ",".join(str(n) for n in interface_networks(self.hosts))


def _host_problems(hosts: Sequence[str]) -> list[str]:
    if not hosts:
        return ["hosts: at least one host is required"]
    problems, seen = [], set()
    for host in hosts:
        try:
            canonical = parse_address(host)
        except ValueError as exc:
            problems.append(f"host {exc}")
            continue
        if canonical != host:
            problems.append(f"host {host!r} is not in canonical form ({canonical})")
        if canonical in seen:
            problems.append(f"host {host!r} is listed more than once")
        seen.add(canonical)
    return problems


def _spec_problems(spec: LaunchSpec) -> list[str]:
    problems = [f"{label}={count!r}: must be a positive integer"
                for label, count in (("ppn", spec.ppn), ("threads", spec.cores_per_rank))
                if isinstance(count, bool) or not isinstance(count, int) or count < 1]
    if not spec.command or not spec.command[0]:
        problems.append("command: a program to run is required")
    elif spec.command[0].startswith("-"):
        problems.append(f"command {spec.command[0]!r}: a program cannot start with '-' (mpirun would read an option)")
    for label, path in (("ssh_config", spec.ssh_config), ("working_dir", spec.working_dir),
                        ("hostfile", spec.hostfile), ("ssh_wrapper", spec.ssh_wrapper), ("gate", spec.gate)):
        if path is not None and not path.is_absolute():
            problems.append(f"{label}={str(path)!r}: must be an absolute path")
    for label, path in (("ssh_config", spec.ssh_config), ("gate", spec.gate)):  # both go into Open MPI's agent
        if path is not None and re.search(r"[\s'\"\\]", str(path)):
            problems.append(f"{label}={str(path)!r}: must not contain blanks, quotes or backslashes")
    for name in spec.environment_names:
        if name == SECRET_VARIABLE:
            problems.append(f"environment_names: {SECRET_VARIABLE} can never be exported to the ranks")
        elif not VARIABLE_NAME.match(name):
            problems.append(f"environment_names: {name!r} is not a variable name")
    if spec.flavor is not MpiFlavor.OPENMPI and spec.ssh_wrapper is None:
        problems.append(f"ssh_wrapper: {spec.flavor.value} takes an ssh executable, not options; "
                        "give a wrapper script (see ssh_wrapper_script)")
    if spec.flavor is MpiFlavor.OPENMPI and spec.hostfile is None and any(":" in h for h in spec.hosts):
        problems.append("hosts: Open MPI cannot take IPv6 addresses in --host; give a hostfile")
    return problems


def build_mpirun_argv(spec: LaunchSpec) -> list[str]:
    """The ``mpirun`` argv for ``spec`` (its flavor's options, then the tap and the command)."""
    options = _openmpi_options(spec) if spec.flavor is MpiFlavor.OPENMPI else _hydra_options(spec)
    return [spec.mpirun, *options, *spec.extra_args, *spec.tap, *spec.command]


def tap_command(python: str, tap_path: Path) -> tuple[str, ...]:
    """What runs in front of every rank's command: :mod:`node_runtime.ranktap` (by its path, with ``python`` (the
    runtime's) isolated and without ``site``: it needs the standard library only and starts fast)."""
    return (python, "-I", "-S", str(tap_path))


RANKMAIN = "node_runtime.rankmain"
_PYTHON = re.compile(r"^python(\d+(\.\d+)*)?$")
_PY_FLAGS = frozenset("bBdEiIOqsuvPRx")  # options without an argument (-S is not: see python_rank_command)
_PY_ARGUMENT = frozenset("WX")  # options with one (-W error, -Xdev)
_PY_LONG_ARGUMENT = frozenset({"--check-hash-based-pycs"})
_ABORTING_MODULES = frozenset({RANKMAIN, "mpi4py", "mpi4py.run"})


def is_python(program: str) -> bool:
    """Whether ``program`` (a name or a path) names a Python interpreter: ``python``, ``python3``, ``python3.12``."""
    return bool(_PYTHON.match(program.rsplit("/", 1)[-1]))


def python_rank_command(argv: Sequence[str]) -> list[str] | None:
    """``PYTHON [options] (FILE | -m MOD | -c CMD) ARGS...`` as ``PYTHON [options] -m node_runtime.rankmain (FILE |
    -m MOD | -c CMD) ARGS...`` (the interpreter's own options stay in front: ``python3 -u -X dev app.py`` becomes
    ``python3 -u -X dev -m node_runtime.rankmain app.py``), so that an uncaught exception on any rank ends the job
    (``MPI_Abort``, as ``python -m mpi4py`` does). None, to run ``argv`` as it is: not a Python interpreter (``bash
    run.sh``), no program to run (interactive, ``-`` for stdin), ``-h``/``-V``/``--version``, ``-S`` (no ``site``:
    the runtime's package could not be imported), an unknown option, or already ``-m mpi4py`` / ``-m
    node_runtime.rankmain``."""
    split = _split_python(argv) if argv and is_python(argv[0]) else None
    if split is None:
        return None
    options, program = split
    if program[0] == "-m" and program[1] in _ABORTING_MODULES:
        return None
    return [argv[0], *options, "-m", RANKMAIN, *program]


def aborts_on_exception(argv: Sequence[str]) -> bool | None:
    """For a Python command line: whether an uncaught exception ends the MPI job (it runs ``-m mpi4py`` or
    ``-m node_runtime.rankmain``); None for other programs."""
    if not argv or not is_python(argv[0]):
        return None
    split = _split_python(argv)
    return split is not None and split[1][0] == "-m" and split[1][1] in _ABORTING_MODULES


def _split_python(argv: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """A Python command line's interpreter options (one word each) and its program part (``FILE ARGS``, ``-m MOD
    ARGS`` or ``-c CMD ARGS``); None when :func:`python_rank_command` leaves it as it is."""
    options: list[str] = []
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "--" or not word.startswith("-") or word == "-":
            rest = list(argv[i + 1:] if word == "--" else argv[i:])
            return (options, rest) if rest and not rest[0].startswith("-") else None
        if word.startswith("--"):
            if word.split("=", 1)[0] not in _PY_LONG_ARGUMENT:
                return None  # --help, --version, --help-env...: nothing to run
            taken = 1 if "=" in word else 2
            options += argv[i:i + taken]
            i += taken
            continue
        found = _short_options(word, argv[i + 1] if i + 1 < len(argv) else None)
        if found is None:
            return None
        more, program, used = found
        options += more
        if program is not None:  # -c CMD / -m MOD
            return options, [*program, *argv[i + used:]]
        i += used
    return None


def _short_options(word: str, following: str | None) -> tuple[list[str], list[str] | None, int] | None:
    """One word of short options (``-u``, ``-uB``, ``-Wignore``, ``-X dev``, ``-um mod``): the options as separate
    words, ``[-c|-m, value]`` if it ends with one, and how many words it used; None for what we do not rewrite."""
    options: list[str] = []
    for j in range(1, len(word)):
        letter = word[j]
        if letter in _PY_FLAGS:
            options.append(f"-{letter}")
            continue
        if letter in _PY_ARGUMENT or letter in "cm":
            value, used = (word[j + 1:], 1) if j + 1 < len(word) else (following, 2)
            if value is None:
                return None
            if letter in "cm":
                return options, [f"-{letter}", value], used
            return [*options, f"-{letter}", value], None, used
        return None  # -S, -h, -V, -?, or unknown
    return options, None, 1


def _openmpi_options(spec: LaunchSpec) -> list[str]:
    options = ["--allow-run-as-root"] if spec.as_root else []
    options += ["-np", str(spec.np)]
    if spec.hostfile is not None:
        options += ["--hostfile", str(spec.hostfile)]
    else:
        options += ["--host", ",".join(f"{host}:{spec.ppn}" for host in spec.hosts)]
    pe = f":PE={spec.cores_per_rank}" if spec.bind else ""
    options += ["--map-by", f"ppr:{spec.ppn}:node{pe}", "--bind-to", "core" if spec.bind else "none"]
    settings = mpi_settings(spec.flavor, spec.fabric, spec.networks)
    for name, value in (*settings.mca, ("oob_tcp_if_include", spec.networks),
                        ("plm_rsh_agent", " ".join(ssh_command(spec.gate))), ("plm_rsh_args", f"-F {spec.ssh_config}")):
        options += ["--mca", name, value]
    options += ["--wdir", str(spec.working_dir)]
    for name, value in (*settings.env, *spec.threads_env):
        options += ["-x", f"{name}={value}"]
    for name in spec.exported:
        options += ["-x", name]
    return options


def _hydra_options(spec: LaunchSpec) -> list[str]:
    """MPICH and Intel MPI both use the Hydra process manager; they differ in how the ssh launcher is named."""
    options = ["-n", str(spec.np), "-ppn", str(spec.ppn)]
    if spec.hostfile is not None:
        options += ["-f", str(spec.hostfile)]
    else:
        options += ["-hosts", ",".join(spec.hosts)]
    if spec.flavor is MpiFlavor.MPICH:
        options += ["-launcher", "ssh", "-launcher-exec", str(spec.ssh_wrapper)]
        options += ["-bind-to", f"core:{spec.cores_per_rank}" if spec.bind else "none"]
    else:
        options += ["-bootstrap", "ssh", "-bootstrap-exec", str(spec.ssh_wrapper)]
    if spec.interface:
        options += ["-iface", spec.interface]
    options += ["-wdir", str(spec.working_dir)]
    pinning = (("I_MPI_PIN_DOMAIN", "omp") if spec.bind else ("I_MPI_PIN", "0"),) \
        if spec.flavor is MpiFlavor.INTELMPI else ()
    for name, value in (*mpi_settings(spec.flavor, spec.fabric, spec.networks).env, *pinning, *spec.threads_env):
        options += ["-genv", name, value]
    # -genvlist passes these names only; Hydra refuses it beside -genvnone ("duplicate environment setting")
    options += ["-genvlist", ",".join(spec.exported)] if spec.exported else ["-genvnone"]
    return options


def hostfile_text(flavor: MpiFlavor, hosts: Sequence[str], ppn: int) -> str:
    """A hostfile listing ``hosts`` with ``ppn`` slots each, in ``flavor``'s syntax."""
    if flavor is MpiFlavor.OPENMPI:
        return "".join(f"{host} slots={ppn}\n" for host in hosts)
    return "".join(f"{host}:{ppn}\n" for host in hosts)


def ssh_command(gate: Path | None) -> list[str]:
    """How mpirun starts ssh: plain ``ssh``, or, with a ``gate``, ``flock -s -o GATE ssh``: it waits until it gets a
    shared lock on the gate (launch holds it exclusively until every node's service answered), then runs ssh."""
    return ["ssh"] if gate is None else ["flock", "-s", "-o", str(gate), "ssh"]


def ssh_wrapper_script(ssh_config: Path, gate: Path | None = None) -> str:
    """A POSIX sh script that runs ssh with the task's config (for MPICH's and Intel MPI's launcher)."""
    command = " ".join(shlex.quote(word) for word in ssh_command(gate))
    return f'#!/bin/sh\nexec {command} -F {shlex.quote(str(ssh_config))} "$@"\n'


def spec_for_node(
    env: NodeEnvironment,
    environ: Mapping[str, str],
    *,
    flavor: MpiFlavor,
    ppn: int,
    command: Sequence[str],
    ssh_config: Path,
    as_root: bool,
    hostfile: Path | None = None,
    ssh_wrapper: Path | None = None,
    gate: Path | None = None,
    interface: str | None = None,
    mpirun: str = "mpirun",
    extra_args: Sequence[str] = (),
    fabric: FabricChoice = PLAIN_TCP,
    threads: int | None = None,
    bind: bool = False,
    tap: Sequence[str] = (),
) -> LaunchSpec:
    """The launch of ``command`` on every host of ``env`` (primary first) in its working directory, exporting
    :func:`ranks_environment` of ``environ``."""
    return LaunchSpec(flavor=flavor, hosts=env.hosts_primary_first, ppn=ppn, command=tuple(command),
                      ssh_config=ssh_config, working_dir=env.working_dir,
                      environment_names=tuple(ranks_environment(environ, env.export_names)), hostfile=hostfile,
                      ssh_wrapper=ssh_wrapper, gate=gate, interface=interface, as_root=as_root, mpirun=mpirun,
                      extra_args=tuple(extra_args), fabric=fabric, threads=threads, bind=bind, tap=tuple(tap))
