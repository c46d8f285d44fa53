"""Schema checks, the profiling pass and the stable split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_hte.data.schema import ColumnRequirement, check_schema
from distributed_hte.data.split import filter_split, split_unit
from distributed_hte.errors import DataError

REQ = [
    ColumnRequirement("y", "data.outcome", "numeric"),
    ColumnRequirement("t", "data.treatment", "numeric"),
    ColumnRequirement("user", "data.fixed_effects", "id"),
]


def _frame(n=50):
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {"y": rng.normal(size=n), "t": rng.poisson(2, n), "user": rng.integers(0, 5, n)}
    )


def test_a_good_dataset_passes(small_parquet):
    s = check_schema(str(small_parquet(_frame())), REQ)
    assert s.n_rows == 50 and s.n_files == 1


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_schema(str(tmp_path / "nope"), REQ)


def test_empty_dataset(small_parquet):
    with pytest.raises(DataError, match="is empty"):
        check_schema(str(small_parquet(_frame().iloc[:0])), REQ)


def test_missing_column_names_field_and_lists_columns(small_parquet):
    with pytest.raises(
        DataError, match=r"no column 't' \(named by data.treatment\); its columns are: y, user"
    ):
        check_schema(str(small_parquet(_frame().drop(columns="t"))), REQ)


def test_wrong_dtype(small_parquet):
    df = _frame()
    df["t"] = df["t"].astype(str)
    with pytest.raises(
        DataError,
        match=r"column 't' \(named by data.treatment\).*has type (large_)?string; it must be a numeric",
    ):
        check_schema(str(small_parquet(df)), REQ)


def test_nulls_in_a_required_column(small_parquet):
    df = _frame().astype({"t": "float64"})
    df.loc[3, "t"] = None
    folder = small_parquet(df)
    # pandas writes NaN for a float None; write a true null with Arrow.
    table = pa.Table.from_pandas(_frame(), preserve_index=False)
    t = pa.array(
        [None if i == 3 else v for i, v in enumerate(table.column("t").to_pylist())], pa.int64()
    )
    pq.write_table(table.set_column(1, "t", t), folder / "part-0.parquet")
    with pytest.raises(DataError, match=r"column 't' \(named by data.treatment\) has 1 null"):
        check_schema(str(folder), REQ)


def test_profile_finds_nan_and_builds_vocabularies(ray_session, small_parquet):
    import ray.data

    from distributed_hte.data.profile import profile_dataset, profile_parquet

    df = _frame(1000)
    folder = small_parquet(df)
    prof = profile_dataset(ray.data.read_parquet(str(folder)), ["y", "t"], ["user"], {})
    assert prof.n_rows == 1000
    np.testing.assert_array_equal(prof.vocab["user"], np.sort(df.user.unique()))
    assert prof.id_counts["user"].sum() == 1000
    assert prof.moments["y"].mean == pytest.approx(df.y.mean())
    assert prof.moments["y"].std == pytest.approx(df.y.std(ddof=0))
    # small data is profiled in the driver: the same profile
    local = profile_parquet(str(folder), ["y", "t"], ["user"], {})
    assert local.n_rows == prof.n_rows
    np.testing.assert_array_equal(local.vocab["user"], prof.vocab["user"])
    np.testing.assert_array_equal(local.id_counts["user"], prof.id_counts["user"])
    assert local.moments["y"].total == pytest.approx(prof.moments["y"].total, rel=1e-12)

    t = df["t"].to_numpy(dtype=float)
    t[10] = np.nan
    folder = small_parquet(df, "nan")
    # A real NaN (not a null): Arrow keeps NaN when built from numpy.
    pq.write_table(
        pa.table({"y": df.y.to_numpy(), "t": pa.array(t), "user": df.user.to_numpy()}),
        folder / "part-0.parquet",
    )
    with pytest.raises(DataError, match=r"column 't' \(named by data.treatment\) has 1 NaN"):
        profile_dataset(
            ray.data.read_parquet(str(folder)), ["y", "t"], ["user"], {"t": "data.treatment"}
        )
    with pytest.raises(DataError, match=r"column 't' \(named by data.treatment\) has 1 NaN"):
        profile_parquet(str(folder), ["y", "t"], ["user"], {"t": "data.treatment"})


def test_split_is_stable_disjoint_and_near_the_fraction():
    rng = np.random.default_rng(1)
    batch = {"a": rng.integers(0, 10**9, 20_000), "b": rng.normal(size=20_000)}
    u1 = split_unit(batch, ["a", "b"])
    # Reordering rows (another partitioning) does not change any row's side.
    perm = rng.permutation(20_000)
    u2 = split_unit({k: v[perm] for k, v in batch.items()}, ["a", "b"])
    np.testing.assert_array_equal(u1[perm], u2)
    train = filter_split(batch, ["a", "b"], 0.2, "train")
    val = filter_split(batch, ["a", "b"], 0.2, "val")
    assert len(train["a"]) + len(val["a"]) == 20_000
    assert not set(train["a"]) & set(val["a"])
    assert 0.18 < len(val["a"]) / 20_000 < 0.22


def test_read_parquet_head_reads_a_partitioned_table_and_skips_what_is_not_data(tmp_path):
    """Hive folders by date, a _SUCCESS marker, a CSV and a hidden folder beside the data."""
    from distributed_hte.kinds.toolkit import read_parquet_head

    for day, ids in [("2026-11-01", [3, 1]), ("2026-11-02", [7])]:
        part = tmp_path / f"date={day}"
        part.mkdir()
        pq.write_table(pa.table({"user_id": ids, "y": [0.5] * len(ids)}), part / "p0.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    (tmp_path / ".staging").mkdir()
    pq.write_table(pa.table({"user_id": [99], "y": [9.0]}), tmp_path / ".staging" / "x.parquet")

    head = read_parquet_head(str(tmp_path), ["user_id", "y", "date"], 10)
    assert head["user_id"].tolist() == [3, 1, 7]
    assert head["date"].astype(str).tolist() == ["2026-11-01", "2026-11-01", "2026-11-02"]
    assert len(read_parquet_head(str(tmp_path), ["user_id"], 2)) == 2


def test_batch_sums_in_the_driver_equal_the_ray_data_pass(ray_session, tmp_path, monkeypatch):
    """Small data is summed in the driver; it must see what Ray Data sees: the same rows,
    partition columns as strings, other files skipped."""
    from distributed_hte.kinds import toolkit

    # nested: cloudpickle ships it by value to Ray's workers (tests are not importable there)
    def _column_sums(batch: dict, names: list[str]) -> dict:
        out = {"n": np.array([float(len(batch[names[0]]))])}
        for c in names:
            values = batch[c]
            if values.dtype.kind in "fiu":
                out[f"sum:{c}"] = np.array([float(values.sum())])
            else:  # strings (ids, hive partition values): a checksum of their lengths
                out[f"len:{c}"] = np.array([float(sum(len(str(v)) for v in values))])
        return out

    rng = np.random.default_rng(3)
    for day in ["2026-11-01", "2026-11-02", "2026-11-03"]:
        part = tmp_path / f"date={day}"
        part.mkdir()
        n = int(rng.integers(50, 400))
        pq.write_table(
            pa.table(
                {
                    "buyer": pa.array([f"b{i}" for i in rng.integers(0, 10**9, n)]),
                    "seller": pa.array(rng.integers(0, 2**40, n), pa.int64()),
                    "y": rng.normal(size=n),
                }
            ),
            part / "part-0.parquet",
        )
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "README.txt").write_text("not data")
    cols = ["buyer", "seller", "y", "date"]

    local = toolkit.batch_sums(str(tmp_path), cols, _column_sums, names=cols)
    monkeypatch.setattr(toolkit, "DRIVER_PASS_MAX_ROWS", 0)
    through_ray = toolkit.batch_sums(str(tmp_path), cols, _column_sums, names=cols)
    assert local.keys() == through_ray.keys()
    for k, v in through_ray.items():
        assert local[k] == pytest.approx(v, rel=1e-12), k
    assert "len:date" in local and local["len:date"] == 10 * local["n"]
