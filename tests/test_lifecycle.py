"""The production life cycle on real parts: MLflow registry (embedded SQLite; a real
``mlflow server`` in the slow tier), scheduled ticks with ``--as-of``, champion/challenger
on a fixed evaluation set, rollback, ``predict --model``, and bad input (exit 2, nothing
registered).

Three scheduled days of simulated data from one data-generating process (the linear
design of the seed, exact solver so each day's fit takes seconds):
day 1 (30k rows) becomes champion; day 2 (60k rows, more data) is promoted; day 3 (day 2
with the outcome shuffled) is refused on the fixed evaluation set, and the champion stays
day 2; rollback returns to day 1; running day 2 again trains nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import yaml

from distributed_hte.errors import ClusterError, DataError, UserError
from distributed_hte.kinds import get_kind
from distributed_hte.registry import Registry, resolve_uri
from distributed_hte.runner import run_job
from distributed_hte.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
DAYS = ("2026-11-22", "2026-11-23", "2026-11-24")
# Day 3's shuffled labels leave the model nothing but noise: its holdout R² falls far
# below the champion's (above 0.9 on this design).
GOOD_R2 = 0.9


def dhte(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "distributed_hte.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def days(sim_linear, tmp_path_factory) -> Path:
    """``<root>/days/<date>/`` for the three days and ``<root>/golden/`` (fixed holdout)."""
    root = tmp_path_factory.mktemp("lifecycle")
    df = pads.dataset(str(sim_linear / "data"), format="parquet").to_table().to_pandas()
    df = df.sort_values(["period", "user_id", "vendor_id"], kind="stable").reset_index(drop=True)
    order = np.random.default_rng(0).permutation(len(df))
    df = df.iloc[order].reset_index(drop=True)
    frames = {
        DAYS[0]: df.iloc[:30_000],
        DAYS[1]: df.iloc[:60_000],
        DAYS[2]: df.iloc[:60_000].assign(
            revenue=np.random.default_rng(1).permutation(df["revenue"].iloc[:60_000].to_numpy())
        ),
        "golden": df.iloc[-20_000:],
    }
    for name, frame in frames.items():
        folder = root / ("golden" if name == "golden" else f"days/{name}")
        folder.mkdir(parents=True)
        frame.to_parquet(folder / "part-0.parquet", index=False)
    return root


def _spec_file(root: Path, out: Path, uri: str | None, model: str = "ads") -> Path:
    raw = {
        "name": "nightly",
        "kind": "fe_hte",
        "data": {
            "path": str(root / "days" / "{as_of}"),
            "beta_features": ["u0", "u1", "v0", "v1", "x0"],
            "g_features": ["z0", "z1", "z2"],
            "fixed_effects": ["user_id", "vendor_id", "period"],
        },
        "model": {"beta_net": {"hidden": []}, "g_net": {"hidden": []}, "solver": "exact"},
        "outputs": {"dir": str(out)},
        "registry": {"uri": uri, "model": model},
        "retrain": {
            "holdout": {"path": str(root / "golden")},
            "gate": {"metric": "val_r2", "mode": "max", "min_delta": 0.0},
            "init_from": None,
        },
    }
    path = out / "nightly.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _tick(spec_file: Path, day: str, capsys) -> tuple[Path, str]:
    spec = load_spec(spec_file, as_of=day)
    path = run_job(spec, as_of=day)
    return path, capsys.readouterr().out


def _three_days(days: Path, out: Path, uri: str | None, capsys, tmp_path: Path) -> None:
    spec_file = _spec_file(days, out, uri)
    registry = Registry(resolve_uri(uri, str(out)))
    reg_args = ["--registry", uri or str(out)]

    # Day 1: the first converged version becomes champion.
    d1, said = _tick(spec_file, DAYS[0], capsys)
    assert d1 == (out / "nightly" / f"as-of-{DAYS[0]}").resolve()
    assert "promoted: ads version 1 is champion" in said
    p1 = json.loads((d1 / "promotion.json").read_text())
    assert p1["promoted"] is True and p1["champion"] is None
    assert p1["challenger"]["score"] > GOOD_R2
    assert registry.champion("ads").version == 1

    # Day 2: more data of the same process; both scored on the golden set, promoted.
    d2, said = _tick(spec_file, DAYS[1], capsys)
    p2 = json.loads((d2 / "promotion.json").read_text())
    assert p2["promoted"] is True, p2
    assert p2["champion"]["version"] == 1 and p2["challenger"]["version"] == 2
    assert p2["challenger"]["score"] >= p2["champion"]["score"]
    assert p2["champion"]["score"] == pytest.approx(p1["challenger"]["score"], rel=1e-9), (
        "the same model on the same rows by the same code gives the same score"
    )
    checks = p2["data_checks"]
    assert checks["schema"].startswith("same") and checks["champion_version"] == 1
    assert set(checks["numeric"]) >= {"revenue", "clicks", "u0", "z2"}
    assert checks["max_psi"] < 0.05, "day 2 comes from the same process as day 1"
    assert 0 <= checks["ids"]["user_id"]["rows_with_new_level_share"] < 0.05
    assert registry.champion("ads").version == 2

    # Day 3: shuffled outcome labels: refused on the fixed set; the champion stays day 2.
    d3, said = _tick(spec_file, DAYS[2], capsys)
    p3 = json.loads((d3 / "promotion.json").read_text())
    assert p3["promoted"] is False and "not promoted: ads version 3" in said
    assert p3["challenger"]["score"] < GOOD_R2 < p3["champion"]["score"]
    assert p3["champion"]["version"] == 2
    assert registry.champion("ads").version == 2
    assert CHALLENGER_OF(registry) == 3

    # Lineage on each version.
    v2 = registry.get("ads", 2)
    for key in ("spec_hash", "data_hash", "data_rows", "schema_hash", "run_dir", "converged"):
        assert v2.tags.get(key), (key, v2.tags)
    assert v2.tags["data_rows"] == "60000" and v2.tags["run_dir"] == str(d2)
    assert v2.tags["as_of"] == DAYS[1] and v2.tags["converged"] == "True"
    assert registry.client.get_run(v2.run_id).data.params["data.path"] == str(
        days / "days" / DAYS[1]
    )

    # A day whose export writes period as a string: exit 2 before Ray, nothing registered.
    _schema_change_is_refused(days, spec_file, tmp_path)
    assert len(registry.versions("ads")) == 3

    # Running day 2 again trains nothing and registers nothing.
    mtime = (d2 / "model" / "bundle.json").stat().st_mtime
    again, said = _tick(spec_file, DAYS[1], capsys)
    assert again == d2 and "already done: ads version 2" in said
    assert (d2 / "model" / "bundle.json").stat().st_mtime == mtime
    assert len(registry.versions("ads")) == 3

    # The CLI: list, show, rollback to day 1, predict with what the alias names.
    assert cli(capsys, "models", "list", "ads", *reg_args) == 0
    listed = capsys.readouterr().out
    assert len([ln for ln in listed.splitlines()[1:] if ln.strip()]) == 3
    assert cli(capsys, "models", "rollback", "ads", *reg_args) == 0
    assert "from version 2 to 1" in capsys.readouterr().out
    assert cli(capsys, "models", "show", "ads@champion", *reg_args) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    out_pred = tmp_path / "pred"
    pred = dhte("predict", "--model", "ads@champion", "--data", str(days / "golden"),
                "--out", str(out_pred), *reg_args)  # fmt: skip
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert "ads version 1" in pred.stderr
    direct = tmp_path / "pred_direct"
    get_kind("fe_hte").predict(d1, str(days / "golden"), direct)
    np.testing.assert_allclose(
        pd.read_parquet(out_pred)["y_hat"], pd.read_parquet(direct)["y_hat"], rtol=1e-6
    )

    # Promote by hand, back to day 2.
    assert cli(capsys, "models", "promote", "ads", "2", *reg_args) == 0
    assert registry.champion("ads").version == 2


def cli(capsys, *args: str) -> int:
    """``dhte`` in this process (commands that start no Ray of their own)."""
    from distributed_hte.cli import main

    capsys.readouterr()
    return main(list(args))


def CHALLENGER_OF(registry: Registry) -> int:  # noqa: N802 - reads like the alias it returns
    return registry.get("ads", "challenger").version


def test_three_scheduled_days_with_the_embedded_registry(days, tmp_path, capsys):
    out = tmp_path / "runs"
    _three_days(days, out, None, capsys, tmp_path)
    assert (out / "mlflow.db").exists() and (out / "mlartifacts").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_three_scheduled_days_with_a_real_mlflow_server(days, tmp_path, capsys):
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'db.sqlite'}",
         "--artifacts-destination", str(store / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
                time.sleep(1)
        _three_days(days, tmp_path / "runs", uri, capsys, tmp_path)
        assert not (tmp_path / "runs" / "mlflow.db").exists()
    finally:
        # The server shuts down gracefully (it can take more than 30 s): then it is killed.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


# ----------------------------------------------------------------------------- bad input


def _count_versions(out: Path) -> int:
    from mlflow.exceptions import MlflowException

    registry = Registry(resolve_uri(None, str(out)))
    try:
        return len(registry.versions("ads"))
    except (UserError, MlflowException):
        return 0


def test_unreachable_registry_exits_2_before_anything(days, tmp_path):
    port = _free_port()  # nothing listens there
    spec_file = _spec_file(days, tmp_path / "runs", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="MLflow registry at .+ is unreachable") as err:
        run_job(load_spec(spec_file, as_of=DAYS[0]), as_of=DAYS[0])
    assert err.value.exit_code == 2
    assert time.monotonic() - t0 < 30, "fails fast, without minutes of retries"
    assert not (tmp_path / "runs" / "nightly").exists()


def test_model_without_champion_exits_2(tmp_path, capsys):
    out = tmp_path / "runs"
    Registry(resolve_uri(None, str(out))).client.create_registered_model("ads")
    code = cli(capsys, "predict", "--model", "ads@champion", "--data", str(tmp_path),
               "--out", str(tmp_path / "p"), "--registry", str(out))  # fmt: skip
    assert code == 2 and "no version with alias 'champion'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert cli(capsys, "models", "show", "nope@champion", "--registry", str(out)) == 2
    assert "no model 'nope'" in capsys.readouterr().err


def test_holdout_selecting_no_rows_exits_2_and_registers_nothing(days, tmp_path):
    out = tmp_path / "runs"
    spec_file = _spec_file(days, out, None)
    spec = load_spec(
        spec_file,
        # The simulator's periods are 202401..202420.
        ["retrain.holdout={column: period, from: 202601}"],
        as_of=DAYS[0],
    )
    with pytest.raises(DataError, match="selects no rows") as err:
        run_job(spec, as_of=DAYS[0])
    assert err.value.exit_code == 2
    assert not (out / "nightly").exists() and _count_versions(out) == 0


def _schema_change_is_refused(days: Path, spec_file: Path, tmp_path: Path) -> None:
    df = pd.read_parquet(days / "days" / DAYS[1])
    odd = tmp_path / "odd"
    odd.mkdir()
    df.assign(period=df["period"].astype(str)).to_parquet(odd / "part-0.parquet", index=False)
    spec = load_spec(spec_file, [f"data.path={odd}"], as_of="2026-11-25")
    with pytest.raises(DataError, match="champion's schema") as err:
        run_job(spec, as_of="2026-11-25")
    assert err.value.exit_code == 2
    assert re.search(r"'period' is (large_)?string, the champion's data had int64", str(err.value))
    assert not (spec_file.parent / "nightly" / "as-of-2026-11-25").exists()


def test_a_kind_that_cannot_warm_start_says_why():
    from distributed_hte.errors import SpecError
    from distributed_hte.kinds import get_kind

    for name in ("segments", "interference"):
        kind = get_kind(name)
        assert kind.warm_start is None
        with pytest.raises(SpecError, match=f"kind '{name}' cannot warm start: .+init_from: null"):
            kind.warm_start_state(None, None, None)
    assert "new ids start at zero" in get_kind("fe_hte").warm_start


def test_retrain_needs_a_registry_and_a_holdout():
    from distributed_hte.errors import SpecError
    from distributed_hte.spec import validate_spec

    base = {"name": "x", "kind": "fe_hte", "data": {"path": "/d"}}
    with pytest.raises(SpecError, match="retrain needs a registry"):
        validate_spec({**base, "retrain": {"holdout": {"path": "/g"}}})
    with pytest.raises(SpecError, match="exactly one of path"):
        validate_spec(
            {
                **base,
                "registry": {"model": "m"},
                "retrain": {"holdout": {"path": "/g", "column": "p"}},
            }
        )
    ok = validate_spec(
        {**base, "registry": {"model": "m"},
         "retrain": {"holdout": {"column": "period", "from": 202610}}}
    )  # fmt: skip
    assert (
        ok.retrain.holdout.from_ == 202610 and ok.to_dict()["retrain"]["holdout"]["from"] == 202610
    )
