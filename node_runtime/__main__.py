"""``python -m node_runtime`` is ``node-runtime``."""

import sys

from node_runtime.cli import main

sys.exit(main())
