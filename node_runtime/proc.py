"""The one way this project runs subprocesses: argv lists (never a shell), errors that carry argv/code/stderr."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from node_runtime.errors import CommandFailed


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion, capturing stdout and stderr.

    Raises :class:`CommandFailed` if it cannot start, times out, or (with ``check``) exits non-zero.
    """
    argv = [str(a) for a in argv]
    try:
        done = subprocess.run(
            argv, input=input, capture_output=True, timeout=timeout,
            env=dict(env) if env is not None else None, cwd=cwd, check=False,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(argv, None, str(exc), reason="could not be started (not found)") from exc
    except PermissionError as exc:
        raise CommandFailed(argv, None, str(exc), reason="could not be started (permission denied)") from exc
    except subprocess.TimeoutExpired as exc:
        stderr = (exc.stderr or b"").decode(errors="replace")
        raise CommandFailed(argv, None, stderr, reason=f"timed out after {timeout}s") from exc
    if check and done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stderr.decode(errors="replace"))
    return done


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    new_session: bool = False,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the background; raises :class:`CommandFailed` if it cannot be started."""
    argv = [str(a) for a in argv]
    try:
        return subprocess.Popen(
            argv, env=dict(env) if env is not None else None, cwd=cwd, stdin=stdin, stdout=stdout,
            stderr=stderr, start_new_session=new_session, pass_fds=tuple(pass_fds),
        )
    except (FileNotFoundError, PermissionError) as exc:
        raise CommandFailed(argv, None, str(exc), reason="could not be started") from exc
