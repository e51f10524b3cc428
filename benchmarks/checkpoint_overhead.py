"""Checkpointing overhead of node_runtime.checkpoint.run_items, with real ``mpirun -np 3``.

Measures (results printed as Markdown and put into docs/benchmarks.md unless ``--no-write``):
1. throughput of 10k items x ~1 ms on 3 ranks, without checkpointing vs with a local directory (target >= 0.90x) and
   with Azurite (target >= 0.80x);
2. items recomputed after a rank is SIGKILLed at a random point (target <= ranks x batch);
3. time for a re-run to resume when 100k items are already committed (directory and Azurite).

Usage: .venv/bin/python benchmarks/checkpoint_overhead.py [--rounds 3] [--kills 5] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import parser, publish  # noqa: E402

BEGIN, END = "<!-- checkpoint_overhead:begin -->", "<!-- checkpoint_overhead:end -->"
RANKS, ITEMS, ITEM_SECONDS, BATCH = 3, 10_000, 0.001, 64
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_pml": "ob1",
           "OMPI_MCA_btl": "self,vader,tcp", "OMPI_MCA_btl_tcp_if_include": "lo",
           "OMPI_MCA_oob_tcp_if_include": "lo", "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONPATH": str(REPO)}


# ---- the MPI program (run by mpirun with --worker) ----

def worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from node_runtime.checkpoint import Store, open_store, run_items

    rank = MPI.COMM_WORLD.Get_rank()
    log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if args.log else None
    done = 0

    def item(x: int) -> int:
        nonlocal done
        if args.item_seconds:
            time.sleep(args.item_seconds)  # ~1 ms of work that does not compete for the 2 cores
        if log is not None:
            os.write(log, b"%d\n" % x)
        done += 1
        if rank == args.kill_rank and done == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return x * x

    start = time.perf_counter()
    store: Store | Literal[False] = False if args.checkpoint == "none" else open_store(args.checkpoint)
    opened = time.perf_counter() - start
    MPI.COMM_WORLD.Barrier()
    start = time.perf_counter()
    results = run_items({f"item{i:06d}": i for i in range(args.items)}, item, checkpoint=store, batch=args.batch)
    elapsed = time.perf_counter() - start
    if results is not None:
        assert len(results) == args.items
        print(json.dumps({"seconds": elapsed, "open": opened}), flush=True)


# ---- the driver ----

def mpirun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    argv = ["mpirun", "-np", str(RANKS), sys.executable, __file__, "--worker", *args]
    return subprocess.run(argv, env={**os.environ, **MPI_ENV}, capture_output=True, text=True, timeout=timeout,
                          check=False)


OPEN_SECONDS: dict[str, list[float]] = {}


def timed(checkpoint: str, items: int = ITEMS, item_seconds: float = ITEM_SECONDS, batch: int = BATCH) -> float:
    done = mpirun("--checkpoint", checkpoint, "--items", str(items), "--item-seconds", str(item_seconds),
                  "--batch", str(batch))
    if done.returncode != 0:
        raise SystemExit(f"benchmark run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    kind = "none" if checkpoint == "none" else "blob" if checkpoint.startswith("http") else "dir"
    OPEN_SECONDS.setdefault(kind, []).append(doc["open"])
    return float(doc["seconds"])


def start_azurite(tmp: Path) -> tuple[str, subprocess.Popen[str]]:
    """Azurite on a loopback port it picks itself, a container, and a container URL with a SAS."""
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    from tests.support.azurite import ACCOUNT, KEY
    from tests.support.azurite import start_azurite as start_server

    server, proc = start_server(tmp / "azurite")
    BlobServiceClient.from_connection_string(server.connection_string).create_container("bench")
    sas = generate_container_sas(ACCOUNT, "bench", account_key=KEY,
                                 permission=ContainerSasPermissions.from_string("rcdl"),
                                 expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=3))
    return f"{server.blob_endpoint}/bench/{{prefix}}?{sas}", proc


CONFIGS = {"none": ("no checkpointing", BATCH), "dir": ("local directory (fsync)", BATCH),
           "azurite": ("Azurite (blob)", BATCH), "azurite-256": ("Azurite (blob)", 256)}


def throughput(rounds: int, azurite_url: str, tmp: Path) -> list[tuple[str, float, float]]:
    """(configuration, median seconds, ratio to no checkpointing), rounds interleaved to share the noise."""
    runs: dict[str, list[float]] = {k: [] for k in CONFIGS}
    for r in range(rounds):
        runs["none"].append(timed("none"))
        runs["dir"].append(timed(str(tmp / f"dir{r}")))
        runs["azurite"].append(timed(azurite_url.format(prefix=f"tp{r}")))
        runs["azurite-256"].append(timed(azurite_url.format(prefix=f"tq{r}"), batch=256))
    base = statistics.median(runs["none"])
    return [(k, statistics.median(v), base / statistics.median(v)) for k, v in runs.items()]


def put_rate(url: str, count: int = 200) -> float:
    """Sequential puts per second of a 32-result batch object: what bounds commits on a store."""
    import pickle

    from node_runtime.checkpoint import open_store
    from node_runtime.checkpoint.stores import seal

    store = open_store(url)
    data = seal(pickle.dumps([(f"item{i:06d}", i * i) for i in range(BATCH // 2)]))
    start = time.perf_counter()
    for i in range(count):
        store.put(f"rate/{i:06d}", data)
    return count / (time.perf_counter() - start)


def redone_after_kill(trials: int, tmp: Path, batch: int = BATCH) -> list[int]:
    rng = random.Random(42)
    redone = []
    for t in range(trials):
        ckpt, log = tmp / f"kill{t}", tmp / f"kill{t}.log"
        common = ["--checkpoint", str(ckpt), "--items", "3000", "--item-seconds", str(ITEM_SECONDS), "--batch",
                  str(batch), "--log", str(log)]
        first = mpirun(*common, "--kill-rank", str(rng.randrange(RANKS)), "--kill-after", str(rng.randrange(50, 900)))
        if first.returncode == 0:
            raise SystemExit("the kill did not happen")
        second = mpirun(*common)
        if second.returncode != 0:
            raise SystemExit(second.stderr[-3000:])
        lines = log.read_text().split()
        assert set(lines) == {str(i) for i in range(3000)}
        redone.append(len(lines) - 3000)
    return redone


def resume_time(checkpoint: str, items: int = 100_000) -> dict[str, float]:
    """Seconds to commit ``items`` trivial items, then for rank 0 to read back what is committed (``load_committed``,
    the whole of a re-run's start-up cost): after a completed run (one snapshot) and after a killed run (batches)."""
    from node_runtime.checkpoint import load_committed, open_store

    def load(url: str) -> tuple[float, int]:
        start = time.perf_counter()
        found = load_committed(open_store(url), "items")
        elapsed = time.perf_counter() - start
        assert not found.corrupt and found.duplicates == 0
        return elapsed, len(found.results)

    fill = timed(checkpoint.format(prefix="done"), items=items, item_seconds=0)
    after_done, count = load(checkpoint.format(prefix="done"))
    assert count == items
    killed = mpirun("--checkpoint", checkpoint.format(prefix="killed"), "--items", str(items), "--item-seconds", "0",
                    "--kill-rank", "1", "--kill-after", str(items // 5))
    if killed.returncode == 0:
        raise SystemExit("the kill did not happen")
    after_kill, count = load(checkpoint.format(prefix="killed"))
    return {"fill": fill, "done": after_done, "killed": after_kill, "killed_items": count}


def report(rounds: int, tp: list[tuple[str, float, float]], redone: list[int],
           resume: dict[str, dict[str, float]], rates: dict[str, float]) -> str:
    targets = {"dir": 0.90, "azurite": 0.80, "azurite-256": 0.80}
    lines = [
        BEGIN,
        "## Checkpointing overhead (`benchmarks/checkpoint_overhead.py`)",
        "",
        f"`run_items` with {RANKS} ranks (`mpirun -np {RANKS}`, loopback, ob1/tcp), {ITEMS:,} items of ~1 ms "
        f"(`time.sleep(0.001)`, so the 2 cores are not the bottleneck); median of {rounds} interleaved rounds on "
        f"{platform.node()} ({os.cpu_count()} cores, Python {platform.python_version()}, load average "
        f"{os.getloadavg()[0]:.1f} at the end: other work shared the machine), {datetime.date.today().isoformat()}. "
        "Time from the first barrier to the results on rank 0; opening the store happens before it, once per task "
        f"(median {statistics.median(OPEN_SECONDS['dir']) * 1000:.0f} ms for a directory, "
        f"{statistics.median(OPEN_SECONDS['blob']) * 1000:.0f} ms for a blob container, mostly importing the Azure "
        "SDK).",
        "",
        "| configuration | batch | seconds | items/s | vs. none | target |",
        "|---|---|---|---|---|---|",
    ]
    for k, seconds, ratio in tp:
        label, batch = CONFIGS[k]
        target = targets.get(k)
        verdict = "" if target is None else f">= {target:.2f}x — {'meets it' if ratio >= target else 'misses it'}"
        lines.append(f"| {label} | {batch} | {seconds:.2f} | {ITEMS / seconds:,.0f} | {ratio:.3f}x | {verdict} |")
    bound = RANKS * BATCH
    base = tp[0][1]
    lines += [
        "",
        f"Why batch matters on a blob store: results are committed in objects of batch/2, each one request. One "
        f"client reaches {rates['dir']:,.0f} puts/s on the local directory (fsync) and {rates['azurite']:,.0f} "
        f"puts/s on Azurite here; at {ITEMS / base:,.0f} items/s the job needs {ITEMS / base / (BATCH / 2):,.0f} "
        f"puts/s with batch {BATCH} and {ITEMS / base / 128:,.0f} with batch 256. Azurite (one Node.js process on "
        "the same 2 cores) serves puts one after another: as the needed rate nears its rate, commits queue and "
        "the job slows; Azure Blob serves concurrent puts from many clients. Rule: pick batch so that "
        "2 x items/s / batch is well below the store's put rate.",
        "",
        f"Items recomputed after SIGKILL of a random rank at a random point, then a re-run ({len(redone)} seeded "
        f"trials, 3,000 items, batch {BATCH}): {', '.join(map(str, redone))} — max {max(redone)}, target <= ranks x "
        f"batch = {bound}: {'meets it' if max(redone) <= bound else 'misses it'}. Every trial ended with all 3,000 "
        "results, none lost, none committed twice.",
        "",
        f"Resume with 100,000 committed items (trivial items, batch {BATCH}): time for rank 0 to read and verify what "
        "is committed, which is all a re-run adds before dispatching.",
        "",
        "| store | commit 100k items | resume after a completed run (one snapshot) | resume after a killed run "
        "(batches only) |",
        "|---|---|---|---|",
    ]
    names = {"dir": "local directory", "azurite": "Azurite (blob)"}
    for k, r in resume.items():
        lines.append(f"| {names[k]} | {r['fill']:.2f} s | {r['done']:.2f} s (100,000 items) | {r['killed']:.2f} s "
                     f"({r['killed_items']:,.0f} items) |")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default="none")
    p.add_argument("--items", type=int, default=ITEMS)
    p.add_argument("--item-seconds", type=float, default=ITEM_SECONDS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--log", default="")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-after", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kills", type=int, default=5)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from tests.support.azurite import stop_azurite

    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    azurite_url, azurite = start_azurite(tmp)
    try:
        rates = {"dir": put_rate(str(tmp / "rate")), "azurite": put_rate(azurite_url.format(prefix="rate"))}
        tp = throughput(args.rounds, azurite_url, tmp)
        redone = redone_after_kill(args.kills, tmp)
        resume = {"dir": resume_time(str(tmp / "resume-{prefix}")),
                  "azurite": resume_time(azurite_url.format(prefix="r-{prefix}"))}
    finally:
        stop_azurite(azurite)
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(args.rounds, tp, redone, resume, rates)
    publish(text, BEGIN, END, write=not args.no_write)


if __name__ == "__main__":
    main()
