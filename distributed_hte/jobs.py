"""Cluster submission through the Ray Jobs API (``JobSubmissionClient``).

``submit_job`` validates the spec locally (bad specs never reach the cluster), writes
the resolved spec into a small working_dir, ships the ``distributed_hte`` package with
it as a ``py_module`` (the cluster runs the submitter's code version), and starts
``python -m distributed_hte.cli run spec.yaml`` on the cluster.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml

from distributed_hte.errors import ClusterError
from distributed_hte.runtime import check_reachable, with_job_env
from distributed_hte.spec import load_spec

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# How long a submission waits for the head's job agent to come up before giving up.
AGENT_WAIT_S = 60.0


def client(address: str):
    """A ``JobSubmissionClient`` for ``address``; unreachable → ClusterError (exit 2)."""
    from ray.job_submission import JobSubmissionClient

    check_reachable(address)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"could not reach the Ray Jobs API at {address}: {exc}") from exc


def submit_job(spec_path: str, overrides: list[str], address: str, wait: bool = False) -> str:
    """Submit a spec; return the job id (with ``wait``: raise ClusterError unless it succeeded)."""
    import distributed_hte

    spec = load_spec(spec_path, overrides)
    jobs = client(address)
    package = Path(distributed_hte.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="dhte-submit-") as work:
        (Path(work) / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        runtime_env = dict(spec.runtime.runtime_env or {})
        runtime_env["working_dir"] = work
        runtime_env["py_modules"] = [*runtime_env.get("py_modules", []), str(package)]
        runtime_env = with_job_env(runtime_env, RAY_TRAIN_V2_ENABLED="1")
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                job_id = jobs.submit_job(
                    entrypoint="python -m distributed_hte.cli run spec.yaml",
                    runtime_env=runtime_env,
                    metadata={"dhte_spec": spec.name, "dhte_kind": spec.kind},
                )
                break
            except (ConnectionError, RuntimeError) as exc:
                # A head that has just started (or is busy) answers 500 "No available agent
                # to submit job, please try again later": a wait, not a refusal.
                if "try again later" in str(exc) and time.monotonic() < deadline:
                    time.sleep(2.0)
                    continue
                raise ClusterError(f"the Ray cluster at {address} refused the job: {exc}") from exc
    if wait:
        status = wait_for(address, job_id)
        if status != "SUCCEEDED":
            raise ClusterError(
                f"job {job_id} ended {status}; see `dhte logs {job_id} --address {address}`"
            )
    return job_id


def wait_for(address: str, job_id: str, timeout_s: float = 3600.0, poll_s: float = 2.0) -> str:
    """Poll until the job reaches a terminal state; return it."""
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
    raise ClusterError(f"job {job_id} did not finish within {timeout_s:.0f}s")


def job_status(address: str, job_id: str) -> str:
    """``PENDING`` / ``RUNNING`` / ``SUCCEEDED`` / ``FAILED`` / ``STOPPED``."""
    try:
        return str(client(address).get_job_status(job_id).value)
    except RuntimeError as exc:
        raise ClusterError(f"no job {job_id} at {address}: {exc}") from exc


def job_logs(address: str, job_id: str, follow: bool = False) -> None:
    """Print a job's logs (``follow``: stream until it ends)."""
    jobs = client(address)
    try:
        if not follow:
            sys.stdout.write(jobs.get_job_logs(job_id))
            return
        import asyncio

        async def tail() -> None:
            async for chunk in jobs.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        asyncio.run(tail())
    except RuntimeError as exc:
        raise ClusterError(f"no logs for job {job_id} at {address}: {exc}") from exc


def stop_job(address: str, job_id: str) -> str:
    """Ask the cluster to stop a job; return its status afterwards."""
    try:
        client(address).stop_job(job_id)
    except RuntimeError as exc:
        raise ClusterError(f"could not stop job {job_id} at {address}: {exc}") from exc
    return job_status(address, job_id)
