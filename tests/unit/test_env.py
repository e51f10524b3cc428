"""NodeEnvironment: valid environments round-trip, every corruption is reported naming its variable."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_runtime.addresses import interface_networks
from node_runtime.env import (
    NODE_ADDRESS_VARIABLE,
    SECRET_VARIABLE,
    VARIABLES,
    NodeEnvironment,
    redact_url,
    variables_markdown,
)
from node_runtime.errors import InvalidEnvironment

NOISE = ["127.0.0.1", "::1", "fe80::1%eth0", "169.254.3.4"]  # local addresses never in generated host lists


def secret_of(size: int, seed: int) -> str:
    return base64.urlsafe_b64encode(random.Random(seed).randbytes(size)).decode().rstrip("=")


ipv4 = st.integers(0, 2**24 - 1).map(lambda i: str(ipaddress.IPv4Address((10 << 24) + i)))
ipv6 = st.integers(0, 2**120 - 1).map(lambda i: str(ipaddress.IPv6Address((0xFD << 120) + i)))


@st.composite
def valid_cases(draw: st.DrawFn) -> tuple[dict[str, str], list[str], dict[str, Any]]:
    """A valid environment, the local addresses to use with it, and what the model must say."""
    family = draw(st.sampled_from([ipv4, ipv6, st.one_of(ipv4, ipv6)]))
    hosts = draw(st.lists(family, min_size=1, max_size=6, unique=True))
    master = draw(st.sampled_from(hosts))
    current = draw(st.sampled_from(hosts))
    port = draw(st.integers(1, 65535))
    root = "/mnt/batch/tasks"
    task = f"{root}/workitems/j1/job-1/t1"
    environ = {
        "AZ_BATCH_HOST_LIST": ",".join(hosts),
        "AZ_BATCH_MASTER_NODE": f"[{master}]:{port}" if ":" in master else f"{master}:{port}",
        "AZ_BATCH_IS_CURRENT_NODE_MASTER": draw(st.sampled_from(["true", "True"])) if current == master else "false",
        "AZ_BATCH_TASK_ID": "t1", "AZ_BATCH_JOB_ID": "j1", "AZ_BATCH_NODE_ID": "tvmps_1",
        "AZ_BATCH_TASK_DIR": task, "AZ_BATCH_TASK_SHARED_DIR": task, "AZ_BATCH_TASK_WORKING_DIR": f"{task}/wd",
        "AZ_BATCH_NODE_ROOT_DIR": root,
    }
    expected: dict[str, Any] = {"hosts": tuple(hosts), "primary_address": master, "primary_port": port,
                                "is_primary": current == master, "current_address": current,
                                "node_count": len(hosts), "cores": None, "ssh_port": 2222, "task_secret": None,
                                "export_names": ()}
    if draw(st.booleans()):
        environ["AZ_BATCH_NODE_LIST"] = ";".join(draw(st.permutations(hosts)))
    if draw(st.booleans()):
        cores = draw(st.lists(st.integers(1, 256), min_size=len(hosts), max_size=len(hosts)))
        pairs = list(zip(hosts, cores, strict=True))
        environ["CCP_NODES"] = " ".join([str(len(hosts)), *(f"{h} {c}" for h, c in draw(st.permutations(pairs)))])
        expected["cores"] = tuple(cores)
    if draw(st.booleans()):
        environ["AZ_BATCH_NODE_COUNT"] = str(len(hosts))
    if draw(st.booleans()):
        ssh_port = draw(st.integers(1, 65535).filter(lambda p: p != port))
        environ["MPILAUNCH_SSH_PORT"] = str(ssh_port)
        expected["ssh_port"] = ssh_port
    elif port == 2222:
        environ["MPILAUNCH_SSH_PORT"] = "2223"
        expected["ssh_port"] = 2223
    if draw(st.booleans()):
        environ[SECRET_VARIABLE] = expected["task_secret"] = secret_of(draw(st.integers(32, 64)), draw(st.integers()))
    if draw(st.booleans()):
        names = draw(st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(
            lambda n: n != SECRET_VARIABLE), max_size=4, unique=True))
        environ["MPILAUNCH_EXPORT_ENV"] = " , ".join(names)
        expected["export_names"] = tuple(names)
    if draw(st.booleans()):
        environ[NODE_ADDRESS_VARIABLE] = current
        local = draw(st.sampled_from([[], NOISE]))
    else:
        local = [*NOISE, current]
    return environ, local, expected


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(valid_cases())
def test_valid_environments_round_trip(case: tuple[dict[str, str], list[str], dict[str, Any]]) -> None:
    environ, local, expected = case
    env = NodeEnvironment.from_environ(environ, local_addresses=local)
    for name, value in expected.items():
        assert getattr(env, name) == value, name
    assert env.hosts_primary_first[0] == env.primary_address
    assert sorted(env.hosts_primary_first) == sorted(env.hosts)
    assert env.task_dir == Path("/mnt/batch/tasks/workitems/j1/job-1/t1")
    text = json.dumps(env.to_dict())
    if env.task_secret:
        assert env.task_secret not in text and env.task_secret not in repr(env)
    assert env.to_dict()["task_secret_set"] is (env.task_secret is not None)


def _named(problems: tuple[str, ...], variable: str) -> list[str]:
    return [p for p in problems if p.startswith((f"{variable}=", f"{variable} "))]


Corruption = Callable[[dict[str, str], dict[str, Any]], None]


def _set(variable: str, value: Callable[[dict[str, Any]], str]) -> Corruption:
    def corrupt(environ: dict[str, str], expected: dict[str, Any]) -> None:
        environ[variable] = value(expected)

    return corrupt


def _unset(variable: str) -> Corruption:
    def corrupt(environ: dict[str, str], expected: dict[str, Any]) -> None:
        environ.pop(variable)

    return corrupt


def _endpoint(host: str, port: Any) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# variable -> ways to corrupt it on its own (each leaves the host list valid)
CORRUPTIONS: dict[str, list[Corruption]] = {
    "AZ_BATCH_NODE_LIST": [_set("AZ_BATCH_NODE_LIST", lambda e: ";".join([*e["hosts"], "192.168.77.1"])),
                           _set("AZ_BATCH_NODE_LIST", lambda e: ";".join(e["hosts"]) + ";")],
    "AZ_BATCH_MASTER_NODE": [_set("AZ_BATCH_MASTER_NODE", lambda e: _endpoint("192.168.77.1", e["primary_port"])),
                             _set("AZ_BATCH_MASTER_NODE", lambda e: e["primary_address"]),
                             _set("AZ_BATCH_MASTER_NODE", lambda e: _endpoint(e["primary_address"], 0)),
                             _unset("AZ_BATCH_MASTER_NODE")],
    "AZ_BATCH_IS_CURRENT_NODE_MASTER": [_set("AZ_BATCH_IS_CURRENT_NODE_MASTER", lambda e: "yes"),
                                        _unset("AZ_BATCH_IS_CURRENT_NODE_MASTER")],
    "CCP_NODES": [_set("CCP_NODES", lambda e: f"{len(e['hosts']) + 1} " + " ".join(f"{h} 2" for h in e["hosts"])),
                  _set("CCP_NODES", lambda e: f"{len(e['hosts'])} " + " ".join(f"{h} 0" for h in e["hosts"])),
                  _set("CCP_NODES", lambda e: f"{len(e['hosts'])} " + " ".join(
                      f"192.168.77.{i} 2" for i in range(len(e["hosts"])))), _set("CCP_NODES", lambda e: " ")],
    "AZ_BATCH_NODE_COUNT": [_set("AZ_BATCH_NODE_COUNT", lambda e: str(len(e["hosts"]) + 1)),
                            _set("AZ_BATCH_NODE_COUNT", lambda e: "0"), _set("AZ_BATCH_NODE_COUNT", lambda e: "")],
    "AZ_BATCH_TASK_ID": [_unset("AZ_BATCH_TASK_ID"), _set("AZ_BATCH_TASK_ID", lambda e: "")],
    "AZ_BATCH_JOB_ID": [_set("AZ_BATCH_JOB_ID", lambda e: "job 1")],
    "AZ_BATCH_NODE_ID": [_unset("AZ_BATCH_NODE_ID")],
    "AZ_BATCH_TASK_DIR": [_set("AZ_BATCH_TASK_DIR", lambda e: "relative/dir")],
    "AZ_BATCH_TASK_WORKING_DIR": [_set("AZ_BATCH_TASK_WORKING_DIR", lambda e: "wd"),
                                  _unset("AZ_BATCH_TASK_WORKING_DIR")],
    "AZ_BATCH_TASK_SHARED_DIR": [_unset("AZ_BATCH_TASK_SHARED_DIR")],
    "AZ_BATCH_NODE_ROOT_DIR": [_set("AZ_BATCH_NODE_ROOT_DIR", lambda e: "")],
    "AZ_BATCH_NODE_SHARED_DIR": [_set("AZ_BATCH_NODE_SHARED_DIR", lambda e: "shared")],
    "MPILAUNCH_SSH_PORT": [_set("MPILAUNCH_SSH_PORT", lambda e: "0"), _set("MPILAUNCH_SSH_PORT", lambda e: "65536"),
                           _set("MPILAUNCH_SSH_PORT", lambda e: "22x")],
    SECRET_VARIABLE: [_set(SECRET_VARIABLE, lambda e: secret_of(31, 1)),
                      _set(SECRET_VARIABLE, lambda e: secret_of(40, 2)[:20] + "+/" + secret_of(40, 2)[20:]),
                      _set(SECRET_VARIABLE, lambda e: "")],
    "MPILAUNCH_EXPORT_ENV": [_set("MPILAUNCH_EXPORT_ENV", lambda e: "GOOD,1BAD"),
                             _set("MPILAUNCH_EXPORT_ENV", lambda e: f"A,{SECRET_VARIABLE}")],
    NODE_ADDRESS_VARIABLE: [_set(NODE_ADDRESS_VARIABLE, lambda e: "192.168.77.1"),
                            _set(NODE_ADDRESS_VARIABLE, lambda e: "not-an-ip")],
}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(valid_cases(), st.data())
def test_every_corruption_is_reported_naming_its_variable(
    case: tuple[dict[str, str], list[str], dict[str, Any]], data: st.DataObject
) -> None:
    environ, local, expected = case
    variables = data.draw(st.lists(st.sampled_from(sorted(CORRUPTIONS)), min_size=1, max_size=6, unique=True))
    for variable in variables:
        data.draw(st.sampled_from(CORRUPTIONS[variable]))(environ, expected)
    with pytest.raises(InvalidEnvironment) as err:
        NodeEnvironment.from_environ(environ, local_addresses=local)
    problems = err.value.problems
    for variable in variables:
        named = _named(problems, variable)
        assert named, f"{variable} not reported in {problems}"
        if variable != SECRET_VARIABLE and variable in environ:
            assert any(repr(environ[variable]) in p for p in named), named
    secret = environ.get(SECRET_VARIABLE)
    if secret:
        assert secret not in str(err.value)
    assert all(any(p.startswith((v.name + "=", v.name + " ")) for v in VARIABLES) for p in problems), problems


@settings(max_examples=100)
@given(valid_cases(), st.sampled_from([
    lambda hosts: ",".join([*hosts, ""]),
    lambda hosts: ",".join([*hosts, hosts[0]]),
    lambda hosts: ",".join([*hosts, "10.0.0.256"]),
    lambda hosts: ",".join([*hosts, "fe80::1%eth0"]),
    lambda hosts: " " + ",".join(hosts),
    lambda hosts: ";".join(hosts) + ";x",
]))
def test_host_list_corruptions_are_reported(case: Any, corrupt: Callable[[list[str]], str]) -> None:
    environ, local, expected = case
    environ["AZ_BATCH_HOST_LIST"] = corrupt(list(expected["hosts"]))
    environ["MPILAUNCH_SSH_PORT"] = "0"
    with pytest.raises(InvalidEnvironment) as err:
        NodeEnvironment.from_environ(environ, local_addresses=local)
    assert _named(err.value.problems, "AZ_BATCH_HOST_LIST")
    assert _named(err.value.problems, "MPILAUNCH_SSH_PORT"), "other problems are still reported"


def base_environ(**changes: str) -> dict[str, str]:
    environ = {
        "AZ_BATCH_HOST_LIST": "10.1.0.4,10.1.0.5,10.1.0.6", "AZ_BATCH_MASTER_NODE": "10.1.0.4:6000",
        "AZ_BATCH_IS_CURRENT_NODE_MASTER": "false", "AZ_BATCH_TASK_ID": "t", "AZ_BATCH_JOB_ID": "j",
        "AZ_BATCH_NODE_ID": "n", "AZ_BATCH_TASK_DIR": "/r/t", "AZ_BATCH_TASK_SHARED_DIR": "/r/t",
        "AZ_BATCH_TASK_WORKING_DIR": "/r/t/wd", "AZ_BATCH_NODE_ROOT_DIR": "/r",
    }
    environ.update(changes)
    return {k: v for k, v in environ.items() if v != "<unset>"}


def problems_of(environ: dict[str, str], local: list[str]) -> tuple[str, ...]:
    with pytest.raises(InvalidEnvironment) as err:
        NodeEnvironment.from_environ(environ, local_addresses=local)
    return err.value.problems


def test_current_address_from_local_interfaces() -> None:
    env = NodeEnvironment.from_environ(base_environ(), local_addresses=["127.0.0.1", "10.1.0.5"])
    assert env.current_address == "10.1.0.5" and not env.is_primary
    # a non-primary node that also holds the primary's address is still told apart
    env = NodeEnvironment.from_environ(base_environ(), local_addresses=["10.1.0.4", "10.1.0.6"])
    assert env.current_address == "10.1.0.6"
    master = base_environ(AZ_BATCH_IS_CURRENT_NODE_MASTER="true")
    assert NodeEnvironment.from_environ(master, local_addresses=["10.1.0.4"]).current_address == "10.1.0.4"


def test_current_address_problems_say_what_to_set() -> None:
    (none,) = problems_of(base_environ(), ["127.0.0.1"])
    assert none.startswith("AZ_BATCH_HOST_LIST=") and "none of its addresses" in none
    assert NODE_ADDRESS_VARIABLE in none and "127.0.0.1" in none
    (two,) = problems_of(base_environ(), ["10.1.0.5", "10.1.0.6"])
    assert "2 of its addresses (10.1.0.5, 10.1.0.6)" in two
    (master,) = problems_of(base_environ(AZ_BATCH_IS_CURRENT_NODE_MASTER="true"), ["10.1.0.5"])
    assert master.startswith("AZ_BATCH_MASTER_NODE='10.1.0.4:6000'") and "primary" in master
    (contra,) = problems_of(base_environ(MPILAUNCH_NODE_ADDRESS="10.1.0.4"), [])
    assert contra.startswith(f"{NODE_ADDRESS_VARIABLE}='10.1.0.4' contradicts")


def test_ssh_port_must_not_be_the_batch_master_port() -> None:
    (problem,) = problems_of(base_environ(MPILAUNCH_SSH_PORT="6000"), ["10.1.0.5"])
    assert problem.startswith("MPILAUNCH_SSH_PORT='6000'") and "reserves" in problem


def test_all_problems_at_once_and_exit_code() -> None:
    environ = base_environ(AZ_BATCH_HOST_LIST="10.1.0.4,,10.1.0.4", AZ_BATCH_TASK_ID="<unset>",
                           CCP_NODES="2 10.1.0.4", MPILAUNCH_SSH_PORT="99999")
    with pytest.raises(InvalidEnvironment) as err:
        NodeEnvironment.from_environ(environ, local_addresses=[])
    assert err.value.exit_code == 2
    text = str(err.value)
    assert len(err.value.problems) == 4
    for fragment in ("AZ_BATCH_HOST_LIST='10.1.0.4,,10.1.0.4': entry 2 is empty; 10.1.0.4 is listed more than once",
                     "AZ_BATCH_TASK_ID is not set", "CCP_NODES='2 10.1.0.4'", "MPILAUNCH_SSH_PORT='99999'"):
        assert fragment in text


def test_ipv6_master_endpoint_and_canonical_forms() -> None:
    environ = base_environ(AZ_BATCH_HOST_LIST="FD00:0::1,fd00::2", AZ_BATCH_MASTER_NODE="[fd00::1]:6000",
                           AZ_BATCH_NODE_LIST="fd00::2;fd00:0:0::1")
    env = NodeEnvironment.from_environ(environ, local_addresses=["fd00:0::2"])
    assert env.hosts == ("fd00::1", "fd00::2") and env.primary_address == "fd00::1"
    assert env.current_address == "fd00::2"
    (problem,) = problems_of(dict(environ, AZ_BATCH_MASTER_NODE="fd00::1:6000"), ["fd00::2"])
    assert "[address]:port" in problem


def test_secret_never_appears_even_when_misplaced() -> None:
    secret = secret_of(32, 7)
    environ = base_environ(MPILAUNCH_TASK_SECRET=secret, AZ_BATCH_TASK_DIR=secret)
    (problem,) = problems_of(environ, ["10.1.0.5"])
    assert secret not in problem and problem.startswith("AZ_BATCH_TASK_DIR=")
    env = NodeEnvironment.from_environ(dict(environ, AZ_BATCH_TASK_DIR="/r/t"), local_addresses=["10.1.0.5"])
    assert env.task_secret == secret
    assert secret not in repr(env) and secret not in json.dumps(env.to_dict())


def test_a_trivially_short_secret_does_not_garble_messages() -> None:
    problems = problems_of(base_environ(MPILAUNCH_TASK_SECRET="a", AZ_BATCH_NODE_COUNT="abc"), ["10.1.0.5"])
    assert "AZ_BATCH_NODE_COUNT='abc': 'abc' is not a positive integer" in problems


def test_padded_secret_and_short_secret() -> None:
    padded = base64.urlsafe_b64encode(b"x" * 32).decode()
    assert padded.endswith("=")
    env = NodeEnvironment.from_environ(base_environ(MPILAUNCH_TASK_SECRET=padded), local_addresses=["10.1.0.5"])
    assert env.task_secret == padded
    (problem,) = problems_of(base_environ(MPILAUNCH_TASK_SECRET=secret_of(16, 3)), ["10.1.0.5"])
    assert "16 bytes" in problem and "hidden" in problem


def test_checkpoint_url_sas_is_hidden() -> None:
    url = "https://acct.blob.core.windows.net/ckpt?sv=2024&sig=SECRETSIG"
    env = NodeEnvironment.from_environ(base_environ(MPILAUNCH_CHECKPOINT_URL=url), local_addresses=["10.1.0.5"])
    assert env.checkpoint_url == url
    assert "SECRETSIG" not in repr(env) and "SECRETSIG" not in json.dumps(env.to_dict())
    assert redact_url("https://u:p@h/c?sig=x") == "https://h/c?<hidden>"
    assert redact_url("file:///tmp/ckpt") == "file:///tmp/ckpt"


@pytest.mark.parametrize(("hosts", "networks"), [
    (["10.0.0.4"], ["10.0.0.4/32"]),
    (["10.0.0.4", "10.0.0.5"], ["10.0.0.4/31"]),
    (["10.0.0.1", "10.0.0.254"], ["10.0.0.0/24"]),
    (["10.0.0.1", "10.0.1.0"], ["10.0.0.0/23"]),
    (["127.0.1.1", "127.0.0.2"], ["127.0.0.0/8"]),
    (["127.0.5.9"], ["127.0.0.0/8"]),
    (["::1"], ["::1/128"]),
    (["fd00::1", "fd00::2", "10.0.0.1"], ["10.0.0.1/32", "fd00::/126"]),
])
def test_interface_networks(hosts: list[str], networks: list[str]) -> None:
    assert [str(n) for n in interface_networks(hosts)] == networks


@given(st.lists(st.one_of(ipv4, ipv6), min_size=1, max_size=8))
def test_interface_networks_are_the_smallest_containing_all(hosts: list[str]) -> None:
    addresses = [ipaddress.ip_address(h) for h in hosts]
    networks = interface_networks(hosts)
    for network in networks:
        members = [a for a in addresses if a.version == network.version]
        assert members and all(a in network for a in members)
        if network.prefixlen < network.max_prefixlen:
            halves: list[Any] = list(network.subnets(1))
            assert not any(all(a in half for a in members) for half in halves)
    assert len(networks) == len({a.version for a in addresses})


def test_current_reads_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [v.name for v in VARIABLES]:
        monkeypatch.delenv(name, raising=False)
    for name, value in base_environ(MPILAUNCH_NODE_ADDRESS="10.1.0.6").items():
        monkeypatch.setenv(name, value)
    assert NodeEnvironment.current().current_address == "10.1.0.6"
    monkeypatch.delenv(NODE_ADDRESS_VARIABLE)
    monkeypatch.setenv("AZ_BATCH_HOST_LIST", "10.1.0.4,127.0.0.1")
    assert NodeEnvironment.current().current_address == "127.0.0.1"  # lo is always an interface address
    assert os.environ["AZ_BATCH_TASK_ID"] == "t"


def test_docs_list_every_variable() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "node-environment.md").read_text()
    assert variables_markdown() in doc, "regenerate the table in docs/node-environment.md from variables_markdown()"


def _clean_environ(**changes: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in {v.name for v in VARIABLES}}
    environ.update(changes)
    return environ


def test_env_command_table_and_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from node_runtime.cli import main

    secret = secret_of(32, 9)
    for variable in VARIABLES:
        monkeypatch.delenv(variable.name, raising=False)
    for name, value in base_environ(MPILAUNCH_NODE_ADDRESS="10.1.0.5", MPILAUNCH_TASK_SECRET=secret).items():
        monkeypatch.setenv(name, value)
    assert main(["env", "--json"]) == 0
    shown = capsys.readouterr().out
    data = json.loads(shown)
    assert data["hosts"] == ["10.1.0.4", "10.1.0.5", "10.1.0.6"] and data["current_address"] == "10.1.0.5"
    assert data["task_secret_set"] is True and secret not in shown
    assert main(["env"]) == 0
    table = capsys.readouterr().out
    assert "10.1.0.4,10.1.0.5,10.1.0.6" in table and secret not in table
    assert any(line.split() == ["current_address", "10.1.0.5"] for line in table.splitlines())


def test_env_command_invalid_environment_exits_2_listing_problems() -> None:
    import subprocess
    import sys

    environ = base_environ(AZ_BATCH_HOST_LIST="10.1.0.4,bogus", AZ_BATCH_JOB_ID="<unset>",
                           MPILAUNCH_TASK_SECRET="too-short-to-be-a-secret")
    done = subprocess.run([sys.executable, "-m", "node_runtime", "env"], env=_clean_environ(**environ),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.startswith("node-runtime: error: invalid node environment (3 problem(s))")
    for fragment in ("AZ_BATCH_HOST_LIST='10.1.0.4,bogus'", "'bogus' is not an IPv4 or IPv6 address",
                     "AZ_BATCH_JOB_ID is not set", "MPILAUNCH_TASK_SECRET (value hidden)"):
        assert fragment in done.stderr
    assert "too-short-to-be-a-secret" not in done.stderr


def test_unusable_local_addresses_are_ignored() -> None:
    env = NodeEnvironment.from_environ(base_environ(), local_addresses=["", "garbage", "fe80::9%eth0", "10.1.0.6"])
    assert env.current_address == "10.1.0.6"


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(valid_cases(), st.dictionaries(st.sampled_from([v.name for v in VARIABLES]),
                                      st.text(max_size=30) | st.just("1") | st.just("10.0.0.1:2222"), max_size=5),
       st.lists(st.text(max_size=20), max_size=3))
def test_arbitrary_values_never_crash(case: Any, overrides: dict[str, str], noise: list[str]) -> None:
    """Any text in any variable gives a model or InvalidEnvironment whose problems each start with a variable."""
    environ, local, _ = case
    environ.update(overrides)
    try:
        env = NodeEnvironment.from_environ(environ, local_addresses=[*local, *noise])
    except InvalidEnvironment as err:
        assert err.problems
        assert all(p.startswith(tuple(v.name for v in VARIABLES)) for p in err.problems), err.problems
    else:
        json.dumps(env.to_dict())
        assert env.current_address in env.hosts and env.primary_address in env.hosts
