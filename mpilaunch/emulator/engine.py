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

Each step reads only live work, through the store's indexes: jobs in non-final states and the tasks that are active,
preparing or running or carry a delete/terminate request (:meth:`~mpilaunch.emulator.store.StateStore.work`); completed
history costs nothing per step. Each pool, job and task is handled on its own
(:class:`~mpilaunch.emulator.isolation.Isolation`): one the engine cannot act on is marked with a Batch error and
skipped, and everything else keeps running.

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
from functools import partial
from pathlib import Path

from mpilaunch.emulator import defaults, records
from mpilaunch.emulator import multiinstance as mi
from mpilaunch.emulator.context import EngineContext, log, wipe
from mpilaunch.emulator.isolation import DATA_ERRORS, Isolation
from mpilaunch.emulator.nodes.base import Node, NodeProvider
from mpilaunch.emulator.pools import START_TAG, NodeManager
from mpilaunch.emulator.store import Doc, StateStore, now_iso, transition
from mpilaunch.emulator.taskrun import Outcome, TaskRun
from node_runtime.errors import MpilaunchError

Key = tuple[str, str]


def _key(job_id: str, task_id: str) -> Key:
    return job_id.lower(), task_id.lower()


LIVE_JOB_STATES = ("active", "disabling", "disabled", "enabling", "terminating", "deleting")
"""Job states the engine looks at (``completed`` jobs only through their tasks' delete requests)."""
WORK_TASK_STATES = ("active", "preparing", "running")
"""Task states the engine looks at (plus tasks flagged for delete/terminate, whatever their state)."""


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


def _check_pool(pool: Doc) -> bool:
    """Read the pool fields placement uses, so a pool with one of the wrong type is marked (not its tasks)."""
    for name in ("taskSlotsPerNode", "targetDedicatedNodes", "targetLowPriorityNodes"):
        int(pool.get(name) or 0)
    str(pool["id"])
    return True


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
    """Runs pools, nodes and tasks of a :class:`~mpilaunch.emulator.store.StateStore`; see the module docstring."""

    def __init__(self, store: StateStore, data_dir: Path | str, provider: NodeProvider | None = None, *,
                 account: str = defaults.ACCOUNT, account_url: str | None = None, poll: float = 0.5) -> None:
        if provider is None:
            from mpilaunch.emulator.nodes.process import ProcessProvider
            provider = ProcessProvider()
        self.ctx = EngineContext(store=store, provider=provider, data_dir=Path(data_dir), account=account,
                           account_url=account_url or defaults.endpoint(), wake=self.wake)
        self.store = store
        self.poll = poll
        self.isolation = Isolation(self.ctx)
        self.nodes = NodeManager(self.ctx, self._busy, self._evict, self.isolation)
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
        """Handle what a previous emulator run left: kill its processes, requeue its running tasks, restart nodes.

        Every record on its own (one the engine cannot act on is marked, the rest recovers), and every process of
        every node in one sweep (:meth:`~mpilaunch.emulator.nodes.base.NodeProvider.kill_tags`)."""
        self._recovered = True
        restored: dict[str, Node] = {}
        pools = self.store.list("pool")
        for pool in pools:
            self.isolation.run("pool", (), pool, partial(self._restore_pool, pool, restored))
        running = [(parent, task) for parent, task in self.store.work("task", ["running"])
                   if task.get("state") == "running"]
        targets: list[tuple[Node, str]] = [(node, START_TAG) for node in restored.values()]
        attempts: list[tuple[tuple[str, ...], Doc, list[Node]]] = []
        for parent, task in running:
            def attempt_nodes(task: Doc = task) -> list[Node]:
                attempt = task.get("_attempt") or {}
                return [restored[n] for _pool, n in attempt.get("nodes", []) if n in restored]
            nodes = self.isolation.run("task", parent, task, attempt_nodes)
            if nodes is not None:
                attempts.append((parent, task, nodes))
                targets += [(node, str((task.get("_attempt") or {}).get("tag", ""))) for node in nodes]
        try:
            self.ctx.provider.kill_tags(targets)
        except MpilaunchError as exc:
            log.warning("what the previous run left could not all be killed: %s", exc)
        for parent, task, nodes in attempts:
            job_id = self._job_id(parent)
            self.isolation.run("task", parent, task, partial(
                records.finish, self.ctx, job_id, task["id"], nodes, multi="multiInstanceSettings" in task,
                outcome=Outcome(kind="requeue"), max_retries=0))
        for pool in pools:
            self.isolation.run("pool", (), pool, partial(self._restart_pool, pool))

    def _job_id(self, parent: tuple[str, ...]) -> str:
        """The job id (as the job doc spells it) of a task's parent key (lower-cased)."""
        job = self.store.get("job", (), parent[0]) if parent else None
        return str(job["id"]) if job is not None else parent[0]

    def _restore_pool(self, pool: Doc, restored: dict[str, Node]) -> None:
        for doc in self.store.list("node", (pool["id"],)):
            node = self.ctx.node_of(doc)
            if node is None or doc.get("state") == "leavingpool":
                self.store.delete("node", (pool["id"],), doc["id"])  # recreated by the next resize
                if node is not None:
                    self.ctx.provider.destroy_node(node)
                continue
            try:
                restored[node.id] = self.ctx.provider.restore_node(node)
            except MpilaunchError as exc:
                log.warning("node %s cannot be restored: %s", node.id, exc)

    def _restart_pool(self, pool: Doc) -> None:
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
        work: dict[str, list[Doc]] = {}
        for parent, task in self.store.work("task", WORK_TASK_STATES):
            work.setdefault(parent[0] if parent else "", []).append(task)
        for job in self.store.list("job", states=LIVE_JOB_STATES):
            tasks = work.pop(str(job.get("id", "")).lower(), [])
            pool = self.isolation.run("job", (), job, partial(self._job, job))
            if pool is not False:  # False: the job is being deleted or has just expired; its tasks wait
                self._job_tasks(job, tasks, pool if isinstance(pool, dict) else None,
                                complete=job.get("state") == "active")
        for job_key, tasks in work.items():  # tasks of completed jobs: their delete and terminate requests
            owner = self.store.get("job", (), job_key)
            if owner is not None:
                self._job_tasks(owner, tasks, None)

    def _job(self, job: Doc) -> Doc | bool:
        """The job's own part of a step; returns ``False`` if its tasks are not to be looked at now, else the pool
        to place its active tasks on (``True``: none, only deletes and terminations)."""
        state = job.get("state")
        if state == "deleting":
            self._delete_job(job)
            return False
        if state == "active" and _expired(job):
            self.store.update("job", (), job["id"], _expire)
            self.wake()
            return False
        if state == "terminating":
            self._terminate_job(job)
        if state != "active":
            return True
        # an auto pool's id is only in executionInfo (poolInfo holds its specification)
        pool_id = str(job.get("poolInfo", {}).get("poolId") or (job.get("executionInfo") or {}).get("poolId") or "")
        pool = self.store.get("pool", (), pool_id) if pool_id else None
        if pool is None or pool.get("state") != "active" or self.isolation.skipped("pool", (), pool):
            return True
        checked = self.isolation.run("pool", (), pool, lambda: _check_pool(pool))
        return pool if checked else True

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
            self._end_auto_pool(job)
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
        self._end_auto_pool(self.store.update("job", (), job_id, complete))

    def _end_auto_pool(self, job: Doc | None) -> None:
        """Delete the job's auto pool once the job completes or is deleted, unless ``keepAlive``: "the Batch service
        deletes the Pool once its lifetime (as determined by the poolLifetimeOption setting) expires; that is, when
        the Job or Job Schedule completes" (``BatchAutoPoolSpecification``)."""
        spec = ((job or {}).get("poolInfo") or {}).get("autoPoolSpecification")
        if job is None or not spec or spec.get("keepAlive") or spec.get("poolLifetimeOption") != "job":
            return
        pool_id = str((job.get("executionInfo") or {}).get("poolId") or "")
        if pool_id and self.store.update("pool", (), pool_id, lambda doc: transition(doc, "deleting")) is not None:
            self.wake()

    def _remove_task(self, job_id: str, task: Doc) -> None:
        """Delete a task that is not running, with its (and its subtasks') directories on the nodes, as Batch does."""
        for doc in [task, *self.store.list("subtask", (job_id, task["id"]))]:
            if doc.get("_taskDir"):
                wipe(Path(doc["_taskDir"]))
        self.store.delete("task", (job_id,), task["id"])

    def _end_idle_task(self, job_id: str, task_id: str) -> None:
        records.finish(self.ctx, job_id, task_id, [], multi=False, outcome=Outcome(kind="terminated"), max_retries=0)

    def _job_tasks(self, job: Doc, tasks: list[Doc], pool: Doc | None, *, complete: bool = False) -> None:
        """Carry out the delete/terminate requests of ``tasks`` (the job's live ones); with a ``pool``, also place
        its active tasks there; with ``complete`` (an active job), complete the job once all its tasks have
        (``onAllTasksComplete``)."""
        candidates: list[Doc] = []  # the pool's usable node docs, listed once per step
        if pool is not None and any(t.get("state") == "active" for t in tasks):
            candidates = self.store.list("node", (pool["id"],), states=["idle", "running"])
        for task in tasks:
            self.isolation.run("task", (job["id"],), task, partial(self._task, job, task, pool, candidates))
        if complete and job.get("onAllTasksComplete") == "terminatejob":
            self.isolation.run("job", (), job, lambda: self._all_complete(job))

    def _task(self, job: Doc, task: Doc, pool: Doc | None, candidates: list[Doc]) -> None:
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
            self._schedule(job, pool, task, candidates)

    def _all_complete(self, job: Doc) -> None:
        """Complete the job if it has tasks and all are completed (two indexed queries, not a read of its tasks)."""
        parent = (str(job["id"]),)
        if (self.store.count("task", parent, states=WORK_TASK_STATES, limit=1) == 0
                and self.store.count("task", parent, limit=1) == 1):
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
        claimed: Doc | None = None
        try:
            claimed = records.claim(self.ctx, job["id"], task["id"], nodes, tag)
            if claimed is None:
                self._free(nodes, 1 if multi else need)
                return
            run = TaskRun(self.ctx, job, claimed, nodes, tag=tag, primary_port=reserve_port(nodes[0].address),
                          on_done=self._done, on_started=self._started)
        except DATA_ERRORS:  # the task cannot run: give its nodes back, then it is marked (Isolation)
            if claimed is not None:
                records.release_all(self.ctx, job["id"], task["id"], nodes)
            self._free(nodes, 1 if multi else need)
            raise
        with self._lock:
            self._runs[key] = run
        run.start()

    def _started(self, run: TaskRun, starts: dict[int, str]) -> None:
        """Every instance of ``run`` runs: its subtasks are ``running`` since their own start."""
        try:
            records.instances_started(self.ctx, run.job["id"], run.task["id"], starts)
        except Exception:  # the attempt goes on; its subtasks' times are written when it ends
            log.exception("task %s/%s: subtask start times not recorded", run.job["id"], run.task["id"])

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
        except DATA_ERRORS as exc:  # its record cannot take the outcome: mark it, free its nodes
            task = self.store.get("task", (job_id,), task_id)
            if task is not None:
                self.isolation.mark("task", (job_id,), task, exc)
            records.release_all(self.ctx, job_id, task_id, run.nodes)
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
