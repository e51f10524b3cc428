"""Docker fixtures: the task image and the VM image (built once per session by scripts/build-image and
scripts/build-vm-image) and uniquely named resources.

Outside CI, docker tests skip with the reason when no docker engine is usable (VM-like nodes: or when not root); in
CI (``CI`` set) they fail instead, because CI must build the images and run them. Every container and network a test
creates carries the label ``org.mpilaunch.test=<session prefix>`` and is removed at teardown, even when the test fails.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("MPILAUNCH_IMAGE", "mpilaunch:latest")
VM_IMAGE = os.environ.get("MPILAUNCH_VM_IMAGE", "mpilaunch-vm:bookworm")
TEST_LABEL = "org.mpilaunch.test"
SESSION_PREFIX = f"mpltest-{os.getpid()}-{secrets.token_hex(2)}"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI; on failure raise with its stderr."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


@functools.cache
def docker_unavailable() -> str | None:
    """Why docker cannot be used here, or None if it can (asked once per session)."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (run scripts/setup)"
    try:
        done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "'docker info' timed out"
    if done.returncode != 0:
        return f"the docker engine is not running (run scripts/setup): {done.stderr.strip()[:200]}"
    return None


def require_docker(*, root: bool = False) -> None:
    """Skip (outside CI) or fail (in CI) when docker is not usable (or, with ``root``, when not running as root)."""
    reason = docker_unavailable()
    if reason is None and root and os.geteuid() != 0:
        reason = "VM-like nodes need root (CI runs as root)"
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"docker tests must run in CI, but {reason}")
    pytest.skip(reason)


def build(script: str, tag: str) -> str:
    """Run ``scripts/<script> TAG`` (it builds the image or finds it up to date); the tag."""
    try:
        done = subprocess.run([str(REPO / "scripts" / script), tag], capture_output=True, text=True,
                              timeout=1200, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/{script} did not finish within 20 minutes")
    if done.returncode != 0:
        pytest.fail(f"scripts/{script} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return tag


@pytest.fixture(scope="session")
def docker_image() -> str:
    """The task image tag, built (or found up to date) by scripts/build-image once per session."""
    require_docker()
    return build("build-image", IMAGE)


@pytest.fixture(scope="session")
def vm_image() -> str:
    """The bare image of VM-like nodes, built (or found up to date) by scripts/build-vm-image once per session."""
    require_docker(root=True)
    return build("build-vm-image", VM_IMAGE)


@dataclass
class DockerScope:
    """Creates uniquely named, labelled docker networks and containers; :meth:`cleanup` removes them all."""

    prefix: str
    networks: list[str] = field(default_factory=list)

    def name(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def network(self, what: str = "net") -> tuple[str, ipaddress.IPv4Network]:
        """A new bridge network (docker picks a free subnet); returns its name and subnet."""
        name = self.name(what)
        docker("network", "create", "--label", f"{TEST_LABEL}={self.prefix}", name)
        self.networks.append(name)
        subnet = docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", name).stdout.strip()
        return name, ipaddress.IPv4Network(subnet)

    def run(self, what: str, image: str, argv: Sequence[str] = (), *, options: Sequence[str] = ()) -> str:
        """Start a detached container named after ``what``; returns its name."""
        name = self.name(what)
        docker("run", "-d", "--name", name, "--label", f"{TEST_LABEL}={self.prefix}", *options, image, *argv)
        return name

    @staticmethod
    def address(container: str, network: str) -> str:
        """The container's IPv4 address on ``network``."""
        fmt = f"{{{{(index .NetworkSettings.Networks {network!r}).IPAddress}}}}".replace("'", '"')
        return docker("inspect", "-f", fmt, container).stdout.strip()

    def exec(self, container: str, argv: Sequence[str], *, timeout: float = 60,
             options: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        return docker("exec", *options, container, *argv, timeout=timeout, check=False)

    def cleanup(self) -> None:
        remove_labelled(self.prefix)


def remove_labelled(prefix: str) -> None:
    """Remove every container and network labelled with ``prefix`` (by this module or the docker provider)."""
    for label in (TEST_LABEL, "org.mpilaunch.emulator"):
        ids = docker("ps", "-aq", "--filter", f"label={label}={prefix}", check=False).stdout.split()
        if ids:
            docker("rm", "-f", "-v", *ids, check=False)
        nets = docker("network", "ls", "-q", "--filter", f"label={label}={prefix}", check=False).stdout.split()
        if nets:
            docker("network", "rm", *nets, check=False)


@pytest.fixture
def docker_scope(request: pytest.FixtureRequest) -> Iterator[DockerScope]:
    """Per-test docker resources (unique prefix per test), removed at teardown."""
    require_docker()
    scope = DockerScope(f"{SESSION_PREFIX}-{secrets.token_hex(3)}")
    try:
        yield scope
    finally:
        scope.cleanup()


@pytest.fixture
def local_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private MPILAUNCH_HOME with `local up` running; its docker nodes are removed at teardown."""
    from mpilaunch.client import local

    for name, value in {"MPILAUNCH_HOME": str(tmp_path / "home"),
                        "MPILAUNCH_CONFIG": str(tmp_path / "no-profile.toml")}.items():
        monkeypatch.setenv(name, value)
    for name in ("MPILAUNCH_PROFILE", "MPILAUNCH_POOL", "AZURE_BATCH_ENDPOINT", "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)
    try:
        local.up(1, default_ports=False)
        yield tmp_path
    finally:
        local.down()
        remove_labelled(local.docker_scope())
