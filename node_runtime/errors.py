"""The exception tree of mpilaunch and node-runtime, documented in this one place.

Every error a user can cause or meet derives from :class:`MpilaunchError`. The CLIs turn it into a one-line
message (plus details) and its ``exit_code``; anything else is a bug and keeps its traceback.

::

    MpilaunchError                 exit 1  base class
    ├── InvalidInput               exit 2  bad flags, specs, files or values; nothing was changed
    │   ├── InvalidEnvironment     exit 2  bad AZ_BATCH_* / MPILAUNCH_* variables; .problems lists every one
    │   └── InvalidRequest         exit 2  a Batch request the service would reject (ids, sizes, requiredSlots)
    ├── PreflightError             exit 2  the pool cannot run the task; .fix says how to make it able to
    ├── CommandFailed              exit 1  a subprocess failed; .argv, .returncode, .stderr
    ├── ServiceError               exit 3  the coordination service could not be started, verified or reached
    ├── BatchError                 exit 4  the Batch service, the emulator or Blob storage answered with an error
    ├── TaskFailed                 exit 1  the task ran and did not succeed
    │   └── HangDetected           exit 124  launch's hang watchdog: no output, no checkpoint for --hang-timeout
    └── CheckpointError            exit 5  a checkpoint store is unusable, or a checkpoint is corrupt

Secrets never appear in messages: code that raises must not put keys, SAS signatures or the task secret in them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

INTERRUPTED = 130  # the exit code after Ctrl-C (128 + SIGINT), as shells report it


class MpilaunchError(Exception):
    """Base of every error mpilaunch and node-runtime raise on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = tuple(details)

    def __str__(self) -> str:
        if not self.details:
            return self.message
        return self.message + "".join(f"\n  - {d}" for d in self.details)


class InvalidInput(MpilaunchError):
    """The user gave a value we cannot use; the message names it."""

    exit_code = 2


class InvalidEnvironment(InvalidInput):
    """One or more environment variables are missing or malformed; ``problems`` lists every one."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__(f"invalid node environment ({len(problems)} problem(s))", details=problems)
        self.problems = tuple(problems)


class InvalidRequest(InvalidInput):
    """A Batch request that the service would refuse."""


class PreflightError(MpilaunchError):
    """The pool cannot run the task as asked (the task would stay active forever)."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str, details: Sequence[str] = ()) -> None:
        super().__init__(message, details=[*details, f"fix: {fix}"])
        self.fix = fix


class CommandFailed(MpilaunchError):
    """A subprocess exited non-zero, timed out, or could not be started."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, *, reason: str = "") -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        what = reason or f"exited with code {returncode}"
        tail = stderr.strip().splitlines()[-20:]
        super().__init__(f"command {self.argv[0] if self.argv else '?'!r} {what}: {' '.join(self.argv)}",
                         details=tail)


class ServiceError(MpilaunchError):
    """The coordination service (sshd on the task port) failed to start, verify, or answer."""

    exit_code = 3


class BatchError(MpilaunchError):
    """The Batch service, the emulator or Blob storage answered with an error (or could not be reached); ``code``."""

    exit_code = 4

    def __init__(self, message: str, *, code: str = "", details: Sequence[str] = ()) -> None:
        super().__init__(f"{code}: {message}" if code else message, details=details)
        self.code = code


class TaskFailed(MpilaunchError):
    """The task ran to completion and did not succeed."""


HANG_EXIT_CODE = 124
"""launch's exit code when its hang watchdog ended the job: GNU ``timeout``'s, which shells and CI already read as
"killed for taking too long"; no other code of ours uses it."""


class HangDetected(TaskFailed):
    """No rank wrote output and no checkpoint was committed for ``launch --hang-timeout``: the watchdog wrote every
    rank's stack to hang-report.json and ended the job; the message says where the ranks were."""

    exit_code = HANG_EXIT_CODE


class CheckpointError(MpilaunchError):
    """A checkpoint store cannot be used, or a checkpoint failed verification."""

    exit_code = 5


def failed(prog: str, error: MpilaunchError) -> int:
    """How a CLI ends on ``error``: ``prog: error: message`` (and its details) on stderr; returns its exit code."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return error.exit_code


def interrupted(prog: str) -> int:
    """How a CLI ends on Ctrl-C: ``prog: interrupted`` on stderr; returns :data:`INTERRUPTED`."""
    print(f"{prog}: interrupted", file=sys.stderr)
    return INTERRUPTED
