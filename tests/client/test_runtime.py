"""The runtime wheel pool create --install-runtime stages: reproducible, this client's version, a lean node install
that runs under the oldest Python the node side claims (3.10, Ubuntu 22.04's)."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

import mpilaunch
from mpilaunch.client import runtime
from node_runtime.errors import InvalidInput

REPO = Path(__file__).resolve().parents[2]
# The node-side tests: they import node_runtime only (and tests.support.netns), never the client.
NODE_TESTS = ["tests/unit/test_env.py", "tests/unit/test_keys.py", "tests/unit/test_mpirun.py",
              "tests/unit/test_launch.py", "tests/unit/test_node_runtime_cli.py",
              "tests/unit/test_current_environment.py"]
CLIENT_ONLY = {"azure-batch", "azure-identity", "azure-core", "click", "rich", "mpi4py", "azure-storage-blob"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return runtime.runtime_wheel(None, tmp_path_factory.mktemp("wheel"))


def test_the_wheel_is_reproducible_and_carries_the_runtime_and_its_installer(wheel: Path, tmp_path: Path) -> None:
    again = runtime.build_wheel(REPO, tmp_path)
    assert wheel.name == again.name == f"mpilaunch-{mpilaunch.__version__}-py3-none-any.whl"
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (wheel, again)]
    assert digest[0] == digest[1], "same sources, different wheel bytes: the upload would not be content-addressed"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"mpilaunch-{mpilaunch.__version__}.dist-info/METADATA").decode()
    assert {"node_runtime/contract.py", "mpilaunch/client/install-runtime.sh"} <= names
    assert not [n for n in names if "__pycache__" in n]
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = {r.split(">")[0].split("<")[0].split(";")[0].strip() for r in requires if "extra ==" not in r}
    assert unconditional == {"psutil", "cryptography"}, requires


def test_a_wheel_of_another_version_is_refused_naming_both(tmp_path: Path) -> None:
    other = tmp_path / "mpilaunch-9.9.9-py3-none-any.whl"
    other.write_bytes(b"PK")
    with pytest.raises(InvalidInput, match=rf"is mpilaunch 9\.9\.9, but this client is mpilaunch "
                                           rf"{mpilaunch.__version__}"):
        runtime.runtime_wheel(other, tmp_path)
    with pytest.raises(InvalidInput, match="is not a wheel file"):
        runtime.check_wheel(tmp_path / "app.py")


def test_an_installed_client_asks_for_its_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runtime, "source_tree", lambda: None)
    with pytest.raises(InvalidInput, match="pass --runtime-wheel PATH"):
        runtime.runtime_wheel(None, tmp_path)


def _python310() -> str | None:
    """A CPython 3.10: pyenv's (this machine kind ships one), else one on PATH that is not a pyenv shim."""
    found = sorted(glob.glob("/root/.pyenv/versions/3.10.*/bin/python3.10"))
    on_path = shutil.which("python3.10")
    return found[-1] if found else on_path if on_path and "/shims/" not in on_path else None


@pytest.mark.slow
def test_a_node_install_pulls_nothing_of_the_client_and_passes_the_node_tests_under_python_310(
        wheel: Path, tmp_path: Path) -> None:
    python = _python310()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("no python3.10 on this machine: the node side's oldest Python cannot be tested")
        pytest.skip("no python3.10 here")
    venv = tmp_path / "node"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.version_info[:2])"],
                          check=True, capture_output=True, text=True).stdout.strip() == "(3, 10)"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=600)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"], check=True,
                               capture_output=True, text=True, timeout=120).stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert not names & CLIENT_ONLY, f"a node install pulled client dependencies: {names & CLIENT_ONLY}"
    version = subprocess.run([str(venv / "bin" / "node-runtime"), "--version"], check=True, capture_output=True,
                             text=True, timeout=60)
    assert mpilaunch.__version__ in version.stdout
    client = subprocess.run([str(venv / "bin" / "mpilaunch"), "--help"], check=False, capture_output=True, text=True,
                            timeout=60)
    assert client.returncode == 2 and 'pip install "mpilaunch[client]"' in client.stderr, client.stderr
    subprocess.run([*pip, "pytest", "hypothesis", "pytest-timeout"], check=True, timeout=600)
    # --noconftest: the suite's conftest registers the client's fixtures, which a node install cannot import.
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--noconftest", *NODE_TESTS], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
