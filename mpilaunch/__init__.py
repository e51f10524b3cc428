"""mpilaunch: run mpi4py programs as Azure Batch multi-instance tasks.

Importing this package is cheap on purpose: the Azure SDKs are imported lazily by the modules that need them.
"""

from node_runtime import __version__

__all__ = ["__version__"]
