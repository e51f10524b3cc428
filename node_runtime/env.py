"""The node's environment: Azure Batch and mpilaunch variables, parsed and cross-checked into :class:`NodeEnvironment`.

:data:`VARIABLES` is the one table of every variable we read; :meth:`NodeEnvironment.from_environ` is pure and reports
every problem at once (:class:`~node_runtime.errors.InvalidEnvironment`), each naming the variable and its value --
except ``MPILAUNCH_TASK_SECRET``, whose value never appears in a message, a repr or :meth:`NodeEnvironment.to_dict`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from node_runtime.addresses import canonical, local_addresses, parse_address
from node_runtime.contract import (
    CHECKPOINT_VARIABLE,
    DEFAULT_SSH_PORT,
    EXPORT_VARIABLE,
    NODE_ADDRESS_VARIABLE,
    NODE_COUNT_VARIABLE,
    SECRET_VARIABLE,
    SSH_PORT_VARIABLE,
    VERSION_VARIABLE,
)
from node_runtime.errors import InvalidEnvironment

MIN_SECRET_BYTES = 32

VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}\Z")


# Parsers: str -> value, raising ValueError(reason); parse_address lives in node_runtime.addresses.
def _address_list(separator: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        reasons, hosts = [], []
        for position, item in enumerate(text.split(separator), 1):
            try:
                address = parse_address(item) if item else ""
            except ValueError as exc:
                reasons.append(str(exc))
                continue
            if not address or address in hosts:
                reasons.append(f"{address} is listed more than once" if address else f"entry {position} is empty")
            hosts.append(address)
        if reasons:
            raise ValueError("; ".join(reasons))
        return tuple(hosts)

    parse.__doc__ = f"Addresses separated by {separator!r}: no empties, no duplicates."
    return parse


parse_host_list = _address_list(",")
parse_node_list = _address_list(";")


def parse_port(text: str) -> int:
    """A TCP port, 1..65535."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number in 1..65535")
    return int(text)


def parse_endpoint(text: str) -> tuple[str, int]:
    """``ip:port`` or ``[ipv6]:port``."""
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("expected ip:port or [ipv6]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address must be written [address]:port")
    return parse_address(host), parse_port(port)


def parse_bool(text: str) -> bool:
    """``true`` or ``false`` (any case)."""
    if text.lower() not in ("true", "false"):
        raise ValueError("expected true or false")
    return text.lower() == "true"


def parse_count(text: str) -> int:
    """A positive integer."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive integer")
    return int(text)


def parse_ccp_nodes(text: str) -> tuple[tuple[str, int], ...]:
    """``n ip cores ip cores…`` → ((ip, cores), …), checking n against the pairs."""
    if not text.split():
        raise ValueError("is empty")
    count, *rest = text.split()
    n = parse_count(count)
    if len(rest) % 2 or len(rest) // 2 != n:
        raise ValueError(f"announces {n} node(s) but lists {len(rest) / 2:g} ip/cores pair(s)")
    pairs = [(parse_address(ip), parse_count(cores)) for ip, cores in zip(rest[::2], rest[1::2], strict=True)]
    if len({ip for ip, _ in pairs}) != len(pairs):
        raise ValueError("an address is listed more than once")
    return tuple(pairs)


def parse_id(text: str) -> str:
    """A non-empty identifier without whitespace."""
    if not text or any(c.isspace() for c in text):
        raise ValueError("expected a non-empty identifier without whitespace")
    return text


def parse_directory(text: str) -> Path:
    """An absolute POSIX path."""
    if not PurePosixPath(text).is_absolute() or "\0" in text:
        raise ValueError("expected an absolute path")
    return Path(text)


def parse_secret(text: str) -> str:
    """base64url (padding optional) of at least :data:`MIN_SECRET_BYTES` random bytes."""
    if not _BASE64URL.match(text):
        raise ValueError("is not base64url text")
    try:
        raw = base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("is not base64url text") from None
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(f"decodes to {len(raw)} bytes; at least {MIN_SECRET_BYTES} are required")
    return text


def parse_names(text: str) -> tuple[str, ...]:
    """Comma-separated environment variable names (blanks around names and empty items ignored)."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    bad = [name for name in names if not VARIABLE_NAME.match(name)]
    if bad:
        raise ValueError(f"not variable names: {', '.join(map(repr, bad))}")
    if SECRET_VARIABLE in names:
        raise ValueError(f"{SECRET_VARIABLE} can never be exported to the ranks")
    return tuple(dict.fromkeys(names))


def parse_text(text: str) -> str:
    """Any non-empty text."""
    if not text.strip():
        raise ValueError("is empty")
    return text


@dataclass(frozen=True)
class Variable:
    """One environment variable: how to parse it and whether it must be set."""

    name: str
    field: str  # the NodeEnvironment field it fills directly, or "" when cross-checks derive fields from it
    parse: Callable[[str], Any]
    required: bool
    description: str
    default: Any = None
    secret: bool = False


VARIABLES: tuple[Variable, ...] = (
    Variable("AZ_BATCH_HOST_LIST", "hosts", parse_host_list, True,
             "Addresses of the task's nodes, comma-separated (set by Batch for multi-instance tasks)."),
    Variable("AZ_BATCH_NODE_LIST", "", parse_node_list, False,
             "The same addresses, semicolon-separated; if set it must hold the same set."),
    Variable("AZ_BATCH_MASTER_NODE", "", parse_endpoint, True,
             "Primary node as ip:port or [ipv6]:port; the ip must be in AZ_BATCH_HOST_LIST, the port is Batch's."),
    Variable("AZ_BATCH_IS_CURRENT_NODE_MASTER", "is_primary", parse_bool, True,
             "true on the primary (subtask 0), else false."),
    Variable("CCP_NODES", "", parse_ccp_nodes, False,
             "'n ip cores ip cores…'; if set, n and the ips must match AZ_BATCH_HOST_LIST."),
    Variable(NODE_COUNT_VARIABLE, "", parse_count, False,
             "Node count set by the mpilaunch client (Azure does not set it); must equal the host count."),
    Variable("AZ_BATCH_TASK_ID", "task_id", parse_id, True, "Task id."),
    Variable("AZ_BATCH_JOB_ID", "job_id", parse_id, True, "Job id."),
    Variable("AZ_BATCH_NODE_ID", "node_id", parse_id, True, "This compute node's id."),
    Variable("AZ_BATCH_POOL_ID", "pool_id", parse_id, False, "Pool id.", default=""),
    Variable("AZ_BATCH_ACCOUNT_NAME", "account_name", parse_id, False, "Batch account name.", default=""),
    Variable("AZ_BATCH_TASK_DIR", "task_dir", parse_directory, True, "The task directory T (stdout.txt, stderr.txt)."),
    Variable("AZ_BATCH_TASK_SHARED_DIR", "shared_dir", parse_directory, True,
             "Where common resource files land; same path on every node, not shared between nodes."),
    Variable("AZ_BATCH_TASK_WORKING_DIR", "working_dir", parse_directory, True, "The task's working directory (T/wd)."),
    Variable("AZ_BATCH_NODE_ROOT_DIR", "node_root_dir", parse_directory, True,
             "Root R of all Batch directories on the node."),
    Variable("AZ_BATCH_NODE_SHARED_DIR", "node_shared_dir", parse_directory, False,
             "R/shared, shared by all tasks on the node."),
    Variable("AZ_BATCH_NODE_STARTUP_DIR", "node_startup_dir", parse_directory, False,
             "R/startup, the start task's directory."),
    Variable(SSH_PORT_VARIABLE, "ssh_port", parse_port, False,
             "Port of the task's sshd; must differ from the AZ_BATCH_MASTER_NODE port.", default=DEFAULT_SSH_PORT),
    Variable(SECRET_VARIABLE, "task_secret", parse_secret, False,
             f"base64url secret (>= {MIN_SECRET_BYTES} bytes) the task's ssh keys derive from; never shown, "
             "never exported to the ranks.", secret=True),
    Variable(EXPORT_VARIABLE, "export_names", parse_names, False,
             "Comma-separated names of the user's variables the ranks must see.", default=()),
    Variable(NODE_ADDRESS_VARIABLE, "", parse_address, False,
             "This node's address in AZ_BATCH_HOST_LIST (set by the emulator; Azure never sets it)."),
    Variable(CHECKPOINT_VARIABLE, "checkpoint_url", parse_text, False,
             "Where checkpointed work is stored (may carry a SAS: its query is hidden)."),
    Variable(VERSION_VARIABLE, "client_version", parse_text, False,
             "The runtime version of the client that built the task; coordinate refuses a node whose runtime "
             "differs.", default=""),
)


def variables_markdown() -> str:
    """The :data:`VARIABLES` table as Markdown (docs/node-environment.md embeds it)."""
    lines = ["| Variable | Required | Default | Meaning |", "|---|---|---|---|"]
    for var in VARIABLES:
        default = "" if var.default in (None, "", ()) else f"`{var.default}`"
        lines.append(f"| `{var.name}` | {'yes' if var.required else 'no'} | {default} | {var.description} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class NodeEnvironment:
    """Everything a node of an mpilaunch multi-instance task learns from its environment."""

    hosts: tuple[str, ...]
    primary_address: str
    primary_port: int
    is_primary: bool
    current_address: str
    node_count: int
    cores: tuple[int, ...] | None
    task_id: str
    job_id: str
    node_id: str
    pool_id: str
    account_name: str
    task_dir: Path
    shared_dir: Path
    working_dir: Path
    node_root_dir: Path
    node_shared_dir: Path | None
    node_startup_dir: Path | None
    ssh_port: int
    export_names: tuple[str, ...]
    task_secret: str | None = field(default=None, repr=False)
    checkpoint_url: str | None = field(default=None, repr=False)
    client_version: str = ""

    @property
    def hosts_primary_first(self) -> tuple[str, ...]:
        """The host list with the primary moved to the front (MPI rank 0 runs there)."""
        return (self.primary_address, *(h for h in self.hosts if h != self.primary_address))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, local_addresses: Iterable[str]) -> NodeEnvironment:
        """Parse and cross-check ``environ``; ``local_addresses`` are this machine's interface addresses."""
        raw, problems = _parse_table(environ)
        hosts, master, cores = raw["AZ_BATCH_HOST_LIST"], raw["AZ_BATCH_MASTER_NODE"], None
        if master is not _BAD and raw[SSH_PORT_VARIABLE] == master[1]:
            problems.append(f"{_show(environ, SSH_PORT_VARIABLE)}: Batch reserves that port "
                            f"({_show(environ, 'AZ_BATCH_MASTER_NODE')}); choose another")
        if hosts is not _BAD:
            problems += _check_hosts(raw, environ)
            if isinstance(raw["CCP_NODES"], tuple) and not any(p.startswith("CCP_NODES") for p in problems):
                cores = tuple(dict(raw["CCP_NODES"])[h] for h in hosts)
        current = _current_address(raw, environ, set(canonical(local_addresses)), problems)
        if problems:
            secret = environ.get(SECRET_VARIABLE, "")  # scrubbed wherever it shows up (if long enough to matter)
            raise InvalidEnvironment([p.replace(secret, "<hidden>") if len(secret) >= 8 else p for p in problems])
        direct = {var.field: raw[var.name] for var in VARIABLES if var.field}
        return cls(**direct, primary_address=master[0], primary_port=master[1], current_address=current,
                   node_count=len(hosts), cores=cores)

    @classmethod
    def current(cls) -> NodeEnvironment:
        """The environment of this process on this machine (``os.environ`` and the interfaces' addresses)."""
        import os

        return cls.from_environ(os.environ, local_addresses=local_addresses())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view; the secret is replaced by whether it is set, the checkpoint URL's query is hidden."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "task_secret":
                out["task_secret_set"] = value is not None
                continue
            if name == "checkpoint_url" and value is not None:
                value = redact_url(value)
            out[name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return out


_BAD = object()  # marks a variable that failed to parse


def _parse_table(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    raw: dict[str, Any] = {}
    problems: list[str] = []
    for var in VARIABLES:
        text = environ.get(var.name)
        if text is None:
            if var.required:
                problems.append(f"{var.name} is not set: {var.description}")
            raw[var.name] = _BAD if var.required else var.default
            continue
        try:
            raw[var.name] = var.parse(text)
        except ValueError as exc:
            shown = " (value hidden)" if var.secret else f"={text!r}"
            problems.append(f"{var.name}{shown}: {exc}")
            raw[var.name] = _BAD
    return raw, problems


def _show(environ: Mapping[str, str], name: str) -> str:
    """``NAME='value'`` for messages (or ``NAME (unset, default …)``)."""
    if name in environ:
        return f"{name}={environ[name]!r}"
    return f"{name} (unset, default {next(v.default for v in VARIABLES if v.name == name)!r})"


def _check_hosts(raw: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Cross-checks of the variables that describe the same host list (which parsed)."""
    hosts, master, problems = raw["AZ_BATCH_HOST_LIST"], raw["AZ_BATCH_MASTER_NODE"], []
    host_list = _show(environ, "AZ_BATCH_HOST_LIST")
    if master is not _BAD and master[0] not in hosts:
        problems.append(f"{_show(environ, 'AZ_BATCH_MASTER_NODE')}: {master[0]} is not in {host_list}")
    nodes = raw["AZ_BATCH_NODE_LIST"]
    if isinstance(nodes, tuple) and set(nodes) != set(hosts):
        problems.append(f"{_show(environ, 'AZ_BATCH_NODE_LIST')}: not the same addresses as {host_list}")
    ccp = raw["CCP_NODES"]
    if isinstance(ccp, tuple) and {ip for ip, _ in ccp} != set(hosts):
        problems.append(f"{_show(environ, 'CCP_NODES')}: not the same addresses as {host_list}")
    count = raw[NODE_COUNT_VARIABLE]
    if isinstance(count, int) and count != len(hosts):
        problems.append(f"{_show(environ, NODE_COUNT_VARIABLE)}: {host_list} has {len(hosts)} host(s)")
    return problems


def _current_address(raw: dict[str, Any], environ: Mapping[str, str], local: set[str], problems: list[str]) -> str:
    """Which host-list address is this node's; appends a problem (and returns "") when that cannot be told."""
    hosts, master, override = raw["AZ_BATCH_HOST_LIST"], raw["AZ_BATCH_MASTER_NODE"], raw[NODE_ADDRESS_VARIABLE]
    is_primary, local_text = raw["AZ_BATCH_IS_CURRENT_NODE_MASTER"], ", ".join(sorted(local)) or "none"
    if _BAD in (hosts, override):
        return ""
    if override is not None:
        if override not in hosts:
            problems.append(f"{_show(environ, NODE_ADDRESS_VARIABLE)}: not in {_show(environ, 'AZ_BATCH_HOST_LIST')}")
        elif _BAD not in (master, is_primary) and is_primary != (override == master[0]):
            problems.append(f"{_show(environ, NODE_ADDRESS_VARIABLE)} contradicts "
                            f"{_show(environ, 'AZ_BATCH_IS_CURRENT_NODE_MASTER')} (the primary is {master[0]})")
        return str(override)
    if _BAD in (master, is_primary) or master[0] not in hosts:
        return ""
    if is_primary:
        if master[0] not in local:
            problems.append(f"{_show(environ, 'AZ_BATCH_MASTER_NODE')}: this node is the primary but {master[0]} "
                            f"is not one of its addresses ({local_text}); set {NODE_ADDRESS_VARIABLE}")
        return str(master[0])
    mine = [h for h in hosts if h in local and h != master[0]]
    if len(mine) != 1:
        why = "none of its addresses" if not mine else f"{len(mine)} of its addresses ({', '.join(mine)})"
        problems.append(f"{_show(environ, 'AZ_BATCH_HOST_LIST')}: {why} belong to this node (local: {local_text}); "
                        f"set {NODE_ADDRESS_VARIABLE}")
        return ""
    return str(mine[0])


def redact_url(url: str) -> str:
    """``url`` with its query (a SAS token, typically) and any user info hidden."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "<hidden>" if parts.query else "", ""))
