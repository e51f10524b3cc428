"""Node and task files on the wire, with the unmodified azure-batch SDK: byte ranges (``ocp-range``, HTTP's
``Range``), HEAD's whole length, and files that change under a request (concurrent deletes, bad paths): Batch
errors, never 500."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from azure.batch import models as m
from azure.core.exceptions import HttpResponseError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.exec_sdk import Batch, completed

pytestmark = pytest.mark.timeout(240)

TREES = 4
PREPARE = (
    "printf 0123456789 > digits.txt; : > empty.txt; ln -s loop loop; ln -s /etc etc-link; mkdir real; "
    "ln -s real real-link; echo kept > real/kept.txt; "
    f"for t in $(seq 1 {TREES}); do for d in a b c d; do mkdir -p tree$t/$d; "
    "for i in $(seq 1 40); do echo $i > tree$t/$d/f$i; done; done; done"
)


@pytest.fixture(scope="module")
def node_files(emulator: Any) -> Iterator[tuple[Any, str, str, str, str]]:
    """(client, pool, node, task root, job) of a completed task whose working directory holds the files above."""
    client = emulator.client()
    session = Batch(client)
    try:
        pool = session.pool(1)
        job = session.job(pool)
        client.create_task(job, m.BatchTaskCreateOptions(id="files", command_line=f"/bin/sh -c '{PREPARE}'"))
        task = completed(client, job, "files")
        assert task.execution_info.exit_code == 0
        yield client, pool, task.node_info.node_id, task.node_info.task_root_directory.strip("/"), job
    finally:
        session.cleanup()


def node_path(pool: str, node: str, rel: str) -> str:
    return f"/pools/{pool}/nodes/{node}/files/{quote(rel, safe='')}"


def test_byte_ranges_through_the_sdk(node_files: tuple[Any, str, str, str, str]) -> None:
    client, pool, node, root, job = node_files
    digits = f"{root}/wd/digits.txt"
    for rng, want in (("bytes=2-4", b"234"), ("bytes=7-", b"789"), ("bytes=-3", b"789"), ("bytes=5-100", b"56789"),
                      ("bytes=0-0", b"0"), ("bytes=-50", b"0123456789")):
        assert b"".join(client.download_node_file(pool, node, digits, ocp_range=rng)) == want, rng
    assert b"".join(client.download_task_file(job, "files", "wd/digits.txt", ocp_range="bytes=8-")) == b"89"
    assert int(client.get_node_file_properties(pool, node, digits).content_length) == 10  # HEAD: the whole file
    for path, rng in ((digits, "bytes=10-"), (digits, "bytes=-0"), (f"{root}/wd/empty.txt", "bytes=0-")):
        with pytest.raises(HttpResponseError) as err:
            b"".join(client.download_node_file(pool, node, path, ocp_range=rng))
        assert err.value.status_code == 416, rng  # the SDK does not read a streamed download's error body


def test_range_header_and_malformed_ranges(emulator: Any, node_files: tuple[Any, str, str, str, str]) -> None:
    _client, pool, node, root, _job = node_files
    url = node_path(pool, node, f"{root}/wd/digits.txt")
    got = emulator.raw("GET", url, headers={"Range": "bytes=1-2"})
    assert got.status_code == 200 and got.content == b"12" and got.headers["Content-Length"] == "2"
    assert emulator.raw("GET", url, headers={"Range": "bytes=1-2", "ocp-range": "bytes=3-3"}).content == b"3"
    for header in ("ocp-range", "Range"):
        for bad in ("bytes=abc-5", "bytes=0-1,3-4", "bytes=-", "items=0-1", "bytes=5", "bytes=1-2-3"):
            resp = emulator.raw("GET", url, headers={header: bad})
            assert resp.status_code == 400, (header, bad, resp.text)
            values = {v["key"]: v["value"] for v in resp.json()["values"]}
            assert resp.json()["code"] == "InvalidHeaderValue" and values["HeaderName"] == header.lower(), values


def race(emulator: Any, pool: str, node: str, rel: str) -> list[tuple[str, int, str]]:
    """4 recursive DELETEs of ``rel`` and 2 recursive listings of it, released at once."""
    answers: list[tuple[str, int, str]] = []
    start = threading.Barrier(6)

    def one(method: str) -> None:
        start.wait()
        if method == "DELETE":
            resp = emulator.raw("DELETE", node_path(pool, node, rel), params={"recursive": "true"})
        else:
            resp = emulator.raw("GET", f"/pools/{pool}/nodes/{node}/files",
                                params={"recursive": "true", "$filter": f"startswith(name, '{rel}')"})
        answers.append((method, resp.status_code, resp.text))

    threads = [threading.Thread(target=one, args=("DELETE" if i < 4 else "LIST",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def test_concurrent_deletes_and_listings_never_500(emulator: Any, node_files: tuple[Any, str, str, str, str]) -> None:
    """Several DELETEs of one directory at once (each racing the others' rmtree) and listings of it meanwhile: every
    answer is 200 or 404 FileNotFound, and the directory is gone."""
    _client, pool, node, root, _job = node_files
    for t in range(1, TREES + 1):
        rel = f"{root}/wd/tree{t}"
        answers = race(emulator, pool, node, rel)
        codes = Counter((method, code) for method, code, _ in answers)
        assert set(codes) <= {("DELETE", 200), ("DELETE", 404), ("LIST", 200)}, answers
        assert codes[("DELETE", 200)] >= 1, answers
        assert all('"FileNotFound"' in text for method, code, text in answers if code == 404), answers
        assert emulator.raw("GET", node_path(pool, node, rel)).status_code == 404


@pytest.mark.parametrize(("rel", "status"), [
    ("wd/loop", 400), ("wd/" + "x" * 5000, 400), ("wd/a\x00b", 400), ("./", 400), ("wd/..", 400),
    ("wd/etc-link/passwd", 400), ("wd/nothere.txt", 404), ("wd/digits.txt/below", 404),
])
def test_bad_paths_are_batch_errors(emulator: Any, node_files: tuple[Any, str, str, str, str], rel: str,
                                    status: int) -> None:
    _client, pool, node, root, _job = node_files
    for method in ("GET", "HEAD", "DELETE"):
        resp = emulator.raw(method, node_path(pool, node, f"{root}/{rel}" if rel != "./" else rel))
        assert resp.status_code == status, (method, rel, resp.text)


def test_delete_refuses_the_root_and_spares_symlink_targets(emulator: Any,
                                                            node_files: tuple[Any, str, str, str, str]) -> None:
    _client, pool, node, root, _job = node_files
    refused = emulator.raw("DELETE", node_path(pool, node, "./"), params={"recursive": "true"})
    assert refused.status_code == 400 and refused.json()["code"] == "InvalidPropertyValue"
    bad = emulator.raw("DELETE", node_path(pool, node, f"{root}/wd/real"), params={"recursive": "yes"})
    assert bad.status_code == 400 and bad.json()["code"] == "InvalidQueryParameterValue"
    assert emulator.raw("DELETE", node_path(pool, node, f"{root}/wd/real-link"),
                        params={"recursive": "true"}).status_code == 200
    assert emulator.raw("GET", node_path(pool, node, f"{root}/wd/real/kept.txt")).content == b"kept\n"
    assert emulator.raw("GET", node_path(pool, node, f"{root}/wd/digits.txt")).content == b"0123456789"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rel=st.text(min_size=1, max_size=40), rng=st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                         max_size=24),
       method=st.sampled_from(["GET", "HEAD", "DELETE"]), under=st.sampled_from(["", "wd/", "wd/digits.txt/"]))
def test_fuzzed_paths_and_ranges_are_never_500(emulator: Any, node_files: tuple[Any, str, str, str, str], rel: str,
                                               rng: str, method: str, under: str) -> None:
    _client, pool, node, root, _job = node_files
    path = f"{root}/wd/fuzz/{rel}" if method == "DELETE" else f"{root}/{under}{rel}"  # deletes touch nothing else
    resp = emulator.raw(method, node_path(pool, node, path), headers={"ocp-range": rng} if rng else None,
                        params={"recursive": "true"} if method == "DELETE" else None)
    assert resp.status_code in (200, 400, 404, 416), (method, path, rng, resp.status_code, resp.text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(st.sampled_from(["recursive", "$filter", "maxresults", "$skiptoken"]),
                              st.text(max_size=30), max_size=4))
def test_fuzzed_listings_are_never_500(emulator: Any, node_files: tuple[Any, str, str, str, str],
                                       params: dict[str, str]) -> None:
    _client, pool, node, _root, job = node_files
    for path in (f"/pools/{pool}/nodes/{node}/files", f"/jobs/{job}/tasks/files/files"):
        resp = emulator.raw("GET", path, params=params)
        assert resp.status_code in (200, 400), (path, params, resp.text)
