"""Remote login's pure parts: the client's remote command and ssh command line, the emulator's validation, node user
database and sshd config."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mpilaunch.client.nodelogin import (
    Login,
    Target,
    host_key_alias,
    new_key,
    new_user_name,
    remote_command,
    ssh_argv,
    ssh_warnings,
    target_for,
)
from mpilaunch.client.results import InstanceResult, TaskResults
from mpilaunch.emulator.api_nodes import check_expiry, check_public_key, check_user_name
from mpilaunch.emulator.nodes.login import (
    LOGIN_GROUP,
    LoginUser,
    authorized_keys,
    expiry_days,
    overlay_files,
    render_sshd_config,
    taken_names,
)
from mpilaunch.emulator.wire_errors import WireError
from node_runtime.errors import InvalidInput

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def sh(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, check=False)


def test_the_session_starts_in_the_tasks_working_directory(tmp_path: Path) -> None:
    wd = tmp_path / "root" / "workitems" / "job" / "job-1" / "task-1" / "wd"
    wd.mkdir(parents=True)
    env = {"AZ_BATCH_NODE_ROOT_DIR": str(tmp_path / "root"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = sh(remote_command("workitems\\job\\job-1\\task-1\\", ["pwd;", "echo", "$((6*7))", "|", "cat"]), env,
              tmp_path)
    assert done.stdout.split() == [str(wd), "42"] and done.stderr == ""  # words joined as ssh joins them


def test_without_the_directory_it_says_so_and_starts_at_home(tmp_path: Path) -> None:
    env = {"AZ_BATCH_NODE_ROOT_DIR": str(tmp_path / "nowhere"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = sh(remote_command("workitems/job/job-1/it's-gone", ["pwd; exit 3"]), env, tmp_path)
    assert done.returncode == 3 and done.stdout.strip() == str(tmp_path)
    assert done.stderr.strip() == ("mpilaunch ssh: cannot enter the task's working directory "
                                   f"(workitems/job/job-1/it's-gone/wd) on this node; starting in {tmp_path}")


def test_no_task_no_command_is_a_login_shell() -> None:
    assert remote_command(None, []) == 'exec "${SHELL:-/bin/sh}" -l'
    assert remote_command(None, ["df", "-h"]) == "df -h"


def test_ssh_command_line(tmp_path: Path) -> None:
    argv = ssh_argv(Login("10.0.0.4", 50001, "mplab12cd34"), tmp_path / "id", known_hosts=tmp_path / "kh",
                    alias="n.p.acct", tty=False, remote="hostname", options=["LocalForward=8888:localhost:8888"])
    assert argv[0] == "ssh" and argv[-2:] == ["10.0.0.4", "hostname"]
    joined = " ".join(argv)
    for part in (f"-i {tmp_path / 'id'}", "-p 50001", "-l mplab12cd34", "-T", "-o IdentitiesOnly=yes",
                 "-o StrictHostKeyChecking=accept-new", "-o HostKeyAlias=n.p.acct", "-o BatchMode=yes",
                 f"-o UserKnownHostsFile={tmp_path / 'kh'}", "-o LocalForward=8888:localhost:8888"):
        assert part in joined
    assert "-t" in ssh_argv(Login("a", 1, "u"), tmp_path, known_hosts=tmp_path, alias="x", tty=True, remote="")
    assert host_key_alias("https://acct.westeurope.batch.azure.com", Target("p", "tvmps_1_d")) == (
        "tvmps_1_d.p.acct.westeurope.batch.azure.com")


def _results(*rows: InstanceResult) -> TaskResults:
    return TaskResults("job", "task", "running", None, None, None, 0, rows)


def _row(instance: int, node: str | None) -> InstanceResult:
    return InstanceResult(instance, node, "pool" if node else None, "running", None, None, None, None, None,
                          "workitems/job/job-1/task" if node else None)


def test_the_target_is_the_instances_node() -> None:
    results = _results(_row(0, "n0"), _row(1, "n1"), _row(2, None))
    assert target_for(results, 1) == Target("pool", "n1", "workitems/job/job-1/task", 1)
    with pytest.raises(InvalidInput, match=r"has no instance 5 \(instances: \[0, 1, 2\]\)"):
        target_for(results, 5)
    with pytest.raises(InvalidInput, match="instance 2 of task job/task has no node yet"):
        target_for(results, 2)


def test_session_names_and_keys_are_what_nodes_take(tmp_path: Path) -> None:
    names = {new_user_name() for _ in range(50)}
    assert len(names) == 50 and all(check_user_name(n) == n for n in names)
    path, public = new_key(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY")
    assert check_public_key(public + " me@laptop") == public


@pytest.mark.parametrize("name", ["alice", "_svc", "a.b-c_d", "x" * 20, "Mixed9", "ends$"])
def test_valid_user_names(name: str) -> None:
    assert check_user_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 21, "-x", "a b", "a/b", "123", ".", "..", "é", None, 7])
def test_invalid_user_names(name: object) -> None:
    with pytest.raises(WireError) as caught:
        check_user_name(name)
    assert caught.value.status == 400 and caught.value.values["PropertyName"] == "name"


def test_expiry() -> None:
    assert check_expiry(None, NOW) == NOW + timedelta(days=1)
    assert check_expiry("2025-06-02T00:00:00Z", NOW) == datetime(2025, 6, 2, tzinfo=timezone.utc)
    assert check_expiry("2025-06-02T02:00:00+02:00", NOW) == datetime(2025, 6, 2, tzinfo=timezone.utc)
    assert check_expiry("2025-06-02T00:00:00", NOW) == datetime(2025, 6, 2, tzinfo=timezone.utc)  # naive: UTC
    for bad in ("2025-06-01T12:00:00Z", "2024-01-01", "soon", 5):
        with pytest.raises(WireError):
            check_expiry(bad, NOW)


def _user(name: str, uid: int, *, admin: bool = False, key: str | None = "ssh-ed25519 AAAA",
          password: str | None = None) -> LoginUser:
    return LoginUser(name, admin, NOW + timedelta(hours=1), key, password, uid)


def test_authorized_keys_expire_with_the_user() -> None:
    text = authorized_keys([_user("a", 1), _user("b", 2, key=None)])
    assert text == 'expiry-time="20250601130000Z" ssh-ed25519 AAAA\n'
    assert expiry_days(_user("a", 1)) == (NOW - datetime(1970, 1, 1, tzinfo=timezone.utc)).days + 1


def test_the_node_user_database() -> None:
    passwd = "root:x:0:0:root:/root:/bin/bash\nme:x:1000:1000::/home/me:/bin/bash\n"
    shadow = "root:$6$host$hash:19000:0:99999:7:::\nme:$6$mine:19000:0:99999:7:::\n"
    group = "root:x:0:\nsudo:x:27:me\nme:x:1000:\n"
    users = [_user("bob", 20001, admin=True, password="$6$salt$h"), _user("amy", 20000)]
    p, s, g = overlay_files(passwd, shadow, group, users)
    assert p.splitlines()[-2:] == ["amy:x:20000:20000::/home/amy:/bin/bash", "bob:x:20001:20001::/home/bob:/bin/bash"]
    lines = s.splitlines()
    assert lines[:2] == ["root:*:19000:0:99999:7:::", "me:*:19000:0:99999:7:::"]  # no host password opens a node
    assert lines[2].startswith("amy:*:") and lines[3].startswith("bob:$6$salt$h:")
    assert lines[3].endswith(f":{expiry_days(users[0])}:")
    assert "sudo:x:27:me,bob" in g.splitlines() and f"{LOGIN_GROUP}:x:19999:amy,bob" in g.splitlines()
    assert taken_names(passwd, group) == {"root", "me", "sudo"}


def test_sshd_config() -> None:
    config = render_sshd_config(listen="127.0.3.4:2200", host_key="/k", env={"A": "1", "B": 'has "quote"'})
    assert "ListenAddress 127.0.3.4:2200" in config and f"AllowGroups {LOGIN_GROUP}" in config
    assert 'SetEnv "A=1"' in config and "quote" not in config and "PermitRootLogin no" in config
    assert "PasswordAuthentication yes" in config and "AuthorizedKeysFile .ssh/authorized_keys" in config
    mapped = render_sshd_config(listen="a:1", host_key="/k", env={}, mapped="root", keys_file="/state/keys")
    assert "AllowUsers root" in mapped and "PermitRootLogin prohibit-password" in mapped
    assert "PasswordAuthentication no" in mapped and "AuthorizedKeysFile /state/keys" in mapped
    assert "SetEnv" not in mapped


class _Batch:
    def __init__(self, pool: object) -> None:
        self.pool = pool

    def get_pool(self, _pool_id: str) -> object:
        return self.pool


def test_azure_pools_without_an_ssh_nat_pool_are_warned_about() -> None:
    from azure.batch import models as m

    nat = {"name": "ssh", "protocol": "tcp", "backendPort": 22, "frontendPortRangeStart": 50000,
           "frontendPortRangeEnd": 50099}
    mapped = m.BatchPool({"id": "p", "networkConfiguration": {"endpointConfiguration": {"inboundNATPools": [nat]}}})
    assert ssh_warnings(_Batch(mapped), "p") == []
    other = m.BatchPool({"id": "p", "networkConfiguration": {"endpointConfiguration": {"inboundNATPools": [
        {**nat, "backendPort": 8888}]}}})
    for pool in (other, m.BatchPool({"id": "p"})):
        (warning,) = ssh_warnings(_Batch(pool), "p")
        assert "no inbound NAT pool for SSH (backend port 22)" in warning and "pool-endpoint-configuration" in warning
