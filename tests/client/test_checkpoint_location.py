"""``--checkpoint LOCATION``: parsing and validation (pure), the SAS the client mints against a real Azurite (enough
for node_runtime.checkpoint, nothing more), and `mpilaunch run --local --checkpoint blob:...` end to end."""

from __future__ import annotations

import importlib.util
import json
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient, ContainerClient

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.api import Launcher
from mpilaunch.client.checkpoint import PERMISSION, parse_location, sas_warnings, store_for, usable_url
from mpilaunch.client.config import StorageConfig
from mpilaunch.client.local import LocalState
from mpilaunch.client.spec import TaskSpec
from mpilaunch.client.storage import sas_expiry
from node_runtime.checkpoint import load_committed, open_store
from node_runtime.errors import CheckpointError, InvalidInput
from tests.client.conftest import local_services, new_task_id  # noqa: F401 - module-scoped emulator + Azurite
from tests.client.test_storage_entra import FakeEntra, oauth_azurite  # noqa: F401 - HTTPS Azurite with OAuth
from tests.support.azurite import ACCOUNT, KEY, Azurite

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "examples" / "sweep.py"
SIG = "c2VjcmV0c2lnbmF0dXJl"
AZ = "https://acct.blob.core.windows.net"
FUTURE = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")


def signed(url: str, sp: str = "rcdl", se: str = FUTURE, sr: str = "c") -> str:
    return f"{url}?sv=2025-01-05&se={se}&sr={sr}&sp={sp}&sig={SIG}"


@pytest.mark.parametrize(("text", "kind", "container", "prefix"), [
    ("/shared/ckpt", "directory", None, ""),
    ("file:///shared/ckpt", "directory", None, ""),
    ("file://localhost/shared/ckpt", "directory", None, ""),
    (f"{AZ}/ckpt", "blob", "ckpt", ""),
    (f"{AZ}/ckpt/sweep/run-1", "blob", "ckpt", "sweep/run-1"),
    ("http://127.0.0.1:10000/devstoreaccount1/ck-1/p", "blob", "ck-1", "p"),
    ("blob:sweep-1", "configured", None, "sweep-1"),
    ("blob:team/sweep_1", "configured", None, "team/sweep_1"),
    (signed(f"{AZ}/ckpt/p"), "signed", "ckpt", "p"),
    (signed(f"{AZ}/ckpt", sp="racwdl"), "signed", "ckpt", ""),
    (signed(f"{AZ}/ckpt", sp="rwdl"), "signed", "ckpt", ""),  # 'w' also creates
])
def test_accepted_forms(text: str, kind: str, container: str | None, prefix: str) -> None:
    loc = parse_location(text)
    assert (loc.kind, loc.container, loc.prefix) == (kind, container, prefix)
    assert loc.needs_sas == (kind in ("blob", "configured"))
    assert SIG not in loc.shown and SIG not in repr(loc)


@pytest.mark.parametrize(("text", "fragment"), [
    ("ckpt/dir", "'ckpt/dir': a directory must be an absolute path"),
    ("", "it is empty"),
    ("s3://bucket/ckpt", "unknown scheme 's3'"),
    ("file://server/share", "use file:///absolute/path"),
    ("blob:", "use blob:PREFIX"),
    ("blob:../up", "prefix segment '..'"),
    ("blob:a//b", "prefix segment ''"),
    (f"{AZ}", "it names no blob container"),
    (f"{AZ}/Bad_Container", "'Bad_Container' is not a valid container name"),
    (f"{AZ}/ab", "'ab' is not a valid container name"),
    (f"{AZ}/ckpt/a b", "prefix segment 'a b'"),
    ("http://acct.blob.core.windows.net/ckpt", "use https"),
    ("https://acct.blob.core.windows.net:99999/ckpt", "malformed port"),
    (f"{AZ}/ckpt#frag", "fragment"),
    (f"{AZ}/ckpt?foo=bar", "its query is not a SAS"),
    (signed(f"{AZ}/ckpt", sp="rcl"), "also needs 'd'"),
    (signed(f"{AZ}/ckpt", sp="rdl"), "also needs 'c'"),
    (signed(f"{AZ}/ckpt", sr="b"), "resource 'b'"),
    (signed(f"{AZ}/ckpt", se="2020-01-01T00:00:00Z"), "expired at 2020-01-01T00:00:00Z"),
])
def test_refused_forms_name_the_value_and_never_the_sas(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_location(text)
    assert fragment in str(info.value)
    assert "invalid checkpoint location" in str(info.value) and SIG not in str(info.value)


def test_a_signed_url_is_passed_unchanged_without_network() -> None:
    url = signed(f"{AZ}/ckpt/p")
    assert usable_url(url, None, datetime.now(UTC)) == url
    assert usable_url("/shared/ckpt", None, datetime.now(UTC)) == "/shared/ckpt"


def test_warnings_for_a_user_sas_with_more_rights_or_an_early_expiry() -> None:
    until = datetime.now(UTC) + timedelta(days=60)
    [extra, early] = sas_warnings(parse_location(signed(f"{AZ}/ckpt", sp="racwdl")), until)
    assert "grants 'aw' beyond what checkpoint stores need ('rcdl')" in extra and SIG not in extra
    assert f"expires at {FUTURE}" in early
    assert sas_warnings(parse_location(signed(f"{AZ}/ckpt")), datetime.now(UTC)) == []
    account_sas = f"{AZ}/ckpt?sv=2025-01-05&ss=b&srt=sco&se={FUTURE}&sp=rcdl&sig={SIG}"
    [warning] = sas_warnings(parse_location(account_sas), datetime.now(UTC))
    assert "is an account SAS" in warning and SIG not in warning
    assert sas_warnings(parse_location(f"{AZ}/ckpt"), until) == []


def test_blob_prefix_needs_a_configured_storage_account() -> None:
    with pytest.raises(InvalidInput, match="'blob:x' needs a configured storage account"):
        usable_url("blob:x", None, datetime.now(UTC))


class Token:
    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        raise AssertionError("no network expected")


def test_other_accounts_get_a_user_delegation_sas_not_the_configured_key() -> None:
    """The configured key signs only for its own account; any other account goes through Entra ID."""
    endpoint = f"http://127.0.0.1:9/{ACCOUNT}"
    configured = StorageConfig(connection_string=f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};"
                                                 f"AccountKey={KEY};BlobEndpoint={endpoint};")
    other = store_for(parse_location(f"{AZ}/ckpt/p"), configured, Token())
    assert other.service.url.startswith(AZ) and other._account_key is None and other.config.container == "ckpt"
    same = store_for(parse_location(f"{endpoint}/ck-x/p"), configured, Token())
    assert same._account_key == KEY and same.config.container == "ck-x"


def test_cli_refuses_a_bad_location_before_any_network_call(capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value in (("--checkpoint", "relative/ckpt"), ("--checkpoint-url", signed(f"{AZ}/ckpt", sp="r"))):
        code = run_cli(cli, "mpilaunch", ["submit", "--endpoint", "http://127.0.0.1:9", flag, value, "--", "true"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "invalid checkpoint location" in err and SIG not in err
    assert "'relative/ckpt'" not in err  # (the second error names the second value)


# --- against a real Azurite -----------------------------------------------------------------------------------------


def sas_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@pytest.fixture
def storage(azurite: Azurite) -> StorageConfig:
    return StorageConfig(connection_string=azurite.connection_string, container=f"t{uuid.uuid4().hex}")


@pytest.mark.azurite
def test_minted_sas_is_what_the_store_needs(storage: StorageConfig) -> None:
    expiry = sas_expiry(timedelta(hours=1), 1)
    url = usable_url("blob:sweep/run-1", storage, expiry)
    base, sas = url.split("?")
    assert base.endswith(f"/{storage.container}-checkpoints/sweep/run-1")
    fields = sas_of(url)
    assert fields["sp"] == PERMISSION and fields["sr"] == "c"
    assert abs(datetime.fromisoformat(fields["se"]) - expiry) < timedelta(seconds=2)

    store = open_store(url)  # the container was created by resolve
    store.put("work/a/1", b"one")
    store.put("work/a/1", b"one")  # a retried identical write is ours: fine
    store.put("work/a/2", b"two")
    assert store.get("work/a/1") == b"one" and store.names("work/") == ["work/a/1", "work/a/2"]
    store.delete("work/a/2")
    assert store.names("work/") == ["work/a/1"]
    assert sas not in repr(store) and "sig=" not in store.location

    with pytest.raises(CheckpointError, match="different content"):
        store.put("work/a/1", b"changed")  # create-only
    blob = BlobClient.from_blob_url(f"{base}/work/a/1?{sas}")
    with pytest.raises(HttpResponseError) as denied:
        blob.upload_blob(b"changed", overwrite=True)  # no 'w': cannot overwrite
    assert denied.value.status_code == 403
    with pytest.raises(HttpResponseError) as denied:
        blob.set_blob_metadata({"sha256": "forged"})  # nor change metadata
    assert denied.value.status_code == 403
    assert store.get("work/a/1") == b"one"
    account_url = base.split(f"/{storage.container}-checkpoints/")[0]
    with pytest.raises(HttpResponseError) as denied:  # the SAS is for this container only, not the inputs' one
        list(ContainerClient(account_url, storage.container, credential=sas).list_blob_names())
    assert denied.value.status_code == 403


@pytest.mark.azurite
def test_explicit_azurite_url_gets_its_container_and_a_sas(azurite: Azurite, storage: StorageConfig) -> None:
    container = f"ck{uuid.uuid4().hex[:10]}"
    url = usable_url(f"{azurite.blob_endpoint}/{container}/runs/a", storage, sas_expiry(None, 0))
    assert url.startswith(f"{azurite.blob_endpoint}/{container}/runs/a?") and sas_of(url)["sp"] == PERMISSION
    store = open_store(url)
    store.put("x", b"1")
    blobs = ContainerClient.from_connection_string(azurite.connection_string, container).list_blob_names()
    assert list(blobs) == ["runs/a/x"]


@pytest.mark.azurite
def test_entra_user_delegation_sas_for_an_account_without_a_key(oauth_azurite: str) -> None:  # noqa: F811
    entra = FakeEntra()
    container = f"ck{uuid.uuid4().hex[:10]}"
    url = usable_url(f"{oauth_azurite}/{container}/run", None, sas_expiry(timedelta(hours=1), 0), entra)
    fields = sas_of(url)
    assert "skoid" in fields and fields["sp"] == PERMISSION  # a user delegation SAS, not an account-key one
    assert entra.scopes
    store = open_store(url)
    store.put("work/a", b"1")
    assert store.get("work/a") == b"1" and store.names("work/") == ["work/a"]
    with pytest.raises(HttpResponseError) as denied:
        BlobClient.from_blob_url(url.replace("/run?", "/run/work/a?")).upload_blob(b"2", overwrite=True)
    assert denied.value.status_code == 403


@pytest.mark.azurite
def test_storage_refusal_is_a_checkpoint_error_without_secrets(azurite: Azurite) -> None:
    wrong_key = KEY[:-8] + "AAAAAAA="
    storage = StorageConfig(connection_string=azurite.connection_string.replace(KEY, wrong_key))
    expected = (f"cannot prepare checkpoint location 'blob:x': container 'mpilaunch-checkpoints' at "
                f"{azurite.blob_endpoint} answered .*HTTP 403")
    with pytest.raises(CheckpointError, match=expected) as info:
        usable_url("blob:x", storage, sas_expiry(None, 0))
    assert wrong_key not in str(info.value) and "sig=" not in str(info.value)


# --- end to end --------------------------------------------------------------------------------------------------


def _sweep_module() -> Any:
    spec = importlib.util.spec_from_file_location("sweep_example", SWEEP)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.azurite
@pytest.mark.timeout(240)
def test_run_sweep_with_blob_checkpoint_through_the_emulator(local_services: LocalState,  # noqa: F811
                                                             capsys: pytest.CaptureFixture[str],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the SDKs' HTTP logging included
    task = new_task_id("ckpt-blob")
    prefix = f"sweep-{uuid.uuid4().hex[:8]}"
    code = run_cli(cli, "mpilaunch", [
        "run", "--local", "-n", "2", "--task-id", task, "--timeout", "180", "--wall-time", "30m",
        "--checkpoint", f"blob:{prefix}", "-i", str(SWEEP), "--", "python3", "sweep.py", "--grid", "4",
        "--steps", "200", "--batch", "4", "--out", "pendulum.json"])
    out = capsys.readouterr()
    assert code == 0, out.err

    launcher = Launcher.local()
    env = {e.name: e.value for e in launcher.batch.get_task("mpilaunch", task).environment_settings}
    url = env["MPILAUNCH_CHECKPOINT_URL"]
    assert f"/{launcher.store.config.container}-checkpoints/{prefix}?" in url and sas_of(url)["sp"] == PERMISSION
    sig = sas_of(url)["sig"]

    sweep = _sweep_module()
    expected = {key: sweep.simulate(point) for key, point in sweep.grid(4, 200).items()}
    committed = load_committed(open_store(url), "pendulum")
    assert committed.results == expected and committed.duplicates == 0 and not committed.corrupt
    names = open_store(url).names("work/pendulum/")
    assert names and all(n.startswith("work/pendulum/") for n in names)
    assert not [n for n in launcher.store.list_names("") if "/work/" in n], "checkpoints in the inputs' container"

    shown = out.out + out.err
    for args in (["status", "--local", task, "--output", "json"], ["results", "--local", task, "--output", "json"],
                 ["status", "--local", task]):
        run_cli(cli, "mpilaunch", args)
        captured = capsys.readouterr()
        shown += captured.out + captured.err
        if "json" in args:
            json.loads(captured.out)
    assert caplog.records, "nothing was logged: the log check below would prove nothing"
    assert sig not in shown and sig not in caplog.text


def test_spec_repr_hides_the_location() -> None:
    s = TaskSpec("j", "t", 2, ("true",), checkpoint_url=signed(f"{AZ}/ckpt"))
    assert SIG not in repr(s.validate())
