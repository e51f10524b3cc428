"""Load: 1000 task adds (500 single, 500 in collections of 100) while 50 readers poll, through the real SDK.
Zero errors allowed; latency percentiles are printed (run with -s to see them), not asserted."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from azure.batch import models as m

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def percentiles(samples: list[float]) -> str:
    qs = statistics.quantiles(samples, n=100)
    return (f"n={len(samples)} p50={qs[49] * 1000:.1f}ms p95={qs[94] * 1000:.1f}ms p99={qs[98] * 1000:.1f}ms "
            f"max={max(samples) * 1000:.1f}ms")


def test_1000_adds_with_50_concurrent_readers(emulator):
    job = f"load-{uuid.uuid4().hex[:8]}"
    setup = emulator.client()
    setup.create_job(m.BatchJobCreateOptions(id=job, pool_info=m.BatchPoolInfo(pool_id=f"{job}-nopool")))
    setup.create_task(job, m.BatchTaskCreateOptions(id="seed", command_line="true"))
    errors: list[BaseException] = []
    adds: list[float] = []
    collections: list[float] = []
    reads: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def timed(bucket: list[float], call) -> None:
        start = time.perf_counter()
        try:
            call()
        except BaseException as exc:  # every failure counts
            with lock:
                errors.append(exc)
            return
        with lock:
            bucket.append(time.perf_counter() - start)

    def writer(worker: int) -> None:
        client = emulator.client()
        for i in range(50):
            timed(adds, lambda i=i: client.create_task(
                job, m.BatchTaskCreateOptions(id=f"s{worker}-{i}", command_line="true")))

    def collection(batch: int) -> None:
        client = emulator.client()

        def add() -> None:
            result = client.create_task_collection(job, m.BatchTaskGroup(task_values=[
                m.BatchTaskCreateOptions(id=f"c{batch}-{i}", command_line="true") for i in range(100)]))
            bad = [r for r in result.result_values if r.status != m.BatchTaskAddStatus.SUCCESS]
            assert not bad, bad

        timed(collections, add)

    def reader(n: int) -> None:
        client = emulator.client()
        while not done.is_set():
            if n % 5 == 0:
                timed(reads, lambda: list(client.list_tasks(job, max_results=200)))
            else:
                timed(reads, lambda: client.get_task(job, "seed"))

    readers = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(50)]
    for t in readers:
        t.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=15) as pool:
        futures = [pool.submit(writer, w) for w in range(10)] + [pool.submit(collection, b) for b in range(5)]
        for f in futures:
            f.result()
    wall = time.perf_counter() - start
    done.set()
    for t in readers:
        t.join(60)
    assert not errors, errors[:3]
    ids = {t.id for t in setup.list_tasks(job)}
    assert len(ids) == 1001
    print(f"\n1000 adds in {wall:.1f}s with 50 readers")
    print(f"  single add:          {percentiles(adds)}")
    print(f"  collection of 100:   {percentiles(collections)}")
    print(f"  reads (get/list):    {percentiles(reads)}")
    assert len(adds) == 500 and len(collections) == 5
    setup.begin_delete_job(job, polling_interval=0)  # leave the shared emulator's scheduler nothing to scan


def test_1000_tasks_50_concurrent_list_readers(wire_emulator):
    """50 readers list a job of 1,000 tasks (one page of 1,000 each time) while a writer updates a task every
    100 ms: zero errors; the percentiles are printed (benchmarks/emulator_wire.py records them against the target)."""
    import base64
    import http.client
    import json
    from email.utils import formatdate
    from urllib.parse import urlsplit

    from mpilaunch.emulator import defaults
    from mpilaunch.emulator.auth import sign, string_to_sign

    def signed(method: str, path: str, query: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"ocp-date": formatdate(usegmt=True), **(extra or {})}
        text = string_to_sign(method, path, query, headers, defaults.ACCOUNT)
        return {**headers, "authorization": f"SharedKey {defaults.ACCOUNT}:"
                                            f"{sign(base64.b64decode(defaults.KEY), text)}"}

    job = f"lists-{uuid.uuid4().hex[:8]}"
    client = wire_emulator.client()
    client.create_job(m.BatchJobCreateOptions(id=job, pool_info=m.BatchPoolInfo(pool_id="nopool")))
    for b in range(10):
        client.create_task_collection(job, m.BatchTaskGroup(task_values=[
            m.BatchTaskCreateOptions(id=f"t{b}-{i}", command_line="true") for i in range(100)]))
    host, port = urlsplit(wire_emulator.endpoint).netloc.split(":")
    path, query = f"/jobs/{job}/tasks", "api-version=2025-06-01"
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def reader() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        for i in range(10):
            start = time.perf_counter()
            try:
                conn.request("GET", f"{path}?{query}", headers=signed("GET", path, query))
                resp = conn.getresponse()
                data = resp.read()
                took = time.perf_counter() - start  # the client's parsing (below, once) is not the server's time
                assert resp.status == 200, (resp.status, data[:300])
                assert i or len(json.loads(data)["value"]) == 1000
            except Exception as exc:  # every failure counts, a timeout too
                with lock:
                    errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                continue
            with lock:
                lat.append(took)
        conn.close()

    def writer() -> None:
        n = 0
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        while not done.wait(0.1):
            wpath = f"/jobs/{job}/tasks/t0-{n % 100}"
            body = json.dumps({"constraints": {"maxTaskRetryCount": n % 3}}).encode()
            conn.request("PUT", f"{wpath}?{query}", body=body, headers=signed(
                "PUT", wpath, query, {"content-length": str(len(body)), "content-type": "application/json"}))
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                with lock:
                    errors.append(f"update: {resp.status}")
            n += 1
        conn.close()

    readers = [threading.Thread(target=reader) for _ in range(50)]
    wthread = threading.Thread(target=writer)
    wthread.start()
    for t in readers:
        t.start()
    for t in readers:
        t.join(240)
    done.set()
    wthread.join(60)
    assert not errors, errors[:3]
    assert len(lat) == 500
    print(f"\n50 readers x 10 lists of 1000 tasks: {percentiles(lat)}")
    client.begin_delete_job(job, polling_interval=0)
