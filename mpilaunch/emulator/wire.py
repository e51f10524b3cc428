"""Request/response values shared by the server and the ``api_*`` handlers, and REST-document helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from mpilaunch.emulator import odata
from mpilaunch.emulator.store import Conflict, Doc, Parent, Store
from mpilaunch.emulator.wire_errors import WireError, exists, not_found

JSON_TYPE = "application/json;odata=minimalmetadata"


class EngineLike(Protocol):
    def wake(self) -> None: ...

    def check_pool(self, pool: Doc) -> None:
        """Raise :class:`~mpilaunch.emulator.nodes.base.NodeError` if the engine cannot make the pool's nodes."""


@dataclass
class Request:
    method: str
    segments: list[str]
    """Decoded path segments (the file path, percent-encoded as one segment by the SDK, is decoded here)."""
    query: dict[str, str]
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes
    base_url: str
    """``http://host:port`` as the client addressed us; used for ``url`` properties and ``odata.nextLink``."""
    raw_path: str
    request_id: str = ""
    raw_query: str = ""


@dataclass(frozen=True)
class FileBody:
    """``length`` bytes of ``path`` from ``start``, streamed by the server."""

    path: Path
    start: int
    length: int


@dataclass
class Response:
    status: int
    body: Any = None
    """A dict (sent as JSON), a :class:`FileBody`, or None."""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE


@dataclass
class Context:
    """What handlers need: the store, the engine (``None`` when the emulator runs without execution)."""

    store: Store
    account: str
    data_dir: Path
    engine: EngineLike | None = None

    def wake(self) -> None:
        if self.engine is not None:
            self.engine.wake()


Handler = Callable[[Context, Request, list[str]], Response]


def public(doc: Doc) -> Doc:
    """The doc without its internal (``_``-prefixed) top-level fields."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def http_date(iso: str) -> str:
    """RFC 1123 form of an ISO time from the store."""
    return format_datetime(datetime.fromisoformat(iso.replace("Z", "+00:00")), usegmt=True)


def entity_headers(doc: Doc) -> dict[str, str]:
    """``ETag``/``Last-Modified`` of an entity."""
    out = {}
    if doc.get("eTag"):
        out["ETag"] = doc["eTag"]
    if doc.get("lastModified"):
        out["Last-Modified"] = http_date(doc["lastModified"])
    return out


def _modified_since(doc: Doc, raw: str, name: str) -> bool:
    try:
        since = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError) as exc:
        raise WireError(400, "InvalidHeaderValue", "The value for one of the HTTP headers is not in the correct "
                        "format.", HeaderName=name, HeaderValue=raw) from exc
    changed = datetime.fromisoformat(doc["lastModified"].replace("Z", "+00:00")).replace(microsecond=0)
    return changed > since


def precondition(req: Request, doc: Doc) -> None:
    """412 ``ConditionNotMet`` unless the request's If-Match/If-None-Match/If-(Un)Modified-Since hold for ``doc``."""
    h = req.headers
    failed = (
        ("if-match" in h and h["if-match"] != "*" and h["if-match"].strip('"') != doc.get("eTag"))
        or ("if-none-match" in h and h["if-none-match"] in ("*", doc.get("eTag"), f'"{doc.get("eTag")}"'))
        or ("if-unmodified-since" in h and _modified_since(doc, h["if-unmodified-since"], "If-Unmodified-Since"))
        or ("if-modified-since" in h and not _modified_since(doc, h["if-modified-since"], "If-Modified-Since")))
    if failed:
        raise WireError(412, "ConditionNotMet", "The condition specified using HTTP conditional header(s) is not met.")


def entity(req: Request, doc: Doc, metadata: str) -> Response:
    """200 with one document, honouring ``$select``; 304 if a read condition says the client's copy is current."""
    try:
        precondition(req, doc)
    except WireError as exc:
        if exc.status != 412:
            raise
        none_match = "if-none-match" in req.headers or "if-modified-since" in req.headers
        if none_match and "if-match" not in req.headers and "if-unmodified-since" not in req.headers:
            return Response(304, None, entity_headers(doc))
        raise
    body = {"odata.metadata": f"{req.base_url}/$metadata#{metadata}/@Element", **public(doc)}
    headers = {**entity_headers(doc), "DataServiceId": doc["url"]} if "url" in doc else entity_headers(doc)
    return Response(200, odata.select(body, req.query), headers)


def created(req: Request, doc: Doc, location: str) -> Response:
    """201 for a created resource: empty body, ``DataServiceId``/``Location`` name it."""
    headers = {**entity_headers(doc), "DataServiceId": location, "Location": location}
    return Response(201, None, headers)


def fetch(ctx: Context, kind: str, parent: Parent, id: str) -> Doc:
    """The stored doc or 404 ``PoolNotFound``/``JobNotFound``/... naming the id."""
    doc = ctx.store.get(kind, parent, id)
    if doc is None:
        raise not_found(kind.capitalize(), id)
    return doc


def insert_new(ctx: Context, req: Request, kind: str, parent: Parent, doc: Doc) -> Response:
    """Insert a new resource: 201, or 409 ``PoolExists``/``JobExists``/``TaskExists`` (ids case-insensitive)."""
    try:
        doc = ctx.store.insert(kind, parent, doc)
    except Conflict as exc:
        raise exists(kind.capitalize()) from exc
    ctx.wake()
    return created(req, doc, doc["url"])


def mutate(ctx: Context, req: Request, kind: str, parent: Parent, id: str, *, fn: Callable[[Doc], None]) -> Doc:
    """Apply ``fn`` atomically once the request's preconditions hold; 404 if missing (or being deleted)."""

    def apply(doc: Doc) -> None:
        if doc.get("_deleting"):
            raise not_found(kind.capitalize(), id)
        precondition(req, doc)
        fn(doc)

    doc = ctx.store.update(kind, parent, id, apply, touch=True)
    if doc is None:
        raise not_found(kind.capitalize(), id)
    ctx.wake()
    return doc


def remove(ctx: Context, req: Request, kind: str, parent: Parent, doc: Doc, *, mark: Callable[[Doc], None]) -> None:
    """Delete at once without an engine; with one, ``mark`` the doc and let the engine kill and remove it."""
    with ctx.store.transaction():
        precondition(req, doc)
        if ctx.engine is None:
            ctx.store.delete(kind, parent, doc["id"])
        else:
            ctx.store.update(kind, parent, doc["id"], mark)
    ctx.wake()


def accepted(doc: Doc | None = None, status: int = 202) -> Response:
    """A body-less success; for an entity, its ``ETag``/``Last-Modified``/``DataServiceId`` (as the spec declares)."""
    return Response(status, None, {**entity_headers(doc), "DataServiceId": doc["url"]} if doc else {})


def listing(req: Request, store: Store, kind: str, parent: Parent, metadata: str, *,
            shape: Callable[[Doc], Doc] = public, keep: Callable[[Doc], bool] = lambda _d: True) -> Response:
    """A paged list: ``maxresults``, ``$skiptoken`` in ``odata.nextLink``, ``$filter``, ``$select``."""
    limit = odata.max_results(req.query)
    start = odata.skiptoken(req.query)
    pred = odata.parse_filter(req.query.get("$filter"))
    docs, nxt = store.page(kind, parent, start, limit, lambda d: keep(d) and pred(shape(d)))
    body: dict[str, Any] = {"odata.metadata": f"{req.base_url}/$metadata#{metadata}",
                            "value": [odata.select(shape(d), req.query) for d in docs]}
    if nxt is not None:
        body["odata.nextLink"] = next_link(req, nxt)
    return Response(200, body)


def next_link(req: Request, token: int) -> str:
    params = {k: v for k, v in req.query.items() if k != "$skiptoken"}
    params["$skiptoken"] = str(token)
    query = "&".join(f"{quote(k, safe='$')}={quote(v, safe='$,')}" for k, v in params.items())
    return f"{req.base_url}{req.raw_path}?{query}"


def body_object(req: Request) -> Any:
    from mpilaunch.emulator.validation import parse_json

    if not req.body:
        raise WireError(400, "MissingRequiredProperty", "The request body is missing.")
    return parse_json(req.body)
