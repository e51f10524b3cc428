"""``python -m node_runtime`` is ``node-runtime``."""

from node_runtime.cli import entry

entry()
