"""Cluster submission against a real Ray head started on 127.0.0.1 (Ray Jobs API)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ray_head(tmp_path):
    """`ray start --head` on free ports; stopped (with its processes) at the end."""
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{RAY.parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    temp = Path("/tmp") / f"rh{port}"  # short: Ray's socket paths have a length limit
    # --block keeps `ray start` in the foreground; terminating it stops exactly this
    # head's processes (a machine-wide `ray stop` would also kill the test session's Ray).
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            "--include-dashboard=true",
            f"--temp-dir={temp}",
            "--dashboard-agent-listen-port",
            str(_free_port()),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _dhte(env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "distributed_hte.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def test_submit_status_logs_to_a_real_head_beside_an_embedded_run(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "outputs"
    res = _dhte(
        env,
        "submit",
        "jobs/fe_hte_quickstart.yaml",
        "simulate.n_rows=10000",
        "simulate.n_users=100",
        "simulate.n_vendors=20",
        "train.epochs=1",
        "scaling.num_workers=1",
        f"outputs.dir={out}",
        "--address",
        address,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = res.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 400
    status = ""
    while time.monotonic() < deadline:
        status = _dhte(env, "status", job_id, "--address", address).stdout.strip()
        if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            break
        time.sleep(3)
    logs = _dhte(env, "logs", job_id, "--address", address).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    run_dir = Path(logs.strip().splitlines()[-1])
    assert run_dir.parent == out / "fe_hte_quickstart"
    assert (run_dir / "COMPLETE").exists()
    assert "[train] epoch 1/1 done" in logs
    # stop on a finished job is harmless and reports its final state.
    assert _dhte(env, "stop", job_id, "--address", address).stdout.strip() == "SUCCEEDED"

    # An embedded run beside the head: two Rays on one machine (as two `dhte run` at
    # once). It must address its own: Ray Train's placement-group cleaner used to fail
    # with "Found multiple active Ray instances". (Run after the job, not during it, so
    # that two Ray start-ups do not compete for 2 cores.)
    embedded = _dhte(
        {k: v for k, v in env.items() if k != "RAY_ADDRESS"},
        "run",
        "jobs/fe_hte_quickstart.yaml",
        "simulate.n_rows=10000",
        "simulate.n_users=100",
        "simulate.n_vendors=20",
        "train.epochs=2",
        "scaling.num_workers=1",
        f"outputs.dir={tmp_path / 'embedded'}",
        timeout=400,
    )
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    embedded_run = Path(embedded.stdout.strip().splitlines()[-1])
    # (the submitted job's own cleaner still auto-detects: on a real cluster there is one
    # Ray per node, and the address a user submits to need not be the head's own)
    for text in (embedded.stderr, (embedded_run / "run.log").read_text()):
        assert "multiple active Ray instances" not in text
