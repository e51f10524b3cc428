"""SharedKey authentication over raw HTTP, signed by the SDK's own policy: what is refused executes nothing."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from mpilaunch.emulator import auth
from mpilaunch.emulator.wire_errors import WireError

pytestmark = pytest.mark.timeout(60)


def rfc1123(delta: timedelta = timedelta()) -> str:
    return format_datetime(datetime.now(UTC) + delta, usegmt=True)


def assert_refused(resp, detail_part: str) -> None:
    assert resp.status_code == 403, resp.text
    body = resp.json()
    assert body["code"] == "AuthenticationFailed"
    assert body["message"]["lang"] == "en-US" and body["message"]["value"].startswith("Server failed")
    details = {v["key"]: v["value"] for v in body["values"]}
    assert detail_part in details["AuthenticationErrorDetail"]


def test_signed_request_is_accepted(wire_emulator):
    assert wire_emulator.raw("GET", "/jobs").status_code == 200


def test_tampered_signature_creates_nothing(wire_emulator):
    job_id = f"tamper-{uuid.uuid4().hex[:8]}"
    from urllib.parse import quote, urlencode

    import requests
    from azure.batch._patch import BatchSharedKeyAuthPolicy
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.core.pipeline import PipelineContext, PipelineRequest
    from azure.core.rest import HttpRequest

    body = f'{{"id": "{job_id}", "poolInfo": {{"poolId": "p"}}}}'.encode()
    url = f"{wire_emulator.endpoint}/jobs?{urlencode({'api-version': '2025-06-01'}, quote_via=quote)}"
    req = HttpRequest("POST", url, headers={"Content-Type": "application/json; odata=minimalmetadata",
                                            "Content-Length": str(len(body))}, content=body)
    BatchSharedKeyAuthPolicy(AzureNamedKeyCredential(wire_emulator.account, wire_emulator.key)).on_request(
        PipelineRequest(req, PipelineContext(None)))
    headers = dict(req.headers)
    scheme, _, sig = headers["Authorization"].rpartition(":")
    flipped = base64.b64encode(bytes([base64.b64decode(sig)[0] ^ 1]) + base64.b64decode(sig)[1:]).decode()
    tampered = requests.post(url, headers={**headers, "Authorization": f"{scheme}:{flipped}"}, data=body, timeout=30)
    assert_refused(tampered, "MAC signature")
    # the body changed after signing is refused too (Content-Length is signed)
    longer = body.replace(b'"p"', b'"pp"')
    resent = requests.post(url, headers={**headers, "Content-Length": str(len(longer))}, data=longer, timeout=30)
    assert_refused(resent, "MAC signature")
    assert wire_emulator.raw("GET", f"/jobs/{job_id}").status_code == 404


def test_stale_and_future_ocp_date(wire_emulator):
    assert_refused(wire_emulator.raw("GET", "/jobs", headers={"ocp-date": rfc1123(-timedelta(minutes=16))}),
                   "more than 15 minutes")
    assert_refused(wire_emulator.raw("GET", "/jobs", headers={"ocp-date": rfc1123(timedelta(minutes=16))}),
                   "more than 15 minutes")
    assert wire_emulator.raw("GET", "/jobs", headers={"ocp-date": rfc1123(-timedelta(minutes=14))}).status_code == 200


def test_wrong_key_account_scheme_and_missing_header(wire_emulator):
    other_key = base64.b64encode(b"k" * 64).decode()
    assert_refused(wire_emulator.raw("GET", "/pools", key=other_key), "MAC signature")
    assert_refused(wire_emulator.raw("GET", "/pools", sign=False), "Authorization header is missing")
    assert_refused(wire_emulator.raw("GET", "/pools", sign=False, headers={"Authorization": "Bearer abc"}),
                   "scheme 'Bearer'")
    resp = wire_emulator.raw("GET", "/pools", sign=False,
                             headers={"Authorization": "SharedKey someoneelse:AAAA", "ocp-date": rfc1123()})
    assert_refused(resp, "account 'someoneelse'")


def test_query_string_is_signed(wire_emulator):
    """A signature made for one query does not authorize another (maxresults changed in flight)."""
    good = wire_emulator.raw("GET", "/jobs", params={"maxresults": "5"})
    assert good.status_code == 200
    import requests

    forged_url = good.request.url.replace("maxresults=5", "maxresults=6")
    assert_refused(requests.get(forged_url, headers=dict(good.request.headers), timeout=30), "MAC signature")


def test_docs_canonical_form_is_accepted():
    """Clients that lower-case query names and join repeated values (as the REST docs say) verify too."""
    key = base64.b64encode(b"s" * 64).decode()
    headers = {"ocp-date": rfc1123(), "content-type": "application/json"}
    text = auth.string_to_sign("GET", "/jobs", "api-version=2025-06-01&timeOut=30", headers, "acct", docs_form=True)
    assert text.endswith("/acct/jobs\napi-version:2025-06-01\ntimeout:30")
    signature = auth.sign(base64.b64decode(key), text)
    auth.Authenticator("acct", key).check("GET", "/jobs", "api-version=2025-06-01&timeOut=30",
                                          {**headers, "authorization": f"SharedKey acct:{signature}"})


def test_bearer_only_when_enabled():
    authn = auth.Authenticator("acct", base64.b64encode(b"x" * 64).decode(), bearer=True)
    authn.check("GET", "/jobs", "", {"authorization": "Bearer token"})
    with pytest.raises(WireError) as err:
        auth.Authenticator("acct", base64.b64encode(b"x" * 64).decode()).check(
            "GET", "/jobs", "", {"authorization": "Bearer token"})
    assert err.value.status == 403 and err.value.code == "AuthenticationFailed"


def test_bearer_over_http_with_the_flag(tmp_path, wire_emulator):
    """``--accept-bearer`` lets a TokenCredential client in (azure-core needs ``enforce_https=False`` over http)."""
    import time as _time

    from azure.batch import BatchClient
    from azure.core.credentials import AccessToken, AccessTokenInfo
    from azure.core.exceptions import HttpResponseError

    from tests.support.emulator import start_emulator

    class FakeEntra:
        def get_token(self, *scopes, **kwargs):
            return AccessToken("token", int(_time.time()) + 3600)

        def get_token_info(self, *scopes, options=None):
            return AccessTokenInfo("token", int(_time.time()) + 3600)

    with start_emulator(tmp_path / "data", execute=False, args=["--accept-bearer"]) as emu:
        assert list(BatchClient(emu.endpoint, FakeEntra()).list_jobs(enforce_https=False)) == []
    with pytest.raises(HttpResponseError) as refused:
        list(BatchClient(wire_emulator.endpoint, FakeEntra()).list_jobs(enforce_https=False))
    assert refused.value.status_code == 403 and refused.value.error.code == "AuthenticationFailed"


def test_head_errors_have_no_body(wire_emulator):
    """Refused and failed HEAD requests answer headers only, so the connection stays usable."""
    import requests

    with requests.Session() as session:
        for _ in range(3):
            resp = session.head(f"{wire_emulator.endpoint}/pools/x?api-version=2025-06-01", timeout=10)
            assert resp.status_code == 403 and resp.content == b""
        missing = wire_emulator.raw("HEAD", "/jobs/nope/tasks/t/files/f")
        assert missing.status_code == 404 and missing.content == b""
