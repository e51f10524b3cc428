"""The node runtime that ``pool create --install-runtime`` installs: a wheel of exactly this client's version.

:func:`runtime_wheel` takes a wheel given by the user (checking its version) or builds one from the source tree this
client runs from. The build is reproducible (fixed file times, sorted entries), so the same sources give the same
bytes and the content-addressed upload (:meth:`~mpilaunch.client.storage.StagingStore.upload`) sends a wheel once.
:data:`INSTALL_SCRIPT` is the StartTask's script; :func:`start_task_command` its command line.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from node_runtime import proc
from node_runtime.contract import RUNTIME_VERSION
from node_runtime.errors import InvalidInput

DISTRIBUTION = "mpilaunch"
INSTALL_SCRIPT = Path(__file__).with_name("install-runtime.sh")
SOURCES = ("pyproject.toml", "README.md", "mpilaunch", "node_runtime")
REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip entry can carry
_WHEEL_NAME = re.compile(r"(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl\Z")


def wheel_name() -> str:
    """The file name of this version's wheel (pure Python, any platform)."""
    return f"{DISTRIBUTION}-{RUNTIME_VERSION}-py3-none-any.whl"


def source_tree() -> Path | None:
    """The source tree this client runs from (an editable install or a checkout), or ``None`` when installed."""
    top = Path(__file__).resolve().parents[2]
    project = top / "pyproject.toml"
    if project.is_file() and re.search(rf'(?m)^name = "{DISTRIBUTION}"$', project.read_text()):
        return top
    return None


def check_wheel(path: Path) -> Path:
    """``path`` if it is a wheel of this client's distribution and version, else :class:`InvalidInput`."""
    found = _WHEEL_NAME.match(path.name)
    if not path.is_file() or found is None:
        raise InvalidInput(f"runtime wheel {str(path)!r} is not a wheel file (NAME-VERSION-...-any.whl)")
    name, version = found["name"].replace("_", "-").lower(), found["version"]
    if name != DISTRIBUTION or version != RUNTIME_VERSION:
        raise InvalidInput(f"runtime wheel {path.name!r} is {name} {version}, but this client is {DISTRIBUTION} "
                           f"{RUNTIME_VERSION}: nodes must run the client's version (give its wheel, or none to "
                           "build one from the source tree)")
    return path


def build_wheel(source: Path, dest: Path) -> Path:
    """Build this version's wheel from ``source`` into ``dest`` (a copy of the sources is built, so the tree gets
    no ``build/`` or egg-info, and stale files of earlier builds cannot slip in)."""
    with tempfile.TemporaryDirectory(prefix="mpilaunch-wheel-") as tmp:
        copy = Path(tmp) / "src"
        for name in SOURCES:
            src = source / name
            if src.is_dir():
                shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                copy.mkdir(exist_ok=True)
                shutil.copy2(src, copy / name)
        # setuptools is a client dependency: no build environment to fetch (works offline)
        proc.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check",
                  "--no-build-isolation", "--wheel-dir", str(Path(tmp) / "out"), str(copy)],
                 timeout=600, env=os.environ | {"SOURCE_DATE_EPOCH": REPRODUCIBLE_EPOCH})
        built = Path(tmp) / "out" / wheel_name()
        if not built.is_file():
            raise InvalidInput(f"building the runtime wheel from {source} gave no {wheel_name()}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(built, dest / built.name))


def runtime_wheel(given: Path | None, build_dir: Path) -> Path:
    """The wheel to install on the nodes: ``given`` (checked), else one built from the source tree into
    ``build_dir``; :class:`InvalidInput` when neither is possible."""
    if given is not None:
        return check_wheel(given)
    source = source_tree()
    if source is None:
        raise InvalidInput(f"this mpilaunch {RUNTIME_VERSION} is installed, not run from a source tree, so it cannot "
                           f"build its own wheel: pass --runtime-wheel PATH (the {wheel_name()} it was installed "
                           "from)")
    return check_wheel(build_wheel(source, build_dir))


def start_task_command(wheel: str) -> str:
    """The StartTask command line running :data:`INSTALL_SCRIPT` on ``wheel`` (both in its working directory;
    Batch runs no shell, so bash is named)."""
    return shlex.join(["/bin/bash", INSTALL_SCRIPT.name, wheel])
