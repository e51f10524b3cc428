"""Step checkpoints under real ``mpirun -np 3``: resume equals a clean run; torn or corrupt ones never restored."""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from node_runtime.checkpoint import open_store
from node_runtime.checkpoint.stores import seal
from tests.checkpoint.conftest import blob_container_url
from tests.checkpoint.mpirun import PROGRAMS, Run, mpirun

SOLVER = PROGRAMS / "faulty_solver.py"
pytestmark = pytest.mark.slow
CELLS, STEPS, EVERY = 240, 600, 50


def solver(tmp: Path, ckpt: str, *extra: str, steps: int = STEPS, out: str = "out.json",
           kill_when: Callable[[], bool] | None = None) -> Run:
    return mpirun(SOLVER, "--checkpoint", ckpt, "--cells", str(CELLS), "--steps", str(steps), "--every",
                  str(EVERY), "--out", str(tmp / out), *extra, kill_when=kill_when)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[float]]:
    """The field after STEPS and STEPS + 100 steps, from uninterrupted runs."""
    tmp = tmp_path_factory.mktemp("clean")
    fields = {}
    for steps in (STEPS, STEPS + 100):
        run = solver(tmp, str(tmp / f"ck{steps}"), steps=steps, out=f"{steps}.json")
        assert run.returncode == 0, run.stderr
        fields[steps] = json.loads((tmp / f"{steps}.json").read_text())
    return fields


def step_dirs(ckpt: Path) -> list[str]:
    return sorted(p.name for p in (ckpt / f"steps/heat-{CELLS}").iterdir())


def test_keep_last_k_complete_checkpoints(tmp_path: Path, clean: dict[int, list[float]]) -> None:
    run = solver(tmp_path, str(tmp_path / "ck"), "--keep", "3")
    assert run.returncode == 0, run.stderr
    assert [d.split(".")[0] for d in step_dirs(tmp_path / "ck")] == ["000000000500", "000000000550", "000000000600"]
    for d in step_dirs(tmp_path / "ck"):
        assert sorted(p.name for p in (tmp_path / "ck/steps/heat-240" / d).iterdir()) == [
            "COMPLETE", "part-00000", "part-00001", "part-00002"]
    assert json.loads((tmp_path / "out.json").read_text()) == clean[STEPS]


@pytest.mark.parametrize(("rank", "obj", "before"), [(1, "part", False), (2, "part", True), (0, "marker", True),
                                                     (0, "part", False)])
def test_torn_checkpoint_is_never_restored(tmp_path: Path, clean: dict[int, list[float]], rank: int, obj: str,
                                           before: bool) -> None:
    """A rank dies in the middle of saving step 300: that checkpoint has no marker and the re-run resumes at 250."""
    ckpt = tmp_path / "ck"
    flags = ["--kill-rank", str(rank), "--kill-step", "300", "--kill-object", obj] + ["--kill-before"] * before
    first = solver(tmp_path, str(ckpt), *flags)
    assert first.returncode != 0
    torn = [d for d in step_dirs(ckpt) if d.startswith("000000000300.")]
    assert torn and not (ckpt / "steps/heat-240" / torn[0] / "COMPLETE").exists()
    second = solver(tmp_path, str(ckpt))
    assert second.returncode == 0, second.stderr
    assert "resuming from the checkpoint of step 250" in second.stdout
    assert json.loads((tmp_path / "out.json").read_text()) == clean[STEPS]
    assert not (ckpt / "steps/heat-240" / torn[0]).exists()  # the torn leftover was cleaned up


@pytest.mark.parametrize("damage", ["foreign-part", "truncated-part", "missing-part", "bad-marker"])
def test_corrupt_newest_checkpoint_is_skipped(tmp_path: Path, clean: dict[int, list[float]], damage: str) -> None:
    ckpt = tmp_path / "ck"
    assert solver(tmp_path, str(ckpt)).returncode == 0
    newest = ckpt / "steps/heat-240" / step_dirs(ckpt)[-1]
    part = newest / "part-00002"
    if damage == "foreign-part":  # well-formed and sealed, but not the bytes the marker vouches for
        part.chmod(0o644)
        part.write_bytes(seal(pickle.dumps([0.0] * 80)))
    elif damage == "truncated-part":
        part.write_bytes(part.read_bytes()[:-7])
    elif damage == "missing-part":
        part.unlink()
    else:
        (newest / "COMPLETE").write_bytes(b"{}")
    resumed = solver(tmp_path, str(ckpt), steps=STEPS + 100)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint of step 550" in resumed.stdout
    assert "skipping checkpoint" in resumed.stderr
    assert "skipping checkpoint of step 600" in resumed.stderr or "/000000000600." in resumed.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == clean[STEPS + 100]


@pytest.mark.parametrize("seed", range(4))
def test_job_killed_at_random_point_resumes_exactly(tmp_path: Path, clean: dict[int, list[float]], seed: int) -> None:
    """The whole job SIGKILLed as soon as the first object of a seeded step appears: usually mid-save (torn)."""
    rng = random.Random(3000 + seed)
    ckpt = str(tmp_path / "ck")
    at = rng.randrange(EVERY, STEPS, EVERY)
    steps = tmp_path / "ck" / f"steps/heat-{CELLS}"
    # --hold-at-end: the job cannot finish before the (polled) trigger fires, however loaded the machine is.
    first = solver(tmp_path, ckpt, "--hold-at-end", kill_when=lambda: steps.is_dir() and any(
        int(d.name.split(".")[0]) >= at for d in steps.iterdir()))
    assert first.killed and not (tmp_path / "out.json").exists()
    second = solver(tmp_path, ckpt)
    assert second.returncode == 0, second.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == clean[STEPS]


def test_restore_with_another_rank_count_is_refused(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ck")
    assert solver(tmp_path, ckpt).returncode == 0
    run = mpirun(SOLVER, "--checkpoint", ckpt, "--cells", str(CELLS), "--steps", str(STEPS), "--out",
                 str(tmp_path / "o"), np=2, timeout=60)
    assert run.returncode != 0
    assert "was saved by 3 ranks but this job has 2" in run.stderr


@pytest.mark.azurite
def test_blob_store_torn_checkpoint_and_resume(tmp_path: Path, azurite: object,
                                               clean: dict[int, list[float]]) -> None:
    url = blob_container_url(azurite)
    first = solver(tmp_path, url, "--kill-rank", "2", "--kill-step", "300")
    assert first.returncode != 0
    names = open_store(url).names("steps/")
    assert any("/000000000300." in n for n in names) and not any(
        "/000000000300." in n and n.endswith("/COMPLETE") for n in names)
    second = solver(tmp_path, url)
    assert second.returncode == 0, second.stderr
    assert "resuming from the checkpoint of step 250" in second.stdout
    assert json.loads((tmp_path / "out.json").read_text()) == clean[STEPS]
