"""Checkpointed parameter sweep: a damped, driven pendulum over a grid of (damping, drive amplitude).

Every grid point is one work item. Results are committed in batches to the checkpoint location, so when Azure Batch
kills the task and runs it again (maybe on other nodes), finished points are not recomputed and none is lost.

    mpirun -np 3 python examples/sweep.py --checkpoint /shared/ckpt --out pendulum.json
    mpilaunch run -n 2 --retries 2 --checkpoint-url 'https://ACCOUNT.blob.core.windows.net/ckpt/sweep?SAS' \
        -i examples/sweep.py --collect pendulum.json -- python3 sweep.py --out pendulum.json

Without ``--checkpoint`` the location comes from ``$MPILAUNCH_CHECKPOINT_URL`` (``mpilaunch run --checkpoint-url``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mpilaunch.checkpoint import run_items

Point = tuple[float, float, int]  # (damping, drive amplitude, integration steps)


def simulate(point: Point) -> dict[str, float]:
    """Integrate theta'' = -q theta' - sin(theta) + a cos(2/3 t) with RK4; summarise the trajectory."""
    q, a, steps = point
    dt = 0.05

    def accel(t: float, theta: float, omega: float) -> float:
        return -q * omega - math.sin(theta) + a * math.cos(2.0 / 3.0 * t)

    t, theta, omega = 0.0, 0.2, 0.0
    peak = 0.0
    for _ in range(steps):
        k1t, k1o = omega, accel(t, theta, omega)
        k2t, k2o = omega + dt / 2 * k1o, accel(t + dt / 2, theta + dt / 2 * k1t, omega + dt / 2 * k1o)
        k3t, k3o = omega + dt / 2 * k2o, accel(t + dt / 2, theta + dt / 2 * k2t, omega + dt / 2 * k2o)
        k4t, k4o = omega + dt * k3o, accel(t + dt, theta + dt * k3t, omega + dt * k3o)
        theta += dt / 6 * (k1t + 2 * k2t + 2 * k3t + k4t)
        omega += dt / 6 * (k1o + 2 * k2o + 2 * k3o + k4o)
        t += dt
        peak = max(peak, abs(omega))
    return {"damping": q, "drive": a, "final_angle": theta, "peak_speed": peak}


def grid(n: int, steps: int) -> dict[str, Point]:
    """n x n points; the key names the point, so results stay attached to it across re-runs."""
    return {f"q{i:03d}-a{j:03d}": (0.1 + 0.9 * i / max(1, n - 1), 0.5 + 1.0 * j / max(1, n - 1), steps)
            for i in range(n) for j in range(n)}


def write_json(path: Path, doc: object) -> None:
    """Write-then-rename, so a killed run never leaves a half-written results file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=24, help="points per axis (default 24: 576 items)")
    parser.add_argument("--steps", type=int, default=2000, help="RK4 steps per point")
    parser.add_argument("--checkpoint", default=None, help="directory or blob container URL "
                        "(default: $MPILAUNCH_CHECKPOINT_URL)")
    parser.add_argument("--batch", type=int, default=32, help="results per commit")
    parser.add_argument("--out", type=Path, default=Path("pendulum.json"))
    args = parser.parse_args()

    results = run_items(grid(args.grid, args.steps), simulate, checkpoint=args.checkpoint, name="pendulum",
                        batch=args.batch)
    if results is not None:  # rank 0
        write_json(args.out, results)
        chaotic = sum(1 for r in results.values() if r["peak_speed"] > 2.5)
        print(f"{len(results)} points, {chaotic} with peak speed > 2.5; results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
