"""Records the engine cannot act on: a pool, job or task whose processing raises a data error (a field of the wrong
type or shape, as a store written by hand, by an older version or by a bug may hold) is marked with an error a Batch
client reads -- pool ``resizeErrors``, job ``executionInfo.schedulingError``, task completed with ``failureInfo`` --
code ``InvalidPropertyValue``, and left alone until it changes (its ``eTag``); everything else keeps running.
Without this, one such record failed every step of the engine: no task of any pool ran, also after a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from mpilaunch.emulator import multiinstance as mi
from mpilaunch.emulator.context import EngineContext, log
from mpilaunch.emulator.store import Doc, now_iso, transition

DATA_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError, LookupError)
"""What a record of the wrong shape raises when the engine reads it (anything else, e.g. an OSError, is taken as
transient: logged, and the next step tries again)."""
UNUSABLE = "InvalidPropertyValue"
"""The error code of a record the engine cannot act on (a Batch error code: a property has a value Batch cannot
use)."""
T = TypeVar("T")


def _why(kind: str, doc_id: object, exc: BaseException) -> str:
    return (f"The emulator cannot act on {kind} {doc_id!r}: {type(exc).__name__}: {exc}. One of its properties has "
            f"a value of the wrong type or shape; update or recreate the {kind}.")


def _mark_pool(doc: Doc, message: str, reason: str) -> None:
    doc["resizeErrors"] = [{"code": UNUSABLE, "message": message, "values": [{"name": "Reason", "value": reason}]}]
    if doc.get("allocationState") != "steady":  # Batch sets resizeErrors only once the pool is steady
        doc["allocationState"] = "steady"
        doc["allocationStateTransitionTime"] = now_iso()


def _mark_job(doc: Doc, message: str, reason: str) -> None:
    info = doc.get("executionInfo")
    if not isinstance(info, dict):
        info = doc["executionInfo"] = {"startTime": doc.get("creationTime") or now_iso()}
    info["schedulingError"] = {"category": "usererror", "code": UNUSABLE, "message": message,
                               "details": [{"name": "Reason", "value": reason}]}


def _mark_task(doc: Doc, message: str, reason: str) -> None:
    now = now_iso()
    info = doc.get("executionInfo")
    if not isinstance(info, dict):
        info = doc["executionInfo"] = {}
    info.setdefault("startTime", now)
    info.update(endTime=now, result="failure", retryCount=info.get("retryCount", 0) if isinstance(
        info.get("retryCount"), int) else 0, requeueCount=info.get("requeueCount", 0) if isinstance(
        info.get("requeueCount"), int) else 0)
    info["failureInfo"] = mi.failure_info(UNUSABLE, message, details={"Reason": reason})
    info.pop("exitCode", None)
    for key in ("_attempt", "_deleting", "_terminating"):
        doc.pop(key, None)
    doc["state"] = doc["state"] if isinstance(doc.get("state"), str) else "active"
    transition(doc, "completed", now)


_MARKS: dict[str, Callable[[Doc, str, str], None]] = {"pool": _mark_pool, "job": _mark_job, "task": _mark_task}


class Isolation:
    """Runs the engine's work on one record at a time so that a record it cannot act on (a data error, see
    :data:`DATA_ERRORS`) is marked (see the module docstring) and skipped until its ``eTag`` changes (a user's
    update or resize), instead of failing the step for every other pool, job and task."""

    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self._bad: dict[tuple[str, str], object] = {}  # (kind, "parent/id") -> eTag it had when it was marked
        self._lock = threading.Lock()

    @staticmethod
    def _key(kind: str, parent: Sequence[str], doc: Doc) -> tuple[str, str]:
        return kind, "/".join([*parent, str(doc.get("id"))]).lower()

    def skipped(self, kind: str, parent: Sequence[str], doc: Doc) -> bool:
        """Whether ``doc`` was marked and has not changed since."""
        with self._lock:
            tag = self._bad.get(self._key(kind, parent, doc), self)
        return tag is not self and tag == doc.get("eTag")

    def run(self, kind: str, parent: Sequence[str], doc: Doc, work: Callable[[], T]) -> T | None:
        """``work()``'s result, or ``None`` if ``doc`` is skipped or ``work`` failed (then it is marked if the
        failure is a data error, else logged for the next step to retry)."""
        if self.skipped(kind, parent, doc):
            return None
        try:
            if doc.get("_corrupt"):
                raise ValueError("its stored document is not a JSON object")
            return work()
        except DATA_ERRORS as exc:
            self.mark(kind, parent, doc, exc)
        except Exception:
            log.exception("%s %s: the engine failed on it; the next step retries", kind, doc.get("id"))
        return None

    def mark(self, kind: str, parent: Sequence[str], doc: Doc, exc: BaseException) -> None:
        """Mark ``doc`` as one the engine cannot act on because of ``exc`` (and skip it until it changes)."""
        message, reason = _why(kind, doc.get("id"), exc), f"{type(exc).__name__}: {exc}"
        log.error("%s", message, exc_info=exc)
        stored: Doc | None = None
        mark = _MARKS.get(kind)
        if mark is not None:
            try:
                stored = self.ctx.store.update(kind, tuple(parent), str(doc.get("id")),
                                               lambda d: mark(d, message, reason))
            except Exception:  # even the mark failed: skip it as it is
                log.exception("%s %s cannot be marked", kind, doc.get("id"))
        if stored is None:
            stored = self.ctx.store.get(kind, tuple(parent), str(doc.get("id"))) or doc
        with self._lock:
            self._bad[self._key(kind, parent, doc)] = stored.get("eTag")
