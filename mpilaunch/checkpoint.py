"""The checkpointed work API for your mpi4py programs: ``from mpilaunch.checkpoint import run_items``.

Work items done exactly once and step checkpoints that survive Batch's retries and requeues (docs/checkpointing.md).
The implementation lives in the node runtime, which every node installs; ``node_runtime.checkpoint`` is the same API
under its older name (an alias kept for programs that use it).
"""

from node_runtime.checkpoint import ENV_URL, StepCheckpoints, Store, load_committed, open_store, run_items
from node_runtime.errors import CheckpointError

__all__ = ["ENV_URL", "CheckpointError", "StepCheckpoints", "Store", "load_committed", "open_store", "run_items"]
