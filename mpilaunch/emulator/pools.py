"""Pool allocation and the node lifecycle: creating → starting → (waitingforstarttask) → idle | starttaskfailed.

The engine's loop calls :meth:`NodeManager.step`; slow work (provider calls, StartTasks) runs on worker threads that
write node docs and wake the loop. Nodes leave a pool (resize down, remove nodes, pool delete) through
``leavingpool``. A node found down after a failed attempt (:meth:`NodeManager.check_lost`) is ``unusable`` (error
``NodeLost``), so the requeued task waits for or goes to healthy nodes; once the provider says it is up again it
restarts (StartTask, then ``idle``), as a rebooted VM. Whatever a StartTask started is killed when it ends (its tag),
so no StartTask process outlives it.

Node actions (:func:`request_action`, asked for by the API or by a resize): ``reboot``, ``reimage``, ``remove``,
``disable`` (scheduling), and the faults ``preempt`` (Spot nodes) and ``kill``. The node enters its state at once
(``rebooting``, ``reimaging``, ``leavingpool``, ``preempted``, ``unusable``); with the option ``requeue`` or
``terminate`` its running tasks are ended first (requeued, or completed with ``TaskEnded``), with ``taskcompletion``
(or ``retaineddata``) they finish first; then the action is carried out. A reboot kills everything on the node and
reruns its StartTask; a reimage and a preemption also lose the node's files (a preempted node comes back with the same
id through ``creating`` after its downtime). A killed node is down at once; its tasks are requeued, and it is
restarted after its downtime.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mpilaunch.emulator import multiinstance as mi
from mpilaunch.emulator import resourcefiles
from mpilaunch.emulator.context import EngineContext, log, wipe
from mpilaunch.emulator.isolation import Isolation
from mpilaunch.emulator.nodes.base import ADMIN, NONADMIN, Node
from mpilaunch.emulator.store import Doc, now_iso, transition
from node_runtime.errors import MpilaunchError

START_TAG = "starttask"
GONE = ("leavingpool",)
PROVISIONING = ("creating", "starting")
LOST_PROBE = 2.0
"""Seconds between checks whether lost (``unusable``) nodes are up again."""
DOWNTIME = 2.0
"""Default seconds a preempted or killed node stays down before it comes back."""
ACTION_STATES = {"reboot": "rebooting", "reimage": "reimaging", "remove": "leavingpool", "preempt": "preempted",
                 "kill": "unusable"}
"""The state a node enters as soon as an action is asked for (``disable`` changes its schedulingState only)."""


def request_action(doc: Doc, kind: str, option: str = "requeue", down: float = DOWNTIME) -> None:
    """Ask for node action ``kind`` (see the module docstring) on a node doc, inside a store update; ``option`` says
    what happens to its running tasks (Batch's nodeRebootOption, nodeDeallocationOption, ...), ``down`` how long a
    preempted or killed node stays down."""
    doc["_action"] = {"kind": kind, "option": option, "down": down}
    if kind in ACTION_STATES:
        transition(doc, ACTION_STATES[kind])


def new_node_id(dedicated: bool) -> str:
    """A fresh node id in Batch's style: ``tvmps_<hex>_d`` (dedicated) or ``..._p`` (low priority/spot)."""
    return f"tvmps_{secrets.token_hex(10)}_{'d' if dedicated else 'p'}"


def is_dedicated(node_id: str) -> bool:
    """Whether a node id made by :func:`new_node_id` is a dedicated node."""
    return not node_id.endswith("_p")


def elevation(spec: Mapping[str, Any]) -> str:
    """The elevation level a task or StartTask runs with: ``admin`` only for ``userIdentity.autoUser.elevationLevel
    = admin`` (the default, and a named ``userIdentity.username``, run as the non-admin task user)."""
    level = ((spec.get("userIdentity") or {}).get("autoUser") or {}).get("elevationLevel")
    return ADMIN if level == ADMIN else NONADMIN


def _ipv6(address: str) -> str:
    a, b, c, d = (int(x) for x in address.split("."))
    return f"0:0:0:0:0:ffff:{a * 256 + b:x}:{c * 256 + d:x}"


class NodeManager:
    """Keeps every pool's nodes at its target and runs their StartTasks."""

    def __init__(self, ctx: EngineContext, is_busy: Callable[[str], bool], evict: Callable[[str, str], None],
                 isolation: Isolation | None = None) -> None:
        self.ctx = ctx
        self.isolation = isolation or Isolation(ctx)
        """Each pool is stepped on its own: one the engine cannot act on is marked (``resizeErrors``) and skipped."""
        self.is_busy = is_busy
        self.evict = evict
        """``evict(node_id, kind)`` ends every attempt running on the node (``requeue`` or ``evicted``)."""
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._probed = 0.0

    # -- the loop's part ---------------------------------------------------------------------------------------
    def step(self) -> None:
        probe = time.monotonic() - self._probed >= LOST_PROBE
        if probe:
            self._probed = time.monotonic()
        for pool in self.ctx.store.list("pool"):
            self.isolation.run("pool", (), pool, partial(self._step_pool, pool, probe))

    def _step_pool(self, pool: Doc, probe: bool) -> None:
        nodes = self.ctx.store.list("node", (pool["id"],))
        if pool.get("state") == "deleting":
            self._delete_pool(pool, nodes)
        else:
            self._resize(pool, nodes)
            if probe:
                self._revive(pool["id"], nodes)
        self._act(pool["id"])

    def check_lost(self, nodes: Sequence[Node], what: str) -> list[Node]:
        """After a failed attempt (``what``): mark each node the provider says is down ``unusable``; returns them."""
        down = [node for node in nodes if not self.ctx.provider.alive(node)]
        for node in down:
            log.warning("node %s is down after %s: unusable until it is back", node.id, what)
            error = {"code": "NodeLost", "message": f"The node went down while running {what}; it is unusable "
                     "until it is up again."}

            def lost(doc: Doc, error: Doc = error) -> None:
                transition(doc, "unusable")
                doc["errors"], doc["_lost"] = [error], True
            self.ctx.update_node(node.pool_id, node.id, lost)
        return down

    def _revive(self, pool_id: str, nodes: list[Doc]) -> None:
        """Restart the pool's lost nodes that are up again (as after a reboot: StartTask, then idle)."""
        for doc in nodes:
            node = self.ctx.node_of(doc) if doc.get("_lost") and doc.get("state") == "unusable" else None
            if node is not None and self.ctx.provider.alive(node):
                self.ctx.update_node(pool_id, doc["id"], lambda d: transition(d, "starting"))
                self.restart_node(pool_id, doc)

    def _resize(self, pool: Doc, nodes: list[Doc]) -> None:
        staying = [n for n in nodes if n.get("state") not in GONE]
        dedicated = int(pool.get("targetDedicatedNodes") or 0)
        low = int(pool.get("targetLowPriorityNodes") or 0)
        have_d = [n for n in staying if n.get("isDedicated", True)]
        have_l = [n for n in staying if not n.get("isDedicated", True)]
        for want, have, is_dedicated in ((dedicated, have_d, True), (low, have_l, False)):
            for _ in range(want - len(have)):
                self._add_node(pool, is_dedicated)
            if len(have) > want:  # broken nodes go first, then idle ones, busy ones last
                removable = [n for n in have if n.get("state") != "creating"]
                removable.sort(key=lambda n: (self.is_busy(n["id"]), n.get("state") == "idle"))
                for node in removable[: len(have) - want]:
                    self._request(pool["id"], node["id"], "remove", pool.get("_deallocation") or "requeue")
        nodes = self.ctx.store.list("node", (pool["id"],))
        settled = not any(n.get("state") in PROVISIONING + GONE for n in nodes)
        counts = (sum(1 for n in nodes if n.get("isDedicated", True)),
                  sum(1 for n in nodes if not n.get("isDedicated", True)))
        if settled and counts == (dedicated, low) and (
                pool.get("allocationState") != "steady" or (pool.get("currentDedicatedNodes"),
                                                             pool.get("currentLowPriorityNodes")) != counts):
            def steady(doc: Doc) -> None:
                doc["allocationState"] = "steady"
                doc["allocationStateTransitionTime"] = now_iso()
                doc["currentDedicatedNodes"], doc["currentLowPriorityNodes"] = counts
            self.ctx.store.update("pool", (), pool["id"], steady)

    def _delete_pool(self, pool: Doc, nodes: list[Doc]) -> None:
        """Remove every node (a half-created one once the provider has made it); its tasks are requeued."""
        for node in nodes:
            if node.get("state") not in (*GONE, "creating"):
                self._request(pool["id"], node["id"], "remove", "requeue")
        if not nodes:
            self.ctx.store.delete("pool", (), pool["id"])
            wipe(self.ctx.data_dir / "nodes" / pool["id"])

    # -- node actions ---------------------------------------------------------------------------------------------
    def _request(self, pool_id: str, node_id: str, kind: str, option: str) -> None:
        self.ctx.update_node(pool_id, node_id, lambda d: request_action(d, kind, option))

    def _act(self, pool_id: str) -> None:
        """Carry out the pool's node actions, bring nodes back after their downtime, take disabled idle nodes
        offline."""
        for doc in self.ctx.store.list("node", (pool_id,)):
            action = doc.get("_action")
            if action is None:
                if doc.get("_upAt", float("inf")) <= time.time():
                    self._come_back(pool_id, doc)
                elif doc.get("schedulingState") == "disabled" and doc.get("state") == "idle":
                    self.ctx.update_node(pool_id, doc["id"], lambda d: transition(d, "offline"))
                continue
            if action.get("started"):
                continue
            if action["kind"] == "kill":
                self._kill(pool_id, doc, float(action["down"]))
                continue
            if action["option"] in ("requeue", "terminate"):
                self.evict(doc["id"], "requeue" if action["option"] == "requeue" else "evicted")
            if self.is_busy(doc["id"]):
                continue  # taskcompletion, or the evicted attempts are still ending

            def start(d: Doc) -> None:
                d["_action"]["started"] = True
                if d["_action"]["kind"] == "disable":
                    del d["_action"]
            self.ctx.update_node(pool_id, doc["id"], start)
            if action["kind"] != "disable":
                self._spawn(doc["id"], self._carry_out, pool_id, doc["id"], action)

    def _carry_out(self, pool_id: str, node_id: str, action: Doc) -> None:
        """The node's tasks are gone: reboot, reimage, remove or preempt it (a worker thread)."""
        doc = self.ctx.store.get("node", (pool_id,), node_id)
        if doc is None:
            return
        kind, node = action["kind"], self.ctx.node_of(doc)
        if kind == "remove":
            self._destroy(pool_id, doc)
            return
        try:
            if node is not None and kind == "reboot":
                self.ctx.provider.kill_node(node)
                self.ctx.provider.restart_node(node)
            elif node is not None:  # reimage, preempt: the disk is gone
                self.ctx.provider.destroy_node(node)
                wipe(node.root)
        except MpilaunchError as exc:
            log.warning("node %s: %s failed: %s", node_id, kind, exc)
        if kind == "preempt":
            def down(d: Doc) -> None:
                d.pop("_action", None)
                d.pop("_node", None)
                d["_upAt"] = time.time() + float(action["down"])
            self.ctx.update_node(pool_id, node_id, down)
            self.ctx.wake()
        else:
            self._provision(pool_id, node_id, node if kind == "reboot" else None)

    def _kill(self, pool_id: str, doc: Doc, down: float) -> None:
        """The node fails now: everything on it ends, its tasks are requeued; it comes back after ``down`` s."""
        node = self.ctx.node_of(doc)
        try:
            if node is not None:
                self.ctx.provider.kill_node(node)
        except MpilaunchError as exc:
            log.warning("node %s cannot be killed: %s", doc["id"], exc)
        self.evict(doc["id"], "requeue")
        error = {"code": "NodeLost", "message": "The node went down (emulator fault injection); it is unusable "
                 "until it is up again."}

        def lost(d: Doc) -> None:
            d.pop("_action", None)
            d["errors"], d["_lost"], d["_upAt"] = [error], True, time.time() + down
        self.ctx.update_node(pool_id, doc["id"], lost)

    def _come_back(self, pool_id: str, doc: Doc) -> None:
        """After its downtime: a preempted node is made again (same id), a killed one restarted."""
        node = self.ctx.node_of(doc)

        def back(d: Doc) -> None:
            d.pop("_upAt", None)
            transition(d, "creating" if node is None else "starting")
        self.ctx.update_node(pool_id, doc["id"], back)
        try:
            if node is not None:
                self.ctx.provider.restart_node(node)
        except MpilaunchError as exc:
            log.warning("node %s cannot be restarted: %s", doc["id"], exc)
        self._spawn(doc["id"], self._provision, pool_id, doc["id"], node)

    # -- node creation -------------------------------------------------------------------------------------------
    def _add_node(self, pool: Doc, dedicated: bool) -> None:
        node_id = new_node_id(dedicated)
        now = now_iso()
        doc: Doc = {
            "id": node_id, "url": self.ctx.node_url(pool["id"], node_id), "state": "creating",
            "schedulingState": "enabled", "stateTransitionTime": now, "lastBootTime": now, "allocationTime": now,
            "ipAddress": "", "ipv6Address": "", "affinityId": f"TVM:{node_id}", "vmSize": pool.get("vmSize", ""),
            "totalTasksRun": 0, "runningTasksCount": 0, "runningTaskSlotsCount": 0, "totalTasksSucceeded": 0,
            "isDedicated": dedicated,
            "virtualMachineInfo": {"imageReference": dict(
                pool.get("virtualMachineConfiguration", {}).get("imageReference", {}))},
            "nodeAgentInfo": {"version": "mpilaunch-emulator", "lastUpdateTime": now},
            "_root": str(self.ctx.node_root(pool["id"], node_id)),
        }
        if pool.get("startTask"):
            doc["startTask"] = pool["startTask"]
        self.ctx.store.insert("node", (pool["id"],), doc)
        self._spawn(node_id, self._provision, pool["id"], node_id, None)

    def restart_node(self, pool_id: str, doc: Doc) -> None:
        """After an emulator restart: restore the node and run its StartTask again (as after a reboot)."""
        self._spawn(doc["id"], self._provision, pool_id, doc["id"], self.ctx.node_of(doc))

    def _spawn(self, key: str, target: Callable[..., None], *args: Any) -> None:
        with self._lock:
            thread = threading.Thread(target=target, args=args, name=f"node-{key}", daemon=True)
            self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
            self._threads[key] = thread
        thread.start()

    def _provision(self, pool_id: str, node_id: str, node: Node | None) -> None:
        try:
            pool = self.ctx.store.get("pool", (), pool_id)
            if pool is None:
                return
            if node is None:
                taken = [n["ipAddress"] for n in self.ctx.store.list("node") if n.get("ipAddress")]
                node = self.ctx.provider.create_node(pool, node_id, self.ctx.node_root(pool_id, node_id), taken)
            else:
                node = self.ctx.provider.restore_node(node)
            created = node
            # AZ_BATCH_NODE_SHARED_DIR exists from the node's start, read/write for every task ("shared" in
            # https://learn.microsoft.com/azure/batch/files-and-directories), before any StartTask runs
            shared = node.root / "shared"
            shared.mkdir(parents=True, exist_ok=True)
            shared.chmod(0o777)

            def starting(doc: Doc) -> None:
                doc["_node"] = created.to_json()
                doc["ipAddress"], doc["ipv6Address"] = created.address, _ipv6(created.address)
                doc["lastBootTime"] = now_iso()
                if doc.pop("_lost", False):
                    doc.pop("errors", None)
                if doc.get("_action", {}).get("started"):  # a reboot or reimage done (not a newer removal)
                    del doc["_action"]
                transition(doc, "starting")
            self.ctx.update_node(pool_id, node_id, starting)
            self._run_start_task(pool, node)
        except (MpilaunchError, OSError) as exc:  # left 'creating', the node could never leave its pool
            log.warning("node %s could not be created: %s", node_id, exc)
            error = {"code": "NodeCreationFailed", "message": str(exc)}

            def unusable(doc: Doc) -> None:
                transition(doc, "unusable")
                doc["errors"] = [error]
            self.ctx.update_node(pool_id, node_id, unusable)
        finally:
            self.ctx.wake()

    # -- StartTask ------------------------------------------------------------------------------------------------
    def _run_start_task(self, pool: Doc, node: Node) -> None:
        spec = pool.get("startTask")
        if not spec:
            self.ctx.update_node(pool["id"], node.id, lambda d: transition(d, "idle"))
            return
        wait = spec.get("waitForSuccess", True)
        self.ctx.update_node(pool["id"], node.id, lambda d: transition(d, "waitingforstarttask" if wait else "idle"))
        self.ctx.wake()
        max_retries = int(spec.get("maxTaskRetryCount") or 0)
        retry = 0
        while True:
            code, failure = self._start_task_once(pool, node, spec, retry)
            if self.ctx.stopping.is_set():
                return  # the next start reruns it (recover)
            if failure is None or code is None or (max_retries != -1 and retry >= max_retries):
                break  # pre-processing errors (no exit code) are not retried
            retry += 1
        ok = failure is None

        def done(doc: Doc) -> None:
            info = doc.setdefault("startTaskInfo", {})
            info.update(state="completed", endTime=now_iso(), result="success" if ok else "failure")
            if code is not None:
                info["exitCode"] = code
            if failure:
                info["failureInfo"] = failure
            if wait and doc.get("state") == "waitingforstarttask":  # not if the node was rebooted or lost meanwhile
                transition(doc, "idle" if ok else "starttaskfailed")
        self.ctx.update_node(pool["id"], node.id, done)

    def _start_task_once(self, pool: Doc, node: Node, spec: Doc, retry: int) -> tuple[int | None, Doc | None]:
        startup = node.root / "startup"
        wipe(startup)
        (startup / "wd").mkdir(parents=True)

        def running(doc: Doc) -> None:
            info: Doc = {"state": "running", "startTime": now_iso(), "retryCount": retry}
            if retry:
                info["lastRetryTime"] = info["startTime"]
            doc["startTaskInfo"] = info
        self.ctx.update_node(pool["id"], node.id, running)
        try:
            resourcefiles.download(spec.get("resourceFiles"), startup / "wd")
            argv = mi.split_command(spec["commandLine"])
        except resourcefiles.TransferError as exc:
            return None, mi.failure_info(exc.code, exc.message)
        except ValueError as exc:
            return None, mi.failure_info("CommandLineParseError", str(exc))
        env = mi.settings(spec.get("environmentSettings")) | mi.node_env(
            pool_id=pool["id"], node_id=node.id, node_root=node.node_root, dedicated=is_dedicated(node.id))
        env |= {"AZ_BATCH_TASK_DIR": node.node_path(startup), "AZ_BATCH_TASK_WORKING_DIR":
                node.node_path(startup / "wd"), "AZ_BATCH_ACCOUNT_NAME": self.ctx.account,
                "AZ_BATCH_ACCOUNT_URL": self.ctx.account_url}
        try:
            execution = self.ctx.provider.run(node, argv, env=env, cwd=node.node_path(startup / "wd"),
                                              stdout=startup / "stdout.txt", stderr=startup / "stderr.txt",
                                              tag=START_TAG, container=spec.get("containerSettings"),
                                              user=elevation(spec))
        except MpilaunchError as exc:
            return None, mi.failure_info("CommandStartFailed", str(exc))
        try:
            while (code := execution.wait(0.2)) is None:
                if self.ctx.stopping.is_set():
                    execution.kill()
                    return None, None
        finally:
            self.ctx.provider.kill_tag(node, START_TAG)  # the daemons it left, too
        return code, None if code == 0 else mi.exit_failure(code, "the StartTask")

    # -- node removal ---------------------------------------------------------------------------------------------
    def _destroy(self, pool_id: str, doc: Doc) -> None:
        try:
            doc = self.ctx.store.get("node", (pool_id,), doc["id"]) or doc
            node = self.ctx.node_of(doc)
            if node is not None:
                self.ctx.provider.destroy_node(node)
            wipe(Path(doc["_root"]))
            self.ctx.store.delete("node", (pool_id,), doc["id"])
        except MpilaunchError as exc:
            log.warning("node %s could not be removed: %s", doc["id"], exc)
        finally:
            self.ctx.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the worker threads (``ctx.stopping`` is set) and kill every StartTask process."""
        with self._lock:
            threads = list(self._threads.values())
            self._threads.clear()
        for thread in threads:
            thread.join(timeout)
        nodes = [node for doc in self.ctx.store.list("node") if (node := self.ctx.node_of(doc)) is not None]
        try:
            self.ctx.provider.kill_tags([(node, START_TAG) for node in nodes])
        except MpilaunchError as exc:
            log.warning("could not end every StartTask: %s", exc)
