"""Run an example unchanged, except that ``run_items`` never returns: after its last commit every rank holds until
killed. A job of it cannot finish (nor write its results file) before a test's polled kill trigger fires, however
loaded the machine is.

    mpirun -np 3 python held_example.py sweep ARGS...   # examples/sweep.py ARGS..., held at its end
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path
from typing import Any

import node_runtime.checkpoint as checkpoint

real_run_items = checkpoint.run_items


def held_run_items(*args: Any, **kwargs: Any) -> Any:
    real_run_items(*args, **kwargs)
    time.sleep(3600)  # wait to be killed


if __name__ == "__main__":
    checkpoint.run_items = held_run_items  # the example's `from node_runtime.checkpoint import run_items` sees it
    example = Path(__file__).resolve().parents[3] / "examples" / f"{sys.argv[1]}.py"
    sys.argv = [str(example), *sys.argv[2:]]
    runpy.run_path(str(example), run_name="__main__")
