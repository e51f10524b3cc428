"""Derived task keys and the coordination service's files: deterministic, per-secret, private, valid for OpenSSH,
and kept outside the Batch node root (where the file APIs cannot serve them)."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from node_runtime import keys, sshd
from node_runtime.errors import InvalidEnvironment, ServiceError

SECRET = secrets.token_urlsafe(32)


@pytest.fixture
def key_files(tmp_path: Path) -> keys.KeyFiles:
    return keys.KeyFiles(tmp_path / "task" / keys.SERVICE_DIR_NAME, tmp_path / "private")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[sshd.Service]:
    """A service of a task under ``tmp_path`` (the node root); its key dir (outside it) is removed afterwards."""
    svc = sshd.service_for(tmp_path / "task", "127.0.0.1", 2222, node_root=tmp_path)
    yield svc
    shutil.rmtree(svc.files.private, ignore_errors=True)


def test_same_secret_gives_same_keys_and_different_secrets_differ() -> None:
    first, again = keys.derive_keys(SECRET), keys.derive_keys(SECRET)
    other = keys.derive_keys(secrets.token_urlsafe(32))
    assert first.user_public == again.user_public and first.host_public == again.host_public
    assert first.user_public.startswith("ssh-ed25519 ") and first.host_public.startswith("ssh-ed25519 ")
    assert first.user_public != first.host_public
    assert {first.user_public, first.host_public}.isdisjoint({other.user_public, other.host_public})


def test_padding_does_not_change_the_keys() -> None:
    secret = secrets.token_urlsafe(32)  # 43 characters: base64url without padding
    assert keys.derive_keys(secret).user_public == keys.derive_keys(secret + "=").user_public


def test_short_secret_is_refused_without_showing_it() -> None:
    short = secrets.token_urlsafe(16)
    with pytest.raises(InvalidEnvironment) as info:
        keys.derive_keys(short)
    assert "MPILAUNCH_TASK_SECRET" in str(info.value) and short not in str(info.value)


def test_repr_shows_no_private_material() -> None:
    derived = keys.derive_keys(SECRET)
    text = repr(derived)
    assert derived.user_private.decode() not in text and "PRIVATE" not in text and SECRET not in text


def test_files_are_private_and_openssh_reads_them(key_files: keys.KeyFiles) -> None:
    files = key_files
    derived = keys.derive_keys(SECRET)
    keys.write_key_files(files, derived, ["10.0.0.1", "10.0.0.2"], 2222)
    assert not files.directory.exists()  # all of it in the private dir
    assert stat.S_IMODE(files.private.stat().st_mode) == 0o700
    for path in files.private.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen missing: run scripts/setup")
    for private, public in ((files.user_key, derived.user_public), (files.host_key, derived.host_public)):
        out = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], check=False, capture_output=True,
                             text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[:2] == public.split()[:2]
    known = files.known_hosts.read_text()
    assert known == f"[10.0.0.1]:2222,[10.0.0.2]:2222 {derived.host_public}\n"
    found = subprocess.run(["ssh-keygen", "-F", "[10.0.0.2]:2222", "-f", str(files.known_hosts)],
                           check=False, capture_output=True,
                             text=True, timeout=10)
    assert found.returncode == 0 and derived.host_public.split()[1] in found.stdout


def test_rewriting_keeps_matching_keys_and_replaces_changed_ones(key_files: keys.KeyFiles) -> None:
    files = key_files
    keys.write_key_files(files, keys.derive_keys(SECRET), ["10.0.0.1"], 2222)
    before = files.user_key.read_bytes()
    keys.write_key_files(files, keys.derive_keys(SECRET), ["10.0.0.1"], 2222)
    assert files.user_key.read_bytes() == before  # same key: file untouched
    files.user_key.chmod(0o644)  # loosened permissions are repaired
    keys.write_key_files(files, keys.derive_keys(SECRET), ["10.0.0.1"], 2222)
    assert stat.S_IMODE(files.user_key.stat().st_mode) == 0o600
    other = keys.derive_keys(secrets.token_urlsafe(32))
    keys.write_key_files(files, other, ["10.0.0.1"], 2222)  # new secret: new keys
    assert (files.private / "id_ed25519.pub").read_text().strip() == other.user_public
    assert files.user_key.read_bytes() != before


def test_loose_directory_is_tightened_and_foreign_one_or_a_symlink_refused(tmp_path: Path) -> None:
    directory = tmp_path / "svc"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    keys.ensure_private_dir(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    planted = tmp_path / "planted"  # a key dir path taken by a symlink (to a dir, or to nowhere)
    for target in (directory, tmp_path / "nowhere"):
        planted.symlink_to(target)
        with pytest.raises(ServiceError, match="refusing to keep keys there"):
            keys.ensure_private_dir(planted)
        planted.unlink()
    if os.geteuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 12345, 12345)
    with pytest.raises(ServiceError, match="owned by uid"):
        keys.ensure_private_dir(foreign)


def make_dir(path: Path, mode: int) -> Path:
    path.mkdir(parents=True)
    path.chmod(mode)
    return path


def test_the_key_dir_base_is_xdg_runtime_dir_when_it_is_outside_the_node_root(tmp_path: Path) -> None:
    runtime, shm = make_dir(tmp_path / "run", 0o700), make_dir(tmp_path / "shm", 0o1777)
    root = make_dir(tmp_path / "root", 0o755)
    assert keys.private_base(root, {"XDG_RUNTIME_DIR": str(runtime)}, [shm]) == runtime
    assert keys.private_base(root, {}, [shm]) == shm
    inside = make_dir(root / "run", 0o700)  # e.g. a TMPDIR-like place below the node root: skipped
    assert keys.private_base(root, {"XDG_RUNTIME_DIR": str(inside)}, [inside, shm]) == shm


def test_no_key_dir_base_outside_the_node_root_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    runtime, shm = make_dir(root / "run", 0o700), make_dir(root / "tmp" / "shm", 0o1777)
    with pytest.raises(ServiceError) as info:
        keys.private_base(root, {"XDG_RUNTIME_DIR": str(runtime)}, [shm, tmp_path / "missing", Path("relative")])
    assert info.value.exit_code == 3
    assert f"outside the Batch node root {root}" in info.value.message
    assert info.value.details == (f"{runtime}: inside the node root {root}", f"{shm}: inside the node root {root}",
                                  f"{tmp_path / 'missing'}: unusable (No such file or directory)",
                                  "relative: not an absolute path")


def test_a_key_dir_base_others_could_tamper_with_is_refused(tmp_path: Path) -> None:
    root, plain = tmp_path / "root", tmp_path / "file"
    plain.write_text("")
    open_to_all = make_dir(tmp_path / "open", 0o777)  # not sticky: anyone could rename our key dir away
    cases = {open_to_all: "writable by others and not sticky", plain: "not a directory"}
    if os.geteuid() == 0:
        foreign = make_dir(tmp_path / "foreign", 0o700)
        os.chown(foreign, 12345, 12345)
        cases[foreign] = "owned by uid 12345"
    for base, why in cases.items():
        with pytest.raises(ServiceError) as info:
            keys.private_base(root, {}, [base])
        assert info.value.details == (f"{base}: {why}",)


def test_by_default_keys_go_to_dev_shm_or_tmp() -> None:
    chosen = keys.private_base(Path("/mnt/batch/tasks"), {})
    assert chosen in {Path("/dev/shm").resolve(), Path("/tmp")}


def test_sshd_accepts_the_generated_config(service: sshd.Service) -> None:
    binary = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        pytest.skip("sshd missing: run scripts/setup")
    svc = service
    keys.write_key_files(svc.files, keys.derive_keys(SECRET), ["127.0.0.1"], 2222)
    assert sshd.write_sshd_config(svc) is True
    assert sshd.write_sshd_config(svc) is False  # unchanged: a running sshd would be kept
    if os.geteuid() == 0:  # sshd -t as root wants its privilege separation directory (ensure() makes it too)
        sshd.PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    text = svc.config.read_text()
    for line in ("ListenAddress 127.0.0.1:2222", "UsePAM no", "PasswordAuthentication no", f"AllowUsers {svc.user}",
                 f"AuthorizedKeysFile {svc.files.private}/authorized_keys",
                 f"HostKey {svc.files.private}/ssh_host_ed25519_key"):
        assert line in text.splitlines()
    checked = subprocess.run([binary, "-t", "-f", str(svc.config)], check=False, capture_output=True,
                             text=True, timeout=10)
    assert checked.returncode == 0, checked.stderr


def test_node_dirs_are_short_stable_and_differ_per_node_and_task(tmp_path: Path) -> None:
    def svc(task: str, address: str) -> sshd.Service:
        return sshd.service_for(tmp_path / task, address, 2222, node_root=tmp_path)

    # nodes of one machine that see their task directory at the same path (the emulator's mount namespaces)
    a, b, c = svc("n0/task", "10.0.0.1"), svc("n1/task", "10.0.0.2"), svc("n0/task", "10.0.0.2")
    d = svc("n0/other-task", "10.0.0.1")
    assert len({s.tmp_dir for s in (a, b, c, d)}) == 4 and len(str(a.tmp_dir)) < 40
    assert len({s.files.private for s in (a, b, c, d)}) == 4
    assert svc("n0/task", "10.0.0.1") == a  # stable: coordinate, launch and --stop find the same dirs
    assert a.files.private.name == a.tmp_dir.name + sshd.KEY_DIR_SUFFIX
    assert a.files.private.name.startswith(f"mpl-{os.getuid()}-") and not a.files.private.is_relative_to(tmp_path)
    assert a.files.directory == tmp_path / "n0" / "task" / ".mpilaunch"


def test_the_secret_goes_from_a_process_environment_as_proc_shows_it() -> None:
    code = ("import sys, time\nfrom node_runtime.keys import forget_secret\nforget_secret()\n"
            "import os\nprint('MPILAUNCH_TASK_SECRET' in os.environ, flush=True)\ntime.sleep(30)\n")
    env = {"PATH": os.environ.get("PATH", ""), "BEFORE": "1", "MPILAUNCH_TASK_SECRET": SECRET, "AFTER": "2"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "False"
        shown = Path(f"/proc/{child.pid}/environ").read_bytes()
        assert SECRET.encode() not in shown
        parsed = psutil.Process(child.pid).environ()  # every other variable is intact
        assert parsed["BEFORE"] == "1" and parsed["AFTER"] == "2"
        assert set(parsed.get("MPILAUNCH_TASK_SECRET", "*")) == {"*"}
    finally:
        child.kill()
        child.wait()


def test_ipv6_listen_address_is_bracketed(tmp_path: Path) -> None:
    assert sshd.service_for(tmp_path, "fd00::1", 2222, node_root=tmp_path).listen == "[fd00::1]:2222"


def test_missing_sshd_binary_is_a_clear_error() -> None:
    with pytest.raises(ServiceError, match="sshd not found or not executable: /nonexistent/sshd"):
        sshd.find_sshd("/nonexistent/sshd")
