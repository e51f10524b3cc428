"""Task files and node files: list (``recursive``, ``$filter``, paging), get (``ocp-range``), properties, delete.

Files are read from the host directories the engine records in the store: a task's ``_taskDir`` (else its node's
root + ``nodeInfo.taskRootDirectory``) and a node's ``_root`` (else ``_node.root``). The file path arrives
percent-encoded as one URL segment (``wd%2Fout.txt``); paths may not leave the directory.

Files change under these handlers (tasks write them, other requests delete them): a file or directory that goes
away while a request handles it answers 404 ``FileNotFound``, a path the file system refuses (too long, a NUL byte,
a symlink loop) 400, never 500.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mpilaunch.emulator import odata
from mpilaunch.emulator.api_pools import get_pool
from mpilaunch.emulator.api_tasks import get_task
from mpilaunch.emulator.store import Doc
from mpilaunch.emulator.wire import FileBody, Handler, HandlerContext, Request, Response, http_date
from mpilaunch.emulator.wire_errors import WireError, bad_query, invalid_value, not_found

OCTET = "application/octet-stream"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
"""One byte range, as the spec's ``ocp-range`` (``bytes=startRange-endRange``) and HTTP's ``Range`` write it."""


def node_root(node: Doc) -> Path | None:
    root = node.get("_root") or (node.get("_node") or {}).get("root")
    return Path(root) if root else None


def task_dir(ctx: HandlerContext, job_id: str, task_id: str) -> tuple[Path | None, str]:
    """Host directory of the task (on its primary node) and the URL prefix of its files."""
    task = get_task(ctx, job_id, task_id)
    prefix = f"jobs/{quote(job_id, safe='')}/tasks/{quote(task_id, safe='')}/files"
    if task.get("_taskDir"):
        return Path(task["_taskDir"]), prefix
    info = task.get("nodeInfo") or {}
    node = ctx.store.get("node", (info.get("poolId", ""),), info.get("nodeId", "")) if info else None
    root = node_root(node) if node else None
    if root is None or not info.get("taskRootDirectory"):
        return None, prefix
    return root / info["taskRootDirectory"].replace("\\", "/").strip("/"), prefix


def node_dir(ctx: HandlerContext, pool_id: str, node_id: str) -> tuple[Path | None, str]:
    node = ctx.store.get("node", (pool_id,), node_id)
    if node is None:
        get_pool(ctx, pool_id)
        raise not_found("Node", node_id)
    return node_root(node), f"pools/{quote(pool_id, safe='')}/nodes/{quote(node_id, safe='')}/files"


def _entry(base: Path, path: Path, req: Request, prefix: str) -> dict[str, Any] | None:
    """The listing entry of ``path``; ``None`` if it went away since the directory was read, or is a symlink to
    nothing (also a loop)."""
    name = path.relative_to(base).as_posix()
    try:
        st = path.stat()
    except OSError:
        return None
    is_dir = stat.S_ISDIR(st.st_mode)
    entry: dict[str, Any] = {"name": name, "url": f"{req.base_url}/{prefix}/{quote(name, safe='/')}",
                             "isDirectory": is_dir}
    if not is_dir:
        entry["properties"] = {"creationTime": _iso(st.st_ctime), "lastModified": _iso(st.st_mtime),
                               "contentLength": str(st.st_size), "contentType": OCTET,
                               "fileMode": f"0o{stat.S_IMODE(st.st_mode) | stat.S_IFMT(st.st_mode):o}"}
    return entry


def _walk(base: Path, recursive: bool) -> list[Path]:
    """``base``'s entries (all levels if ``recursive``; symlinked directories are not entered), sorted; directories
    that vanish during the walk are skipped."""
    if not recursive:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            return sorted(base.iterdir())
        return []
    paths: list[Path] = []
    for top, dirs, files in os.walk(base):
        paths.extend(Path(top, name) for name in dirs + files)
    return sorted(paths)


def _listing(req: Request, base: Path | None, prefix: str) -> Response:
    recursive = req.query.get("recursive", "false").lower()
    if recursive not in ("true", "false"):
        raise bad_query("recursive", recursive, "must be true or false")
    limit, start = odata.max_results(req.query), odata.skiptoken(req.query)
    pred = odata.parse_filter(req.query.get("$filter"))
    entries: list[dict[str, Any]] = []
    if base is not None:
        found = (_entry(base, p, req, prefix) for p in _walk(base, recursive == "true"))
        entries = [e for e in found if e is not None and pred(e)]
    body: dict[str, Any] = {"odata.metadata": f"{req.base_url}/$metadata#files",
                            "value": entries[start:start + limit]}
    if start + limit < len(entries):
        from mpilaunch.emulator.wire import next_link

        body["odata.nextLink"] = next_link(req, start + limit)
    return Response(200, body)


@contextlib.contextmanager
def _fs_errors(rel: str) -> Iterator[None]:
    """File system errors of a request about ``rel`` as Batch errors: gone (also concurrently) 404, a path the file
    system cannot take 400."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise not_found("File", rel) from exc
    except ValueError as exc:  # a NUL byte
        raise invalid_value("filePath", rel, "is not a valid file path") from exc
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop (pathlib before Python 3.13)
        if isinstance(exc, OSError) and exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
            raise
        raise invalid_value("filePath", rel, "is not a valid file path (too long or a symlink loop)") from exc


def _resolve(base: Path | None, rel: str) -> Path:
    if base is None:
        raise not_found("File", rel)
    parts = Path(rel.replace("\\", "/")).parts
    if not parts or rel.startswith("/") or ".." in parts:
        raise invalid_value("filePath", rel, "must be a relative path to a file or directory inside the directory")
    path = base.joinpath(*parts)
    try:
        path.resolve().relative_to(base.resolve())
    except ValueError as exc:
        raise invalid_value("filePath", rel, "must stay inside the directory") from exc
    return path


def _file_headers(st: os.stat_result, req: Request, prefix: str, rel: str) -> dict[str, str]:
    tag = hash((st.st_ino, st.st_mtime_ns, st.st_size)) % 16**13
    is_dir = stat.S_ISDIR(st.st_mode)
    return {"ocp-creation-time": http_date(_iso(st.st_ctime)), "Last-Modified": http_date(_iso(st.st_mtime)),
            "ETag": f"0x8D{tag:013X}",
            "ocp-batch-file-isdirectory": "true" if is_dir else "false",
            "ocp-batch-file-url": f"{req.base_url}/{prefix}/{quote(rel, safe='')}",
            "ocp-batch-file-mode": f"{stat.S_IMODE(st.st_mode) | stat.S_IFMT(st.st_mode):o}",
            "Content-Length": "0" if is_dir else str(st.st_size)}


def _not_modified(req: Request, st: os.stat_result) -> bool:
    raw = req.headers.get("if-modified-since")
    if not raw:
        return False
    try:
        since = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError) as exc:
        raise invalid_value("If-Modified-Since", raw, "must be an RFC 1123 date") from exc
    return int(st.st_mtime) <= since.timestamp()


def _get(req: Request, base: Path | None, prefix: str, rel: str, head: bool) -> Response:
    """Get Node/Task File (``head``: its properties). ``ocp-range`` (else HTTP's ``Range``) picks a byte range of a
    file: the answer is still 200 (the spec and the SDK know no 206) with ``Content-Length`` = the range's length;
    HEAD always gives the whole file's length."""
    path = _resolve(base, rel)
    st = path.stat()
    headers = _file_headers(st, req, prefix, rel)
    if _not_modified(req, st):
        return Response(304, None, headers, content_type=OCTET)
    if head or stat.S_ISDIR(st.st_mode):
        return Response(200, FileBody(path, 0, 0) if not head else None, headers, content_type=OCTET)
    start, end = 0, st.st_size
    header = "ocp-range" if req.headers.get("ocp-range") else "range"
    if req.headers.get(header):
        start, end = _parse_range(header, req.headers[header], st.st_size)
    headers["Content-Length"] = str(end - start)
    return Response(200, FileBody(path, start, end - start), headers, content_type=OCTET)


def _parse_range(header: str, raw: str, size: int) -> tuple[int, int]:
    """``bytes=first-last`` (``last`` capped at the end), ``bytes=first-`` or ``bytes=-suffix`` of a ``size``-byte
    file as ``[start, end)``; 400 if malformed, 416 if no byte of the file is in it."""
    match = _RANGE.fullmatch(raw.replace(" ", ""))
    if match is None or not any(match.groups()):
        raise WireError(400, "InvalidHeaderValue", "The value for one of the HTTP headers is not in the correct "
                        "format.", HeaderName=header, HeaderValue=raw)
    first, last = match.groups()
    if not first:
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise WireError(416, "InvalidRange", "The specified byte range is invalid for the given resource.",
                        RangeHeader=raw, ContentLength=str(size))
    return start, end


def _delete(req: Request, base: Path | None, rel: str) -> Response:
    recursive = req.query.get("recursive", "false").lower()
    if recursive not in ("true", "false"):
        raise bad_query("recursive", recursive, "must be true or false")
    path = _resolve(base, rel)
    if stat.S_ISDIR(path.lstat().st_mode):
        if recursive != "true" and any(path.iterdir()):
            raise WireError(409, "OperationInvalidForCurrentState", "The directory is not empty: delete it with "
                            "recursive=true.")
        shutil.rmtree(path)  # a concurrent delete makes it raise FileNotFoundError: 404, as if it came first
    else:
        path.unlink()
    return Response(200, None, {})


_Locate = Callable[[HandlerContext, str, str], tuple[Path | None, str]]
"""From the URL's first two ids (job and task, or pool and node): the host directory and the files' URL prefix."""


def _file_handlers(locate: _Locate) -> tuple[Handler, Handler, Handler]:
    """The list, get (also HEAD) and delete handlers of the files under the directory ``locate`` finds."""

    def list_files(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
        return _listing(req, *locate(ctx, ids[0], ids[1]))

    def get_file(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
        base, prefix = locate(ctx, ids[0], ids[1])
        with _fs_errors(ids[2]):
            return _get(req, base, prefix, ids[2], head=req.method == "HEAD")

    def delete_file(ctx: HandlerContext, req: Request, ids: list[str]) -> Response:
        base = locate(ctx, ids[0], ids[1])[0]
        with _fs_errors(ids[2]):
            return _delete(req, base, ids[2])

    return list_files, get_file, delete_file


list_task_files, get_task_file, delete_task_file = _file_handlers(task_dir)
list_node_files, get_node_file, delete_node_file = _file_handlers(node_dir)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
