"""The emulator's HTTP server: routing, SharedKey check, Batch response headers, and the engine's lifecycle.

``EmulatorServer(data_dir, host=..., port=0, account=..., key=..., provider=...)`` opens (or reopens) the SQLite
state under ``data_dir``, builds the execution engine (with ``provider``'s nodes; process nodes by default) when
``execute`` is true, and serves on a thread (``start()``/``stop()``); ``mpilaunch emulator serve`` runs one in the
foreground.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlsplit

from mpilaunch.emulator import api_files, api_jobs, api_nodes, api_pools, api_tasks, defaults
from mpilaunch.emulator.auth import Authenticator
from mpilaunch.emulator.engine import Engine
from mpilaunch.emulator.nodes.base import NodeProvider
from mpilaunch.emulator.store import Store
from mpilaunch.emulator.validation import MAX_BODY
from mpilaunch.emulator.wire import Context, FileBody, Handler, Request, Response
from mpilaunch.emulator.wire_errors import WireError, new_request_id
from node_runtime.errors import InvalidInput

log = logging.getLogger("mpilaunch.emulator")
access = logging.getLogger("mpilaunch.emulator.access")

_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(\.\d+\.\d+)?")
"""Dated api-versions (``2025-06-01``, ``2024-07-01.20.0``); the wire format served is 2025-06-01's."""
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
    ("GET", ("pools", _ID, "nodes"), api_pools.list_nodes),
    ("POST", ("pools", _ID, "removenodes"), api_pools.remove_nodes),
    ("GET", ("pools", _ID, "nodes", _ID), api_pools.get_node),
    ("POST", ("pools", _ID, "nodes", _ID, "reboot"), api_nodes.reboot),
    ("POST", ("pools", _ID, "nodes", _ID, "reimage"), api_nodes.reimage),
    ("POST", ("pools", _ID, "nodes", _ID, "disablescheduling"), api_nodes.disable_scheduling),
    ("POST", ("pools", _ID, "nodes", _ID, "enablescheduling"), api_nodes.enable_scheduling),
    ("POST", ("pools", _ID, "nodes", _ID, FAULT), api_nodes.fault),
    ("GET", ("pools", _ID, "nodes", _ID, "files"), api_files.list_node_files),
    ("GET", ("pools", _ID, "nodes", _ID, *_FILE), api_files.get_node_file),
    ("HEAD", ("pools", _ID, "nodes", _ID, *_FILE), api_files.get_node_file),
    ("DELETE", ("pools", _ID, "nodes", _ID, *_FILE), api_files.delete_node_file),
    ("POST", ("jobs",), api_jobs.add),
    ("GET", ("jobs",), api_jobs.list_),
    ("GET", ("jobs", _ID), api_jobs.get),
    ("PATCH", ("jobs", _ID), api_jobs.patch),
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
        self.store = Store(self.data_dir / "state.sqlite3")
        self.engine = (Engine(self.store, self.data_dir, provider, account=account, account_url=self.endpoint)
                       if execute else None)
        self.ctx = Context(self.store, account, self.data_dir, self.engine)
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
        self.store.close()
        self._lock_file.close()

    def handle(self, req: Request) -> Response:
        """Authenticate, route and run one request; every failure becomes a Batch error response."""
        try:
            self.auth.check(req.method, req.raw_path, req.raw_query, req.headers)
            if "api-version" not in req.query:
                raise WireError(400, "MissingRequiredQueryParameter", "A query parameter that's mandatory for this "
                                "request is not specified.", QueryParameterName="api-version")
            if not _API_VERSION.fullmatch(req.query["api-version"]):
                raise WireError(400, "UnsupportedRequestVersion", "The specified version of the REST API is not "
                                "supported.", QueryParameterName="api-version",
                                QueryParameterValue=req.query["api-version"][:40])
            handler, ids = route(req.method, req.segments)
            return handler(self.ctx, req, ids)
        except WireError as exc:
            return Response(exc.status, exc.body(req.request_id))
        except Exception:
            log.exception("internal error on %s %s", req.method, req.raw_path)
            err = WireError(500, "InternalError", "An internal error occurred in the emulator.")
            return Response(500, err.body(req.request_id))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mpilaunch-batch-emulator"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

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
        """The request body (Content-Length or chunked), refusing more than twice the Batch limit unread."""
        too_large = WireError(413, "RequestBodyTooLarge", "The request body is too large and exceeds the maximum "
                              "permissible limit.", MaxLimit=str(MAX_BODY))
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                line = self.rfile.readline(1024).split(b";")[0].strip()
                try:
                    size = int(line, 16)
                except ValueError as exc:
                    raise WireError(400, "InvalidRequestBody", "The chunked request body is malformed.") from exc
                if size == 0:
                    while self.rfile.readline(65537).strip():
                        pass
                    return bytes(data)
                if len(data) + size > 2 * MAX_BODY:
                    raise too_large
                data += self.rfile.read(size)
                self.rfile.readline(8)
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            raise WireError(400, "InvalidHeaderValue", "The value for one of the HTTP headers is not in the correct "
                            "format.", HeaderName="Content-Length", HeaderValue=length)
        if int(length) > 2 * MAX_BODY:
            raise too_large
        return self.rfile.read(int(length)) if int(length) else b""

    def _send(self, resp: Response, request_id: str) -> None:
        self.send_response(resp.status)
        self.send_header("request-id", request_id)
        self.send_header("DataServiceVersion", "3.0")
        client_id = self.headers.get("client-request-id")
        if client_id and self.headers.get("return-client-request-id", "").lower() == "true":
            self.send_header("client-request-id", client_id)
        for name, value in resp.headers.items():
            if name != "Content-Length":
                self.send_header(name, value)
        if isinstance(resp.body, dict):
            data = json.dumps(resp.body).encode()
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has headers only, even for errors
                self.wfile.write(data)
        elif isinstance(resp.body, FileBody):
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(resp.body.length))
            self.end_headers()
            _copy(resp.body, self.wfile)
        else:
            head_length = resp.headers.get("Content-Length", "0") if self.command == "HEAD" else "0"
            self.send_header("Content-Length", head_length)
            if self.command == "HEAD" and "Content-Type" not in resp.headers and resp.status == 200:
                self.send_header("Content-Type", resp.content_type)
            self.end_headers()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve


def _copy(body: FileBody, out: Any) -> None:
    if body.length <= 0:  # also a directory: headers only
        return
    with body.path.open("rb") as f:
        f.seek(body.start)
        left = body.length
        while left > 0:
            chunk = f.read(min(left, 1 << 16))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)
