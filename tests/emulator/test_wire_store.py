"""Unit tests of the store (the contract with the engine) and the OData $filter subset."""

from __future__ import annotations

import threading

import pytest

from mpilaunch.emulator.odata import parse_filter
from mpilaunch.emulator.store import Conflict, StateStore, transition
from mpilaunch.emulator.wire_errors import WireError


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / "s.sqlite3")
    yield s
    s.close()


def test_insert_get_case_insensitive_and_conflict(store):
    doc = store.insert("job", (), {"id": "Job_1", "state": "active"})
    assert doc["eTag"].startswith("0x8D") and doc["creationTime"] == doc["stateTransitionTime"]
    assert store.get("job", (), "JOB_1")["id"] == "Job_1"
    with pytest.raises(Conflict):
        store.insert("job", (), {"id": "job_1"})
    store.insert("pool", (), {"id": "job_1"})  # kinds are separate namespaces


def test_update_stamps_and_transitions(store):
    first = store.insert("task", ("j",), {"id": "t", "state": "active"})
    updated = store.update("task", ("J",), "T", lambda d: transition(d, "running"))
    assert updated["state"] == "running" and updated["previousState"] == "active"
    assert updated["eTag"] != first["eTag"] and updated["lastModified"] == first["lastModified"]
    touched = store.update("task", ("j",), "t", lambda d: d.update(x=1), touch=True)
    assert touched["lastModified"] >= first["lastModified"]
    assert store.update("task", ("j",), "nope", lambda d: None) is None
    assert [d["id"] for d in store.list("task", None, states=["running"])] == ["t"]


def test_failed_update_rolls_back(store):
    store.insert("job", (), {"id": "j", "state": "active"})

    def boom(doc):
        doc["state"] = "completed"
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        store.update("job", (), "j", boom)
    assert store.get("job", (), "j")["state"] == "active"


def test_delete_cascades_by_kind(store):
    store.insert("job", (), {"id": "a"})
    store.insert("pool", (), {"id": "a"})
    store.insert("node", ("a",), {"id": "n"})
    store.insert("task", ("a",), {"id": "t"})
    store.insert("subtask", ("a", "t"), {"id": 1})
    store.insert("task", ("a_b",), {"id": "t"})  # LIKE wildcards in ids must not leak
    assert store.delete("job", (), "A")
    assert store.list("task", ("a",)) == [] and store.list("subtask") == []
    assert [d["id"] for d in store.list("node", ("a",))] == ["n"]
    assert store.list("task", ("a_b",))
    assert not store.delete("job", (), "a")


def test_paging_and_persistence(tmp_path):
    path = tmp_path / "p.sqlite3"
    store = StateStore(path)
    for i in range(7):
        store.insert("task", ("j",), {"id": f"t{i}", "odd": i % 2})
    store.close()
    store = StateStore(path)
    seen, token = [], 0
    while True:
        docs, nxt = store.page("task", ("j",), token, 2, keep=lambda d: d["odd"] == 1)
        seen += [d["id"] for d in docs]
        if nxt is None:
            break
        token = nxt
    assert seen == ["t1", "t3", "t5"]
    store.close()


def test_concurrent_writers_and_readers(store):
    errors = []

    def writer(w):
        try:
            for i in range(100):
                store.insert("task", ("j",), {"id": f"w{w}-{i}", "state": "active"})
                store.update("task", ("j",), f"w{w}-{i}", lambda d: transition(d, "running"))
        except Exception as exc:
            errors.append(exc)

    def reader():
        try:
            for _ in range(100):
                store.list("task", ("j",))
                store.page("task", ("j",), 0, 10)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    written = store.list("task", ("j",))
    assert len(written) == 400 and {d["state"] for d in written} == {"running"}
    docs = store.list("task", ("j",))
    assert len(docs) == 400 and {d["state"] for d in docs} == {"running"}
    assert len({d["eTag"] for d in docs}) == 400


@pytest.mark.parametrize(("expr", "ids"), [
    ("state eq 'active'", ["a"]),
    ("state ne 'active'", ["b", "c"]),
    ("executionInfo/exitCode eq 0", ["b"]),
    ("executionInfo.exitCode gt 0 or id eq 'a'", ["a", "c"]),
    ("not (state eq 'completed') and startswith(id, 'a')", ["a"]),
    ("creationTime ge datetime'2025-01-02T00:00:00Z'", ["b", "c"]),
    ("displayName eq 'it''s'", ["c"]),
    ("", ["a", "b", "c"]),
])
def test_filter(expr, ids):
    docs = [{"id": "a", "state": "active", "creationTime": "2025-01-01T00:00:00Z"},
            {"id": "b", "state": "completed", "executionInfo": {"exitCode": 0},
             "creationTime": "2025-01-02T00:00:00Z"},
            {"id": "c", "state": "completed", "executionInfo": {"exitCode": 3}, "displayName": "it's",
             "creationTime": "2025-01-03T00:00:00Z"}]
    pred = parse_filter(expr)
    assert [d["id"] for d in docs if pred(d)] == ids


@pytest.mark.parametrize("expr", ["state eq", "state like 'x'", "(state eq 'a'", "state eq 'a' 'b'", "#"])
def test_bad_filters_are_400(expr):
    with pytest.raises(WireError) as err:
        parse_filter(expr)
    assert err.value.status == 400 and err.value.values["QueryParameterName"] == "$filter"
