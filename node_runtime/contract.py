"""What the client and the nodes agree on, defined once, here on the node side; the client builds from it.

The variables the client puts in a task's environment, the default coordination port, the MPI flavors, the fabric
choices, the coordination and launch command lines, and the runtime version every node must share with the client.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Sequence

from node_runtime import __version__

RUNTIME_VERSION = __version__
PROGRAM = "node-runtime"
DEFAULT_SSH_PORT = 2222

NODE_COUNT_VARIABLE = "AZ_BATCH_NODE_COUNT"  # Azure does not set it; the client does, the runtime cross-checks
SECRET_VARIABLE = "MPILAUNCH_TASK_SECRET"  # noqa: S105 (a variable name, not a secret)
SSH_PORT_VARIABLE = "MPILAUNCH_SSH_PORT"
EXPORT_VARIABLE = "MPILAUNCH_EXPORT_ENV"
CHECKPOINT_VARIABLE = "MPILAUNCH_CHECKPOINT_URL"
VERSION_VARIABLE = "MPILAUNCH_RUNTIME_VERSION"
NODE_ADDRESS_VARIABLE = "MPILAUNCH_NODE_ADDRESS"  # set by the emulator only (several nodes on one machine)


class MpiFlavor(str, enum.Enum):
    """The MPI implementations whose ``mpirun`` we drive (``str()`` is the value, as ``enum.StrEnum`` of 3.11)."""

    OPENMPI = "openmpi"
    MPICH = "mpich"
    INTELMPI = "intelmpi"

    def __str__(self) -> str:
        return str(self.value)


FLAVORS = tuple(f.value for f in MpiFlavor)
FABRICS = ("auto", "ucx", "tcp")  # launch --fabric: auto picks UCX over InfiniBand when every node has it, else TCP
DEFAULT_FABRIC = "auto"
COORDINATION_COMMAND_LINE = shlex.join([PROGRAM, "coordinate"])


def launch_command_line(argv: Sequence[str], *, ppn: int | None = None, mpi: str | None = None,
                        fabric: str = DEFAULT_FABRIC, threads_per_rank: int | None = None) -> str:
    """The primary's command line; ``shlex.split`` of it gives back ``node-runtime launch ... -- *argv``."""
    options: list[str] = []
    if ppn is not None:
        options += ["--ppn", str(ppn)]
    if threads_per_rank is not None:
        options += ["--threads-per-rank", str(threads_per_rank)]
    if mpi is not None:
        options += ["--mpi", MpiFlavor(mpi).value]
    if fabric != DEFAULT_FABRIC:
        if fabric not in FABRICS:
            raise ValueError(f"fabric {fabric!r} is not one of {', '.join(FABRICS)}")
        options += ["--fabric", fabric]
    return shlex.join([PROGRAM, "launch", *options, "--", *argv])
