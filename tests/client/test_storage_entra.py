"""Entra ID storage path against a real Azurite with OAuth: bearer-token uploads and user-delegation SAS URLs.

Azurite's "basic" OAuth checks a token's issuer, audience and lifetime (not its signature) and only over HTTPS, so
the test serves Azurite with a self-signed certificate the SDK is told to trust, and signs in with a credential
that hands out such tokens (standing in for azure-identity).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mpilaunch.client.config import StorageConfig
from mpilaunch.client.storage import StagingStore, walk_inputs
from tests.support.azurite import ACCOUNT, running_azurite

pytestmark = pytest.mark.azurite


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class FakeEntra:
    """A TokenCredential issuing storage tokens of a made-up tenant/user (what Azurite's basic OAuth accepts)."""

    def __init__(self) -> None:
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes += scopes
        now = int(time.time())
        tid = "72f988bf-86f1-41af-91ab-2d7cd011db47"
        claims = {"iss": f"https://sts.windows.net/{tid}/", "aud": "https://storage.azure.com", "iat": now - 60,
                  "nbf": now - 60, "exp": now + 3600, "oid": str(uuid.uuid4()), "tid": tid}
        return AccessToken(f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.c2ln", now + 3600)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def oauth_azurite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An HTTPS Azurite with --oauth basic; yields its blob endpoint (the certificate is trusted via env)."""
    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    args = ["--oauth", "basic", "--cert", str(cert), "--key", str(key)]
    with running_azurite(tmp_path / "data", extra_args=args) as server:
        yield f"https://127.0.0.1:{server.port}/{ACCOUNT}"


def test_entra_upload_and_user_delegation_sas(oauth_azurite: str, tmp_path: Path) -> None:
    entra = FakeEntra()
    store = StagingStore(StorageConfig(account=ACCOUNT, endpoint=oauth_azurite, container="entra"), entra)
    (tmp_path / "app.py").write_text("print(1)\n")
    files = walk_inputs([tmp_path / "app.py"])
    assert len(store.upload(files).uploaded) == 1
    assert store.upload(files).uploaded == ()  # content compare works with a token too
    assert entra.scopes and all(s.startswith("https://storage.azure.com") for s in entra.scopes)

    read_url = store.container_sas_url("r", dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    assert "skoid=" in read_url and "sp=r" in read_url  # a user delegation SAS, not an account-key one
    [staged] = store.staged(files, read_url)
    assert BlobClient.from_blob_url(staged.url).download_blob().readall() == b"print(1)\n"
    with pytest.raises(HttpResponseError) as err:
        BlobClient.from_blob_url(staged.url).upload_blob(b"x", overwrite=True)
    assert err.value.status_code == 403
