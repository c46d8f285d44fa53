"""The dhte CLI as a user runs it: exit codes, one-paragraph errors, nothing half-written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "jobs" / "fe_hte_quickstart.yaml"


def dhte(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run(
        [sys.executable, "-m", "distributed_hte.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env=env,
    )


def _good_frame(n: int = 2000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {c: rng.normal(size=n) for c in ["u0", "u1", "v0", "v1", "x0", "z0", "z1", "z2", "revenue"]}
    )
    df["clicks"] = rng.poisson(2, n)
    df["user_id"] = rng.integers(0, 50, n)
    df["vendor_id"] = rng.integers(0, 10, n)
    df["period"] = rng.integers(0, 5, n)
    return df


def _write(folder: Path, table: pa.Table) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-0.parquet")
    return folder


def _assert_user_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: "), res.stderr[-2000:]
    for f in fragments:
        assert f in err, (f, err)
    assert "Traceback" not in res.stderr


def _bad_data_cases(tmp: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    df = _good_frame()
    t = pa.Table.from_pandas(df, preserve_index=False)
    clicks_nan = df["clicks"].to_numpy(float)
    clicks_nan[7] = np.nan
    nulls = pa.array([None if i == 3 else v for i, v in enumerate(df["x0"])], pa.float64())
    return {
        "missing path": (tmp / "nope", ("does not exist",)),
        "empty": (_write(tmp / "empty", t.slice(0, 0)), ("is empty",)),
        "missing feature column": (
            _write(tmp / "missing", t.drop_columns(["x0"])),
            ("no column 'x0'", "data.beta_features"),
        ),
        "wrong dtype": (
            _write(
                tmp / "dtype",
                t.set_column(t.schema.get_field_index("z1"), "z1", pa.array(df["z1"].astype(str))),
            ),
            ("column 'z1'", "data.g_features", "numeric"),
        ),
        "nulls": (
            _write(tmp / "nulls", t.set_column(t.schema.get_field_index("x0"), "x0", nulls)),
            ("column 'x0'", "null"),
        ),
        "NaN in the treatment": (
            _write(
                tmp / "nan",
                t.set_column(t.schema.get_field_index("clicks"), "clicks", pa.array(clicks_nan)),
            ),
            ("column 'clicks'", "data.treatment", "NaN"),
        ),
    }


CASES = [
    "missing path",
    "empty",
    "missing feature column",
    "wrong dtype",
    "nulls",
    "NaN in the treatment",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_exits_2_and_writes_nothing(case, tmp_path):
    path, fragments = _bad_data_cases(tmp_path / "data")[case]
    out = tmp_path / "outputs"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: bad\nkind: fe_hte\ndata: {{path: {path}}}\noutputs: {{dir: {out}}}\n")
    res = dhte("run", str(spec), "train.epochs=1")
    _assert_user_error(res, *fragments)
    assert not out.exists(), "a failed input check must not create the outputs folder"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: x\nkind: fe_hte\ntrain: {epochs: 2\n", "not valid YAML"),
        (
            "name: x\nkind: fe_hte\ndata: {path: /d}\ntrain: {epoch: 2}\n",
            "train.epoch: unknown key",
        ),
        (
            "name: x\nkind: fe_hte\ndata: {path: /d}\ntrain: {epochs: two}\n",
            "train.epochs: found 'two'",
        ),
        (
            "name: x\nkind: fe_htx\ndata: {path: /d}\n",
            "found 'fe_htx'; allowed kinds: aipw_segments, fe_hte",
        ),
    ],
)
def test_malformed_spec_exits_2(text, fragment, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    _assert_user_error(dhte("run", str(spec)), fragment)
    res = dhte("validate", str(spec))
    assert res.returncode == 2 and fragment in res.stderr


def test_debug_shows_the_traceback(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\nkind: fe_hte\ndata: {path: /d}\ntrain: {epochs: two}\n")
    res = dhte("--debug", "run", str(spec))
    assert res.returncode == 2
    assert "Traceback" in res.stderr and "SpecError" in res.stderr


def test_validate_checks_every_shipped_spec():
    res = dhte("validate", *sorted(str(p) for p in (REPO / "jobs").glob("*.yaml")))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("ok ") == len(list((REPO / "jobs").glob("*.yaml")))


def test_unreachable_cluster_exits_2(tmp_path):
    res = dhte("run", str(QUICK), f"outputs.dir={tmp_path / 'o'}", "--address", "127.0.0.1:1")
    _assert_user_error(res, "unreachable")
    assert not (tmp_path / "o").exists()
    res = dhte("submit", str(QUICK), "--address", "http://127.0.0.1:1")
    _assert_user_error(res, "unreachable")


def _assert_clean_terminal(res: subprocess.CompletedProcess, run_dir: Path) -> None:
    """Our stage and progress lines only: Ray's report dicts, checkpoint chatter, worker
    prefixes and warnings go to run.log, which keeps them."""
    terminal = res.stdout + res.stderr
    assert not re.search(r"\{'\w+': ", terminal), "a Python dict repr on the terminal"
    for chatter in ["Checkpoint successfully created", "TrainingReport(", "pid="]:
        assert chatter not in terminal, chatter
    # Python warnings (UserWarning, RayDeprecationWarning, ...); our own "[run] WARNING:
    # the fit did not converge" line is meant for the terminal and does not match
    assert not re.search(r"\w+Warning\b", terminal), "a Python warning on the terminal"
    log = (run_dir / "run.log").read_text()
    assert "Checkpoint successfully created" in log and "TrainingReport(" in log
    assert "(RayTrainWorker pid=" in log


def test_run_prints_the_run_dir_last_and_writes_a_complete_run(tmp_path):
    """The main job, shrunk: simulate → train (2 DDP workers) → estimate → report."""
    res = dhte(
        "run",
        str(QUICK),
        "simulate.n_rows=20000",
        "simulate.n_users=200",
        "simulate.n_vendors=40",
        "train.epochs=2",
        f"outputs.dir={tmp_path}",
    )
    assert res.returncode == 0, res.stderr[-4000:]
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "fe_hte_quickstart"
    for name in [
        "COMPLETE",
        "spec.yaml",
        "status.json",
        "metrics.json",
        "run.log",
        "coefficients.json",
        "model/bundle.json",
        "fixed_effects/user_id.parquet",
        "history.parquet",
        "plots/training_curve.png",
    ]:
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    assert "beta_corr" in res.stdout and "[train] epoch" in res.stderr
    assert "[fit]" in (run_dir / "run.log").read_text()
    _assert_clean_terminal(res, run_dir)

    # A complete run directory is never overwritten.
    res = dhte("run", str(QUICK), f"outputs.dir={tmp_path}", "--run-dir", str(run_dir))
    _assert_user_error(res, "complete run")
    assert len(list((tmp_path / "data").iterdir())) == 1, "refused before simulating anything"

    # predict through the CLI.
    data = next((tmp_path / "data").glob("fe_hte_quickstart-*")) / "data"
    pred = dhte(
        "predict", "--run", str(run_dir), "--data", str(data), "--out", str(tmp_path / "pred")
    )
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert pd.read_parquet(tmp_path / "pred")["y_hat"].notna().sum() == 20000
