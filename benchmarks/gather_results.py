"""Gather a 100-instance task's results + every instance's stdout/stderr: parallel vs sequential.

What is measured is the client code path of ``mpilaunch results --logs DIR`` (``Launcher.results`` then
``Launcher.download_logs``) through the real azure-batch 15.1 SDK, against a small replay server that answers the
three Batch REST calls involved (Get Task, List Subtasks in pages of 25 with ``odata.nextLink``, Get Node File) in
the documented wire format (shaped after the REST spec's ``Tasks_ListSubTasks`` example), with a fixed per-request
latency standing in for the round trip to a Batch region. The emulator cannot host 100 nodes on a 2-core machine,
and its loopback answers in ~1 ms would hide what parallelism buys against a remote service.

    .venv/bin/python benchmarks/gather_results.py [--instances 100] [--latency-ms 30] [--rounds 3] [--workers 16]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import parser
from mpilaunch.client.api import Launcher, TaskRef
from mpilaunch.client.config import BatchConfig, Settings
from mpilaunch.emulator import defaults

JOB, TASK, POOL = "bench", "gather", "mpi"
PAGE = 25
T0, T1 = "2030-01-01T10:00:00Z", "2030-01-01T10:00:05Z"
LOG = ("x" * 79 + "\n") * 50  # 4 KB per log file


def node(i: int) -> dict[str, Any]:
    nid = f"tvm-{i:04d}"
    return {"affinityId": f"TVM:{nid}", "nodeUrl": f"http://h/pools/{POOL}/nodes/{nid}", "poolId": POOL,
            "nodeId": nid, "taskRootDirectory": f"\\workitems\\{JOB}\\job-1\\{TASK}\\{i}"}


def task_doc() -> dict[str, Any]:
    return {"id": TASK, "url": "http://h/x", "eTag": "0x1", "lastModified": T1, "creationTime": T0,
            "state": "completed", "stateTransitionTime": T1, "commandLine": "node-runtime launch -- true",
            "nodeInfo": node(0), "executionInfo": {"startTime": T0, "endTime": T1, "exitCode": 0, "result": "success",
                                                   "retryCount": 0, "requeueCount": 0}}


def subtask_doc(i: int) -> dict[str, Any]:
    return {"id": i, "startTime": T0, "endTime": T1, "state": "completed", "stateTransitionTime": T1,
            "previousState": "running", "previousStateTransitionTime": T0, "exitCode": 0, "result": "success",
            "nodeInfo": node(i)}


def make_handler(instances: int, latency: float) -> type[BaseHTTPRequestHandler]:
    class Replay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls between header and body writes

        def log_message(self, *args: Any) -> None:
            pass

        def send(self, body: bytes, ctype: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            time.sleep(latency)
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if parts[-1] == "subtasksinfo":
                start = int(parse_qs(url.query).get("$skiptoken", ["1"])[0])
                end = min(start + PAGE, instances)
                doc: dict[str, Any] = {"value": [subtask_doc(i) for i in range(start, end)]}
                if end < instances:
                    doc["odata.nextLink"] = (f"http://{self.headers['Host']}{url.path}?api-version="
                                             f"{defaults.API_VERSION}&$skiptoken={end}")
                self.send(json.dumps(doc).encode(), "application/json")
            elif parts[0] == "jobs":
                self.send(json.dumps(task_doc()).encode(), "application/json")
            elif "files" in parts:
                self.send(LOG.encode(), "application/octet-stream")
            else:
                self.send_error(404)

    return Replay


def gather(launcher: Launcher, workers: int, dest: Path, instances: int) -> float:
    start = time.perf_counter()
    results = launcher.results(TaskRef(JOB, TASK))
    files = launcher.download_logs(results, dest, workers=workers)
    elapsed = time.perf_counter() - start
    assert len(results.instances) == instances and len(files) == 2 * instances, (len(results.instances), len(files))
    return elapsed


def main() -> None:
    ap = parser(__doc__, writes=False)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=16)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(args.instances, args.latency_ms / 1000))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    launcher = Launcher(Settings(BatchConfig(endpoint, defaults.ACCOUNT, defaults.KEY), None, POOL))
    timings: dict[str, list[float]] = {"sequential": [], "parallel": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                timings["sequential"].append(gather(launcher, 1, Path(tmp) / f"s{r}", args.instances))
                timings["parallel"].append(gather(launcher, args.workers, Path(tmp) / f"p{r}", args.instances))
    finally:
        server.shutdown()
    seq, par = statistics.median(timings["sequential"]), statistics.median(timings["parallel"])
    print(f"{args.instances} instances, {2 * args.instances} log files, {args.latency_ms:g} ms per request, "
          f"median of {args.rounds}:")
    print(f"  sequential (1 worker):     {seq:.2f} s")
    print(f"  parallel ({args.workers} workers):     {par:.2f} s")
    print(f"  speed-up: {seq / par:.1f}x (target >= 4x: {'meets it' if seq / par >= 4 else 'MISSES it'})")


if __name__ == "__main__":
    main()
