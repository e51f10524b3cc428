"""``mpilaunch emulator serve``: credentials printed, clean stop on SIGTERM/SIGINT, state kept across restarts,
bad flags refused."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from azure.batch import models as m

from mpilaunch.emulator import defaults
from tests.support.emulator import start_emulator
from tests.support.procs import reaped

pytestmark = pytest.mark.timeout(120)


def test_restart_keeps_pools_jobs_tasks(tmp_path):
    with start_emulator(tmp_path / "data", execute=False) as emu:
        client = emu.client()
        client.create_pool(m.BatchPoolCreateOptions(id="keep-pool", vm_size="s", target_dedicated_nodes=0))
        client.create_job(m.BatchJobCreateOptions(id="keep-job", pool_info=m.BatchPoolInfo(pool_id="keep-pool")))
        client.create_tasks("keep-job", [m.BatchTaskCreateOptions(id=f"t{i}", command_line="true")
                                         for i in range(120)])
        client.terminate_task("keep-job", "t7")
        etag = client.get_task("keep-job", "t3").etag
        assert emu.stop() == 0
        emu.start()
        client = emu.client()
        assert client.get_pool("keep-pool").id == "keep-pool"
        assert sorted(t.id for t in client.list_tasks("keep-job")) == sorted(f"t{i}" for i in range(120))
        assert client.get_task("keep-job", "t7").state == m.BatchTaskState.COMPLETED
        assert client.get_task("keep-job", "t3").etag == etag
        with pytest.raises(Exception, match="TaskExists"):
            client.create_task("keep-job", m.BatchTaskCreateOptions(id="T3", command_line="true"))


def test_prints_endpoint_and_credentials_and_stops_on_sigint(tmp_path):
    argv = [sys.executable, "-c", "from mpilaunch.cli import main; main()", "emulator", "serve", "--port", "0",
            "--data", str(tmp_path / "d"), "--no-execute"]
    with reaped(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) as proc:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("Batch emulator listening on http://127.0.0.1:")
        assert lines[1].split() == ["account:", defaults.ACCOUNT]
        assert lines[2].split() == ["key:", defaults.KEY]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "emulator stopped" in out and "Traceback" not in err
    assert (tmp_path / "d" / "state.sqlite3").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--key", "not base64!"], "--key"),
    (["--account", "bad name"], "--account"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-c", "from mpilaunch.cli import main; main()", "emulator", "serve", "--port", "0",
         "--data", str(tmp_path / "d"), "--no-execute", *args],
        check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(tmp_path, wire_emulator):
    result = subprocess.run(
        [sys.executable, "-c", "from mpilaunch.cli import main; main()", "emulator", "serve", "--port",
         str(wire_emulator.port), "--data", str(tmp_path / "d"), "--no-execute"],
        check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot listen on" in result.stderr


def test_one_data_dir_one_emulator(wire_emulator):
    result = subprocess.run(
        [sys.executable, "-c", "from mpilaunch.cli import main; main()", "emulator", "serve", "--port", "0",
         "--data", str(wire_emulator.data_dir), "--no-execute"],
        check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "in use by another running emulator" in result.stderr


def test_verbose_logs_requests(tmp_path):
    with start_emulator(tmp_path / "data", execute=False, args=["-v"]) as emu:
        assert emu.raw("GET", "/jobs").status_code == 200
        assert emu.raw("GET", "/jobs/nope").status_code == 404
    log = emu.log_text()
    assert "GET /jobs?api-version=2025-06-01 -> 200" in log and "-> 404" in log
