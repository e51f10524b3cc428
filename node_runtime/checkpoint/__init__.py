"""Checkpointed, idempotent mpi4py work that survives Azure Batch retries (see docs/checkpointing.md).

- :func:`run_items`: exactly-once work items with dynamic load balancing and batched durable commits.
- :class:`StepCheckpoints`: all-or-nothing collective step checkpoints for iterative solvers.
- :func:`open_store`: the store a URL (or ``$MPILAUNCH_CHECKPOINT_URL``) names: a directory or an Azure Blob container.

mpi4py and the Azure SDK are imported only when used.
"""

from node_runtime.checkpoint.steps import StepCheckpoints
from node_runtime.checkpoint.stores import ENV_URL, Store, open_store
from node_runtime.checkpoint.workitems import load_committed, run_items

__all__ = ["ENV_URL", "StepCheckpoints", "Store", "load_committed", "open_store", "run_items"]
