"""The ``mmm`` data contract: a long region × week table → a checked, dense panel.

Pure numpy/pandas (no torch, no Ray). A marketing panel is small (regions × weeks rows),
so it is read whole with pyarrow. Every problem a user can fix is a ``DataError`` (exit
2) raised before anything is written: missing columns, nulls or NaNs, negative activity
or spend, a channel that is always zero, a region without KPI, a week column that does
not parse or is not weekly, duplicate region-weeks.

Ragged panels: each region's series lives on the common weekly grid. Weeks before a
region's first row and after its last are outside its series (masked; no media). A gap
(missing weeks inside the series) is masked in the loss and in every metric; its media
and controls are interpolated linearly from the neighbouring weeks, so the carry-over
runs through the gap over the real elapsed time instead of jumping it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from distributed_hte.data.schema import open_dataset
from distributed_hte.errors import DataError

log = logging.getLogger(__name__)

MIN_FIT_WEEKS = 4


@dataclass
class Columns:
    """Which columns play which role (resolved from the spec)."""

    region: str
    week: str
    kpi: str
    media: list[str]
    spend: dict[str, str]  # channel → spend column (channels without spend are absent)
    controls: list[str]
    holdout_weeks: int
    expected: str | None = None  # the simulator's noise-free KPI, simulated data only


@dataclass
class Panel:
    """A dense region × week panel. R regions, T grid weeks, C channels, K controls."""

    regions: list[Any]  # (R,) original region ids
    week_labels: list[Any]  # (T,) original week values (ISO date strings or integers)
    kpi: np.ndarray  # (R, T); 0 where not observed
    media: np.ndarray  # (R, T, C) activity, gaps interpolated
    spend: np.ndarray  # (R, T, C) spend; 0 for channels without a spend column
    controls: np.ndarray  # (R, T, K) raw controls, gaps interpolated
    observed: np.ndarray  # (R, T) bool: the row exists
    holdout: np.ndarray  # (R, T) bool: one of the region's last holdout_weeks rows
    has_spend: list[bool]  # (C,)
    expected: np.ndarray | None = None  # (R, T) noise-free KPI (simulated data)
    ragged: dict[str, Any] | None = None

    @property
    def fit(self) -> np.ndarray:
        """(R, T) bool: observed weeks not held out."""
        return self.observed & ~self.holdout


@dataclass
class Scalers:
    """Fitted once on the fit weeks and saved with the model (a refresh reuses them)."""

    kpi_scale: np.ndarray  # (R,) fit-period mean KPI of each region
    media_scale: np.ndarray  # (R, C) fit-period mean activity of each region and channel
    control_mean: np.ndarray  # (K,)
    control_sd: np.ndarray  # (K,)
    cost: np.ndarray  # (C,) spend per unit of activity over the fit weeks (NaN: no spend)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "kpi_scale": self.kpi_scale,
            "media_scale": self.media_scale,
            "control_mean": self.control_mean,
            "control_sd": self.control_sd,
            "cost": self.cost,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Scalers:
        return cls(**{k: np.asarray(a[k], dtype=np.float64) for k in cls.__dataclass_fields__})


def _week_index(values: pd.Series, dtype: pa.DataType, column: str) -> tuple[np.ndarray, list]:
    """Grid index (0 = the earliest week) and the label of each grid week."""
    if pa.types.is_integer(dtype) or (
        pa.types.is_floating(dtype) and np.all(np.mod(values.to_numpy(np.float64), 1) == 0)
    ):
        v = values.to_numpy(np.int64)
        lo = int(v.min())
        return v - lo, list(range(lo, int(v.max()) + 1))
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        text = values.astype(str)
        if text.str.fullmatch(r"-?\d+").all():
            return _week_index(text.astype(np.int64), pa.int64(), column)
        try:
            with warnings.catch_warnings():  # pandas' "could not infer format" for mixed text
                warnings.simplefilter("ignore", UserWarning)
                dates = pd.to_datetime(text, errors="raise")
        except (ValueError, TypeError) as exc:
            bad = next((s for s in text if pd.to_datetime(s, errors="coerce") is pd.NaT), text[0])
            raise DataError(
                f"column {column!r} (named by data.week) does not parse as dates or integer "
                f"periods (e.g. {bad!r}): use ISO dates (2024-01-01) or integers"
            ) from exc
    elif pa.types.is_date(dtype) or pa.types.is_timestamp(dtype):
        dates = pd.to_datetime(values)
    else:
        raise DataError(
            f"column {column!r} (named by data.week) has type {dtype}; it must be a date, a "
            "timestamp, a date string or an integer period"
        )
    days = dates.dt.normalize().to_numpy("datetime64[D]").astype(np.int64)
    lo = int(days.min())
    off = days - lo
    if np.any(off % 7):
        first = str(np.datetime64(int(days[np.flatnonzero(off % 7)[0]]), "D"))
        raise DataError(
            f"column {column!r} (named by data.week) is not on a weekly grid: {first} is not a "
            f"whole number of weeks after {np.datetime64(lo, 'D')}; give one date per week "
            "(e.g. each week's Monday)"
        )
    idx = off // 7
    labels = [str(np.datetime64(lo + 7 * i, "D")) for i in range(int(idx.max()) + 1)]
    return idx, labels


def _numeric(df: pd.DataFrame, col: str, field: str, schema: pa.Schema) -> np.ndarray:
    t = schema.field(col).type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise DataError(f"column {col!r} (named by {field}) has type {t}; it must be numeric")
    v = df[col].to_numpy(np.float64, na_value=np.nan)
    bad = int((~np.isfinite(v)).sum())
    if bad:
        raise DataError(
            f"column {col!r} (named by {field}) has {bad} null, NaN or infinite value(s) of "
            f"{len(v)}; fill or drop them before training"
        )
    return v


def read_panel(path: str, cols: Columns) -> Panel:
    """Read and check the long table at ``path``; return the dense panel."""
    ds = open_dataset(path)
    schema = ds.schema
    spend_cols = list(dict.fromkeys(cols.spend.values()))
    wanted = [cols.region, cols.week, cols.kpi, *cols.media, *spend_cols, *cols.controls]
    fields = {
        cols.region: "data.region",
        cols.week: "data.week",
        cols.kpi: "data.kpi",
        **{c: "data.media" for c in cols.media},
        **{c: "data.spend" for c in spend_cols if c not in cols.media},
        **{c: "data.controls" for c in cols.controls},
    }
    missing = [c for c in dict.fromkeys(wanted) if c not in schema.names]
    if missing:
        raise DataError(
            f"the dataset at {path} has no column(s) {missing} (named by "
            f"{', '.join(fields[c] for c in missing)}); its columns are: {', '.join(schema.names)}"
        )
    read = list(dict.fromkeys(wanted + ([cols.expected] if cols.expected else [])))
    df = ds.to_table(columns=read).to_pandas()
    if len(df) == 0:
        raise DataError(f"the dataset at {path} is empty; nothing to train on")
    rt = schema.field(cols.region).type
    if not (pa.types.is_integer(rt) or pa.types.is_string(rt) or pa.types.is_large_string(rt)):
        raise DataError(
            f"column {cols.region!r} (named by data.region) has type {rt}; it must be an id "
            "(integer or string)"
        )
    if df[cols.region].isna().any():
        raise DataError(f"column {cols.region!r} (named by data.region) has null values")
    if df[cols.week].isna().any():
        raise DataError(
            f"column {cols.week!r} (named by data.week) has {int(df[cols.week].isna().sum())} "
            "null value(s); every row needs its week"
        )
    # A region whose KPI is missing altogether is named as such, before the NaN check.
    kpi_raw = df[cols.kpi].to_numpy(np.float64, na_value=np.nan)
    no_kpi = pd.Series(np.isfinite(kpi_raw) & (kpi_raw != 0)).groupby(df[cols.region].values).any()
    if not no_kpi.all():
        empty = no_kpi.index[~no_kpi.values].tolist()
        raise DataError(
            f"{len(empty)} region(s) have no KPI (column {cols.kpi!r}, named by data.kpi, is "
            f"null or zero on every row), e.g. {empty[:5]}; drop them or fill their KPI"
        )
    kpi = _numeric(df, cols.kpi, "data.kpi", schema)
    media = np.stack([_numeric(df, c, "data.media", schema) for c in cols.media], -1)
    spend_map = {c: _numeric(df, c, "data.spend", schema) for c in spend_cols}
    controls = (
        np.stack([_numeric(df, c, "data.controls", schema) for c in cols.controls], -1)
        if cols.controls
        else np.zeros((len(df), 0))
    )
    for j, c in enumerate(cols.media):
        neg = int((media[:, j] < 0).sum())
        if neg:
            raise DataError(
                f"column {c!r} (channel {c!r}, named by data.media) has {neg} negative value(s) "
                f"(min {media[:, j].min():g}); activity must be ≥ 0"
            )
        if not np.any(media[:, j] > 0):
            raise DataError(
                f"channel {c!r} (named by data.media) is zero on every row: its effect cannot be "
                "estimated; drop it from data.media"
            )
    for c, v in spend_map.items():
        if np.any(v < 0):
            raise DataError(
                f"column {c!r} (named by data.spend) has {int((v < 0).sum())} negative value(s); "
                "spend must be ≥ 0"
            )
    week_idx, labels = _week_index(df[cols.week], schema.field(cols.week).type, cols.week)
    codes, regions = pd.factorize(df[cols.region], sort=True)
    r_n, t_n, c_n = len(regions), len(labels), len(cols.media)
    flat = codes.astype(np.int64) * t_n + week_idx
    if len(np.unique(flat)) != len(flat):
        dup = pd.Series(flat).duplicated()
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(
            f"region {regions[codes[i]]!r} has more than one row for week {labels[week_idx[i]]} "
            f"(columns {cols.region!r}, {cols.week!r}); give one row per region and week"
        )

    def dense(v: np.ndarray) -> np.ndarray:
        out = np.zeros((r_n * t_n,) + v.shape[1:])
        out[flat] = v
        return out.reshape((r_n, t_n) + v.shape[1:])

    observed = dense(np.ones(len(df))).astype(bool)
    spend = np.zeros((len(df), c_n))
    has_spend = []
    for j, c in enumerate(cols.media):
        col = cols.spend.get(c)
        has_spend.append(col is not None)
        if col is not None:
            spend[:, j] = spend_map[col]
    panel = Panel(
        regions=[r.item() if hasattr(r, "item") else r for r in regions],
        week_labels=labels,
        kpi=dense(kpi),
        media=dense(media),
        spend=dense(spend),
        controls=dense(controls),
        observed=observed,
        holdout=np.zeros_like(observed),
        has_spend=has_spend,
        expected=dense(df[cols.expected].to_numpy(np.float64)) if cols.expected else None,
    )
    panel.ragged = _fill_gaps(panel)
    panel.holdout = _holdout(panel.observed, cols.holdout_weeks)
    few = np.flatnonzero(panel.fit.sum(1) < MIN_FIT_WEEKS)
    if len(few):
        raise DataError(
            f"{len(few)} region(s) have fewer than {MIN_FIT_WEEKS} weeks left to fit after "
            f"holding out data.holdout_weeks={cols.holdout_weeks}, e.g. "
            f"{[panel.regions[i] for i in few[:5]]}; lower holdout_weeks or drop them"
        )
    return panel


def _holdout(observed: np.ndarray, weeks: int) -> np.ndarray:
    """(R, T) bool: the last ``weeks`` observed weeks of each region."""
    out = np.zeros_like(observed)
    if weeks == 0:
        return out
    rank_from_end = np.cumsum(observed[:, ::-1], axis=1)[:, ::-1]
    return observed & (rank_from_end <= weeks)


def _fill_gaps(p: Panel) -> dict[str, Any]:
    """Interpolate media and controls in each region's gaps; say what was found."""
    r_n, t_n = p.observed.shape
    late = gaps = gap_weeks = early_end = 0
    grid = np.arange(t_n)
    for r in range(r_n):
        idx = np.flatnonzero(p.observed[r])
        first, last = idx[0], idx[-1]
        late += first > 0
        early_end += last < t_n - 1
        inside = ~p.observed[r, first : last + 1]
        n_missing = int(inside.sum())
        if n_missing:
            gap_weeks += n_missing
            gaps += int(np.sum(np.diff(np.concatenate([[0], inside.astype(int)])) == 1))
            miss = grid[first : last + 1][inside]
            for arr in (p.media, p.spend, p.controls):
                for j in range(arr.shape[2]):
                    arr[r, miss, j] = np.interp(miss, idx, arr[r, idx, j])
        if p.controls.shape[2]:
            p.controls[r, :first] = p.controls[r, first]
            p.controls[r, last + 1 :] = p.controls[r, last]
    info = {
        "regions": r_n,
        "weeks": t_n,
        "rows": int(p.observed.sum()),
        "late_start_regions": int(late),
        "early_end_regions": int(early_end),
        "gaps": int(gaps),
        "gap_weeks_interpolated": int(gap_weeks),
    }
    if late or gaps or early_end:
        log.info(
            "[prepare] ragged panel: %d of %d regions start late, %d end early, %d gap(s) "
            "covering %d region-weeks: those weeks are masked; media and controls in gaps "
            "are interpolated so the carry-over runs through them",
            late, r_n, early_end, gaps, gap_weeks,
        )  # fmt: skip
    return info


def fit_scalers(p: Panel) -> Scalers:
    """KPI, media and control scalers on the fit weeks (see :class:`Scalers`)."""
    fit = p.fit
    n_fit = fit.sum(1)
    kpi_scale = (p.kpi * fit).sum(1) / n_fit
    if np.any(kpi_scale <= 0):
        r = int(np.flatnonzero(kpi_scale <= 0)[0])
        raise DataError(
            f"region {p.regions[r]!r} has a fit-period mean KPI of {kpi_scale[r]:g}; the MMM "
            "models a positive KPI (sales, conversions)"
        )
    media_sum = (p.media * fit[:, :, None]).sum(1)
    media_scale = media_sum / n_fit[:, None]
    for j in range(media_scale.shape[1]):
        pos = media_scale[:, j] > 0
        if not pos.any():
            raise DataError(
                f"channel {j} is zero in every region's fit weeks: nothing to estimate its "
                "effect from"
            )
        # A region that never used the channel: any scale gives zero; the median keeps its
        # response curve (for budgets) on the usual scale.
        media_scale[~pos, j] = np.median(media_scale[pos, j])
    k = p.controls.shape[2]
    if k:
        vals = p.controls[fit]
        mean, sd = vals.mean(0), vals.std(0)
        sd = np.where(sd > 0, sd, 1.0)
    else:
        mean, sd = np.zeros(0), np.ones(0)
    spend_sum = (p.spend * fit[:, :, None]).sum((0, 1))
    cost = np.where(np.asarray(p.has_spend), spend_sum / media_sum.sum(0), np.nan)
    return Scalers(kpi_scale, media_scale, mean, sd, cost)


def scaled(p: Panel, s: Scalers) -> dict[str, np.ndarray]:
    """Model inputs: ``y`` (R, T), ``media`` (R, T, C), ``controls`` (R, T, K), float32."""
    return {
        "y": (p.kpi / s.kpi_scale[:, None]).astype(np.float32),
        "media": (p.media / s.media_scale[:, None, :]).astype(np.float32),
        "controls": ((p.controls - s.control_mean) / s.control_sd).astype(np.float32),
    }


@dataclass
class Plan:
    """A media plan (or any stretch of weeks) for some of a model's regions.

    P plan regions, W plan weeks (``start`` .. ``start + W − 1`` on the model's week grid,
    which may run past the history's end), C channels, K controls.
    """

    region_index: np.ndarray  # (P,) positions in the model's regions
    start: int  # grid index of the plan's first week
    media: np.ndarray  # (P, W, C) activity
    controls: np.ndarray  # (P, W, K)

    @property
    def weeks(self) -> int:
        return self.media.shape[1]


def grid_labels(labels: list[Any], n: int) -> list[Any]:
    """The first ``n`` labels of the model's weekly grid, extended past its end."""
    if isinstance(labels[0], int):
        return [labels[0] + i for i in range(n)]
    d0 = np.datetime64(labels[0], "D")
    return [str(d0 + np.timedelta64(7 * i, "D")) for i in range(n)]


def _grid_index(values: pd.Series, dtype: pa.DataType, column: str, labels: list[Any]):
    """Each row's week as an index on the model's grid (0 = its first week)."""
    idx, own = _week_index(values, dtype, column)
    if isinstance(labels[0], int) != isinstance(own[0], int):
        raise DataError(
            f"column {column!r} (named by data.week) holds {'integer periods' if isinstance(own[0], int) else 'dates'}"
            f", but the model was fitted on {'integer periods' if isinstance(labels[0], int) else 'dates'}"
        )
    if isinstance(labels[0], int):
        return idx + (own[0] - labels[0])
    days = (np.datetime64(own[0], "D") - np.datetime64(labels[0], "D")).astype(np.int64)
    if days % 7:
        raise DataError(
            f"column {column!r} (named by data.week): {own[0]} is not on the model's weekly grid "
            f"(a whole number of weeks after {labels[0]})"
        )
    return idx + days // 7


def read_plan(path: str, cols: Columns, regions: list[Any], labels: list[Any]) -> Plan:
    """Read a media plan: region, week, media and control columns (a KPI is ignored).

    The plan's weeks must be consecutive, the same for every region in it, and start no
    later than the week after the history (``len(labels)``): the history before the plan
    gives the carry-over. DataError (exit 2) for anything else.
    """
    ds = open_dataset(path)
    schema = ds.schema
    wanted = [cols.region, cols.week, *cols.media, *cols.controls]
    missing = [c for c in dict.fromkeys(wanted) if c not in schema.names]
    if missing:
        raise DataError(
            f"the plan at {path} has no column(s) {missing}; a plan needs the model's region, "
            f"week, media {cols.media} and control {cols.controls} columns; it has: "
            f"{', '.join(schema.names)}"
        )
    df = ds.to_table(columns=list(dict.fromkeys(wanted))).to_pandas()
    if len(df) == 0:
        raise DataError(f"the plan at {path} is empty")
    if df[cols.region].isna().any() or df[cols.week].isna().any():
        raise DataError(f"the plan at {path} has rows without a region or a week")
    media = np.stack([_numeric(df, c, "data.media", schema) for c in cols.media], -1)
    if np.any(media < 0):
        j = int(np.flatnonzero((media < 0).any(0))[0])
        raise DataError(
            f"the plan's column {cols.media[j]!r} has negative activity; it must be ≥ 0"
        )
    controls = (
        np.stack([_numeric(df, c, "data.controls", schema) for c in cols.controls], -1)
        if cols.controls
        else np.zeros((len(df), 0))
    )
    week = _grid_index(df[cols.week], schema.field(cols.week).type, cols.week, labels)
    pos = {r: i for i, r in enumerate(regions)}
    region_ids = [r.item() if hasattr(r, "item") else r for r in df[cols.region]]
    unknown = sorted({r for r in region_ids if r not in pos}, key=str)
    if unknown:
        raise DataError(
            f"{len(unknown)} region(s) of the plan are not in the fitted model, e.g. "
            f"{unknown[:5]}; a plan covers regions the model was fitted on"
        )
    start, stop = int(week.min()), int(week.max()) + 1
    if start < 0 or start > len(labels):
        first = grid_labels(labels, max(start, 0) + 1)[-1] if start >= 0 else "before it"
        raise DataError(
            f"the plan starts at week {first}, but the model's history runs from {labels[0]} "
            f"to {labels[-1]}: a plan starts within the history or the week after it, so the "
            "history gives its carry-over"
        )
    codes, plan_regions = pd.factorize(pd.Series(region_ids, dtype=object))
    p_n, w_n = len(plan_regions), stop - start
    flat = codes.astype(np.int64) * w_n + (week - start)
    if len(np.unique(flat)) != len(flat) or len(flat) != p_n * w_n:
        raise DataError(
            f"the plan must give each of its {p_n} region(s) exactly one row for every week from "
            f"{grid_labels(labels, start + 1)[-1]} to {grid_labels(labels, stop)[-1]} "
            f"({w_n} weeks); it has {len(flat)} rows"
        )
    out_m = np.zeros((p_n * w_n, media.shape[1]))
    out_c = np.zeros((p_n * w_n, controls.shape[1]))
    out_m[flat], out_c[flat] = media, controls
    return Plan(
        region_index=np.array([pos[r] for r in plan_regions]),
        start=start,
        media=out_m.reshape(p_n, w_n, -1),
        controls=out_c.reshape(p_n, w_n, -1),
    )
