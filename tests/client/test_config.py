"""Configuration precedence (flags > environment > profile file), Entra fallback, secrets kept out of sight."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpilaunch.client.config import BatchConfig, StorageConfig, resolve_settings
from node_runtime.errors import InvalidInput

KEY = "c2VjcmV0LWtleS1ieXRlcy0xMjM0NTY3ODkwMTIzNDU2Nzg5MA=="


def write_profile(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return {"MPILAUNCH_CONFIG": str(path)}


def test_flags_beat_environment_beat_profile(tmp_path: Path) -> None:
    env = write_profile(tmp_path, """
[default]
batch_endpoint = "https://profile.example"
batch_account = "profacct"
pool = "profpool"
storage_account = "profstore"
""")
    env |= {"AZURE_BATCH_ENDPOINT": "https://env.example", "AZURE_BATCH_ACCESS_KEY": KEY}
    s = resolve_settings({"batch_endpoint": "https://flag.example"}, env)
    assert s.batch.endpoint == "https://flag.example"
    assert s.batch.account == "profacct" and s.batch.key == KEY and s.pool == "profpool"
    assert s.storage is not None and s.storage.account_url == "https://profstore.blob.core.windows.net"
    s = resolve_settings({}, env)
    assert s.batch.endpoint == "https://env.example"


def test_named_profile_and_errors(tmp_path: Path) -> None:
    env = write_profile(tmp_path, '[prod]\nbatch_endpoint = "https://prod"\n')
    assert resolve_settings({}, env, profile="prod").batch.endpoint == "https://prod"
    assert resolve_settings({}, env | {"MPILAUNCH_PROFILE": "prod"}).batch.endpoint == "https://prod"
    with pytest.raises(InvalidInput, match=r"profile 'dev' not found .*\(has: prod\)"):
        resolve_settings({}, env, profile="dev")
    with pytest.raises(InvalidInput, match="no Batch endpoint"):
        resolve_settings({}, env)
    bad = write_profile(tmp_path, '[default]\nbatch_endpont = "x"\n')
    with pytest.raises(InvalidInput, match="unknown keys \\['batch_endpont'\\]"):
        resolve_settings({}, bad)
    broken = write_profile(tmp_path, "[default\n")
    with pytest.raises(InvalidInput, match="cannot read profile file"):
        resolve_settings({}, broken)
    with pytest.raises(InvalidInput, match="does not exist"):
        resolve_settings({}, {"MPILAUNCH_CONFIG": str(tmp_path / "none.toml")}, profile="x")


def test_no_storage_without_storage_settings(tmp_path: Path) -> None:
    s = resolve_settings({"batch_endpoint": "https://b"}, {"MPILAUNCH_CONFIG": str(tmp_path / "none.toml")})
    assert s.storage is None


def test_secrets_are_not_in_repr() -> None:
    b = BatchConfig("https://b", "acct", KEY)
    st = StorageConfig(connection_string=f"AccountName=x;AccountKey={KEY}", key=KEY)
    for obj in (b, st):
        assert KEY not in repr(obj) and KEY not in str(obj)


def test_shared_key_or_entra_credential() -> None:
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.identity import DefaultAzureCredential

    keyed = BatchConfig("https://b.example", "acct", KEY).client()
    assert isinstance(keyed._config.credential, AzureNamedKeyCredential)
    entra = BatchConfig("https://b.example", "acct").client()
    assert isinstance(entra._config.credential, DefaultAzureCredential)
    with pytest.raises(InvalidInput, match="account name"):
        BatchConfig("https://b.example", None, KEY).client()


def test_a_given_token_credential_replaces_the_default() -> None:
    class Token:
        def get_token(self, *scopes: str, **kwargs: object) -> None:
            raise AssertionError("not called by construction")

    cred = Token()
    assert BatchConfig("https://b.example", "acct").client(cred)._config.credential is cred
    keyed = BatchConfig("https://b.example", "acct", KEY).client(cred)
    assert keyed._config.credential is not cred  # a configured key wins
