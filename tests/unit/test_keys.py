"""Derived task keys and the coordination service's files: deterministic, per-secret, private, valid for OpenSSH."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from node_runtime import keys, sshd
from node_runtime.errors import InvalidEnvironment, ServiceError

SECRET = secrets.token_urlsafe(32)


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


def test_files_are_private_and_openssh_reads_them(tmp_path: Path) -> None:
    files = keys.KeyFiles.under(tmp_path)
    derived = keys.derive_keys(SECRET)
    keys.write_key_files(files, derived, ["10.0.0.1", "10.0.0.2"], 2222)
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    for path in files.directory.iterdir():
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


def test_rewriting_keeps_matching_keys_and_replaces_changed_ones(tmp_path: Path) -> None:
    files = keys.KeyFiles.under(tmp_path)
    keys.write_key_files(files, keys.derive_keys(SECRET), ["10.0.0.1"], 2222)
    before = files.user_key.read_bytes()
    keys.write_key_files(files, keys.derive_keys(SECRET), ["10.0.0.1"], 2222)
    assert files.user_key.read_bytes() == before  # same key: file untouched
    files.user_key.chmod(0o644)  # loosened permissions are repaired
    keys.write_key_files(files, keys.derive_keys(SECRET), ["10.0.0.1"], 2222)
    assert stat.S_IMODE(files.user_key.stat().st_mode) == 0o600
    other = keys.derive_keys(secrets.token_urlsafe(32))
    keys.write_key_files(files, other, ["10.0.0.1"], 2222)  # new secret: new keys
    assert (files.directory / "id_ed25519.pub").read_text().strip() == other.user_public
    assert files.user_key.read_bytes() != before


def test_loose_directory_is_tightened_and_foreign_one_refused(tmp_path: Path) -> None:
    directory = tmp_path / "svc"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    keys.ensure_private_dir(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    if os.geteuid() != 0:
        pytest.skip("changing a directory's owner needs root")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 12345, 12345)
    with pytest.raises(ServiceError, match="owned by uid"):
        keys.ensure_private_dir(foreign)


def test_sshd_accepts_the_generated_config(tmp_path: Path) -> None:
    binary = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        pytest.skip("sshd missing: run scripts/setup")
    svc = sshd.service_for(tmp_path, "127.0.0.1", 2222)
    keys.write_key_files(svc.files, keys.derive_keys(SECRET), ["127.0.0.1"], 2222)
    assert sshd.write_sshd_config(svc) is True
    assert sshd.write_sshd_config(svc) is False  # unchanged: a running sshd would be kept
    if os.geteuid() == 0:  # sshd -t as root wants its privilege separation directory (ensure() makes it too)
        sshd.PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    text = svc.config.read_text()
    for line in ("ListenAddress 127.0.0.1:2222", "UsePAM no", "PasswordAuthentication no",
                 f"AuthorizedKeysFile {svc.files.authorized_keys}", f"AllowUsers {svc.user}"):
        assert line in text.splitlines()
    checked = subprocess.run([binary, "-t", "-f", str(svc.config)], check=False, capture_output=True,
                             text=True, timeout=10)
    assert checked.returncode == 0, checked.stderr


def test_node_tmp_dir_is_short_and_differs_per_node(tmp_path: Path) -> None:
    a = sshd.service_for(tmp_path / "n0" / "task", "10.0.0.1", 2222)
    b = sshd.service_for(tmp_path / "n1" / "task", "10.0.0.2", 2222)
    # nodes of one machine that see their task directory at the same path (the emulator's mount namespaces)
    c = sshd.service_for(tmp_path / "n0" / "task", "10.0.0.2", 2222)
    assert len({a.tmp_dir, b.tmp_dir, c.tmp_dir}) == 3 and len(str(a.tmp_dir)) < 40
    assert sshd.service_for(tmp_path / "n0" / "task", "10.0.0.1", 2222).tmp_dir == a.tmp_dir  # stable


def test_ipv6_listen_address_is_bracketed(tmp_path: Path) -> None:
    assert sshd.service_for(tmp_path, "fd00::1", 2222).listen == "[fd00::1]:2222"


def test_missing_sshd_binary_is_a_clear_error() -> None:
    with pytest.raises(ServiceError, match="sshd not found or not executable: /nonexistent/sshd"):
        sshd.find_sshd("/nonexistent/sshd")
