"""The execution half of the emulator: a scheduler thread that turns store documents into running nodes and tasks.

``Engine(store, data_dir, provider)``; the server calls :meth:`Engine.start` (which first :meth:`recover`\\ s what a
previous run left), :meth:`Engine.wake` after every mutation, and :meth:`Engine.stop` on shutdown. Each loop step:

* pools: :class:`~mpilaunch.emulator.pools.NodeManager` allocates/removes nodes, runs StartTasks and carries out node
  actions (reboot, reimage, remove, disable scheduling, preempt, kill), ending the attempts on those nodes;
* jobs being deleted or terminated: their running tasks are killed, then the job is removed or completed;
* tasks: deletes and terminations requested by the API are carried out; active tasks are placed on free nodes
  (a multi-instance task needs a pool with inter-node communication, one slot per node and N idle nodes, otherwise
  it stays active as in Azure) and run by a :class:`~mpilaunch.emulator.taskrun.TaskRun` thread;
* jobs with ``onAllTasksComplete = terminatejob`` complete when all their tasks have.

An attempt that fails because one of its nodes went down (the provider says it is not alive) is requeued, not
retried: Batch's recovery retries are not counted against ``maxTaskRetryCount``. A shutdown kills every process but
leaves the documents as they are; the next :meth:`recover` requeues the tasks that were running (``requeueCount``,
not ``retryCount``) and restarts nodes.
"""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from mpilaunch.emulator import defaults, records
from mpilaunch.emulator import multiinstance as mi
from mpilaunch.emulator.context import Context, log, wipe
from mpilaunch.emulator.nodes.base import Node, NodeProvider
from mpilaunch.emulator.pools import START_TAG, NodeManager
from mpilaunch.emulator.store import Doc, Store, now_iso, transition
from mpilaunch.emulator.taskrun import Outcome, TaskRun
from node_runtime.errors import MpilaunchError

Key = tuple[str, str]


def _key(job_id: str, task_id: str) -> Key:
    return job_id.lower(), task_id.lower()


MASTER_PORT = 6000
"""``AZ_BATCH_MASTER_NODE``'s port when the master's address is not this machine's (e.g. a container's)."""


def reserve_port(address: str) -> int:
    """A port for ``AZ_BATCH_MASTER_NODE``: a currently free one if ``address`` is local, else :data:`MASTER_PORT`."""
    try:
        with socket.socket() as s:
            s.bind((address, 0))
            return int(s.getsockname()[1])
    except OSError:
        return MASTER_PORT


def _expired(job: Doc) -> bool:
    """Whether the job has outlived its ``constraints.maxWallClockTime`` (measured from its creation)."""
    try:
        limit = mi.parse_duration((job.get("constraints") or {}).get("maxWallClockTime"))
        created = datetime.fromisoformat(str(job.get("creationTime")))
    except ValueError:
        return False
    return limit is not None and (datetime.now(timezone.utc) - created).total_seconds() >= limit


def _expire(job: Doc) -> None:
    """Terminate a job whose wall clock ran out, as Batch does (``terminateReason = MaxWallClockTimeExpiry``)."""
    if job.get("state") == "active":
        transition(job, "terminating")
        job.setdefault("executionInfo", {"startTime": job.get("creationTime", now_iso())})
        job["executionInfo"]["terminateReason"] = "MaxWallClockTimeExpiry"


class Engine:
    """Runs pools, nodes and tasks of a :class:`~mpilaunch.emulator.store.Store`; see the module docstring."""

    def __init__(self, store: Store, data_dir: Path | str, provider: NodeProvider | None = None, *,
                 account: str = defaults.ACCOUNT, account_url: str | None = None, poll: float = 0.5) -> None:
        if provider is None:
            from mpilaunch.emulator.nodes.process import ProcessProvider
            provider = ProcessProvider()
        self.ctx = Context(store=store, provider=provider, data_dir=Path(data_dir), account=account,
                           account_url=account_url or defaults.endpoint(), wake=self.wake)
        self.store = store
        self.poll = poll
        self.nodes = NodeManager(self.ctx, self._busy, self._evict)
        self._runs: dict[Key, TaskRun] = {}
        self._slots: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._recovered = False
        self._blocked: set[Key] = set()

    @property
    def account_url(self) -> str:
        """The endpoint written into ``nodeInfo``/``url`` fields; set it once the server knows its port."""
        return self.ctx.account_url

    @account_url.setter
    def account_url(self, value: str) -> None:
        self.ctx.account_url = value

    def check_pool(self, pool: Doc) -> None:
        """Raise :class:`~mpilaunch.emulator.nodes.base.NodeError` if the provider cannot make ``pool``'s nodes."""
        self.ctx.provider.check_pool(pool)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Recover (once), then start the scheduler thread."""
        if not self._recovered:
            self.recover()
        self._thread = threading.Thread(target=self._loop, name="emulator-engine", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Ask the scheduler to look at the store now (after any mutation)."""
        self._wake.set()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop scheduling, kill every process of every task and StartTask; documents stay for :meth:`recover`."""
        self.ctx.stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.cancel("shutdown")
        for run in runs:
            run.thread.join(timeout)
        self.nodes.stop(timeout)
        self.ctx.provider.close()

    def recover(self) -> None:
        """Handle what a previous emulator run left: kill its processes, requeue its running tasks, restart nodes."""
        self._recovered = True
        restored: dict[str, Node] = {}
        for pool in self.store.list("pool"):
            for doc in self.store.list("node", (pool["id"],)):
                node = self.ctx.node_of(doc)
                if node is None or doc.get("state") == "leavingpool":
                    self.store.delete("node", (pool["id"],), doc["id"])  # recreated by the next resize
                    if node is not None:
                        self.ctx.provider.destroy_node(node)
                    continue
                try:
                    restored[node.id] = self.ctx.provider.restore_node(node)
                    self.ctx.provider.kill_tag(node, START_TAG)
                except MpilaunchError as exc:
                    log.warning("node %s cannot be restored: %s", node.id, exc)
        for job in self.store.list("job"):
            for task in self.store.list("task", (job["id"],), states=["running"]):
                attempt = task.get("_attempt") or {}
                nodes = [restored[n] for _pool, n in attempt.get("nodes", []) if n in restored]
                for node in nodes:
                    self.ctx.provider.kill_tag(node, attempt.get("tag", ""))
                records.finish(self.ctx, job["id"], task["id"], nodes, multi="multiInstanceSettings" in task,
                               outcome=Outcome(kind="requeue"), max_retries=0)
        for pool in self.store.list("pool"):
            for doc in self.store.list("node", (pool["id"],)):
                def reset(d: Doc) -> None:
                    d["runningTasksCount"] = d["runningTaskSlotsCount"] = 0
                    for key in ("_action", "_upAt"):  # a restart is a reboot: pending node actions are void
                        d.pop(key, None)
                    transition(d, "starting")
                self.ctx.update_node(pool["id"], doc["id"], reset)
                self.nodes.restart_node(pool["id"], doc)

    # -- the loop -------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.ctx.stopping.is_set():
            self._wake.wait(self.poll)
            self._wake.clear()
            if self.ctx.stopping.is_set():
                return
            try:
                self._step()
            except Exception:  # the scheduler must survive anything; the next step retries
                log.exception("engine step failed")

    def _busy(self, node_id: str) -> bool:
        with self._lock:
            return self._slots.get(node_id, 0) > 0

    def _evict(self, node_id: str, kind: str) -> None:
        self._cancel_where(lambda run: any(n.id == node_id for n in run.nodes), kind)

    def _step(self) -> None:
        self.nodes.step()
        for job in self.store.list("job"):
            state = job.get("state")
            if state == "deleting":
                self._delete_job(job)
                continue
            if state == "active" and _expired(job):
                self.store.update("job", (), job["id"], _expire)
                self.wake()
                continue
            if state == "terminating":
                self._terminate_job(job)
            self._job_tasks(job, schedule=state == "active")  # deletes happen in any job state

    def _cancel_where(self, match: Callable[[TaskRun], bool], kind: str) -> int:
        with self._lock:
            runs = [r for r in self._runs.values() if match(r)]
        for run in runs:
            run.cancel(kind)
        return len(runs)

    def _job_runs(self, job_id: str) -> list[TaskRun]:
        with self._lock:
            return [r for k, r in self._runs.items() if k[0] == job_id.lower()]

    def _delete_job(self, job: Doc) -> None:
        runs = self._job_runs(job["id"])
        for run in runs:
            run.cancel("deleted")
        if not runs:
            self.store.delete("job", (), job["id"])
            for node_doc in self.store.list("node"):
                wipe(Path(node_doc["_root"]) / "workitems" / job["id"])

    def _terminate_job(self, job: Doc) -> None:
        runs = self._job_runs(job["id"])
        for run in runs:
            run.cancel("terminated")
        for task in self.store.list("task", (job["id"],), states=["active"]):
            self._end_idle_task(job["id"], task["id"])
        if not runs:
            self._complete_job(job["id"], None)

    def _complete_job(self, job_id: str, reason: str | None) -> None:
        def complete(doc: Doc) -> None:
            info = doc.setdefault("executionInfo", {"startTime": doc.get("creationTime", now_iso())})
            info["endTime"] = now_iso()
            if reason:
                info["terminateReason"] = reason
            transition(doc, "completed")
        self.store.update("job", (), job_id, complete)

    def _remove_task(self, job_id: str, task: Doc) -> None:
        """Delete a task that is not running, with its (and its subtasks') directories on the nodes, as Batch does."""
        for doc in [task, *self.store.list("subtask", (job_id, task["id"]))]:
            if doc.get("_taskDir"):
                wipe(Path(doc["_taskDir"]))
        self.store.delete("task", (job_id,), task["id"])

    def _end_idle_task(self, job_id: str, task_id: str) -> None:
        records.finish(self.ctx, job_id, task_id, [], multi=False, outcome=Outcome(kind="terminated"), max_retries=0)

    def _job_tasks(self, job: Doc, *, schedule: bool) -> None:
        """Carry out task deletes/terminations; with ``schedule``, also place active tasks and complete the job."""
        tasks = self.store.list("task", (job["id"],))
        pool_id = str(job.get("poolInfo", {}).get("poolId") or "") if schedule else ""
        pool = self.store.get("pool", (), pool_id) if pool_id else None
        if pool is not None and pool.get("state") != "active":
            pool = None
        candidates: list[Doc] | None = None  # the pool's usable node docs, listed once per step
        for task in tasks:
            with self._lock:
                run = self._runs.get(_key(job["id"], task["id"]))
            if task.get("_deleting"):
                if run is not None:
                    run.cancel("deleted")
                else:
                    self._remove_task(job["id"], task)
            elif task.get("_terminating") and task.get("state") != "completed":
                if run is not None:
                    run.cancel("terminated")
                else:
                    self._end_idle_task(job["id"], task["id"])
            elif task.get("state") == "active" and run is None and pool is not None:
                if candidates is None:
                    candidates = self.store.list("node", (pool["id"],), states=["idle", "running"])
                self._schedule(job, pool, task, candidates)
        if schedule and job.get("onAllTasksComplete") == "terminatejob" and tasks and all(
                t.get("state") == "completed" for t in self.store.list("task", (job["id"],))):
            self._complete_job(job["id"], "AllTasksComplete")

    # -- placement ------------------------------------------------------------------------------------------------
    def _schedule(self, job: Doc, pool: Doc, task: Doc, candidates: list[Doc]) -> None:
        """Claim nodes for ``task`` among ``candidates`` (idle/running node docs of ``pool``) and start a run."""
        key = _key(job["id"], task["id"])
        multi = "multiInstanceSettings" in task
        wanted = int(task["multiInstanceSettings"].get("numberOfInstances", 1)) if multi else 1
        if multi and (why := mi.multi_instance_blocker(pool, task)):
            if key not in self._blocked:
                self._blocked.add(key)
                log.warning("task %s/%s stays active: %s", job["id"], task["id"], why)
            return
        slots, need = int(pool.get("taskSlotsPerNode") or 1), int(task.get("requiredSlots") or 1)
        free: list[Node] = []
        with self._lock:
            for doc in candidates:
                used = self._slots.get(doc["id"], 0)
                node = self.ctx.node_of(doc)
                fits = used == 0 and doc["state"] == "idle" if multi else used + need <= slots
                if node is not None and fits and doc.get("schedulingState", "enabled") == "enabled":
                    free.append(node)
            if len(free) < wanted:
                return
            nodes = free[:wanted]
            for node in nodes:
                self._slots[node.id] = self._slots.get(node.id, 0) + (1 if multi else need)
        tag = f"{job['id']}/{task['id']}/{secrets.token_hex(4)}"
        claimed = records.claim(self.ctx, job["id"], task["id"], nodes, tag)
        if claimed is None:
            self._free(nodes, 1 if multi else need)
            return
        run = TaskRun(self.ctx, job, claimed, nodes, tag=tag, master_port=reserve_port(nodes[0].address),
                      on_done=self._done)
        with self._lock:
            self._runs[key] = run
        run.start()

    def _free(self, nodes: list[Node], slots: int) -> None:
        with self._lock:
            for node in nodes:
                self._slots[node.id] = max(self._slots.get(node.id, 0) - slots, 0)

    def _done(self, run: TaskRun, outcome: Outcome) -> None:
        """Called on the run's thread when the attempt has ended and its processes are gone."""
        job_id, task_id = run.job["id"], run.task["id"]
        try:
            if outcome.kind == "deleted":  # the directories go first: once the doc is gone, the task is gone
                for index in range(len(run.nodes)):
                    wipe(run.task_dir(index))
            # before the nodes are freed, so the requeued task cannot land on a dead one
            if outcome.kind == "failure" and self.nodes.check_lost(run.nodes, f"task {job_id}/{task_id}"):
                outcome = Outcome(kind="requeue")  # a lost node: Batch requeues, outside maxTaskRetryCount
            if outcome.kind != "shutdown":
                records.finish(self.ctx, job_id, task_id, run.nodes, multi=run.multi, outcome=outcome,
                               max_retries=self._max_retries(run))
        finally:
            with self._lock:
                self._runs.pop(_key(job_id, task_id), None)
            self._free(run.nodes, run.slots)
            self.wake()

    @staticmethod
    def _max_retries(run: TaskRun) -> int:
        for source in (run.task, run.job):
            value = source.get("constraints", {}).get("maxTaskRetryCount")
            if value is not None:
                return int(value)
        return 0
