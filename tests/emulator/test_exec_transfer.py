"""Resource files and output files against real Blob storage (Azurite), through the engine and directly."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import (
    BlobSasPermissions,
    BlobServiceClient,
    ContainerSasPermissions,
    generate_blob_sas,
    generate_container_sas,
)

from mpilaunch.emulator import resourcefiles
from tests.support.exec_engine import py, rig

pytestmark = pytest.mark.azurite


class Blobs:
    def __init__(self, azurite: Any) -> None:
        self.azurite = azurite
        self.service = BlobServiceClient.from_connection_string(azurite.connection_string)
        self.name = f"c{uuid.uuid4().hex[:12]}"
        self.container = self.service.create_container(self.name)

    def _expiry(self) -> datetime:
        return datetime.now(UTC) + timedelta(hours=1)

    def container_sas(self, perms: str) -> str:
        token = generate_container_sas(self.azurite.account, self.name, account_key=self.azurite.key,
                                       permission=ContainerSasPermissions.from_string(perms), expiry=self._expiry())
        return f"{self.azurite.blob_endpoint}/{self.name}?{token}"

    def blob_sas(self, blob: str) -> str:
        token = generate_blob_sas(self.azurite.account, self.name, blob, account_key=self.azurite.key,
                                  permission=BlobSasPermissions(read=True), expiry=self._expiry())
        return f"{self.azurite.blob_endpoint}/{self.name}/{blob}?{token}"

    def put(self, blob: str, data: bytes) -> None:
        self.container.upload_blob(blob, data, overwrite=True)

    def get(self, blob: str) -> bytes:
        return bytes(self.container.download_blob(blob).readall())

    def names(self) -> list[str]:
        return sorted(b.name for b in self.container.list_blobs())


@pytest.fixture
def blobs(azurite: Any) -> Blobs:
    return Blobs(azurite)


def test_download_http_sas_and_container_prefix_with_mode(blobs: Blobs, tmp_path: Path) -> None:
    blobs.put("app.py", b"print('hi')\n")
    blobs.put("in/a.txt", b"A")
    blobs.put("in/sub/b.txt", b"B")
    blobs.put("other.txt", b"O")
    resourcefiles.download([
        {"httpUrl": blobs.blob_sas("app.py"), "filePath": "bin/app.py", "fileMode": "0750"},
        {"storageContainerUrl": blobs.container_sas("rl"), "blobPrefix": "in/", "filePath": "data"},
    ], tmp_path)
    assert (tmp_path / "bin" / "app.py").read_bytes() == b"print('hi')\n"
    assert (tmp_path / "bin" / "app.py").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "data" / "in" / "a.txt").read_text() == "A"
    assert (tmp_path / "data" / "in" / "sub" / "b.txt").read_text() == "B"
    assert not (tmp_path / "data" / "other.txt").exists()


def test_download_failures_carry_batch_codes_without_secrets(blobs: Blobs, tmp_path: Path) -> None:
    missing = blobs.blob_sas("missing.bin")
    with pytest.raises(resourcefiles.TransferError) as err:
        resourcefiles.download([{"httpUrl": missing, "filePath": "x"}], tmp_path)
    assert err.value.code == "BlobDownloadNotFound"
    assert "sig=" not in str(err.value) and "missing.bin" in str(err.value)
    forged = missing.replace("sig=", "sig=AAAA")
    with pytest.raises(resourcefiles.TransferError) as err:
        resourcefiles.download([{"httpUrl": forged, "filePath": "x"}], tmp_path)
    assert err.value.code == "BlobDownloadAccessDenied"


def output_file(pattern: str, container_url: str, condition: str, path: str | None = None) -> dict[str, Any]:
    """A task's ``outputFiles`` entry: upload ``pattern`` to the container (as ``path``) on ``condition``."""
    container = {"containerUrl": container_url, **({"path": path} if path is not None else {})}
    return {"filePattern": pattern, "destination": {"container": container},
            "uploadOptions": {"uploadCondition": condition}}


def run_alone(tmp_path: Path, command: str, **task: Any) -> dict[str, Any]:
    """Run one task on a one-node pool; its ``executionInfo`` once it completed (the engine is stopped by then)."""
    with rig(tmp_path) as r:
        r.pool(nodes=1)
        r.job()
        r.task("t", command, **task)
        info: dict[str, Any] = r.completed("t")["executionInfo"]
    return info


def test_multi_instance_resource_files_and_output_files(blobs: Blobs, tmp_path: Path) -> None:
    blobs.put("common/setup.txt", b"common")
    blobs.put("task-input.txt", b"primary only")
    check = ("import os, sys; d = os.environ['AZ_BATCH_TASK_SHARED_DIR']; "
             "ok = open(os.path.join(d, 'common', 'setup.txt')).read() == 'common'; "
             "master = os.environ['AZ_BATCH_IS_CURRENT_NODE_MASTER'] == 'true'; "
             "sys.exit(0 if ok and os.path.exists('task-input.txt') == master else 4)")
    main = ("import os; assert open('task-input.txt').read() == 'primary only'; os.makedirs('out/deep'); "
            "open('out/r1.txt', 'w').write('1'); open('out/deep/r2.txt', 'w').write('2'); print('done')")
    out_url = blobs.container_sas("rwl")
    outputs = [output_file("out/**/*.txt", out_url, "tasksuccess", "results"),
               output_file("../stdout.txt", out_url, "taskcompletion", "logs/stdout.txt"),
               output_file("out/r1.txt", out_url, "taskfailure", "never")]
    with rig(tmp_path) as r:
        r.pool(nodes=2)
        r.job()
        r.task("io", py(main), instances=2, coordination=py(check), outputFiles=outputs,
               resourceFiles=[{"httpUrl": blobs.blob_sas("task-input.txt"), "filePath": "task-input.txt"}],
               multiInstanceSettings={"numberOfInstances": 2, "coordinationCommandLine": py(check),
                                      "commonResourceFiles": [{"storageContainerUrl": blobs.container_sas("rl"),
                                                               "blobPrefix": "common/"}]})
        info = r.completed("io")["executionInfo"]
        assert info["result"] == "success", info.get("failureInfo")
    assert blobs.names() == ["common/setup.txt", "logs/stdout.txt", "results/deep/r2.txt", "results/r1.txt",
                             "task-input.txt"]
    assert blobs.get("results/deep/r2.txt") == b"2"
    assert blobs.get("logs/stdout.txt") == b"done\n"


def test_output_upload_failure_fails_the_task(blobs: Blobs, tmp_path: Path) -> None:
    read_only = blobs.container_sas("rl")
    info = run_alone(tmp_path, py("open('x.txt', 'w').write('x')"),
                     outputFiles=[output_file("x.txt", read_only, "taskcompletion")])
    assert (info["result"], info["failureInfo"]["code"]) == ("failure", "FileUploadAccessDenied")


def test_failure_uploads_only_the_failure_outputs(blobs: Blobs, tmp_path: Path) -> None:
    url = blobs.container_sas("rwl")
    info = run_alone(tmp_path, py("import sys; print('oops'); sys.exit(3)"),
                     outputFiles=[output_file("../std*.txt", url, "taskfailure", "fail"),
                                  output_file("../stdout.txt", url, "tasksuccess", "ok.txt")])
    assert (info["result"], info["exitCode"]) == ("failure", 3)
    assert blobs.names() == ["fail/stderr.txt", "fail/stdout.txt"]
    assert blobs.get("fail/stdout.txt") == b"oops\n"
