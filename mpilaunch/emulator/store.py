"""The emulator's state: REST-shaped JSON documents in SQLite (WAL), shared by the wire half and the engine.

Contract (the API and the engine both code against it)
-----------------------------------------------------
Documents are ``dict``s shaped exactly like the Batch REST bodies of api-version 2025-06-01 (camelCase: a pool doc
looks like ``BatchPool``, a node doc like ``BatchNode``, a job like ``BatchJob``, a task like ``BatchTask``, a subtask
like ``BatchSubtask``). Keys starting with ``_`` are internal: stored, never sent (the API strips them).

Kinds and their ``parent`` (a tuple of the owner's ids; ids are compared case-insensitively, stored as given):

=========  ==================  ==========================================================
kind       parent              id
=========  ==================  ==========================================================
pool       ``()``              pool id
node       ``(pool_id,)``      node id (the engine picks it, e.g. ``tvmps_<hex>_d``)
job        ``()``              job id
task       ``(job_id,)``       task id
subtask    ``(job_id, task_id)``  ``str(subtask id)``; the doc's ``id`` is the int (0 = primary)
=========  ==================  ==========================================================

Writes stamp ``eTag`` (``0x8D...`` hex, unique per write) and, when ``touch=True``, ``lastModified``; ``insert``
also sets ``creationTime``/``stateTransitionTime`` if absent. Times are ISO-8601 UTC strings (:func:`now_iso`).
Lists come back in insertion order.

Who writes what
---------------
* API (wire half): inserts pools/jobs/tasks; user mutations (resize, update, terminate, delete requests).
  Deletes and terminations only *request*: the API sets the state and calls ``engine.wake()``; the engine does the
  killing/cleanup and then removes documents:

  - pool delete: ``state = "deleting"``; engine stops the nodes, then ``store.delete("pool", (), id)`` (cascades).
  - pool add/resize: ``targetDedicatedNodes`` set and ``allocationState = "resizing"``; the engine creates/removes
    node docs and sets ``allocationState = "steady"`` and ``currentDedicatedNodes``.
  - job delete: ``state = "deleting"``; engine kills the job's tasks, then ``store.delete("job", (), id)``.
  - job terminate: ``state = "terminating"`` (``executionInfo.terminateReason`` set by the API, default
    ``"UserTerminate"``); engine kills running tasks, completes the job (``state = "completed"``,
    ``executionInfo.endTime``).
  - task delete: ``_deleting = True`` (the API answers 404 TaskNotFound for it from then on); engine kills it and
    calls ``store.delete("task", (job,), id)`` (cascades to subtasks).
  - task terminate: ``_terminating = True``; engine kills it and completes it (Batch: ``failureInfo`` code
    ``TaskEnded``/``executionInfo.result = "failure"``).
  If no engine runs, the API does the final step itself (delete/complete at once).
* Engine (execution half): nodes, task/subtask state transitions (use :func:`transition`), ``executionInfo``,
  ``nodeInfo``; subtask docs. Engine writes use ``touch=False`` (Batch's lastModified ignores state changes).

Internal fields the API reads (for file operations):

* node ``_root``: absolute host path of the node's root dir (AZ_BATCH_NODE_ROOT_DIR as seen from the emulator);
  node files are listed/served from it.
* task and subtask ``_taskDir``: absolute host path of the task dir (AZ_BATCH_TASK_DIR) on the node that ran it
  (task: the primary / its node); task files are served from it. The public ``nodeInfo`` (poolId, nodeId,
  taskRootDirectory = ``workitems/{job}/job-1/{task}``, ...) is set by the engine as Batch does.

API
---
``StateStore(path)``; ``get(kind, parent, id)``; ``insert(kind, parent, doc)`` (raises :class:`Conflict` if the id
exists, case-insensitively); ``put(kind, parent, doc)`` (upsert); ``update(kind, parent, id, fn, touch=False)`` (``fn``
mutates the doc in place, runs inside the write transaction; returns the stored doc or ``None`` if missing);
``delete(kind, parent, id)`` (cascades to children; returns whether it existed); ``list(kind, parent=None,
states=None)`` (``parent=None``: every parent); ``count(...)`` (as ``list``, counted); ``work(kind, states)`` (docs in
``states`` or flagged for the engine, with their parents); ``page(kind, parent, after, limit, keep)`` for paging;
``transaction()`` (re-entrant, for several reads/writes that must be atomic). Thread-safe; all methods may be called
from any thread. Returned docs are copies: mutate them freely.

Costs
-----
Every query the engine and the API make goes through an index, so their cost does not grow with history (completed
tasks): ``(kind, state)`` for the engine's work (:meth:`StateStore.work`: docs in non-final states, plus the flagged
ones through a partial index), ``(kind, parent, seq)`` for lists, pages (``LIMIT``-like: a page reads only its rows
and the next one) and cascading deletes, ``(kind, parent, lid)`` for gets.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

Doc = dict[str, Any]
Parent = tuple[str, ...]

_CHILDREN: dict[str, tuple[str, ...]] = {"pool": ("node",), "job": ("task", "subtask"), "task": ("subtask",)}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    kind   TEXT NOT NULL,
    parent TEXT NOT NULL,
    lid    TEXT NOT NULL,
    state  TEXT,
    doc    TEXT NOT NULL,
    flag   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (kind, parent, lid)
);
"""
# After the table (an older store gets its flag column first, see StateStore._migrate).
_INDEXES = """
CREATE INDEX IF NOT EXISTS docs_state ON docs (kind, state);
CREATE INDEX IF NOT EXISTS docs_parent_seq ON docs (kind, parent, seq);
CREATE INDEX IF NOT EXISTS docs_flagged ON docs (kind) WHERE flag = 1;
"""
FLAGS = ("_deleting", "_terminating")
"""Internal request flags (set by the API, carried out by the engine): a doc with one is *flagged*, which an index
finds without reading the others (:meth:`StateStore.work`)."""


def _load(lid: str, state: str | None, text: str) -> Doc:
    """The stored doc; one that is not a JSON object (written by hand, or damaged) comes back as a stub with its id
    and state and ``_corrupt``, so readers see a record of the wrong shape instead of failing on every read."""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        return doc
    stub: Doc = {"id": lid, "_corrupt": True}
    if state is not None:
        stub["state"] = state
    return stub


def _flag(doc: Doc) -> int:
    return 1 if any(doc.get(name) for name in FLAGS) else 0


class Conflict(Exception):
    """``insert`` of an id that already exists (case-insensitively) under the same parent."""


def now_iso() -> str:
    """The current UTC time as Batch writes it: ``2025-06-01T12:00:00.123456Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _where(sql: str, kind: str, parent: Parent | None, states: Iterable[str] | None) -> tuple[str, list[str]]:
    """``sql`` (ending in ``WHERE kind=?``) narrowed to ``parent`` and ``states`` when given, and its arguments."""
    args = [kind]
    if parent is not None:
        sql += " AND parent=?"
        args.append(_parent_key(parent))
    if states is not None:
        wanted = list(states)
        sql += f" AND state IN ({','.join('?' * len(wanted))})"
        args.extend(wanted)
    return sql, args


def transition(doc: Doc, state: str, at: str | None = None) -> None:
    """Move ``doc`` to ``state``, keeping ``previousState``/``previousStateTransitionTime`` as Batch does."""
    if doc.get("state") == state:
        return
    at = at or now_iso()
    if "state" in doc:
        doc["previousState"] = doc["state"]
        if "stateTransitionTime" in doc:
            doc["previousStateTransitionTime"] = doc["stateTransitionTime"]
    doc["state"] = state
    doc["stateTransitionTime"] = at


def _parent_key(parent: Iterable[str]) -> str:
    return "/".join(p.lower() for p in parent)


class StateStore:
    """Thread-safe document store in one SQLite file (created if missing); see the module docstring."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._depth = 0
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._db.executescript(_INDEXES)
        self._last_etag = 0

    def _migrate(self) -> None:
        """A store written before the ``flag`` column: add it and set it from the docs (once)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(docs)")}
        if "flag" in columns:
            return
        with self.transaction():
            self._db.execute("ALTER TABLE docs ADD COLUMN flag INTEGER NOT NULL DEFAULT 0")
            for seq, text in self._db.execute("SELECT seq, doc FROM docs WHERE doc LIKE '%\\_deleting%' ESCAPE '\\' "
                                              "OR doc LIKE '%\\_terminating%' ESCAPE '\\'").fetchall():
                self._db.execute("UPDATE docs SET flag=? WHERE seq=?", (_flag(_load("", None, text)), seq))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the store for several operations; commits at the outermost exit, rolls back on exception."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")

    def _etag(self) -> str:
        tick = max(time.time_ns() // 100, self._last_etag + 1)
        self._last_etag = tick
        return f"0x8D{tick % 16**13:013X}"

    def _stamp(self, doc: Doc, touch: bool) -> None:
        doc["eTag"] = self._etag()
        if touch or "lastModified" not in doc:
            doc["lastModified"] = now_iso()

    def get(self, kind: str, parent: Parent, id: str) -> Doc | None:
        with self._lock:
            row = self._db.execute("SELECT lid, state, doc FROM docs WHERE kind=? AND parent=? AND lid=?",
                                   (kind, _parent_key(parent), str(id).lower())).fetchone()
        return None if row is None else _load(*row)

    def insert(self, kind: str, parent: Parent, doc: Doc) -> Doc:
        """Add a new document; raises :class:`Conflict` if its id exists under ``parent`` in any letter case."""
        doc = dict(doc)
        now = now_iso()
        doc.setdefault("creationTime", now)
        if "state" in doc:
            doc.setdefault("stateTransitionTime", now)
        with self.transaction():
            self._stamp(doc, True)
            try:
                self._db.execute("INSERT INTO docs (kind, parent, lid, state, doc, flag) VALUES (?, ?, ?, ?, ?, ?)",
                                 (kind, _parent_key(parent), str(doc["id"]).lower(), doc.get("state"),
                                  json.dumps(doc), _flag(doc)))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"{kind} {doc['id']!r} exists") from exc
        return doc

    def put(self, kind: str, parent: Parent, doc: Doc, *, touch: bool = False) -> Doc:
        """Insert or replace a document (keeps its place in list order if it existed)."""
        doc = dict(doc)
        with self.transaction():
            self._stamp(doc, touch)
            self._db.execute(
                "INSERT INTO docs (kind, parent, lid, state, doc, flag) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, parent, lid) DO UPDATE SET state=excluded.state, doc=excluded.doc, "
                "flag=excluded.flag",
                (kind, _parent_key(parent), str(doc["id"]).lower(), doc.get("state"), json.dumps(doc), _flag(doc)))
        return doc

    def update(self, kind: str, parent: Parent, id: str, fn: Callable[[Doc], None], *,
               touch: bool = False) -> Doc | None:
        """Apply ``fn`` (mutating in place) to the stored doc atomically; ``None`` if there is no such doc."""
        with self.transaction():
            doc = self.get(kind, parent, id)
            if doc is None:
                return None
            fn(doc)
            self._stamp(doc, touch)
            self._db.execute("UPDATE docs SET state=?, doc=?, flag=? WHERE kind=? AND parent=? AND lid=?",
                             (doc.get("state"), json.dumps(doc), _flag(doc), kind, _parent_key(parent),
                              str(id).lower()))
        return doc

    def delete(self, kind: str, parent: Parent, id: str) -> bool:
        """Remove a document and its children (pool: nodes; job: tasks, subtasks; task: subtasks)."""
        key = _parent_key((*parent, str(id)))
        with self.transaction():
            cur = self._db.execute("DELETE FROM docs WHERE kind=? AND parent=? AND lid=?",
                                   (kind, _parent_key(parent), str(id).lower()))
            for child in _CHILDREN.get(kind, ()):
                # the parent itself or any key below it ("job/task" under "job"): a range the index serves
                self._db.execute("DELETE FROM docs WHERE kind=? AND parent=?", (child, key))
                self._db.execute("DELETE FROM docs WHERE kind=? AND parent>=? AND parent<?",
                                 (child, key + "/", key + chr(ord("/") + 1)))
            return cur.rowcount > 0

    def list(self, kind: str, parent: Parent | None = None, *, states: Iterable[str] | None = None) -> list[Doc]:
        """All docs of ``kind`` under ``parent`` (every parent if ``None``), optionally only in ``states``."""
        sql, args = _where("SELECT lid, state, doc FROM docs WHERE kind=?", kind, parent, states)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq", args).fetchall()
        return [_load(*r) for r in rows]

    def work(self, kind: str, states: Iterable[str]) -> builtins.list[tuple[Parent, Doc]]:
        """The docs of ``kind`` (under every parent) that are in ``states`` or flagged (see :data:`FLAGS`), with
        their parent keys (lower-cased ids), in list order: what the engine must look at, found through indexes, so
        its cost does not grow with history (completed docs)."""
        wanted = list(states)
        sql = "SELECT seq, parent, lid, state, doc FROM docs WHERE kind=? AND state IN "
        sql += f"({','.join('?' * len(wanted))})"
        sql += " UNION SELECT seq, parent, lid, state, doc FROM docs WHERE kind=? AND flag=1 ORDER BY seq"
        with self._lock:
            rows = self._db.execute(sql, [kind, *wanted, kind]).fetchall()
        return [(tuple(p.split("/")) if p else (), _load(lid, state, text)) for _seq, p, lid, state, text in rows]

    def count(self, kind: str, parent: Parent | None = None, *, states: Iterable[str] | None = None,
              limit: int | None = None) -> int:
        """How many docs :meth:`list` would return (at most ``limit``: ``limit=1`` asks whether there is one)."""
        sql, args = _where("SELECT count(*) FROM (SELECT 1 FROM docs WHERE kind=?", kind, parent, states)
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            row = self._db.execute(sql + ")", args).fetchone()
        return int(row[0])

    def page(self, kind: str, parent: Parent, after: int, limit: int,
             keep: Callable[[Doc], bool] = lambda _d: True) -> tuple[builtins.list[Doc], int | None]:
        """Up to ``limit`` docs kept by ``keep``, after position ``after`` (0 = start); returns (docs, next or None)."""
        out: builtins.list[Doc] = []
        last = after
        with self._lock:
            rows = self._db.execute("SELECT seq, lid, state, doc FROM docs WHERE kind=? AND parent=? AND seq>? "
                                    "ORDER BY seq", (kind, _parent_key(parent), after))
            try:
                for seq, lid, state, text in rows:
                    doc = _load(lid, state, text)
                    if not keep(doc):
                        continue
                    if len(out) >= max(limit, 1):
                        return out, last
                    out.append(doc)
                    last = int(seq)
            finally:
                rows.close()
        return out, None

