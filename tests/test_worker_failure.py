"""Recovery from failures on a real local Ray, bounded in time.

* A Ray Train worker process SIGKILLed in the middle of an epoch: Ray Train restarts the
  worker group from the last epoch's checkpoint (``scaling.max_failures``), the run
  completes, every epoch appears once in ``history.parquet``, and the final metrics are
  within tolerance of an uninterrupted run.
* The driver (the whole ``dhte run`` process group) SIGKILLed mid-run; ``dhte run
  --run-dir`` again resumes from the last checkpoint: the same. Default tier: both
  drivers connect to this session's Ray (a driver that dies on a cluster whose head
  lives on, as a RayJob's submitter pod does), so no Ray starts per driver; every wait
  has a deadline and the dead driver's Train actors are gone before the rerun. The slow
  tier repeats it with a driver that owns its embedded Ray (a laptop crash: Ray dies too).
* A warm start (``retrain.init_from``) through Ray Train begins where the previous model
  ended (the benchmark measures the epochs it saves at scale).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from distributed_hte.runner import run_job
from distributed_hte.spec import validate_spec

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
# Both runs read the same seeded row orders; only the restart differs.
R2_ATOL = 0.01
LOSS_RTOL = 0.05
KILL_DEADLINE_S = 240
# A dhte run subprocess (minutes on a loaded 2-core machine); in-process runs are bounded
# only by Ray (a blocking ray.get does not return to Python for a signal).
RUN_DEADLINE_S = 300


def _raw(data: Path, out: Path, max_failures: int = 2) -> dict:
    return {
        "name": "recover",
        "kind": "fe_hte",
        "data": {"path": str(data / "data")},
        "model": {"beta_net": {"hidden": []}, "g_net": {"hidden": []}, "solver": "sgd"},
        # Small batches: an epoch lasts a couple of seconds, long enough to die inside;
        # a checkpoint every epoch, so a restart resumes mid-run.
        "train": {"epochs": EPOCHS, "batch_size": 128, "lr": 0.01, "log_every_s": 60,
                  "early_stopping_patience": None, "checkpoint_every": 1},
        "scaling": {"num_workers": 2, "max_failures": max_failures},
        "outputs": {"dir": str(out)},
    }  # fmt: skip


def _committed(run_dir: Path) -> bool:
    """Ray Train has registered a checkpoint (every rank reported it): a restart resumes
    from it. Its folder alone is not enough: rank 0 writes it before the others report."""
    return (run_dir / "train" / "checkpoint_manager_snapshot.json").exists()


def _wait_for_checkpoint(
    run_dir: Path, stop: threading.Event | None = None, deadline_s: float = KILL_DEADLINE_S
) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        if _committed(run_dir):
            # Into the next epoch: its first batches are being trained.
            time.sleep(0.3)
            return True
        time.sleep(0.05)
    return False


def _train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # This session's Ray only: other Ray instances may run on the same machine.
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if "RayTrainWorker" in (a.class_name or "")]


def _check_history(run: Path) -> pd.DataFrame:
    history = pd.read_parquet(run / "history.parquet")
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1)), "every epoch exactly once"
    return history


def _close(a: Path, b: Path) -> None:
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert ma["val"]["r2"] == pytest.approx(mb["val"]["r2"], abs=R2_ATOL)
    assert ma["val"]["loss"] == pytest.approx(mb["val"]["loss"], rel=LOSS_RTOL)


# A hard deadline per test (fixtures included). The thread method, because a blocking
# ray.get ignores SIGALRM: a hung Ray ends the pytest run with every stack dumped, so CI
# fails in bounded time instead of stalling.
pytestmark = pytest.mark.timeout(900, method="thread")


@pytest.fixture(scope="module")
def uninterrupted(sim_tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    return run_job(validate_spec(_raw(sim_tiny, out)), run_dir=str(out / "run"))


def test_a_killed_train_worker_is_restarted_from_the_last_checkpoint(
    sim_tiny, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        if not _wait_for_checkpoint(run_dir, stop):
            return
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        run = run_job(validate_spec(_raw(sim_tiny, tmp_path)), run_dir=str(run_dir))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert killed, "no Train worker was killed: the test did not test anything"
    assert (run / "COMPLETE").exists()
    history = _check_history(run)
    assert history["resumed_from_epoch"].max() >= 1, "the group restarted from a checkpoint"
    assert history["resumed_from_epoch"].iloc[0] == 0
    _close(run, uninterrupted)


@pytest.mark.slow
def test_a_dead_worker_fails_the_run_with_max_failures_0(sim_tiny, tmp_path):
    """The knob reaches Ray: without restarts the same kill ends the run (marked failed)."""
    run_dir = tmp_path / "run"
    stop = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        if _wait_for_checkpoint(run_dir, stop):
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with pytest.raises(Exception):  # noqa: B017 - Ray's TrainingFailedError, any form
            run_job(validate_spec(_raw(sim_tiny, tmp_path, max_failures=0)), run_dir=str(run_dir))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert killed
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


def _train_actors() -> dict[str, str]:
    """This session's live Ray Train actors (controller and workers): id → class name."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    return {
        a.actor_id: a.class_name
        for a in actors
        if any(n in (a.class_name or "") for n in ("RayTrainWorker", "TrainController"))
    }


def _start_and_kill_driver(
    spec_file: Path, run_dir: Path, address: str | None, deadline_s: float
) -> list[str]:
    """``dhte run`` in a process group of its own, SIGKILLed once epoch 1's checkpoint is
    committed and the next epoch is under way; returns the command."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "distributed_hte.cli", "run", str(spec_file),
           "--run-dir", str(run_dir), *(["--address", address] if address else [])]  # fmt: skip
    first = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        committed = _wait_for_checkpoint(run_dir, deadline_s=deadline_s)
        assert committed or first.poll() is not None, f"no checkpoint in {deadline_s:.0f} s"
        assert first.poll() is None, f"the driver exited by itself ({first.returncode})"
    finally:
        # The driver and everything in its process group: a crashed submitter.
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert not (run_dir / "COMPLETE").exists(), "killed before the run completed"
    return cmd


def _check_resumed(run_dir: Path, uninterrupted: Path) -> None:
    history = _check_history(run_dir)
    assert history["resumed_from_epoch"].iloc[-1] >= 1, "resumed, not trained from scratch"
    _close(run_dir, uninterrupted)


def test_a_killed_driver_resumes_with_run_dir(sim_tiny, uninterrupted, tmp_path):
    """The dead driver's Train actors go with it (they fate-share with their owner); then
    ``dhte run --run-dir`` again, connected to the same Ray, resumes."""
    import ray

    spec_file = tmp_path / "recover.yaml"
    spec_file.write_text(yaml.safe_dump(_raw(sim_tiny, tmp_path)))
    run_dir = tmp_path / "run"
    address = ray.get_runtime_context().gcs_address
    before = set(_train_actors())  # earlier runs' (handles may outlive a run in-process)
    cmd = _start_and_kill_driver(spec_file, run_dir, address, deadline_s=180)
    deadline = time.monotonic() + 60
    while left := set(_train_actors()) - before:
        # A rerun must not race the old workers for the run directory.
        assert time.monotonic() < deadline, f"the dead driver's actors live on: {left}"
        time.sleep(0.5)

    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    again = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_DEADLINE_S
    )
    assert again.returncode == 0, again.stderr[-3000:]
    _check_resumed(run_dir, uninterrupted)
    workers = [c for a, c in _train_actors().items() if a not in before and "Worker" in c]
    assert not workers, f"the rerun left Train workers behind: {workers}"


@pytest.mark.slow
def test_a_killed_driver_with_its_embedded_ray_resumes_with_run_dir(
    sim_tiny, uninterrupted, tmp_path
):
    """A laptop crash: the driver owned its embedded Ray, which dies with it. A fresh
    embedded Ray per driver takes minutes on a loaded 2-core machine."""
    spec_file = tmp_path / "recover.yaml"
    spec_file.write_text(yaml.safe_dump(_raw(sim_tiny, tmp_path)))
    run_dir = tmp_path / "run"
    cmd = _start_and_kill_driver(spec_file, run_dir, None, deadline_s=600)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    _check_resumed(run_dir, uninterrupted)


def test_a_warm_start_begins_where_the_previous_model_ended(sim_tiny, uninterrupted, tmp_path):
    """``retrain.init_from: <run>`` through Ray Train: one epoch from the uninterrupted
    run's model comes within 5 % of the validation loss that run reached in all its
    epochs, and ends its first epoch below the cold start's first (the benchmark measures the
    epochs saved at scale: ``benchmarks/README.md``, warm start)."""
    raw = _raw(sim_tiny, tmp_path)
    raw["train"]["epochs"] = 1
    raw["registry"] = {"model": "warm"}
    raw["retrain"] = {"holdout": {"path": str(sim_tiny / "data")}, "init_from": str(uninterrupted)}
    run = run_job(validate_spec(raw), run_dir=str(tmp_path / "warm"))
    assert json.loads((run / "init" / "source.json").read_text())["run_dir"] == str(uninterrupted)
    cold = pd.read_parquet(uninterrupted / "history.parquet")["val_loss"]
    warm = pd.read_parquet(run / "history.parquet")["val_loss"]
    assert warm.iloc[0] <= cold.min() * (1 + LOSS_RTOL), (warm.tolist(), cold.tolist())
    assert warm.iloc[0] < cold.iloc[0], "the first epoch starts from the previous model"
