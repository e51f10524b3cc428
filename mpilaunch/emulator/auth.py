"""SharedKey verification as the Batch service does it, plus optional bearer acceptance for Entra code paths.

String-to-sign (Batch docs, "Authenticate requests to the Azure Batch service")::

    VERB \\n Content-Encoding \\n Content-Language \\n Content-Length \\n Content-MD5 \\n Content-Type \\n Date \\n
    If-Modified-Since \\n If-Match \\n If-None-Match \\n If-Unmodified-Since \\n Range \\n
    CanonicalizedHeaders (every ocp-* header, lower-cased, sorted, ``name:value\\n``)
    CanonicalizedResource (``/account/path`` then ``\\nname:value`` per query parameter, sorted)

Content-Length is ``0`` for a body-less POST/PUT/PATCH/DELETE (as the SDK signs it). The docs lower-case query
names and join repeated values with commas; the azure-batch SDK keeps names as sent (``timeOut``) and signs the
first value: both canonical forms are accepted. The request time (``ocp-date``, else ``Date``) must be within
15 minutes of now.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qs

from mpilaunch.emulator.wire_errors import WireError

SKEW = timedelta(minutes=15)
_SIGNED = ("content-encoding", "content-language", "content-length", "content-md5", "content-type", "date",
           "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "range")


def failed(detail: str) -> WireError:
    """403 ``AuthenticationFailed`` naming what was wrong (as Batch's AuthenticationErrorDetail)."""
    return WireError(403, "AuthenticationFailed", "Server failed to authenticate the request. Make sure the value "
                     "of Authorization header is formed correctly including the signature.",
                     AuthenticationErrorDetail=detail)


def string_to_sign(method: str, path: str, query: str, headers: Mapping[str, str], account: str,
                   *, docs_form: bool = False) -> str:
    """The canonical string for a request; ``headers`` keys must be lower case."""
    values = dict(headers)
    if method not in ("GET", "HEAD") and not values.get("content-length"):
        values["content-length"] = "0"
    lines = [method, *(values.get(h, "") for h in _SIGNED)]
    ocp = sorted((k, v) for k, v in values.items() if "ocp-" in k and v)
    text = "\n".join(lines) + "\n" + "".join(f"{k}:{v}\n" for k, v in ocp) + f"/{account}{path}"
    params = parse_qs(query, keep_blank_values=False)
    if docs_form:
        lowered: dict[str, list[str]] = {}
        for name, vals in params.items():
            lowered.setdefault(name.lower(), []).extend(vals)
        text += "".join(f"\n{n}:{','.join(v)}" for n, v in sorted(lowered.items()))
    else:
        text += "".join(f"\n{n}:{params[n][0]}" for n in sorted(params) if params[n][0])
    return text


def sign(key: bytes, text: str) -> str:
    return base64.b64encode(hmac.new(key, text.encode(), hashlib.sha256).digest()).decode()


def request_time(headers: Mapping[str, str]) -> datetime:
    raw = headers.get("ocp-date") or headers.get("date")
    if not raw:
        raise failed("The request has neither an ocp-date nor a Date header.")
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError) as exc:
        raise failed(f"The date header {raw!r} is not an RFC 1123 date.") from exc
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


class Authenticator:
    """Checks requests for one account; ``bearer`` enables accepting any ``Bearer`` token (testing only)."""

    def __init__(self, account: str, key: str, *, bearer: bool = False) -> None:
        self.account = account
        try:
            self._key = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("the account key is not valid base64") from exc
        self.bearer = bearer

    def check(self, method: str, path: str, query: str, headers: Mapping[str, str],
              now: datetime | None = None) -> None:
        """Raise a 403 :class:`WireError` unless the request is authentic; ``path`` is the raw (encoded) path."""
        auth = headers.get("authorization", "")
        if not auth:
            raise failed("The Authorization header is missing.")
        scheme, _, cred = auth.partition(" ")
        if scheme == "Bearer" and self.bearer:
            if not cred.strip():
                raise failed("The bearer token is empty.")
            return
        if scheme != "SharedKey":
            raise failed(f"The authorization scheme {scheme!r} is not supported.")
        account, _, signature = cred.strip().rpartition(":")
        if account != self.account:
            raise failed(f"The account {account!r} is not this emulator's account.")
        when = request_time(headers)
        now = now or datetime.now(timezone.utc)
        if abs(now - when) > SKEW:
            raise failed(f"The request time {when:%Y-%m-%dT%H:%M:%SZ} is more than 15 minutes from the server "
                         f"time {now:%Y-%m-%dT%H:%M:%SZ}.")
        for docs_form in (False, True):
            expected = sign(self._key, string_to_sign(method, path, query, headers, self.account,
                                                      docs_form=docs_form))
            if hmac.compare_digest(expected, signature):
                return
        raise failed("The MAC signature found in the HTTP request is not the same as any computed signature.")
