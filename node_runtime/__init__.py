"""node-runtime: what runs on each Azure Batch compute node of an mpilaunch multi-instance task.

The lowest layer: it imports nothing from ``mpilaunch`` (an import-linter contract checks it), and defines what the
client and the nodes must agree on (:mod:`node_runtime.contract`). A node install (``pip install mpilaunch``) needs
psutil and cryptography (``[checkpoint]`` adds mpi4py and azure-storage-blob), plus OpenSSH's ssh and sshd, flock and
an MPI; ``install-runtime.sh`` installs them on Batch's Ubuntu images.
"""

__version__ = "0.1.0"
"""The version of the whole distribution (``pyproject.toml`` reads it from here); the client and the nodes must
run the same one (``node-runtime coordinate`` checks)."""
