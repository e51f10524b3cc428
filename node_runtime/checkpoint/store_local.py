"""A checkpoint store in a local or shared directory: write temp + fsync, hard-link into place, fsync the directory.

``os.link`` fails if the target exists, which gives create-only semantics atomically (``rename`` would overwrite).
On file systems without hard links (some network mounts) we fall back to an existence check plus ``rename``.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from node_runtime.checkpoint.stores import Store, check_name
from node_runtime.errors import CheckpointError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(Store):
    """Objects are files under ``root``; names map to relative paths."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        if not str(root):
            raise CheckpointError("empty checkpoint directory path")
        self.root = Path(root).expanduser().absolute()
        self.location = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"checkpoint location {self.location!r} exists and is not a directory")

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _makedirs(self, path: Path) -> None:
        """Create ``path`` and missing parents, fsyncing each parent so the new entries are durable."""
        missing = []
        while not path.is_dir():
            missing.append(path)
            path = path.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(d.parent)

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            self._makedirs(path.parent)
            tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                self._link(tmp, path)
            except FileExistsError:
                if path.read_bytes() != data:
                    raise CheckpointError(f"checkpoint object {name!r} already exists in {self.location!r} "
                                          "with different content (create-only store)") from None
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint object {name!r} in {self.location!r}: {e}") from e

    @staticmethod
    def _link(tmp: Path, path: Path) -> None:
        try:
            os.link(tmp, path)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if path.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
            tmp.rename(path)

    def get(self, name: str) -> bytes | None:
        path = self._path(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint object {name!r} in {self.location!r}: {e}") from e

    def names(self, prefix: str) -> list[str]:
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        names = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in filenames:
                if f.startswith("."):
                    continue  # temp files of writes in progress (or of writers that were killed)
                name = f if rel == "." else f"{rel}/{f}"
                if name.startswith(prefix):
                    names.append(name)
        return sorted(names)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != self.root and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise CheckpointError(f"cannot delete checkpoint object {name!r} in {self.location!r}: {e}") from e
