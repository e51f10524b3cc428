"""Pure task building: spec validation, command-line quoting, the multi-instance task model."""

from __future__ import annotations

import base64
import re
import shlex
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mpilaunch
from mpilaunch.client import taskbuild
from mpilaunch.client.spec import (
    BindMount,
    ContainerSpec,
    HostMount,
    Registry,
    TaskSpec,
    check_id,
    parse_duration,
    parse_env,
)
from mpilaunch.client.storage import StagedFile
from mpilaunch.client.taskbuild import OutputTarget, build_task
from node_runtime.contract import launch_command_line
from node_runtime.errors import InvalidInput, InvalidRequest


def spec(**kw: object) -> TaskSpec:
    base: dict[str, object] = {"job_id": "job-1", "task_id": "task_1", "nodes": 3, "argv": ("python3", "app.py")}
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


@given(st.lists(st.text(alphabet=st.characters(exclude_characters="\0", exclude_categories=["Cs"])),
                min_size=1),
       st.one_of(st.none(), st.integers(1, 64)), st.sampled_from([None, "openmpi", "mpich"]))
def test_command_line_round_trips_through_shlex(argv: list[str], ppn: int | None, mpi: str | None) -> None:
    words = shlex.split(launch_command_line(argv, ppn=ppn, mpi=mpi))
    assert words[:2] == ["node-runtime", "launch"]
    sep = words.index("--")
    assert words[sep + 1:] == argv
    opts = words[2:sep]
    assert ("--ppn" in opts) == (ppn is not None) and ("--mpi" in opts) == (mpi is not None)


def test_command_line_carries_fabric_and_threads_per_rank() -> None:
    assert "--fabric" not in launch_command_line(["a"])  # auto is the runtime's default
    words = shlex.split(launch_command_line(["a"], fabric="ucx", threads_per_rank=4))
    assert words == ["node-runtime", "launch", "--threads-per-rank", "4", "--fabric", "ucx", "--", "a"]
    with pytest.raises(ValueError, match="fabric"):
        launch_command_line(["a"], fabric="ib")
    with pytest.raises(InvalidInput, match="unknown fabric 'ib'"):
        spec(fabric="ib").validate()


def test_command_line_with_shell_metacharacters_is_quoted() -> None:
    line = launch_command_line(["python3", "-c", "print('a b'); import os", "$HOME", "--", "x;y"], ppn=2)
    assert line.startswith("node-runtime launch --ppn 2 -- python3 -c ")
    assert shlex.split(line)[5:] == ["python3", "-c", "print('a b'); import os", "$HOME", "--", "x;y"]


def test_build_task_is_a_correct_multi_instance_task(tmp_path: Path) -> None:
    s = spec(env=(("OMP_NUM_THREADS", "2"), ("MY_FLAG", "a b")), wall_time=timedelta(minutes=30), retries=2,
             outputs=("result-*.json", "sub/final.h5"), mpi="openmpi", ppn=2, checkpoint_url="/shared/ckpt")
    common = [StagedFile("https://acct/c/app.py?sig=x", "app.py", "0755")]
    primary = [StagedFile("https://acct/c/only.txt?sig=x", "only.txt")]
    task = build_task(s, common_files=common, primary_files=primary,
                      outputs=OutputTarget("https://acct/out?sig=w", "job-1/task_1"), secret="s" * 43)
    body = task.as_dict()
    assert body["id"] == "task_1" and body["requiredSlots"] == 1
    mis = body["multiInstanceSettings"]
    assert mis["numberOfInstances"] == 3 and mis["coordinationCommandLine"] == "node-runtime coordinate"
    assert mis["commonResourceFiles"] == [{"httpUrl": "https://acct/c/app.py?sig=x", "filePath": "wd/app.py",
                                           "fileMode": "0755"}]
    assert body["resourceFiles"] == [{"httpUrl": "https://acct/c/only.txt?sig=x", "filePath": "only.txt"}]
    assert shlex.split(body["commandLine"]) == ["node-runtime", "launch", "--ppn", "2", "--mpi", "openmpi", "--",
                                                "python3", "app.py"]
    env = {e["name"]: e["value"] for e in body["environmentSettings"]}
    assert env == {"AZ_BATCH_NODE_COUNT": "3", "MPILAUNCH_TASK_SECRET": "s" * 43, "MPILAUNCH_SSH_PORT": "2222",
                   "MPILAUNCH_RUNTIME_VERSION": mpilaunch.__version__,
                   "MPILAUNCH_EXPORT_ENV": "OMP_NUM_THREADS,MY_FLAG", "MPILAUNCH_CHECKPOINT_URL": "/shared/ckpt",
                   "OMP_NUM_THREADS": "2", "MY_FLAG": "a b"}
    assert body["constraints"]["maxTaskRetryCount"] == 2
    assert task.constraints is not None and task.constraints.max_wall_clock_time == timedelta(minutes=30)
    assert body["userIdentity"] == {"autoUser": {"scope": "pool", "elevationLevel": "nonadmin"}}
    outs = body["outputFiles"]
    assert [o["filePattern"] for o in outs] == ["result-*.json", "sub/final.h5", "../std*.txt"]
    assert [o["destination"]["container"]["path"] for o in outs[:2]] == ["job-1/task_1/outputs",
                                                                         "job-1/task_1/outputs/sub/final.h5"]
    assert outs[2]["destination"]["container"] == {"containerUrl": "https://acct/out?sig=w",
                                                   "path": "job-1/task_1/logs"}
    assert all(o["uploadOptions"]["uploadCondition"] == "taskCompletion" for o in outs)
    assert "containerSettings" not in body


def test_fresh_secret_per_task_is_long_base64url() -> None:
    secrets = set()
    for _ in range(3):
        env = {e.name: e.value for e in build_task(spec()).environment_settings or []}
        value = env["MPILAUNCH_TASK_SECRET"]
        assert value is not None
        assert len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))) >= 32
        secrets.add(value)
    assert len(secrets) == 3


def test_secret_does_not_appear_in_spec_repr() -> None:
    s = spec(checkpoint_url="https://acct/ckpt?sig=SECRETSIG",
             container=ContainerSpec("img", registry=Registry("reg.io", "me", "PASSWORD")))
    assert "SECRETSIG" not in repr(s) and "PASSWORD" not in repr(s)
    assert "SECRETURL" not in repr(StagedFile("https://x?sig=SECRETURL", "a"))


def test_container_settings_with_registry_and_bind_mounts() -> None:
    s = spec(container=ContainerSpec("reg.io/mpi:1", (BindMount.parse("shared:ro"), BindMount.parse("Task")),
                                     Registry("reg.io", identity="/subscriptions/x/id"), "--shm-size=1g"),
             elevated=True)
    body = build_task(s).as_dict()
    assert body["containerSettings"] == {
        "imageName": "reg.io/mpi:1", "containerRunOptions": "--shm-size=1g", "workingDirectory": "taskWorkingDirectory",
        "registry": {"registryServer": "reg.io", "identityReference": {"resourceId": "/subscriptions/x/id"}},
        "containerHostBatchBindMounts": [{"source": "Shared", "isReadOnly": True},
                                         {"source": "Task", "isReadOnly": False}]}
    assert body["userIdentity"]["autoUser"]["elevationLevel"] == "admin"


def test_host_mounts_become_quoted_docker_mount_options() -> None:
    c = ContainerSpec("img", run_options="--shm-size=1g",
                      host_mounts=(HostMount.parse("/data:/in:ro"), HostMount.parse("/scratch dir:/scratch")))
    opts = build_task(spec(container=c)).as_dict()["containerSettings"]["containerRunOptions"]
    assert shlex.split(opts) == ["--shm-size=1g", "--mount=type=bind,source=/data,target=/in,readonly",
                                 "--mount=type=bind,source=/scratch dir,target=/scratch"]
    for bad in ["/a", "rel:/b", "/a:/b:rx", "/a,b:/c", "/a:/b:ro:x"]:
        with pytest.raises(InvalidInput, match=re.escape(repr(bad))):
            HostMount.parse(bad)


@pytest.mark.parametrize("text", ["nowhere", "Shared:rx", ""])
def test_bad_bind_mount_names_the_value(text: str) -> None:
    with pytest.raises(InvalidInput, match=repr(text)):
        BindMount.parse(text)


def test_validation_lists_every_problem_naming_values(tmp_path: Path) -> None:
    bad = spec(job_id="a" * 65, task_id="has space", nodes=0, argv=(), ppn=0, mpi="lam", display_name="x" * 1025,
               retries=-2, wall_time=timedelta(0), env=(("AZ_BATCH_X", "1"), ("1BAD", "2")),
               inputs=(tmp_path / "missing.py",), outputs=("/abs/*.txt",), ssh_port=0)
    with pytest.raises(InvalidInput) as err:
        bad.validate()
    text = str(err.value)
    for fragment in ["'" + "a" * 65 + "'", "'has space'", "nodes must be >= 1, got 0", "command to run is empty",
                     "got 0", "'lam'", "1025 characters", "got -2", "wall time", "'AZ_BATCH_X' is reserved",
                     "'1BAD'", "missing.py", "'/abs/*.txt'", "ssh port"]:
        assert fragment in text, fragment
    assert len(err.value.details) == 14


def test_inputs_colliding_on_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.py").write_text("1")
    (tmp_path / "b" / "x.py").write_text("2")
    with pytest.raises(InvalidInput, match=r"same path 'x\.py'"):
        spec(inputs=(tmp_path / "a" / "x.py", tmp_path / "b" / "x.py")).validate()


def test_check_id() -> None:
    assert check_id("pool", "ok_Pool-1") == "ok_Pool-1"
    with pytest.raises(InvalidRequest, match="invalid pool id 'p/1'"):
        check_id("pool", "p/1")


def test_request_too_large_is_refused_before_submission() -> None:
    files = [StagedFile(f"https://acct.blob/c/{i:06d}/{'x' * 200}?sig=abc", f"f{i}") for i in range(5000)]
    with pytest.raises(InvalidRequest, match=r"over the 1048576-byte limit \(5000 resource files\)"):
        build_task(spec(), common_files=files)


def test_outputs_without_target_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="need an output container"):
        build_task(spec(outputs=("*.h5",)))


def test_parse_env_and_duration() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == (("A", "1"), ("B", "x=y"), ("C", ""))
    with pytest.raises(InvalidInput, match="'NOVALUE'"):
        parse_env(["NOVALUE"])
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("2h30m") == timedelta(hours=2, minutes=30)
    assert parse_duration("1d") == timedelta(days=1)
    assert parse_duration("01:02:03") == timedelta(hours=1, minutes=2, seconds=3)
    for bad in ["", "5x", "1:2", "h"]:
        with pytest.raises(InvalidInput, match="invalid duration"):
            parse_duration(bad)


def test_request_body_has_no_unset_fields() -> None:
    body = taskbuild.request_body(build_task(spec()))
    assert b"null" not in body
