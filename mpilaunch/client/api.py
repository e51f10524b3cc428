"""The Python API behind the CLI: build, pre-flight, submit, wait, gather results.

Example (a notebook, against the local emulator started by ``mpilaunch local up``)::

    from pathlib import Path
    from mpilaunch.client.api import Launcher
    from mpilaunch.client.spec import TaskSpec

    launcher = Launcher.local()
    spec = TaskSpec(job_id="demo", task_id="hello-1", nodes=3, argv=("python3", "hello_mpi.py"),
                    inputs=(Path("examples/hello_mpi.py"),))
    ref = launcher.submit(spec)
    results = launcher.wait(ref)          # -> TaskResults; results.succeeded, results.instances
    launcher.download_logs(results, Path("logs"))

Every error is an :mod:`node_runtime.errors` exception; Azure SDK errors (Batch or Blob storage) become
:class:`BatchError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpilaunch.client import config as cfg
from mpilaunch.client.results import (
    NODE_FIELDS,
    TaskResults,
    build_results,
    fetch_first_failure,
    lists_nodes,
    wants_launch_report,
)
from mpilaunch.client.spec import TaskSpec
from node_runtime.errors import BatchError, InvalidInput, MpilaunchError

if TYPE_CHECKING:
    from mpilaunch.client.pools import PoolSpec
    from mpilaunch.client.storage import UploadMonitor


@dataclass(frozen=True)
class TaskRef:
    job_id: str
    task_id: str

    def __str__(self) -> str:
        return f"{self.job_id}/{self.task_id}"


@contextlib.contextmanager
def batch_errors(endpoint: str) -> Iterator[None]:
    """Turn Azure SDK exceptions from ``endpoint`` (Batch or Blob storage) into :class:`BatchError` (code + service
    message, never a key)."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    try:
        yield
    except ClientAuthenticationError as exc:
        raise BatchError(f"authentication failed at {endpoint}: check the account name and key / Entra login",
                         code=_code(exc)) from None
    except HttpResponseError as exc:
        message = getattr(getattr(exc, "error", None), "message", None) or exc.reason or str(exc)
        raise BatchError(str(message).splitlines()[0], code=_code(exc)) from None
    except ServiceRequestError as exc:
        raise BatchError(f"cannot reach {endpoint}: {type(exc).__name__}") from None


def _code(exc: Any) -> str:
    return str(getattr(getattr(exc, "error", None), "code", None) or getattr(exc, "status_code", "") or "")


class Launcher:
    """A Batch account + storage account pair, and the operations on MPI tasks."""

    def __init__(self, settings: cfg.Settings, credential: Any = None) -> None:
        """``credential``: an azure-identity ``TokenCredential`` used where no key is configured
        (default ``DefaultAzureCredential``)."""
        self.settings = settings
        self.credential = credential
        self.batch = settings.batch.client(credential)
        self._store: Any = None

    @classmethod
    def from_environment(cls, flags: dict[str, str | None] | None = None, profile: str | None = None) -> Launcher:
        return cls(cfg.resolve_settings(flags or {}, profile=profile))

    @classmethod
    def local(cls, nodes: int | None = None) -> Launcher:
        """The local emulator + Azurite; with ``nodes``, start them if needed and grow pool ``local`` to it."""
        from mpilaunch.client import local

        if nodes is not None:
            local.up(nodes)
        return cls(local.settings())

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return batch_errors(self.settings.batch.endpoint)

    def storage_errors(self) -> contextlib.AbstractContextManager[None]:
        return batch_errors(str(self.store.service.url))

    @property
    def store(self) -> Any:
        if self._store is None:
            if self.settings.storage is None:
                raise InvalidInput("no storage account configured: set AZURE_STORAGE_CONNECTION_STRING or "
                                   "AZURE_STORAGE_ACCOUNT (inputs and outputs go through Blob storage)")
            from mpilaunch.client.storage import StagingStore

            self._store = StagingStore(self.settings.storage, self.credential)
        return self._store

    def pool_for(self, spec: TaskSpec, pool: str | None = None) -> str:
        """The pool the task will run on: the job's if it exists, else ``pool`` or the configured one."""
        from azure.core.exceptions import ResourceNotFoundError

        with self.errors():
            try:
                job = self.batch.get_job(spec.job_id)
            except ResourceNotFoundError:
                job = None
        if job is not None:
            job_pool = job.pool_info.pool_id if job.pool_info else None
            if pool and job_pool and pool != job_pool:
                raise InvalidInput(f"job {spec.job_id!r} runs on pool {job_pool!r}, not {pool!r}: use another job")
            if job_pool:
                return str(job_pool)
        chosen = pool or self.settings.pool
        if not chosen:
            raise InvalidInput("no pool given: pass --pool or set MPILAUNCH_POOL")
        return chosen

    def preflight(self, spec: TaskSpec, pool: str | None = None) -> list[str]:
        """Raise :class:`PreflightError` if the pool cannot run ``spec``; return warnings."""
        spec.validate()
        return self._preflight(spec, self.pool_for(spec, pool))

    def _preflight(self, spec: TaskSpec, pool_id: str) -> list[str]:
        from mpilaunch.client.preflight import preflight

        with self.errors():
            return preflight(self.batch, pool_id, spec)

    def build(self, spec: TaskSpec, *, monitor: UploadMonitor | None = None, secret: str | None = None) -> Any:
        """Upload inputs (skipping unchanged ones) and return the ``BatchTaskCreateOptions`` for ``spec``."""
        from mpilaunch.client import storage, taskbuild

        spec = self.with_checkpoint_sas(spec.validate())
        if not spec.inputs and not spec.primary_inputs and not spec.outputs and not spec.upload_logs:
            return taskbuild.build_task(spec, secret=secret)
        store = self.store
        expiry = storage.sas_expiry(spec.wall_time, spec.retries)
        common, primary = storage.walk_inputs(spec.inputs), storage.walk_inputs(spec.primary_inputs)
        with self.storage_errors():
            if monitor is None:
                store.upload(common + primary)  # also creates the container
            else:
                with monitor(sum(f.size for f in common + primary)) as advance:
                    store.upload(common + primary, on_progress=advance)
            read_url = store.container_sas_url("r", expiry)
            write_url = store.container_sas_url("cw", expiry)
        outputs = taskbuild.OutputTarget(write_url, f"outputs/{spec.job_id}/{spec.task_id}")
        return taskbuild.build_task(spec, common_files=store.staged(common, read_url),
                                    primary_files=store.staged(primary, read_url), outputs=outputs, secret=secret)

    def stage_runtime(self, wheel: Path | None = None) -> list[Any]:
        """Upload this client's runtime wheel (``wheel``, else built from the source tree) and the install script,
        each once (content-addressed), and return them as StartTask resource files (``StagedFile``), each readable
        through a SAS of its own for :data:`~mpilaunch.client.storage.RUNTIME_SAS_VALIDITY` (nodes added or
        reimaged later download them again; user delegation SAS last 7 days at most)."""
        import tempfile

        from mpilaunch.client import runtime, storage

        with tempfile.TemporaryDirectory(prefix="mpilaunch-runtime-") as tmp:
            files = storage.walk_inputs([runtime.runtime_wheel(wheel, Path(tmp)), runtime.INSTALL_SCRIPT])
            with self.storage_errors():
                self.store.upload(files)
                expiry = storage.runtime_sas_expiry()
                return [storage.StagedFile(self.store.blob_sas_url(f.blob_name, "r", expiry), f.rel)
                        for f in files]

    def with_checkpoint_sas(self, spec: TaskSpec) -> TaskSpec:
        """``spec`` with a usable checkpoint location: a Blob one gets its container created and a SAS appended."""
        if not spec.checkpoint_url:
            return spec
        from mpilaunch.client import checkpoint, storage

        expiry = storage.sas_expiry(spec.wall_time, spec.retries)
        url = checkpoint.usable_url(spec.checkpoint_url, self.settings.storage, expiry, self.credential)
        return dataclasses.replace(spec, checkpoint_url=url)

    def checkpoint_warnings(self, spec: TaskSpec) -> list[str]:
        """Warnings about a SAS the user put in the checkpoint location (more rights than needed, early expiry)."""
        if not spec.checkpoint_url:
            return []
        from mpilaunch.client import checkpoint, storage

        location = checkpoint.parse_location(spec.checkpoint_url)
        return checkpoint.sas_warnings(location, storage.sas_expiry(spec.wall_time, spec.retries))

    def ensure_job(self, job_id: str, pool_id: str) -> None:
        from azure.batch import models as bm
        from azure.core.exceptions import ResourceExistsError

        with self.errors(), contextlib.suppress(ResourceExistsError):
            self.batch.create_job(bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id)))

    def submit(self, spec: TaskSpec, *, pool: str | None = None, monitor: UploadMonitor | None = None,
               warn: Callable[[str], None] | None = None) -> TaskRef:
        """Pre-flight, upload, create the job if needed, add the task."""
        spec.validate()
        pool_id = self.pool_for(spec, pool)
        for warning in self._preflight(spec, pool_id) + self.checkpoint_warnings(spec):
            if warn:
                warn(warning)
        task = self.build(spec, monitor=monitor)
        self.ensure_job(spec.job_id, pool_id)
        with self.errors():
            self.batch.create_task(spec.job_id, task)
        return TaskRef(spec.job_id, spec.task_id)

    def submit_auto_pool(self, spec: TaskSpec, pool: PoolSpec, *, monitor: UploadMonitor | None = None,
                         warn: Callable[[str], None] | None = None, runtime_wheel: Path | None = None) -> TaskRef:
        """Pre-flight against the pool ``pool`` describes, upload, create job ``spec.job_id`` with that pool of its
        own (Batch deletes it when the job completes), add the task, then let the job complete with the task."""
        from azure.batch import models as bm
        from azure.core.exceptions import ResourceExistsError

        from mpilaunch.client import pools
        from mpilaunch.client.preflight import check_pool

        spec.validate()
        for warning in check_pool(pools.as_pool(pool), spec) + self.checkpoint_warnings(spec):
            if warn:
                warn(warning)
        runtime = self.stage_runtime(runtime_wheel) if pool.install_runtime else []
        task = self.build(spec, monitor=monitor)
        with self.errors():
            try:
                self.batch.create_job(pools.auto_pool_job(spec.job_id, pool, runtime))
            except ResourceExistsError:
                raise InvalidInput(f"job {spec.job_id!r} exists: --auto-pool needs a job of its own (its pool is "
                                   "deleted with it); give another --job or leave it out") from None
            try:
                self.batch.create_task(spec.job_id, task)
            except BaseException:
                self.batch.begin_delete_job(spec.job_id)  # the job's pool goes with it
                raise
            self.batch.update_job(spec.job_id, bm.BatchJobUpdateOptions(all_tasks_complete_mode="terminatejob"))
        return TaskRef(spec.job_id, spec.task_id)

    def results(self, ref: TaskRef) -> TaskResults:
        """The task and every subtask (all pages of List Subtasks); for a requeued or failed task also its pool's
        nodes (what happened to them)."""
        from azure.core.exceptions import ResourceNotFoundError

        with self.errors():
            task = self.batch.get_task(ref.job_id, ref.task_id)
            subtasks = list(self.batch.list_subtasks(ref.job_id, ref.task_id))
            nodes = None
            if task.node_info is not None and lists_nodes(task):
                with contextlib.suppress(ResourceNotFoundError):  # the pool is gone: nothing to say about nodes
                    nodes = list(self.batch.list_nodes(task.node_info.pool_id, select=list(NODE_FIELDS)))
            # a failed task: which rank failed first, from the primary's launch-report.json (one small file)
            first = fetch_first_failure(self.batch, task) if wants_launch_report(task) else None
        return build_results(ref.job_id, task, subtasks, nodes, first)

    def wait(self, ref: TaskRef, *, timeout: float | None = None, interval: float = 1.0,
             max_interval: float = 15.0, on_update: Callable[[TaskResults], None] | None = None,
             on_tick: Callable[[], None] | None = None) -> TaskResults:
        """Poll until the task completes; ``on_update`` sees every poll. Raises on ``timeout`` (task keeps running).

        Polls every ``interval`` seconds at first, backing off (x1.5) to ``max_interval`` while nothing changes, so a
        long task does not spend the account's request quota; any state change polls quickly again. ``on_tick`` is
        called every ``interval`` seconds while waiting, whatever the polls' pace (live output keeps its own).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, last = interval, None
        ticker = _Ticker(on_tick, interval)
        while True:
            res = self.results(ref)
            if on_update:
                on_update(res)
            if res.completed:
                return res
            if deadline is not None and time.monotonic() >= deadline:
                raise MpilaunchError(f"task {ref} still {res.state} after {timeout:g}s (it keeps running)")
            seen = (res.state, tuple(r.state for r in res.instances), res.retry_count, res.requeue_count)
            delay = interval if seen != last else min(delay * 1.5, max(interval, max_interval))
            last = seen
            ticker.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))

    def follow(self, ref: TaskRef, emit: Callable[[str, bool], None], *, raw: bool = False, instance: int = 0,
               streams: tuple[str, ...] = ("stdout.txt", "stderr.txt"), timeout: float | None = None,
               interval: float = 1.0, on_update: Callable[[TaskResults], None] | None = None) -> TaskResults:
        """:meth:`wait`, showing the task's output as it comes: ``emit(line, from_stderr)`` gets every whole line of
        the rank view (the primary's rank-tagged lines and its launch messages) or, ``raw`` (always for instances
        other than the primary), of the instance's ``streams``. Every ``interval`` seconds, one size request per
        followed file and a ranged download of what is new (:mod:`mpilaunch.client.follow`)."""
        from mpilaunch.client.follow import Follower, NodeFiles

        follower = Follower(NodeFiles(self.batch), emit, raw=raw, instance=instance, streams=streams)

        def update(results: TaskResults) -> None:
            follower.update(results)
            if on_update:
                on_update(results)

        with self.errors():
            results = self.wait(ref, timeout=timeout, interval=interval, on_update=update, on_tick=follower.poll)
            follower.finish(results)
        return results

    def instance_count(self, ref: TaskRef) -> int:
        """How many instances the task has (its ``multiInstanceSettings.numberOfInstances``; 1 for other tasks)."""
        with self.errors():
            task = self.batch.get_task(ref.job_id, ref.task_id, select=["multiInstanceSettings"])
        settings = task.multi_instance_settings
        return int(settings.number_of_instances or 1) if settings else 1

    def terminate(self, ref: TaskRef) -> None:
        with self.errors():
            self.batch.terminate_task(ref.job_id, ref.task_id)

    def reactivate(self, ref: TaskRef) -> None:
        """Batch's reactivate: a completed, failed task becomes active again, its retry count reset to 0 (the
        service refuses other tasks: ``TaskNotCompleted``, ``TaskSucceeded``)."""
        with self.errors():
            self.batch.reactivate_task(ref.job_id, ref.task_id)

    def download_logs(self, results: TaskResults, dest: Path, *, workers: int = 16) -> list[Path]:
        """Every instance's stdout.txt/stderr.txt into ``dest/instance-<i>/``, fetched in parallel."""
        from mpilaunch.client.results import download_logs

        with self.errors():
            return download_logs(self.batch, results, dest, workers=workers)

    def download_outputs(self, ref: TaskRef, dest: Path) -> list[Path]:
        """The output files and logs the primary uploaded to Blob storage, into ``dest``."""
        prefix = f"outputs/{ref.job_id}/{ref.task_id}/"
        written = []
        with self.storage_errors():
            for name in self.store.list_names(prefix):
                target = dest / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.store.download(name))
                written.append(target)
        return written


class _Ticker:
    """Sleeps for :meth:`Launcher.wait`, calling ``on_tick`` every ``every`` seconds meanwhile (on its own beat,
    whatever the sleeps between polls), or just sleeps without one."""

    def __init__(self, on_tick: Callable[[], None] | None, every: float) -> None:
        self.on_tick, self.every = on_tick, max(every, 0.05)
        self.due = time.monotonic()

    def sleep(self, seconds: float) -> None:
        if self.on_tick is None:
            time.sleep(seconds)
            return
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if now >= self.due:
                self.on_tick()
                self.due = now + self.every
            if now >= end:
                return
            time.sleep(min(end, self.due) - now)
