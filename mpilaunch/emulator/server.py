"""The emulator's HTTP server: routing, SharedKey check, Batch response headers, and the engine's lifecycle.

``EmulatorServer(data_dir, host=..., port=0, account=..., key=..., provider=...)`` opens (or reopens) the SQLite
state under ``data_dir``, builds the execution engine (with ``provider``'s nodes; process nodes by default) when
``execute`` is true, and serves on a thread (``start()``/``stop()``); ``mpilaunch emulator serve`` runs one in the
foreground.
"""

from __future__ import annotations

import fcntl
import logging
import re
import sys
import threading
import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlsplit

from mpilaunch.emulator import api_files, api_jobs, api_nodes, api_pools, api_tasks, defaults
from mpilaunch.emulator.auth import Authenticator
from mpilaunch.emulator.engine import Engine
from mpilaunch.emulator.nodes.base import NodeProvider
from mpilaunch.emulator.store import StateStore
from mpilaunch.emulator.validation import MAX_BODY
from mpilaunch.emulator.wire import (
    FileBody,
    Handler,
    HandlerContext,
    ListCache,
    Request,
    Response,
    conditions,
    failed_condition,
    not_met,
    to_json,
)
from mpilaunch.emulator.wire_errors import WireError, new_request_id
from node_runtime.errors import InvalidInput

log = logging.getLogger("mpilaunch.emulator")
access = logging.getLogger("mpilaunch.emulator.access")

API_VERSIONS = frozenset((
    "2025-06-01", "2024-07-01.20.0", "2024-02-01.19.0", "2023-11-01.18.0", "2023-05-01.17.0", "2022-10-01.16.0",
    "2022-01-01.15.0", "2021-06-01.14.0", "2020-09-01.12.0", "2020-03-01.11.0", "2019-08-01.10.0",
    "2019-06-01.9.0", "2018-12-01.8.0", "2018-08-01.7.0", "2018-03-01.6.1", "2017-09-01.6.0", "2017-06-01.5.1",
    "2017-05-01.5.0", "2017-01-01.4.0", "2016-07-01.3.1", "2016-02-01.3.0", "2015-12-01.2.2"))
"""The Batch data-plane api-versions ever published (the stable folders of the REST spec); any other is 400
``UnsupportedRequestVersion``. The wire format served is 2025-06-01's whichever the client names: the SDKs of
the last few versions (azure-batch 15.x, azure-cli's) read it."""
_ID = "*"
_REST = "**"
_FILE = ("files", _REST)
FAULT = "mpilaunch-fault"
"""The emulator's own node operation (not Batch's): ``POST /pools/{pool}/nodes/{node}/mpilaunch-fault``."""
ROUTES: list[tuple[str, tuple[str, ...], Handler]] = [
    ("POST", ("pools",), api_pools.add),
    ("GET", ("pools",), api_pools.list_),
    ("GET", ("pools", _ID), api_pools.get),
    ("HEAD", ("pools", _ID), api_pools.exists_),
    ("PATCH", ("pools", _ID), api_pools.patch),
    ("DELETE", ("pools", _ID), api_pools.delete),
    ("POST", ("pools", _ID, "resize"), api_pools.resize),
    ("POST", ("pools", _ID, "updateproperties"), api_pools.replace),
    ("GET", ("pools", _ID, "nodes"), api_pools.list_nodes),
    ("POST", ("pools", _ID, "removenodes"), api_pools.remove_nodes),
    ("GET", ("pools", _ID, "nodes", _ID), api_pools.get_node),
    ("POST", ("pools", _ID, "nodes", _ID, "reboot"), api_nodes.reboot),
    ("POST", ("pools", _ID, "nodes", _ID, "reimage"), api_nodes.reimage),
    ("POST", ("pools", _ID, "nodes", _ID, "disablescheduling"), api_nodes.disable_scheduling),
    ("POST", ("pools", _ID, "nodes", _ID, "enablescheduling"), api_nodes.enable_scheduling),
    ("POST", ("pools", _ID, "nodes", _ID, FAULT), api_nodes.fault),
    ("POST", ("pools", _ID, "nodes", _ID, "users"), api_nodes.add_user),
    ("PUT", ("pools", _ID, "nodes", _ID, "users", _ID), api_nodes.replace_user),
    ("DELETE", ("pools", _ID, "nodes", _ID, "users", _ID), api_nodes.delete_user),
    ("GET", ("pools", _ID, "nodes", _ID, "remoteloginsettings"), api_nodes.remote_login_settings),
    ("GET", ("pools", _ID, "nodes", _ID, "files"), api_files.list_node_files),
    ("GET", ("pools", _ID, "nodes", _ID, *_FILE), api_files.get_node_file),
    ("HEAD", ("pools", _ID, "nodes", _ID, *_FILE), api_files.get_node_file),
    ("DELETE", ("pools", _ID, "nodes", _ID, *_FILE), api_files.delete_node_file),
    ("POST", ("jobs",), api_jobs.add),
    ("GET", ("jobs",), api_jobs.list_),
    ("GET", ("jobs", _ID), api_jobs.get),
    ("PATCH", ("jobs", _ID), api_jobs.patch),
    ("PUT", ("jobs", _ID), api_jobs.replace),
    ("DELETE", ("jobs", _ID), api_jobs.delete),
    ("POST", ("jobs", _ID, "terminate"), api_jobs.terminate),
    ("GET", ("jobs", _ID, "taskcounts"), api_jobs.task_counts),
    ("POST", ("jobs", _ID, "tasks"), api_tasks.add),
    ("GET", ("jobs", _ID, "tasks"), api_tasks.list_),
    ("POST", ("jobs", _ID, "addtaskcollection"), api_tasks.add_collection),
    ("GET", ("jobs", _ID, "tasks", _ID), api_tasks.get),
    ("PUT", ("jobs", _ID, "tasks", _ID), api_tasks.replace),
    ("DELETE", ("jobs", _ID, "tasks", _ID), api_tasks.delete),
    ("POST", ("jobs", _ID, "tasks", _ID, "terminate"), api_tasks.terminate),
    ("POST", ("jobs", _ID, "tasks", _ID, "reactivate"), api_tasks.reactivate),
    ("GET", ("jobs", _ID, "tasks", _ID, "subtasksinfo"), api_tasks.list_subtasks),
    ("GET", ("jobs", _ID, "tasks", _ID, "files"), api_files.list_task_files),
    ("GET", ("jobs", _ID, "tasks", _ID, *_FILE), api_files.get_task_file),
    ("HEAD", ("jobs", _ID, "tasks", _ID, *_FILE), api_files.get_task_file),
    ("DELETE", ("jobs", _ID, "tasks", _ID, *_FILE), api_files.delete_task_file),
]


def route(method: str, segments: list[str]) -> tuple[Handler, list[str]]:
    """The handler and captured ids for a request, or a 400 ``InvalidUri`` / 405 ``UnsupportedHttpVerb``."""
    verbs_seen = False
    for verb, pattern, handler in ROUTES:
        ids = _match(pattern, segments)
        if ids is None:
            continue
        if verb == method:
            return handler, ids
        verbs_seen = True
    if verbs_seen:
        raise WireError(405, "UnsupportedHttpVerb", f"The resource doesn't support the specified HTTP verb "
                        f"{method}.")
    raise WireError(400, "InvalidUri", "The requested URI does not represent any resource on the server.",
                    UriPath="/" + "/".join(segments))


def _match(pattern: tuple[str, ...], segments: list[str]) -> list[str] | None:
    ids: list[str] = []
    for i, part in enumerate(pattern):
        if part == _REST:
            rest = segments[i:]
            return [*ids, "/".join(rest)] if rest and all(rest) else None
        if i >= len(segments):
            return None
        if part == _ID:
            if not segments[i]:
                return None
            ids.append(segments[i])
        elif part != segments[i]:
            return None
    return ids if len(segments) == len(pattern) else None


def _lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the data dir: two emulators must never run one state."""
    handle = (data_dir / "emulator.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise InvalidInput(f"--data {data_dir}: in use by another running emulator") from exc
    return handle


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen() backlog: many clients connect at once (socketserver's default is 5)
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-request are normal (debug); anything else is a bug, logged with its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("connection from %s dropped: %s", client_address, exc)
        else:
            log.exception("error serving %s", client_address)


class EmulatorServer:
    """One emulator: state under ``data_dir``, HTTP on ``host:port`` (0 = a free port), nodes from ``provider``
    (process nodes if None; the engine closes it on :meth:`stop`)."""

    def __init__(self, data_dir: Path, *, host: str = defaults.HOST, port: int = defaults.PORT,
                 account: str = defaults.ACCOUNT, key: str = defaults.KEY, bearer: bool = False,
                 execute: bool = True, provider: NodeProvider | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.auth = Authenticator(account, key, bearer=bearer)
        self._lock_file = _lock_data_dir(self.data_dir)
        try:
            self.httpd = _HTTPServer((host, port), _Handler)
        except OSError:
            self._lock_file.close()
            raise
        self.store = StateStore(self.data_dir / "state.sqlite3")
        self.engine = (Engine(self.store, self.data_dir, provider, account=account, account_url=self.endpoint)
                       if execute else None)
        self.lists = ListCache(self.store.path)
        self.ctx = HandlerContext(self.store, account, self.data_dir, self.engine, self.lists)
        self.httpd.emulator = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        """Start the engine (it first recovers what a previous run left), then serve on a background thread."""
        if self.engine is not None:
            self.engine.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="emulator-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, stop the engine (it leaves running tasks to be recovered), close the store."""
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(10)
        if self.engine is not None:
            self.engine.stop()
        self.lists.close()
        self.store.close()
        self._lock_file.close()

    def handle(self, req: Request) -> Response:
        """Authenticate, route and run one request; every failure becomes a Batch error response."""
        try:
            self.auth.check(req.method, req.raw_path, req.raw_query, req.headers)
            if "api-version" not in req.query:
                raise WireError(400, "MissingRequiredQueryParameter", "A query parameter that's mandatory for this "
                                "request is not specified.", QueryParameterName="api-version")
            if req.query["api-version"] not in API_VERSIONS:
                raise WireError(400, "UnsupportedRequestVersion", "The specified version of the REST API is not "
                                "supported.", QueryParameterName="api-version",
                                QueryParameterValue=req.query["api-version"][:40])
            conditions(req.headers)  # 400 for a combination Batch refuses, before anything is done
            handler, ids = route(req.method, req.segments)
            resp = handler(self.ctx, req, ids)
            if req.method in ("GET", "HEAD") and resp.status == 200:
                resp = _read_condition(req, resp)
            return resp
        except WireError as exc:
            return Response(exc.status, None if exc.status == 304 else exc.body(req.request_id))
        except Exception:
            log.exception("internal error on %s %s", req.method, req.raw_path)
            err = WireError(500, "InternalError", "An internal error occurred in the emulator.")
            return Response(500, err.body(req.request_id))


def _read_condition(req: Request, resp: Response) -> Response:
    """A read of an entity (pool, job, task, node, file; GET or HEAD) honours its conditional headers against the
    answer's ``ETag``/``Last-Modified``: 304 (If-None-Match, If-Modified-Since) or 412 (If-Match,
    If-Unmodified-Since) when one does not hold. Reads without either header (lists) ignore them, as Batch's list
    operations take none."""
    etag, stamp = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
    if etag is None and stamp is None:
        return resp
    modified: datetime | None = parsedate_to_datetime(stamp) if stamp else None
    name = failed_condition(req.headers, etag, modified)
    if name is None:
        return resp
    err = not_met(True, name)
    if err.status == 304:
        kept = {k: v for k, v in resp.headers.items() if k in ("ETag", "Last-Modified")}
        return Response(304, None, kept, content_type=resp.content_type)
    return Response(err.status, err.body(req.request_id))


_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")
_LENGTH = re.compile(r"[0-9]{1,12}")
_HTTP_ERRORS = {400: "RequestUrlFailedToParse", 414: "InvalidUri", 431: "InvalidHeaderValue",
                505: "UnsupportedHttpVersion"}
"""Batch error codes (BatchErrorCodeStrings) for what the HTTP layer refuses before a request is routed: a request
line it cannot parse, a URL over 64 KiB, a header line over 64 KiB or over 100 headers, an HTTP version other than
1.x; anything else ``InvalidInput``."""


def _body_error(reason: str) -> WireError:
    return WireError(400, "InvalidRequestBody", "The specified Request Body is not syntactically valid.",
                     Reason=reason)


def _header_error(name: str, value: str) -> WireError:
    return WireError(400, "InvalidHeaderValue", "The value for one of the HTTP headers is not in the correct "
                     "format.", HeaderName=name, HeaderValue=value[:100])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # answers to unparsable request lines get a status line and headers too
    server_version = "mpilaunch-batch-emulator"
    disable_nagle_algorithm = True
    """TCP_NODELAY: a small answer leaves at once instead of waiting up to 40 ms for the client's delayed ACK."""
    coalesce_writes = True
    """Status line, headers and (the first 64 KiB of) the body leave in one send; False = headers, then body."""
    timeout = 120
    """Seconds a connection may stay silent (idle between requests, or mid-request) before it is closed."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def __getattr__(self, name: str) -> Any:
        """Every method (OPTIONS, TRACE, anything) is routed, so an unserved one gets Batch's own answer: 405
        ``UnsupportedHttpVerb`` on a resource, 400 ``InvalidUri`` elsewhere, after authentication."""
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """What the HTTP layer refuses before routing (bad request line, header too long, unknown version) gets a
        Batch error body too, never http.server's HTML."""
        self.log_error("code %d, message %s", code, message)
        text = message or self.responses.get(code, ("Bad request",))[0]
        err = WireError(code, _HTTP_ERRORS.get(code, "InvalidInput"), f"The request could not be read: {text}.")
        self.close_connection = True
        request_id = new_request_id()
        self._send(Response(code, err.body(request_id)), request_id)

    def _serve(self) -> None:
        emulator: EmulatorServer = self.server.emulator  # type: ignore[attr-defined]
        request_id = new_request_id()
        started = time.perf_counter()
        try:
            body = self._read_body()
        except WireError as exc:
            self.close_connection = True
            self._send(Response(exc.status, exc.body(request_id)), request_id)
            return
        split = urlsplit(self.path)
        headers = {k.lower(): v.strip() for k, v in self.headers.items()}
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        segments = [unquote(s) for s in split.path.strip("/").split("/")] if split.path.strip("/") else []
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])  # type: ignore[index]
        req = Request(self.command, segments, query, headers, body, f"http://{host}", split.path, request_id,
                      split.query)
        resp = emulator.handle(req)
        self._send(resp, request_id)
        access.info("%s %s -> %d (%.1f ms)", self.command, self.path, resp.status,
                    (time.perf_counter() - started) * 1000)

    def _read_body(self) -> bytes:
        """The request body (Content-Length or chunked), refusing more than twice the Batch limit unread and any
        framing that is not exactly HTTP/1.1's (the connection is closed after such an error)."""
        encoding = self.headers.get("Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                raise _header_error("Transfer-Encoding", encoding)
            if lengths:  # RFC 9112 6.3: chunked wins, and such a message must not leave the connection open
                self.close_connection = True
            return self._read_chunked()
        if not lengths:
            return b""
        if len(set(lengths)) > 1 or not _LENGTH.fullmatch(lengths[0].strip()):
            raise _header_error("Content-Length", ", ".join(lengths))
        length = int(lengths[0])
        if length > 2 * MAX_BODY:
            raise _too_large()
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            raise _body_error(f"the body ended after {len(data)} of its {length} bytes (Content-Length)")
        return data

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while True:
            line = self.rfile.readline(1026)
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not _CHUNK_SIZE.fullmatch(size_text):
                raise _body_error(f"malformed chunk size line {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                for _ in range(100):  # trailer fields, then the empty line
                    trailer = self.rfile.readline(8194)
                    if not trailer.endswith(b"\n"):
                        raise _body_error("malformed chunked trailer")
                    if not trailer.strip():
                        return bytes(data)
                raise _body_error("too many chunked trailer fields")
            if len(data) + size > 2 * MAX_BODY:
                raise _too_large()
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _body_error("a chunk is shorter than its size or not followed by CRLF")
            data += chunk

    def _send(self, resp: Response, request_id: str) -> None:
        self.send_response(resp.status)
        self.send_header("request-id", request_id)
        self.send_header("DataServiceVersion", "3.0")
        headers = getattr(self, "headers", None)
        client_id = headers.get("client-request-id") if headers is not None else None
        if client_id and headers is not None and headers.get("return-client-request-id", "").lower() == "true":
            self.send_header("client-request-id", client_id)
        if self.close_connection:
            self.send_header("Connection", "close")
        for name, value in resp.headers.items():
            if name != "Content-Length":
                self.send_header(name, value)
        head_only = self.command == "HEAD"  # a HEAD answer has headers only, even for errors
        if isinstance(resp.body, dict | bytes):
            data = resp.body if isinstance(resp.body, bytes) else to_json(resp.body)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(data)))
            self._finish(b"" if head_only else data)
        elif isinstance(resp.body, FileBody):
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(resp.body.length))
            if not _copy(resp.body, self._finish):
                self.close_connection = True  # fewer bytes than announced: only closing tells the client
        else:
            head_length = resp.headers.get("Content-Length", "0") if head_only else "0"
            if resp.status != 304:
                self.send_header("Content-Length", head_length)
            if head_only and "Content-Type" not in resp.headers and resp.status == 200:
                self.send_header("Content-Type", resp.content_type)
            self._finish(b"")

    def _finish(self, data: bytes) -> None:
        """End the headers and send ``data`` (the body, or its first part) with them in one write; later calls
        (the rest of a file) just write."""
        buffer = getattr(self, "_headers_buffer", None)
        if not buffer:
            if data:
                self.wfile.write(data)
            return
        buffer.append(b"\r\n")
        if self.coalesce_writes:
            buffer.append(data)
            self.flush_headers()
        else:
            self.flush_headers()
            if data:
                self.wfile.write(data)


def _too_large() -> WireError:
    return WireError(413, "RequestBodyTooLarge", "The request body is too large and exceeds the maximum "
                     "permissible limit.", MaxLimit=str(MAX_BODY))


def _copy(body: FileBody, write: Any) -> bool:
    """Send ``body`` through ``write`` in 64 KiB parts, the first with the headers; False if the file ended before
    ``body.length`` bytes (it shrank since it was measured)."""
    if body.length <= 0:  # also a directory: headers only
        write(b"")
        return True
    with body.path.open("rb") as f:
        f.seek(body.start)
        left = body.length
        while left > 0:
            chunk = f.read(min(left, 1 << 16))
            write(chunk)
            if not chunk:
                return False
            left -= len(chunk)
    return True
