"""Shared helpers for the ratio benchmarks: simulated data, peak memory of a process tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"
RESULTS = ROOT / "benchmarks" / "results"


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of a process and all its descendants (shared pages split fairly)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakMemory:
    """Sample the PSS of a process tree every ``interval`` seconds; keep the peak."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak tree PSS (GB), exit code and the last stdout line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        with PeakMemory(proc.pid) as mem:
            stdout, _ = proc.communicate()
    out_lines = stdout.strip().splitlines()
    return {
        "cmd": " ".join(cmd),
        "seconds": time.perf_counter() - t0,
        "peak_pss_gb": mem.peak / 1e9,
        "returncode": proc.returncode,
        "last_line": out_lines[-1] if out_lines else "",
    }


def simulate(
    name: str, n_rows: int, beta: str = "linear", g: str = "linear", seed: int = 0, **kw
) -> Path:
    """Simulated fe_hte data under benchmarks/_work (reused if present)."""
    out = WORK / name
    if not (out / "simulation.json").exists():
        args = [
            f"n_rows={n_rows}",
            f"beta={beta}",
            f"g={g}",
            f"seed={seed}",
            *[f"{k}={v}" for k, v in kw.items()],
        ]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "distributed_hte.cli",
                "simulate",
                "fe_hte",
                *args,
                "--out",
                str(out),
            ],
            check=True,
            cwd=ROOT,
        )
    return out


def save(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        **result,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def run_dhte_job(spec: str, overrides: list[str], log: Path) -> tuple[dict, Path, dict]:
    """``dhte run spec overrides...`` in its own process, measured by :func:`run_measured`.

    Returns the measurement, the run directory (the CLI's last stdout line) and its
    ``metrics.json``; a failed run raises SystemExit naming the log.
    """
    res = run_measured([sys.executable, "-m", "distributed_hte.cli", "run", spec, *overrides], log)
    if res["returncode"] != 0:
        raise SystemExit(f"{spec} {' '.join(overrides)}: exit {res['returncode']}, see {log}")
    run_dir = Path(res["last_line"])
    return res, run_dir, json.loads((run_dir / "metrics.json").read_text())
