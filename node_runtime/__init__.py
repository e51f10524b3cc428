"""node-runtime: what runs on each Azure Batch compute node of an mpilaunch multi-instance task.

The lowest layer: it imports nothing from ``mpilaunch`` (an import-linter contract checks it), and defines what the
client and the nodes must agree on (:mod:`node_runtime.contract`). A node install needs only the standard library,
psutil and cryptography (mpi4py and azure-storage-blob for checkpointing), plus OpenSSH, flock and an MPI.
"""

__version__ = "0.1.0"
"""The version of the whole distribution (``pyproject.toml`` reads it from here); the client and the nodes must
run the same one (``node-runtime coordinate`` checks)."""
