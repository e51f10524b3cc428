"""Request/response values shared by the server and the ``api_*`` handlers, and REST-document helpers."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from mpilaunch.emulator import odata
from mpilaunch.emulator.store import Conflict, Doc, Parent, StateStore
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
class HandlerContext:
    """What handlers need: the store, the engine (``None`` when the emulator runs without execution), and the
    cache of list pages (``None``: every list is computed)."""

    store: StateStore
    account: str
    data_dir: Path
    engine: EngineLike | None = None
    lists: ListCache | None = None

    def wake(self) -> None:
        if self.engine is not None:
            self.engine.wake()


Handler = Callable[[HandlerContext, Request, list[str]], Response]


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


CONDITIONAL = ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since")
_PAIRS = ({"if-none-match", "if-modified-since"}, {"if-match", "if-unmodified-since"})


def conditions(headers: Mapping[str, str]) -> dict[str, str]:
    """The conditional headers a request is evaluated on (Batch, "Specifying conditional headers for Batch service
    operations"): at most one, except If-None-Match with If-Modified-Since (If-None-Match decides) and If-Match with
    If-Unmodified-Since (If-Match decides); any other combination is 400 ``MultipleConditionHeadersNotSupported``.
    Dates that are not RFC 1123 are 400 ``InvalidHeaderValue``."""
    present = {name: headers[name] for name in CONDITIONAL if name in headers}
    if len(present) > 1:
        if set(present) not in _PAIRS:
            raise WireError(400, "MultipleConditionHeadersNotSupported", "Multiple condition headers are not "
                            "supported.", HeaderNames=", ".join(sorted(present)))
        present.pop("if-modified-since", None)
        present.pop("if-unmodified-since", None)
    for name in ("if-modified-since", "if-unmodified-since"):
        if name in present:
            _http_date(name, present[name])
    return present


def _http_date(name: str, raw: str) -> datetime:
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError) as exc:
        raise WireError(400, "InvalidHeaderValue", "The value for one of the HTTP headers is not in the correct "
                        "format.", HeaderName=name.title(), HeaderValue=raw[:100]) from exc
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _etag_in(raw: str, etag: str | None) -> bool:
    """Whether ``etag`` is among the (quoted or bare, comma-separated) tags of an If-Match/If-None-Match value."""
    tags = {t.strip().removeprefix("W/").strip('"') for t in raw.split(",")}
    return "*" in tags or (etag is not None and etag.strip('"') in tags)


def failed_condition(headers: Mapping[str, str], etag: str | None, modified: datetime | None) -> str | None:
    """The conditional header that does not hold for an entity with ``etag`` and last-modified time ``modified``
    (compared at whole seconds, as HTTP dates carry), or None if all hold."""
    cond = conditions(headers)
    if modified is not None:
        modified = modified.replace(microsecond=0)
    for name, raw in cond.items():
        if name == "if-match":
            ok = _etag_in(raw, etag)
        elif name == "if-none-match":
            ok = not _etag_in(raw, etag)
        elif modified is None:
            ok = True
        elif name == "if-modified-since":
            ok = modified > _http_date(name, raw)
        else:
            ok = modified <= _http_date(name, raw)
        if not ok:
            return name
    return None


def not_met(read: bool, name: str) -> WireError:
    """The answer to a failed condition: 304 for If-None-Match/If-Modified-Since on a read (GET, HEAD), else 412."""
    if read and name in ("if-none-match", "if-modified-since"):
        return WireError(304, "ConditionNotMet", "The condition specified in the conditional header(s) was not met "
                         "for a read operation.")
    return WireError(412, "ConditionNotMet", "The condition specified using HTTP conditional header(s) is not met.")


def _doc_modified(doc: Doc) -> datetime | None:
    raw = doc.get("lastModified")
    return datetime.fromisoformat(raw.replace("Z", "+00:00")) if raw else None


def precondition(req: Request, doc: Doc) -> None:
    """412 ``ConditionNotMet`` (304 for a read) unless the request's conditional headers hold for ``doc``."""
    name = failed_condition(req.headers, doc.get("eTag"), _doc_modified(doc))
    if name is not None:
        raise not_met(req.method in ("GET", "HEAD"), name)


def entity(req: Request, doc: Doc, metadata: str) -> Response:
    """200 with one document, honouring ``$select`` (the server answers 304/412 instead when a conditional header
    does not hold for its ``ETag``/``Last-Modified``, as for every read)."""
    body = {"odata.metadata": f"{req.base_url}/$metadata#{metadata}/@Element", **public(doc)}
    headers = {**entity_headers(doc), "DataServiceId": doc["url"]} if "url" in doc else entity_headers(doc)
    return Response(200, odata.select(body, req.query), headers)


def created(req: Request, doc: Doc, location: str) -> Response:
    """201 for a created resource: empty body, ``DataServiceId``/``Location`` name it."""
    headers = {**entity_headers(doc), "DataServiceId": location, "Location": location}
    return Response(201, None, headers)


def fetch(ctx: HandlerContext, kind: str, parent: Parent, id: str) -> Doc:
    """The stored doc or 404 ``PoolNotFound``/``JobNotFound``/... naming the id."""
    doc = ctx.store.get(kind, parent, id)
    if doc is None:
        raise not_found(kind.capitalize(), id)
    return doc


def insert_new(ctx: HandlerContext, req: Request, kind: str, parent: Parent, doc: Doc) -> Response:
    """Insert a new resource: 201, or 409 ``PoolExists``/``JobExists``/``TaskExists`` (ids case-insensitive)."""
    try:
        doc = ctx.store.insert(kind, parent, doc)
    except Conflict as exc:
        raise exists(kind.capitalize()) from exc
    ctx.wake()
    return created(req, doc, doc["url"])


def mutate(ctx: HandlerContext, req: Request, kind: str, parent: Parent, id: str, *, fn: Callable[[Doc], None]) -> Doc:
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


def remove(ctx: HandlerContext, req: Request, kind: str, parent: Parent, doc: Doc, *,
           mark: Callable[[Doc], None]) -> None:
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


def listing(req: Request, store: StateStore, kind: str, parent: Parent, metadata: str, *,
            shape: Callable[[Doc], Doc] = public, keep: Callable[[Doc], bool] = lambda _d: True,
            cache: ListCache | None = None) -> Response:
    """A paged list: ``maxresults``, ``$skiptoken`` in ``odata.nextLink``, ``$filter``, ``$select``; the body is
    serialized once and, with a ``cache``, shared by identical requests until the store changes."""

    def page() -> bytes:
        limit = odata.max_results(req.query)
        start = odata.skiptoken(req.query)
        pred = odata.parse_filter(req.query.get("$filter"))
        docs, nxt = store.page(kind, parent, start, limit, lambda d: keep(d) and pred(shape(d)))
        head = to_json({"odata.metadata": f"{req.base_url}/$metadata#{metadata}"})[:-1]
        tail = b"" if nxt is None else b',"odata.nextLink":' + to_json(next_link(req, nxt))
        if cache is None or req.query.get("$select"):
            values = b",".join(to_json(odata.select(shape(d), req.query)) for d in docs)
        else:
            values = b",".join(cache.fragments(kind, shape, docs))
        return head + b',"value":[' + values + b"]" + tail + b"}"

    if cache is None:
        return Response(200, page())
    return Response(200, cache.get((req.base_url, req.raw_path, tuple(sorted(req.query.items()))), page))


def to_json(body: Any) -> bytes:
    """A response body as sent: compact JSON."""
    return json.dumps(body, separators=(",", ":")).encode()


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: bytes | None = None


class ListCache:
    """Serialized list pages keyed by request, each valid while nothing was committed to the store since it was
    computed; identical requests arriving together compute one page (the others wait for it).

    "Nothing committed" is SQLite's ``PRAGMA data_version`` on a connection of our own to the store's file: it
    changes whenever any other connection (the store's, whoever writes through it) commits. A page is stored under
    the version read *before* computing it, so a commit during the computation makes it miss next time, never
    serve stale data."""

    def __init__(self, db_path: Path, *, entries: int = 64, max_bytes: int = 64 << 20,
                 fragments: int = 50_000) -> None:
        self._db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False,
                                   isolation_level=None)
        self._lock = threading.Lock()
        self._pages: OrderedDict[Any, tuple[int, bytes]] = OrderedDict()
        self._flights: dict[Any, _Flight] = {}
        self._entries, self._max_bytes, self._bytes = entries, max_bytes, 0
        self._fragments: OrderedDict[Any, bytes] = OrderedDict()
        self._max_fragments = fragments
        self.hits = self.misses = 0

    def fragments(self, kind: str, shape: Callable[[Doc], Doc], docs: list[Doc]) -> list[bytes]:
        """Each doc as serialized in a list (``shape`` applied), reused while the doc keeps its ``eTag`` (the store
        stamps a new one on every write); docs without one are serialized every time."""
        keys = [(kind, id(shape), d.get("id"), d.get("eTag")) if d.get("eTag") else None for d in docs]
        with self._lock:
            found = [self._fragments.get(k) if k is not None else None for k in keys]
        made: dict[Any, bytes] = {}
        for i, (key, frag) in enumerate(zip(keys, found, strict=True)):
            if frag is None:
                found[i] = fresh = to_json(shape(docs[i]))
                if key is not None:
                    made[key] = fresh
        if made:
            with self._lock:
                self._fragments.update(made)
                while len(self._fragments) > self._max_fragments:
                    self._fragments.popitem(last=False)
        return [f for f in found if f is not None]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def get(self, key: Any, compute: Callable[[], bytes]) -> bytes:
        version = self.version()
        with self._lock:
            hit = self._pages.get(key)
            if hit is not None and hit[0] == version:
                self._pages.move_to_end(key)
                self.hits += 1
                return hit[1]
            self.misses += 1
            flight = self._flights.get((key, version))
            leader = flight is None
            if flight is None:
                flight = self._flights[(key, version)] = _Flight()
        if not leader:
            flight.done.wait(30)
            if flight.value is not None:
                return flight.value
            return compute()  # the leader failed (e.g. a bad $filter): fail the same way
        try:
            value = compute()
            flight.value = value
            self._keep(key, version, value)
            return value
        finally:
            flight.done.set()
            with self._lock:
                self._flights.pop((key, version), None)

    def _keep(self, key: Any, version: int, value: bytes) -> None:
        with self._lock:
            old = self._pages.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])
            if len(value) > self._max_bytes // 4:
                return
            self._pages[key] = (version, value)
            self._bytes += len(value)
            while len(self._pages) > self._entries or self._bytes > self._max_bytes:
                _k, (_v, dropped) = self._pages.popitem(last=False)
                self._bytes -= len(dropped)


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
