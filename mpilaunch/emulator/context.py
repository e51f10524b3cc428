"""What the engine's parts share: the store, the node provider, where node roots live, and how to wake the loop."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpilaunch.emulator.nodes.base import Node, NodeProvider
from mpilaunch.emulator.store import Doc, StateStore

log = logging.getLogger("mpilaunch.emulator.engine")


@dataclass
class EngineContext:
    """Shared by :class:`~mpilaunch.emulator.engine.Engine`, its node manager and its task runs."""

    store: StateStore
    provider: NodeProvider
    data_dir: Path
    account: str
    account_url: str
    wake: Callable[[], None]
    stopping: threading.Event = field(default_factory=threading.Event)

    def node_root(self, pool_id: str, node_id: str) -> Path:
        """Host directory of a node's root (``AZ_BATCH_NODE_ROOT_DIR`` as the emulator sees it)."""
        return self.data_dir / "nodes" / pool_id / node_id

    def node_url(self, pool_id: str, node_id: str) -> str:
        return f"{self.account_url.rstrip('/')}/pools/{pool_id}/nodes/{node_id}"

    def task_url(self, job_id: str, task_id: str) -> str:
        return f"{self.account_url.rstrip('/')}/jobs/{job_id}/tasks/{task_id}"

    def update_node(self, pool_id: str, node_id: str, fn: Callable[[Doc], None]) -> Doc | None:
        return self.store.update("node", (pool_id,), node_id, fn)

    @staticmethod
    def node_of(doc: Doc) -> Node | None:
        """The provider's :class:`Node` of a node doc (``None`` while it is still being created)."""
        data: Any = doc.get("_node")
        return Node.from_json(data) if data else None


def wipe(path: Path) -> None:
    """Remove a directory tree if it exists (a fresh task dir for every attempt)."""
    shutil.rmtree(path, ignore_errors=True)
