"""Resource file downloads and output file uploads, as a Batch node does them (Blob REST over plain HTTP(S)).

Downloads: ``httpUrl`` (any URL, incl. Blob SAS URLs) to ``filePath``; ``storageContainerUrl`` (a container SAS URL)
with optional ``blobPrefix`` -- every listed blob to ``filePath/<blob name>``; ``fileMode`` (octal) applied.
Uploads: ``outputFiles`` whose ``uploadCondition`` matches, files matched by ``filePattern`` (relative to the working
directory; ``*``, ``?``, ``**``) to ``destination.container.containerUrl`` under ``path``.
Failures raise :class:`TransferError` with the Batch failure code; the message never contains a SAS signature.
"""

from __future__ import annotations

import glob
import os
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from node_runtime.errors import MpilaunchError

TIMEOUT = 120.0
_CHUNK = 1 << 20


class TransferError(MpilaunchError):
    """A resource file could not be downloaded or an output file uploaded; ``code`` is the Batch failure code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def redact(url: str) -> str:
    """The URL without its query string (SAS tokens are secrets)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _blob_url(container_url: str, blob: str) -> str:
    parts = urllib.parse.urlsplit(container_url)
    path = parts.path.rstrip("/") + "/" + urllib.parse.quote(blob)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _open(url: str, code: str, *, headers: Mapping[str, str] | None = None, data: bytes | None = None,
          method: str = "GET") -> Any:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise TransferError(code, f"unsupported URL scheme in {redact(url)!r} (http/https only)")
    request = urllib.request.Request(url, data=data, headers=dict(headers or {}), method=method)  # noqa: S310
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT)  # noqa: S310 - scheme checked above
    except urllib.error.HTTPError as exc:
        kind = {403: "AccessDenied", 404: "NotFound"}.get(exc.code, "MiscError")
        raise TransferError(code.replace("MiscError", kind), f"{redact(url)}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransferError(code, f"{redact(url)}: {getattr(exc, 'reason', exc)}") from exc


def _safe_target(base: Path, rel: str) -> Path:
    posix = PurePosixPath(rel)
    if posix.is_absolute() or ".." in posix.parts:
        raise TransferError("InvalidFilePath", f"filePath {rel!r} must be relative and stay inside the task dir")
    return base.joinpath(*posix.parts)


def _fetch(url: str, target: Path, mode: str | None, code: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _open(url, code) as response, target.open("wb") as out:
        while chunk := response.read(_CHUNK):
            out.write(chunk)
    if mode:
        try:
            target.chmod(int(mode, 8))
        except ValueError as exc:
            raise TransferError("InvalidFileMode", f"fileMode {mode!r} is not an octal mode") from exc


def list_blobs(container_url: str, prefix: str | None) -> Iterator[str]:
    """Names of the blobs in a container (SAS URL), following ``NextMarker`` pages."""
    marker = ""
    while True:
        parts = urllib.parse.urlsplit(container_url)
        query = [*urllib.parse.parse_qsl(parts.query), ("restype", "container"), ("comp", "list")]
        if prefix:
            query.append(("prefix", prefix))
        if marker:
            query.append(("marker", marker))
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, urllib.parse.urlencode(query), ""))
        with _open(url, "ContainerListMiscError", headers={"x-ms-version": "2021-08-06"}) as response:
            tree = ET.fromstring(response.read())  # noqa: S314 - storage service answer, not user XML
        for name in tree.iterfind("./Blobs/Blob/Name"):
            yield name.text or ""
        marker = tree.findtext("NextMarker") or ""
        if not marker:
            return


def download(resource_files: Sequence[Mapping[str, Any]] | None, dest: Path) -> None:
    """Download ``resource_files`` (``ResourceFile`` docs) into ``dest``; raises :class:`TransferError`."""
    for rf in resource_files or ():
        mode = rf.get("fileMode")
        if rf.get("httpUrl"):
            if not rf.get("filePath"):
                raise TransferError("InvalidFilePath", f"resource file {redact(rf['httpUrl'])!r} needs a filePath")
            _fetch(rf["httpUrl"], _safe_target(dest, rf["filePath"]), mode, "BlobDownloadMiscError")
        elif rf.get("storageContainerUrl"):
            base = _safe_target(dest, rf.get("filePath") or ".")
            for blob in list_blobs(rf["storageContainerUrl"], rf.get("blobPrefix")):
                _fetch(_blob_url(rf["storageContainerUrl"], blob), _safe_target(base, blob), mode,
                       "BlobDownloadMiscError")
        else:
            raise TransferError("UnsupportedResourceFile",
                                "only httpUrl and storageContainerUrl resource files are supported by the emulator")


def _matches(pattern: str, wd: Path) -> tuple[list[Path], Path | None]:
    """Files matched by ``pattern`` and the directory blob names are relative to (``None``: single file)."""
    full = pattern if os.path.isabs(pattern) else str(wd / pattern)  # noqa: PTH117 - str pattern, not a path
    files = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())  # noqa: PTH207
    if not glob.has_magic(full):
        return files, None
    base = PurePosixPath(full).parts
    fixed = next((i for i, part in enumerate(base) if glob.has_magic(part)), len(base))
    return files, Path(*base[:fixed])


def upload(output_files: Sequence[Mapping[str, Any]] | None, wd: Path, *, succeeded: bool) -> int:
    """Upload the output files whose ``uploadCondition`` matches the outcome; returns how many files were sent."""
    sent = 0
    for of in output_files or ():
        condition = str(of.get("uploadOptions", {}).get("uploadCondition", "taskcompletion")).lower()
        if (condition == "tasksuccess" and not succeeded) or (condition == "taskfailure" and succeeded):
            continue
        container = of.get("destination", {}).get("container", {})
        if not container.get("containerUrl"):
            raise TransferError("UnsupportedOutputFile", "output files need destination.container.containerUrl")
        headers = {"x-ms-blob-type": "BlockBlob", "x-ms-version": "2021-08-06"}
        headers |= {h["name"]: h.get("value", "") for h in container.get("uploadHeaders") or ()}
        prefix = str(container.get("path") or "").strip("/")
        files, base = _matches(str(of["filePattern"]), wd)
        for file in files:
            if base is None:
                name = prefix or file.name
            else:
                rel = file.relative_to(base).as_posix()
                name = f"{prefix}/{rel}" if prefix else rel
            with _open(_blob_url(container["containerUrl"], name), "FileUploadMiscError", headers=headers,
                       data=file.read_bytes(), method="PUT"):
                sent += 1
    return sent
