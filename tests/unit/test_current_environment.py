"""How the node runtime finds this node's address: the primary by binding to the master address, others (and a
primary whose master address does not bind) by enumerating the interfaces."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from node_runtime import coordinate
from node_runtime.contract import RUNTIME_VERSION, VERSION_VARIABLE
from node_runtime.coordinate import current_environment, is_local_address
from node_runtime.errors import InvalidEnvironment, ServiceError
from tests.support.netns import batch_environment

NOT_LOCAL = "192.0.2.7"  # TEST-NET-1: never an address of this machine


def test_is_local_address() -> None:
    assert is_local_address("127.0.0.1")
    assert not is_local_address(NOT_LOCAL)
    assert not is_local_address("2001:db8::7")


def test_the_primary_is_found_without_enumerating_interfaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> list[str]:
        raise AssertionError("interfaces enumerated")

    monkeypatch.setattr(coordinate, "local_addresses", fail)
    env = current_environment(batch_environment(tmp_path, ["127.0.0.1", NOT_LOCAL], 0, cores=1,
                                                secret=secrets.token_urlsafe(32)))
    assert env.is_primary and env.current_address == "127.0.0.1"


def test_a_primary_whose_master_address_is_not_local_is_refused(tmp_path: Path) -> None:
    environ = batch_environment(tmp_path, [NOT_LOCAL, "127.0.0.1"], 0, cores=1, secret=secrets.token_urlsafe(32))
    with pytest.raises(InvalidEnvironment, match=f"{NOT_LOCAL} is not one of its addresses"):
        current_environment(environ)


def test_a_secondary_is_found_among_the_interfaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordinate, "local_addresses", lambda: ["127.0.0.1", "10.9.8.7"])
    env = current_environment(batch_environment(tmp_path, [NOT_LOCAL, "10.9.8.7"], 1, cores=1,
                                                secret=secrets.token_urlsafe(32)))
    assert not env.is_primary and env.current_address == "10.9.8.7"


def test_a_secondary_is_found_by_binding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> list[str]:
        raise AssertionError("interfaces enumerated")

    monkeypatch.setattr(coordinate, "local_addresses", fail)
    env = current_environment(batch_environment(tmp_path, [NOT_LOCAL, "127.0.0.1", "192.0.2.8"], 1, cores=1,
                                                secret=secrets.token_urlsafe(32)))
    assert not env.is_primary and env.current_address == "127.0.0.1"


def test_a_secondary_with_no_local_address_is_refused(tmp_path: Path) -> None:
    environ = batch_environment(tmp_path, [NOT_LOCAL, "192.0.2.8"], 1, cores=1, secret=secrets.token_urlsafe(32))
    with pytest.raises(InvalidEnvironment, match="none of its addresses belong to this node"):
        current_environment(environ)


def test_coordinate_refuses_a_runtime_other_than_the_clients(tmp_path: Path) -> None:
    environ = batch_environment(tmp_path, ["127.0.0.1"], 0, cores=1, secret=secrets.token_urlsafe(32))
    coordinate.check_version(current_environment(environ))  # no version given: nothing to compare
    coordinate.check_version(current_environment({**environ, VERSION_VARIABLE: RUNTIME_VERSION}))
    env = current_environment({**environ, VERSION_VARIABLE: "9.9.9"})
    with pytest.raises(ServiceError) as refused:
        coordinate.start_service(env)  # before any key is written or sshd started
    assert refused.value.exit_code == 3
    assert f"runs mpilaunch runtime {RUNTIME_VERSION}, but the client that submitted the task runs 9.9.9" in str(
        refused.value)
    assert "--install-runtime" in str(refused.value)
    assert not (env.shared_dir / ".mpilaunch").exists()
