"""Well-known development credentials and port of the emulator, documented like Azurite's, and how a pool asks it
for VM-like nodes.

They are public on purpose: anyone who can reach the port can use them, so the emulator listens on 127.0.0.1 unless
told otherwise. Pass ``--account``/``--key`` to ``mpilaunch emulator serve`` for anything else.
"""

from __future__ import annotations

ACCOUNT = "devbatchaccount1"
"""Default account name (the first path-less segment of the string-to-sign, like ``devstoreaccount1`` in Azurite)."""

KEY = "uySxevn+YW5+JSiPU2nW6pyLDSt/zFmSd2XrjXTbhp+dmS80VM1bpJuJJFBJ2cou09wUuvzkKfJ6ABJ4ctlDtA=="
"""Default account key (base64 of 64 bytes, like a real Batch key)."""

HOST = "127.0.0.1"
PORT = 10100
"""Default TCP port (Azurite uses 10000-10002)."""

API_VERSION = "2025-06-01"
"""The REST api-version whose spec the emulator follows."""

KIND_METADATA = "mpilaunch-emulator-nodes"
"""The pool metadata name the emulator reads (Batch gives metadata no meaning): :data:`KIND_VM` asks for VM-like nodes
for a pool without a containerConfiguration (see ``mpilaunch.emulator.nodes.vm``)."""
KIND_VM = "vm"

VM_IMAGE = "mpilaunch-vm:bookworm"
"""Default image of VM-like nodes, built by ``scripts/build-vm-image`` (``emulator serve --vm-image``)."""
VM_IMAGE_VARIABLE = "MPILAUNCH_VM_IMAGE"
"""Environment variable naming the image of VM-like nodes (for ``serve`` and ``scripts/build-vm-image``)."""


def endpoint(host: str = HOST, port: int = PORT) -> str:
    """The account URL clients pass to ``BatchClient`` (no account name in the path, as in Azure)."""
    return f"http://{host}:{port}"
