"""One attempt of a task on its nodes, as Batch runs it (a thread per attempt).

Multi-instance: every instance gets a fresh task dir and the common resource files in it, the primary also the
task's resource files in ``wd``; the coordination command runs on all instances; when all exited 0 the command line
runs on the primary (the coordination commands start paced on a shared machine: :meth:`TaskRun._coordinate`). Any
failure ends the attempt at once and kills every instance. Whatever the outcome, every
process started with the attempt's tag is killed on every node before the outcome is recorded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpilaunch.emulator import multiinstance as mi
from mpilaunch.emulator import resourcefiles
from mpilaunch.emulator.context import EngineContext, log, wipe
from mpilaunch.emulator.nodes.base import Execution, Node
from mpilaunch.emulator.pools import elevation, is_dedicated
from mpilaunch.emulator.store import now_iso
from node_runtime.errors import MpilaunchError

POLL = 0.02
PACE_WINDOW = 2.0
"""Seconds a coordination command counts as *starting* for the pacing (see :meth:`TaskRun._coordinate`)."""
PACE_PER_CORE = 4


def pace() -> int:
    """How many coordination commands of one attempt may be starting at once: 4 per core, at least 8."""
    return max(8, PACE_PER_CORE * (os.cpu_count() or 1))



@dataclass
class Outcome:
    """How an attempt ended. ``kind``: success | failure | timeout | terminated | evicted | deleted | requeue |
    shutdown (``evicted``: terminated because a node it ran on was rebooted, reimaged, removed or disabled with the
    ``terminate`` option)."""

    kind: str = "failure"
    retry: bool = True
    """Whether a failure may be retried: not for pre-processing (resource files, a command that cannot be parsed or
    started) or file upload errors, as Batch's ``executionInfo.retryCount`` says."""
    exit_code: int | None = None
    failure: dict[str, Any] | None = None
    codes: dict[int, int | None] = field(default_factory=dict)
    """Coordination exit code per instance index (``None``: did not finish)."""
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Failure info per instance index that failed."""
    starts: dict[int, str] = field(default_factory=dict)
    """When each instance started running (its coordination command started on its node), per index."""
    ends: dict[int, str] = field(default_factory=dict)
    """When each instance ended (its coordination command failed, or its processes were gone at the end)."""


class Stop(Exception):
    """The attempt was ended from outside (terminate, delete, timeout, shutdown)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class TaskRun:
    """Runs one attempt of ``task`` (of ``job``, on ``nodes``; nodes[0] is the primary) on its own thread."""

    def __init__(self, ctx: EngineContext, job: Mapping[str, Any], task: Mapping[str, Any], nodes: Sequence[Node], *,
                 tag: str, primary_port: int, on_done: Callable[[TaskRun, Outcome], None],
                 on_started: Callable[[TaskRun, dict[int, str]], None] | None = None) -> None:
        self.ctx, self.job, self.task, self.nodes, self.tag = ctx, job, task, list(nodes), tag
        self.primary_port = primary_port
        self.on_done = on_done
        self.on_started = on_started
        """Called (on the run's thread) once every instance runs, with each one's start time."""
        self.multi = "multiInstanceSettings" in task
        self.slots = 1 if self.multi else int(task.get("requiredSlots") or 1)
        """Task slots this attempt holds on each of its nodes."""
        self.rel = mi.task_rel_dir(job["id"], task["id"])
        self.outcome = Outcome()
        self._executions: list[Execution] = []
        self._instances: dict[int, Execution] = {}  # each instance's coordination command
        self._stop: str | None = None
        self._event = threading.Event()
        timeout = mi.parse_duration(task.get("constraints", {}).get("maxWallClockTime"))
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.thread = threading.Thread(target=self._main, name=f"task-{job['id']}-{task['id']}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self, kind: str) -> None:
        """End the attempt: ``terminated``, ``evicted``, ``deleted``, ``requeue`` or ``shutdown`` (first request
        wins)."""
        if self._stop is None:
            self._stop = kind
        self._event.set()

    def task_dir(self, index: int) -> Path:
        return self.nodes[index].root / self.rel

    # -- the attempt --------------------------------------------------------------------------------------------
    def _main(self) -> None:
        outcome = self.outcome
        try:
            self._execute()
        except Stop as stop:
            outcome.kind = stop.kind
        except Exception as exc:  # a bug or a broken node: record it as a server error, never hang the task
            log.exception("task %s/%s: attempt crashed", self.job["id"], self.task["id"])
            outcome.failure = mi.failure_info("InternalError", f"emulator error: {exc}", category="servererror")
        finally:
            self._kill_all()
        if outcome.kind == "failure" and outcome.failure is None:
            outcome.failure = mi.failure_info("InternalError", "attempt ended without a result", category="servererror")
        self.on_done(self, outcome)

    def _kill_all(self) -> None:
        """Kill every process of the attempt on every node (tagged ones and the commands' groups), then reap.

        One sweep for all the nodes (:meth:`~mpilaunch.emulator.nodes.base.NodeProvider.kill_tags`): node by
        node, each scanning the process table, it took 55-65% of a trivial task's submit→completed at any size."""
        try:
            self.ctx.provider.kill_tags([(node, self.tag) for node in self.nodes])
        except MpilaunchError as exc:
            log.warning("could not clean the nodes of %s: %s", self.tag, exc)
        for index, execution in self._instances.items():  # each instance ends when its own processes are gone
            execution.kill()
            execution.wait(1.0)
            self.outcome.ends.setdefault(index, now_iso())
        for execution in self._executions:
            execution.kill()
            execution.wait(1.0)
        for index in range(len(self.nodes)):
            self.outcome.ends.setdefault(index, now_iso())

    def _check(self) -> None:
        if self._stop is not None:
            raise Stop(self._stop)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise Stop("timeout")

    def _execute(self) -> Outcome:
        outcome = self.outcome
        for index in range(len(self.nodes)):
            wipe(self.task_dir(index))
            (self.task_dir(index) / "wd").mkdir(parents=True)
        self._prepare(outcome)
        if outcome.failures:
            outcome.retry = False
            return self._fail(outcome)
        if self.multi:
            argv = self._argv(self.task["multiInstanceSettings"].get("coordinationCommandLine"), outcome)
            if argv is None:
                return self._fail(outcome)
            if not self._coordinate(argv, outcome):
                return self._fail(outcome)
        argv = self._argv(self.task["commandLine"], outcome)
        if not argv:
            return self._fail(outcome)
        primary = self._launch(0, argv, outcome)
        if primary is None:
            return self._fail(outcome)
        outcome.exit_code = self._wait_one(primary)
        outcome.kind = "success" if outcome.exit_code == 0 else "failure"
        if outcome.exit_code != 0:
            outcome.failure = mi.exit_failure(outcome.exit_code, "the task command line")
        self._upload(outcome)
        return outcome

    def _prepare(self, outcome: Outcome) -> None:
        """Download resource files on every instance in parallel (common ones into the task dir)."""
        common = self.task.get("multiInstanceSettings", {}).get("commonResourceFiles")

        def one(index: int) -> None:
            try:
                if self.multi:
                    resourcefiles.download(common, self.task_dir(index))
                if index == 0:
                    resourcefiles.download(self.task.get("resourceFiles"), self.task_dir(0) / "wd")
            except resourcefiles.TransferError as exc:
                outcome.failures[index] = mi.failure_info(exc.code, exc.message)

        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            list(pool.map(one, range(len(self.nodes))))
        self._check()

    def _argv(self, command_line: str | None, outcome: Outcome) -> list[str] | None:
        """The split command line ([] if None); None, with the failure recorded for the primary, if it cannot be."""
        if command_line is None:
            return []
        try:
            return mi.split_command(command_line)
        except ValueError as exc:
            outcome.failures[0] = mi.failure_info("CommandLineParseError", str(exc))
            outcome.retry = False
            return None

    def env(self, index: int) -> dict[str, str]:
        node = self.nodes[index]
        instances = [mi.Instance(i, n.id, n.address) for i, n in enumerate(self.nodes)]
        return mi.instance_env(
            account=self.ctx.account, account_url=self.ctx.account_url, pool_id=node.pool_id,
            job_id=self.job["id"], task_id=self.task["id"], node_root=node.node_root, instances=instances,
            index=index, primary_port=self.primary_port, multi_instance=self.multi,
            job_settings=self.job.get("commonEnvironmentSettings"), task_settings=self.task.get("environmentSettings"),
            dedicated=is_dedicated(node.id))

    def _launch(self, index: int, argv: list[str], outcome: Outcome) -> Execution | None:
        node, tdir = self.nodes[index], self.task_dir(index)
        try:
            execution = self.ctx.provider.run(node, argv, env=self.env(index), cwd=node.node_path(tdir / "wd"),
                                              stdout=tdir / "stdout.txt", stderr=tdir / "stderr.txt", tag=self.tag,
                                              container=self.task.get("containerSettings"),
                                              user=elevation(self.task))
            self._executions.append(execution)
            return execution
        except MpilaunchError as exc:
            outcome.failures[index] = mi.failure_info("CommandStartFailed", str(exc))
            outcome.retry = False
            return None

    def _coordinate(self, argv: list[str], outcome: Outcome) -> bool:
        """Run the coordination command on every instance and wait for all; ``False`` at the first failure (the
        others are left to the kill). No command (``argv`` empty): every instance starts at once.

        The commands start paced (:func:`pace`): at most that many at once are *starting* (running for less than
        :data:`PACE_WINDOW` seconds); one that exits, or runs longer, makes room for the next. On Azure every node
        has its own cores; here all nodes share this machine's, and 100 coordination commands started at once
        (each starts and verifies an sshd within its own 10 s limits) starved each other on 2 cores. A command
        that waits for the others is never blocked by the pacing, only started later."""
        pending = list(range(len(self.nodes)))
        running: dict[int, tuple[Execution, float]] = {}
        limit = pace()
        while pending or running:
            now = time.monotonic()
            starting = sum(1 for _e, at in running.values() if now - at < PACE_WINDOW)
            started: dict[int, str] = {}
            while pending and (not argv or starting < limit):
                index = pending.pop(0)
                started[index] = outcome.starts[index] = now_iso()
                if not argv:
                    continue
                execution = self._launch(index, argv, outcome)
                if execution is None:
                    return False
                self._instances[index] = execution
                running[index] = (execution, time.monotonic())
                starting += 1
            if started and self.on_started is not None:
                self.on_started(self, started)
            for index, (execution, _at) in list(running.items()):
                code = execution.poll()
                if code is None:
                    continue
                outcome.codes[index] = code
                del running[index]
                if code != 0:
                    outcome.ends[index] = now_iso()
                    outcome.failures[index] = mi.exit_failure(code, "the coordination command")
                    return False
            if pending or running:
                self._event.wait(POLL)
                self._check()
        return True

    def _wait_one(self, execution: Execution) -> int:
        while (code := execution.poll()) is None:
            self._event.wait(POLL)
            self._check()
        return code

    def _fail(self, outcome: Outcome) -> Outcome:
        outcome.kind = "failure"
        index = min(outcome.failures) if outcome.failures else 0
        failure = dict(outcome.failures.get(index) or mi.failure_info("InternalError", "unknown failure"))
        if self.multi:
            failure.setdefault("details", []).append({"name": "Subtask", "value": str(index)})
            failure["details"].append({"name": "NodeId", "value": self.nodes[index].id})
        outcome.failure = failure
        outcome.exit_code = outcome.codes.get(index)
        self._upload(outcome)
        return outcome

    def _upload(self, outcome: Outcome) -> None:
        try:
            resourcefiles.upload(self.task.get("outputFiles"), self.task_dir(0) / "wd",
                                 succeeded=outcome.kind == "success")
        except resourcefiles.TransferError as exc:
            outcome.kind, outcome.retry = "failure", False
            outcome.failure = mi.failure_info(exc.code, exc.message)
