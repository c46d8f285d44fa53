"""fe_hte with linear nets through ``run_job``: the exact solver against pyfixest feols on
data laid out as a warehouse lays it out (six files partitioned by week, rows in date
order, sparse int64 ids, skewed group sizes, Poisson clicks confounded with the buyer and
seller effects, unrelated files beside the parquet)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from distributed_hte.runner import run_job
from distributed_hte.simulate.fe_hte_warehouse import WarehouseConfig, write_warehouse
from distributed_hte.spec import validate_spec

# Tolerances, named once (issue: exact path within 1e-6 of feols, SEs within 1e-4 relative).
COEF_ATOL = 1e-6
FE_ATOL = 1e-6
SE_RTOL = 1e-4

BETA = ["u0", "u1", "v0", "v1", "x0"]
G = ["z0", "z1", "z2"]
FAMILIES = ["buyer", "seller", "week"]
FORMULA = (
    "revenue ~ clicks + "
    + " + ".join(f"clicks:{b}" for b in BETA)
    + " + "
    + " + ".join(G)
    + " | buyer + seller + week"
)


@pytest.fixture(scope="module")
def warehouse(ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wh") / "wh"
    cfg = WarehouseConfig(n_rows=60_000, n_buyers=1_200, n_sellers=250, seed=11, chunk_rows=5_000)
    return write_warehouse(cfg, out)


@pytest.fixture(scope="module")
def frame(warehouse) -> pd.DataFrame:
    files = sorted(glob.glob(str(warehouse / "data" / "*.parquet")))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


@pytest.fixture(scope="module")
def exact_run(warehouse, tmp_path_factory) -> Path:
    spec = validate_spec(
        {
            "name": "exact",
            "kind": "fe_hte",
            "data": {
                "path": str(warehouse / "data"),
                "beta_features": BETA,
                "g_features": G,
                "fixed_effects": FAMILIES,
            },
            "model": {"cluster": "buyer"},  # linear nets by default: solver auto = exact
            "train": {"val_fraction": 0.0},  # every row, as feols
            "outputs": {"dir": str(tmp_path_factory.mktemp("runs"))},
        }
    )
    assert spec.uses_exact_solver
    return run_job(spec)


@pytest.fixture(scope="module")
def feols(frame):
    import pyfixest as pf

    return pf.feols(
        FORMULA,
        data=frame,
        vcov="iid",
        fixef_rm="none",
        demeaner=pf.MapDemeaner(fixef_tol=1e-12, fixef_maxiter=100_000),
    )


def test_coefficients_and_fixed_effects_equal_feols(exact_run, feols):
    ref = feols
    coefs = json.loads((exact_run / "coefficients.json").read_text())
    ours = {"clicks": coefs["beta"]["(intercept)"]}
    ours.update({f"clicks:{b}": coefs["beta"][b] for b in BETA})
    ours.update({g: coefs["g"][g] for g in G})
    for name, value in ours.items():
        assert value == pytest.approx(ref.coef()[name], abs=COEF_ATOL), name
    # fixef's LSQR stops at 1e-6 by default: ask for the exact solution it can give
    fixef = ref.fixef(atol=1e-14, btol=1e-14)
    for fam in FAMILIES:
        theirs = pd.Series(fixef[f"C({fam})"])
        theirs.index = theirs.index.astype(np.int64)
        est = pd.read_parquet(exact_run / "fixed_effects" / f"{fam}.parquet").set_index("id")
        est = est.loc[est["n_rows"] > 0, "estimate"]
        theirs = theirs.reindex(est.index).fillna(0.0)  # fixest's reference level is 0
        # the model holds float32: about 1e-7 off the float64 solution
        np.testing.assert_allclose(est - est.mean(), theirs - theirs.mean(), atol=FE_ATOL)


@pytest.mark.parametrize(
    "name,vcov", [("iid", "iid"), ("hetero", "hetero"), ("CRV1", {"CRV1": "buyer"})]
)
def test_standard_errors_equal_feols(exact_run, feols, name, vcov):
    ref = feols.vcov(vcov).se()
    inf = json.loads((exact_run / "inference.json").read_text())[name]["coefficients"]
    for coef_name, se in ref.items():
        assert inf[coef_name]["se"] == pytest.approx(se, rel=SE_RTOL), (name, coef_name)


def test_exact_fit_reports_a_verdict_and_recovers_the_truth(exact_run):
    m = json.loads((exact_run / "metrics.json").read_text())
    assert m["training"]["solver"] == "exact"
    assert m["training"]["converged"] is True
    assert m["training"]["data_passes"] == 2
    # truth from this project's simulation marker
    for fam in FAMILIES:
        assert m["fixed_effects"][fam]["corr_with_truth"] > 0.9, (fam, m["fixed_effects"][fam])
    assert m["truth"]["beta_corr"] > 0.9


def test_sgd_starts_from_the_exact_linear_fit(warehouse, feols, tmp_path):
    """model.init auto: SGD starts at the exact linear solution, so one epoch at a step size
    too small to move anything ends where feols is (to float32), not at the random start."""
    spec = validate_spec(
        {
            "name": "warm",
            "kind": "fe_hte",
            "data": {
                "path": str(warehouse / "data"),
                "beta_features": BETA,
                "g_features": G,
                "fixed_effects": FAMILIES,
            },
            "model": {"solver": "sgd", "finish_fixed_effects": False},
            "train": {"val_fraction": 0.0, "epochs": 1, "lr": 1e-9, "log_every_s": 120},
            "scaling": {"num_workers": 1},
            "outputs": {"dir": str(tmp_path)},
        }
    )
    assert spec.starts_from_linear_fit and not spec.uses_exact_solver
    run = run_job(spec)
    coefs = json.loads((run / "coefficients.json").read_text())
    ref = feols.coef()
    assert coefs["beta"]["(intercept)"] == pytest.approx(ref["clicks"], abs=1e-4)
    for b in BETA:
        assert coefs["beta"][b] == pytest.approx(ref[f"clicks:{b}"], abs=1e-4), b
    for g in G:
        assert coefs["g"][g] == pytest.approx(ref[g], abs=1e-4), g
    m = json.loads((run / "metrics.json").read_text())
    assert m["training"]["init"] == "exact linear fit"
    assert m["training"]["init_rss"] == pytest.approx(float(np.sum(feols.resid() ** 2)), rel=1e-6)
