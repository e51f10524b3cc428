"""The task image: what it contains, what it must not contain, and an MPI cluster of three of its containers."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.support.docker import REPO, DockerScope, docker

pytestmark = pytest.mark.slow

HELLO = textwrap.dedent("""
    import socket
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    total = comm.allreduce(comm.rank + 1)
    names = comm.gather((comm.rank, socket.gethostname()), root=0)
    if comm.rank == 0:
        print("ranks", comm.size, "sum", total, "hosts", ",".join(h for _, h in sorted(names)))
""")


def test_dockerfile_is_hadolint_clean() -> None:
    done = subprocess.run([str(REPO / ".venv" / "bin" / "hadolint"), str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_defaults_and_no_baked_secrets(docker_image: str) -> None:
    script = ("id -u; id -un; node-runtime --version; python -c 'import mpi4py; print(mpi4py.__version__)'; "
              "ls /etc/ssh/ | grep -c ssh_host_ || true; "
              "find / -xdev \\( -name 'id_rsa*' -o -name 'id_ed25519*' -o -name 'id_ecdsa*' -o -name '*.pem' "
              "-path '*/private/*' \\) -print 2>/dev/null | wc -l; "
              "mpirun --version | head -n1")
    out = docker("run", "--rm", docker_image, "bash", "-c", script).stdout.split("\n")
    uid, user, runtime, mpi4py_version, host_keys, private_keys, mpirun = out[:7]
    assert uid != "0" and user == "mpi"
    assert runtime.startswith("node-runtime")
    assert mpi4py_version.startswith("4.")
    assert host_keys == "0", "SSH host keys must not be baked into the image"
    assert private_keys == "0", "no private keys may be baked into the image"
    assert "Open MPI" in mpirun
    root = docker("run", "--rm", "--user", "root", docker_image, "id", "-u").stdout.strip()
    assert root == "0"
    api = docker("run", "--rm", docker_image, "python", "-c",
                 "from mpilaunch.checkpoint import CheckpointError, run_items; print(run_items.__module__)").stdout
    assert api.strip() == "node_runtime.checkpoint.workitems"  # the programs' import works without the client
    client = docker("run", "--rm", docker_image, "mpilaunch", "--help", check=False)
    assert client.returncode == 2 and 'pip install "mpilaunch[client]"' in client.stderr


def test_extra_ca_certificates_are_trusted(docker_image: str) -> None:
    staged = sorted(p.name for p in (REPO / "certs").glob("*.crt"))
    listed = docker("run", "--rm", docker_image, "ls", "/usr/local/share/ca-certificates").stdout.split()
    assert staged == sorted(listed)  # exactly the certs/*.crt of the build (none on a machine without extra CAs)
    if not staged:
        return
    # The staged CAs are in the bundle pip and the Azure SDK use.
    first = (REPO / "certs" / staged[0]).read_text().strip().splitlines()[1]
    bundle = docker("run", "--rm", docker_image, "bash", "-c",
                    'grep -c -F -- "$1" "$PIP_CERT"', "_", first, check=False).stdout.strip()
    assert bundle not in ("", "0")


def test_three_container_mpi_cluster_over_ssh(docker_image: str, docker_scope: DockerScope, tmp_path: Path) -> None:
    """Plain sshd (non-root, port 2222, a per-cluster key) + mpirun across three containers of the image."""
    net, subnet = docker_scope.network()
    keys = tmp_path / "keys"
    keys.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "id")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")], check=True)
    (keys / "sshd_config").write_text(textwrap.dedent("""\
        Port 2222
        HostKey /keys/host
        AuthorizedKeysFile /keys/id.pub
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        PidFile none
        """))
    (keys / "ssh_config").write_text(textwrap.dedent("""\
        Host *
          Port 2222
          IdentityFile /keys/id
          IdentitiesOnly yes
          StrictHostKeyChecking no
          UserKnownHostsFile /dev/null
          BatchMode yes
          ConnectTimeout 5
          LogLevel ERROR
        """))
    (keys / "hello.py").write_text(HELLO)
    subprocess.run(["chown", "-R", "1000:1000", str(keys)], check=True)  # the image's default user owns its keys
    names = [docker_scope.run(f"node{i}", docker_image, ["/usr/sbin/sshd", "-D", "-e", "-f", "/keys/sshd_config"],
                              options=["--network", net, "--hostname", f"node{i}", "--shm-size", "256m",
                                       "-v", f"{keys}:/keys:ro"])
             for i in range(3)]
    hosts = [docker_scope.address(name, net) for name in names]
    mpirun = ["timeout", "60", "mpirun", "--host", ",".join(hosts), "-np", "3",
              "--mca", "plm_rsh_args", "-F /keys/ssh_config",
              "--mca", "btl_tcp_if_include", str(subnet), "--mca", "oob_tcp_if_include", str(subnet),
              "/opt/mpilaunch/bin/python", "/keys/hello.py"]
    done = docker_scope.exec(names[0], mpirun, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ranks 3 sum 6 hosts node0,node1,node2" in done.stdout

    # Fault injection: with node2's container killed, the same job fails instead of hanging.
    docker("kill", names[2])
    failed = docker_scope.exec(names[0], mpirun, timeout=90)
    assert failed.returncode not in (0, 124), failed.stdout + failed.stderr
