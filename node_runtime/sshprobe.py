"""An in-process SSH client handshake, to verify a coordination service without spawning ``ssh``.

It does what ``ssh`` would up to a successful login, and no more (RFC 4253, 5656, 8731, 8709, 4252):
version exchange; KEXINIT (curve25519-sha256, ssh-ed25519, aes128-ctr, hmac-sha2-256, no compression); the
key exchange; the server's host key must EQUAL the pinned one and its signature over the exchange hash must verify;
NEWKEYS; then, encrypted, the ``ssh-userauth`` service and a signed ``publickey`` login with the task's user key,
which the server must accept (USERAUTH_SUCCESS). It then disconnects.

Why not ``ssh``: each OpenSSH connection here stalls on TCP delayed ACKs (~40 ms, two to three times). This socket
sets TCP_NODELAY and re-arms TCP_QUICKACK after every read, so the same handshake takes a few milliseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from node_runtime.errors import ServiceError

VERSION = b"SSH-2.0-mpilaunch_probe"
KEX = b"curve25519-sha256,curve25519-sha256@libssh.org"
HOST_KEY_ALG, CIPHER, MAC = b"ssh-ed25519", b"aes128-ctr", b"hmac-sha2-256"
MSG_DISCONNECT, MSG_IGNORE, MSG_DEBUG, MSG_SERVICE_REQUEST, MSG_SERVICE_ACCEPT = 1, 2, 4, 5, 6
MSG_EXT_INFO, MSG_KEXINIT, MSG_NEWKEYS, MSG_KEX_ECDH_INIT, MSG_KEX_ECDH_REPLY = 7, 20, 21, 30, 31
MSG_USERAUTH_REQUEST, MSG_USERAUTH_FAILURE, MSG_USERAUTH_SUCCESS, MSG_USERAUTH_BANNER = 50, 51, 52, 53
MSG_GLOBAL_REQUEST = 80
SKIPPED = (MSG_IGNORE, MSG_DEBUG, MSG_EXT_INFO, MSG_USERAUTH_BANNER, MSG_GLOBAL_REQUEST)  # OpenSSH's: no reply wanted
MAX_PACKET = 256 * 1024


def string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def mpint(value: bytes) -> bytes:
    """An unsigned big-endian integer as an SSH mpint (leading zeros stripped, a zero byte if the top bit is set)."""
    value = value.lstrip(b"\0")
    return string(b"\0" + value if value and value[0] & 0x80 else value)


def ed25519_blob(key: Ed25519PublicKey) -> bytes:
    return string(HOST_KEY_ALG) + string(key.public_bytes_raw())


class Reader:
    """Consumes SSH wire types from one message payload."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ServiceError("truncated SSH message from the server")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def string(self) -> bytes:
        (n,) = struct.unpack(">I", self.take(4))
        return self.take(n)


@dataclass
class _Direction:
    """One direction's packet protection: none until NEWKEYS, then aes128-ctr + hmac-sha2-256."""

    seq: int = 0
    cipher: object | None = None  # a cryptography CipherContext (its type is not public)
    mac_key: bytes = b""

    @property
    def block(self) -> int:
        return 16 if self.cipher else 8

    def crypt(self, data: bytes) -> bytes:
        return self.cipher.update(data) if self.cipher else data  # type: ignore[attr-defined]

    def mac(self, packet: bytes) -> bytes:
        return hmac.new(self.mac_key, struct.pack(">I", self.seq) + packet, hashlib.sha256).digest()


class Connection:
    """An SSH transport over a TCP socket with NODELAY and QUICKACK (no delayed-ACK stalls)."""

    def __init__(self, address: str, port: int, deadline: float) -> None:
        self.deadline = deadline
        try:
            self.sock = socket.create_connection((address, port), timeout=self._remaining())
        except OSError as exc:
            raise ServiceError(f"cannot connect to {address} port {port}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.out, self.inc = _Direction(), _Direction()

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ServiceError("the SSH handshake timed out")
        return remaining

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.settimeout(self._remaining())
            self.sock.sendall(data)
        except OSError as exc:
            raise ServiceError(f"the server closed the connection: {exc}") from exc

    def recv_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            try:
                self.sock.settimeout(self._remaining())
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)  # re-armed: it does not stick
                chunk = self.sock.recv(65536)
            except TimeoutError as exc:
                raise ServiceError("the SSH handshake timed out") from exc
            except OSError as exc:
                raise ServiceError(f"the server closed the connection: {exc}") from exc
            if not chunk:
                raise ServiceError("the server closed the connection during the SSH handshake")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def recv_line(self) -> bytes:
        """The server's identification line (RFC 4253 4.2: other lines may come first)."""
        for _ in range(16):
            line = b""
            while not line.endswith(b"\n"):
                line += self.recv_exact(1)
                if len(line) > 255:
                    raise ServiceError("the peer is not an SSH server (no identification line)")
            if line.startswith(b"SSH-"):
                return line.rstrip(b"\r\n")
        raise ServiceError("the peer is not an SSH server (no identification line)")

    def send(self, payload: bytes) -> None:
        block = self.out.block
        pad = block - (5 + len(payload)) % block
        pad += block if pad < 4 else 0
        packet = struct.pack(">IB", 1 + len(payload) + pad, pad) + payload + os.urandom(pad)
        mac = self.out.mac(packet) if self.out.cipher else b""
        self.send_raw(self.out.crypt(packet) + mac)
        self.out.seq = (self.out.seq + 1) & 0xFFFFFFFF

    def recv(self) -> bytes:
        """The next payload that is not IGNORE/DEBUG/EXT_INFO/BANNER; DISCONNECT becomes a ServiceError."""
        while True:
            block = self.inc.block
            first = self.inc.crypt(self.recv_exact(block))
            (length,) = struct.unpack(">I", first[:4])
            if length < 5 or length > MAX_PACKET or (length + 4) % block:
                raise ServiceError("the peer is not an SSH server (bad packet framing)")
            packet = first + self.inc.crypt(self.recv_exact(length + 4 - block))
            if self.inc.cipher and not hmac.compare_digest(self.recv_exact(32), self.inc.mac(packet)):
                raise ServiceError("SSH packet authentication failed")
            self.inc.seq = (self.inc.seq + 1) & 0xFFFFFFFF
            payload = packet[5:4 + length - packet[4]]
            if not payload:
                raise ServiceError("empty SSH packet from the server")
            if payload[0] == MSG_DISCONNECT:
                reader = Reader(payload[5:])
                raise ServiceError(f"the server disconnected: {reader.string().decode(errors='replace')}")
            if payload[0] not in SKIPPED:
                return payload

    def expect(self, kind: int, step: str) -> Reader:
        payload = self.recv()
        if payload[0] != kind:
            raise ServiceError(f"unexpected SSH message {payload[0]} from the server during {step}")
        return Reader(payload[1:])


def _kexinit() -> bytes:
    lists = [KEX, HOST_KEY_ALG, CIPHER, CIPHER, MAC, MAC, b"none", b"none", b"", b""]
    return bytes([MSG_KEXINIT]) + os.urandom(16) + b"".join(string(x) for x in lists) + b"\0" + b"\0\0\0\0"


def _negotiated(server_kexinit: bytes) -> bytes:
    """The kex method both sides pick; fails unless the server offers everything we need."""
    reader = Reader(server_kexinit[17:])
    offered = [reader.string().split(b",") for _ in range(8)]
    ours = [KEX.split(b","), [HOST_KEY_ALG], [CIPHER], [CIPHER], [MAC], [MAC], [b"none"], [b"none"]]
    picks = [next((a for a in want if a in have), None) for want, have in zip(ours, offered, strict=True)]
    if None in picks:
        raise ServiceError("the SSH server offers none of the task's algorithms (curve25519, ssh-ed25519, "
                         "aes128-ctr, hmac-sha2-256)")
    return picks[0]  # type: ignore[return-value]


def probe(address: str, port: int, *, host_key: Ed25519PublicKey, user_key: Ed25519PrivateKey, user: str,
          timeout: float = 10.0) -> None:
    """Log in to the SSH server on ``address``:``port`` as ``user`` with ``user_key``, requiring its host key to be
    ``host_key``, then disconnect; raises :class:`ServiceError` naming the step that failed."""
    conn = Connection(address, port, time.monotonic() + timeout)
    try:
        shared, h = _key_exchange(conn, host_key)

        def key(letter: bytes, size: int) -> bytes:
            return hashlib.sha256(shared + h + letter + h).digest()[:size]

        def aes(iv: bytes, k: bytes) -> object:
            return Cipher(algorithms.AES(k), modes.CTR(iv)).encryptor()

        conn.out = _Direction(conn.out.seq, aes(key(b"A", 16), key(b"C", 16)), key(b"E", 32))
        conn.inc = _Direction(conn.inc.seq, aes(key(b"B", 16), key(b"D", 16)), key(b"F", 32))
        _login(conn, h, user, user_key)
        conn.send(bytes([MSG_DISCONNECT]) + struct.pack(">I", 11) + string(b"verified") + string(b""))
    finally:
        conn.close()


def _key_exchange(conn: Connection, host_key: Ed25519PublicKey) -> tuple[bytes, bytes]:
    """Versions, KEXINITs, curve25519-sha256 with the pinned host key, NEWKEYS; returns (K as mpint, H)."""
    client_kexinit = _kexinit()
    conn.send_raw(VERSION + b"\r\n")
    server_version = conn.recv_line()
    if not server_version.startswith(b"SSH-2.0-"):
        raise ServiceError(f"unsupported SSH version {server_version[:40]!r}")
    conn.send(client_kexinit)
    server_kexinit = conn.recv()
    if server_kexinit[0] != MSG_KEXINIT:
        raise ServiceError(f"unexpected SSH message {server_kexinit[0]} instead of KEXINIT")
    _negotiated(server_kexinit)
    ephemeral = X25519PrivateKey.generate()
    q_c = ephemeral.public_key().public_bytes_raw()
    conn.send(bytes([MSG_KEX_ECDH_INIT]) + string(q_c))
    reply = conn.expect(MSG_KEX_ECDH_REPLY, "the key exchange")
    k_s, q_s, signature = reply.string(), reply.string(), reply.string()
    if k_s != ed25519_blob(host_key):
        raise ServiceError("the SSH server's host key is not the task's host key")
    try:
        shared = mpint(ephemeral.exchange(X25519PublicKey.from_public_bytes(q_s)))
    except ValueError as exc:
        raise ServiceError(f"invalid key exchange value from the SSH server: {exc}") from exc
    h = hashlib.sha256(string(VERSION) + string(server_version) + string(client_kexinit) + string(server_kexinit)
                       + string(k_s) + string(q_c) + string(q_s) + shared).digest()
    sig = Reader(signature)
    if sig.string() != HOST_KEY_ALG:
        raise ServiceError("the SSH server signed the exchange with another algorithm than ssh-ed25519")
    try:
        host_key.verify(sig.string(), h)
    except InvalidSignature as exc:
        raise ServiceError("the SSH server's signature over the key exchange does not verify") from exc
    conn.send(bytes([MSG_NEWKEYS]))
    conn.expect(MSG_NEWKEYS, "the key exchange")
    return shared, h


def _login(conn: Connection, session_id: bytes, user: str, user_key: Ed25519PrivateKey) -> None:
    """The ``ssh-userauth`` service, then a signed ``publickey`` login the server must accept."""
    conn.send(bytes([MSG_SERVICE_REQUEST]) + string(b"ssh-userauth"))
    conn.expect(MSG_SERVICE_ACCEPT, "the service request")
    request = (bytes([MSG_USERAUTH_REQUEST]) + string(user.encode()) + string(b"ssh-connection")
               + string(b"publickey") + b"\1" + string(HOST_KEY_ALG) + string(ed25519_blob(user_key.public_key())))
    signed = user_key.sign(string(session_id) + request)
    conn.send(request + string(string(HOST_KEY_ALG) + string(signed)))
    answer = conn.recv()
    if answer[0] != MSG_USERAUTH_SUCCESS:
        raise ServiceError(f"the SSH server does not accept the task's user key for {user}"
                           if answer[0] == MSG_USERAUTH_FAILURE else
                           f"unexpected SSH message {answer[0]} in answer to the login")
