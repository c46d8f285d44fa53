"""Exact least squares with several high-dimensional fixed effects, out of core.

The model (``n`` rows, ``p`` regressors, ``F`` fixed-effect families of ``n_f`` ids each)::

    y = c + X b + Σ_f D_f a_f + e          D_f: (n, n_f) indicator of row i's id in family f

is fitted from sufficient statistics that are sums over rows, so they are computed per
batch and added (:func:`batch_statistics`, :class:`StatisticsAccumulator`). Memory is
O(Σ n_f · p + p²) plus the cross-tabulations D_fᵀD_g of id pairs, never O(n).

Solve (:func:`solve`), by Frisch–Waugh–Lovell. With D = [D_1 .. D_F] (``M = Σ n_f``
columns) solve the singular but consistent system (DᵀD) P = Dᵀ[X y] for the ``p + 1``
right-hand sides. DᵀD has diagonal blocks diag(counts_f) and off-diagonal blocks the
cross-tabs. The largest family's block is diagonal, so it is eliminated exactly; what is
left is the Schur complement S over the other families (``m`` ids), solved densely by a
pseudo-inverse (``m ≤ dense_max``) or by preconditioned conjugate gradients. Then

    b = (XᵀX − XᵀD P_X)⁻¹ (Xᵀy − XᵀD P_y),    a = P_y − P_X b,

and each family is shifted to zero mean over its seen ids (unweighted), the shifts going
into the intercept ``c`` — the convention of ``FixedEffectsHTE.normalize_``. The RSS
follows from the statistics: RSS = yᵀy − bᵀXᵀy − aᵀDᵀy for any least-squares (b, a).

Standard errors (:func:`inference`): ``iid`` needs only the statistics; ``hetero`` (HC1)
and ``CRV1`` need a second pass (:func:`batch_scores`) that demeans each row,
x̃_i = x_i − Σ_f P_X,f[id_f(i)], and sums e_i² x̃_i x̃_iᵀ and per-cluster Σ e_i x̃_i. The
small-sample corrections are pyfixest ``feols``' defaults (``ssc()``: k_adj, k_fixef =
"nonnested", G_adj, G_df = "min"), including its count of fixed effects, k_fe − (F − 1),
and the rule that fixed effects nested in the cluster are not counted.

Numbers only: numpy and scipy, no ray, no torch, no I/O. Singleton ids are kept (pyfixest
``fixef_rm="none"``); ids are dense codes ``0..n_f-1`` that the caller encodes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

VcovType = Literal["iid", "hetero", "CRV1"]
VCOV_TYPES: tuple[str, ...] = ("iid", "hetero", "CRV1")
# Above this many ids outside the largest family, the Schur complement is solved by CG.
DENSE_MAX = 1_000
# Eigenvalues of the count-scaled Schur complement below this (relative) are null space.
EIG_RTOL = 1e-11
# CG stops at this relative residual (per right-hand side).
CG_RTOL = 1e-12


def check_vcov(vcov: str, cluster: int | None, n_families: int) -> None:
    """Raise ValueError unless ``vcov`` is allowed and ``cluster`` fits it."""
    if vcov not in VCOV_TYPES:
        raise ValueError(f"vcov must be one of {list(VCOV_TYPES)}, got {vcov!r}")
    if vcov == "CRV1":
        if cluster is None or not 0 <= cluster < n_families:
            raise ValueError(
                f"vcov='CRV1' needs cluster = the index of a fixed-effect family "
                f"(0..{n_families - 1}), got {cluster!r}"
            )
    elif cluster is not None:
        raise ValueError(f"cluster is only used with vcov='CRV1', got vcov={vcov!r}")


# -- pass 1: sufficient statistics --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchStatistics:
    """Sums over the rows of one batch, with ids compacted to those present.

    ``k_f`` ids of family f are present, ``q`` distinct id pairs for a family pair.

    Attributes:
        n: rows.
        x_sum: (p,) Σ x_i.   y_sum: Σ y_i.
        xtx: (p, p) XᵀX.   xty: (p,) Xᵀy.   yty: yᵀy.
        ids: per family, (k_f,) int64 codes present in the batch (sorted).
        counts: per family, (k_f,) rows per present id.
        dx: per family, (k_f, p) Σ x_i over the rows of each present id.
        dy: per family, (k_f,) Σ y_i over the rows of each present id.
        pairs: per family pair f < g (in ``itertools.combinations`` order), a tuple
            (codes_f (q,), codes_g (q,), counts (q,)) of the pairs present.
    """

    n: int
    x_sum: np.ndarray
    y_sum: float
    xtx: np.ndarray
    xty: np.ndarray
    yty: float
    ids: tuple[np.ndarray, ...]
    counts: tuple[np.ndarray, ...]
    dx: tuple[np.ndarray, ...]
    dy: tuple[np.ndarray, ...]
    pairs: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flatten to two 1-D arrays (float64 and int64) for transport in a one-row batch."""
        p, F = self.xty.shape[0], len(self.ids)
        head = [self.n, p, F, *(len(i) for i in self.ids), *(len(q[0]) for q in self.pairs)]
        ints = [np.asarray(head, np.int64), *self.ids, *self.counts]
        for cf, cg_, cnt in self.pairs:
            ints += [cf, cg_, cnt]
        floats = [
            self.x_sum,
            [self.y_sum, self.yty],
            self.xtx.ravel(),
            self.xty,
            *(d.ravel() for d in self.dx),
            *self.dy,
        ]
        return {
            "ints": np.concatenate([np.asarray(a, np.int64) for a in ints]),
            "floats": np.concatenate([np.asarray(a, np.float64).ravel() for a in floats]),
        }

    @staticmethod
    def from_arrays(ints: np.ndarray, floats: np.ndarray) -> BatchStatistics:
        """Inverse of :meth:`to_arrays`."""
        n, p, F = (int(v) for v in ints[:3])
        n_pairs = F * (F - 1) // 2
        k = [int(v) for v in ints[3 : 3 + F]]
        q = [int(v) for v in ints[3 + F : 3 + F + n_pairs]]
        it, ft = 3 + F + n_pairs, 0

        def take_i(size: int) -> np.ndarray:
            nonlocal it
            it += size
            return ints[it - size : it]

        def take_f(size: int) -> np.ndarray:
            nonlocal ft
            ft += size
            return floats[ft - size : ft]

        ids = tuple(take_i(kf) for kf in k)
        counts = tuple(take_i(kf) for kf in k)
        pairs = tuple((take_i(qq), take_i(qq), take_i(qq)) for qq in q)
        x_sum = take_f(p)
        y_sum, yty = (float(v) for v in take_f(2))
        xtx = take_f(p * p).reshape(p, p)
        xty = take_f(p)
        dx = tuple(take_f(kf * p).reshape(kf, p) for kf in k)
        dy = tuple(take_f(kf) for kf in k)
        return BatchStatistics(n, x_sum, y_sum, xtx, xty, yty, ids, counts, dx, dy, pairs)


def _group(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct codes (k,) sorted, inverse (n,), counts (k,)) of non-negative int codes.

    A bincount when the code range is small next to n (O(n + range)), else a sort.
    """
    if len(codes) == 0:
        return codes.astype(np.int64), codes.astype(np.int64), codes.astype(np.int64)
    top = int(codes.max()) + 1
    if top > 4 * len(codes):
        return np.unique(codes, return_inverse=True, return_counts=True)
    cnt = np.bincount(codes, minlength=top)
    present = np.flatnonzero(cnt)
    lookup = np.empty(top, np.int64)
    lookup[present] = np.arange(len(present))
    return present, lookup[codes], cnt[present]


def batch_statistics(y: np.ndarray, X: np.ndarray, codes: np.ndarray) -> BatchStatistics:
    """Pass-1 statistics of one batch.

    Args:
        y: (n,) outcome.
        X: (n, p) regressors without the intercept (``p`` may be 0).
        codes: (n, F) int64 dense id codes, one column per family (``F`` may be 0).
    """
    y = np.asarray(y, np.float64)
    X = np.asarray(X, np.float64).reshape(len(y), -1)
    codes = np.asarray(codes, np.int64).reshape(len(y), -1)
    ids, counts, dx, dy, inverse = [], [], [], [], []
    for f in range(codes.shape[1]):
        u, inv, cnt = _group(codes[:, f])
        ids.append(u)
        counts.append(cnt)
        inverse.append(inv)
        # bincount per column: O(n p), no dense (n_f, p) array for ids absent here
        dx.append(
            np.stack([np.bincount(inv, X[:, j], len(u)) for j in range(X.shape[1])], axis=1)
            if X.shape[1]
            else np.zeros((len(u), 0))
        )
        dy.append(np.bincount(inv, y, len(u)))
    pairs = []
    for f, g in itertools.combinations(range(codes.shape[1]), 2):
        key = inverse[f].astype(np.int64) * len(ids[g]) + inverse[g]
        uk, _, cnt = _group(key)
        pairs.append((ids[f][uk // len(ids[g])], ids[g][uk % len(ids[g])], cnt))
    return BatchStatistics(
        n=len(y),
        x_sum=X.sum(axis=0),
        y_sum=float(y.sum()),
        xtx=X.T @ X,
        xty=X.T @ y,
        yty=float(y @ y),
        ids=tuple(ids),
        counts=tuple(counts),
        dx=tuple(dx),
        dy=tuple(dy),
        pairs=tuple(pairs),
    )


@dataclass(frozen=True, slots=True)
class FEStatistics:
    """Pass-1 sufficient statistics of a whole dataset (dense per family).

    Attributes:
        n: rows.   x_sum: (p,).   y_sum, yty: scalars.
        xtx: (p, p) XᵀX.   xty: (p,) Xᵀy.
        counts: per family, (n_f,) rows per id (0 for ids never seen).
        dx: per family, (n_f, p) D_fᵀX.   dy: per family, (n_f,) D_fᵀy.
        cross: per family pair f < g (``itertools.combinations`` order), the
            (n_f, n_g) CSR cross-tab D_fᵀD_g of row counts.
    """

    n: int
    x_sum: np.ndarray
    y_sum: float
    xtx: np.ndarray
    xty: np.ndarray
    yty: float
    counts: tuple[np.ndarray, ...]
    dx: tuple[np.ndarray, ...]
    dy: tuple[np.ndarray, ...]
    cross: tuple[sp.csr_matrix, ...]

    @property
    def n_ids(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.counts)

    @property
    def p(self) -> int:
        return self.xty.shape[0]

    def crosstab(self, f: int, g: int) -> sp.csr_matrix:
        """(n_f, n_g) D_fᵀD_g for any f ≠ g."""
        pairs = list(itertools.combinations(range(len(self.counts)), 2))
        if f < g:
            return self.cross[pairs.index((f, g))]
        return self.cross[pairs.index((g, f))].T.tocsr()


class StatisticsAccumulator:
    """Adds :class:`BatchStatistics` into dense per-family arrays; cross-tabs stay sparse.

    Memory: O(Σ n_f · p + p²) plus the pending id pairs, compacted (duplicates summed)
    whenever they outgrow twice the last compacted size.
    """

    def __init__(self, n_ids: Sequence[int], p: int) -> None:
        self.n_ids = tuple(int(v) for v in n_ids)
        self.p = p
        self.n = 0
        self.x_sum = np.zeros(p)
        self.y_sum = 0.0
        self.xtx = np.zeros((p, p))
        self.xty = np.zeros(p)
        self.yty = 0.0
        self.counts = [np.zeros(k, np.int64) for k in self.n_ids]
        self.dx = [np.zeros((k, p)) for k in self.n_ids]
        self.dy = [np.zeros(k) for k in self.n_ids]
        self._pairs = list(itertools.combinations(range(len(self.n_ids)), 2))
        self._pending: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [
            [] for _ in self._pairs
        ]
        self._pending_len = [0] * len(self._pairs)
        self._compact_len = [0] * len(self._pairs)

    def add(self, s: BatchStatistics) -> None:
        if len(s.ids) != len(self.n_ids) or s.xty.shape[0] != self.p:
            raise ValueError(
                f"batch has {len(s.ids)} families and p={s.xty.shape[0]}; "
                f"expected {len(self.n_ids)} and p={self.p}"
            )
        self.n += s.n
        self.x_sum += s.x_sum
        self.y_sum += s.y_sum
        self.xtx += s.xtx
        self.xty += s.xty
        self.yty += s.yty
        for f, ids in enumerate(s.ids):
            if len(ids) and (ids[0] < 0 or ids[-1] >= self.n_ids[f]):
                raise ValueError(f"family {f}: id codes outside 0..{self.n_ids[f] - 1}")
            # ids are unique within a batch, so fancy-index += is exact
            self.counts[f][ids] += s.counts[f]
            self.dx[f][ids] += s.dx[f]
            self.dy[f][ids] += s.dy[f]
        for j, pair in enumerate(s.pairs):
            self._pending[j].append(pair)
            self._pending_len[j] += len(pair[0])
            if self._pending_len[j] > 2 * max(self._compact_len[j], 1 << 16):
                self._compact(j)

    def _compact(self, j: int) -> sp.csr_matrix:
        f, g = self._pairs[j]
        rows = np.concatenate([q[0] for q in self._pending[j]] or [np.zeros(0, np.int64)])
        cols = np.concatenate([q[1] for q in self._pending[j]] or [np.zeros(0, np.int64)])
        vals = np.concatenate([q[2] for q in self._pending[j]] or [np.zeros(0, np.int64)])
        m = sp.csr_matrix(
            (vals.astype(np.float64), (rows, cols)), shape=(self.n_ids[f], self.n_ids[g])
        )
        m.sum_duplicates()
        coo = m.tocoo()
        self._pending[j] = [(coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data)]
        self._pending_len[j] = self._compact_len[j] = m.nnz
        return m

    def result(self) -> FEStatistics:
        return FEStatistics(
            n=self.n,
            x_sum=self.x_sum.copy(),
            y_sum=self.y_sum,
            xtx=self.xtx.copy(),
            xty=self.xty.copy(),
            yty=self.yty,
            counts=tuple(c.copy() for c in self.counts),
            dx=tuple(d.copy() for d in self.dx),
            dy=tuple(d.copy() for d in self.dy),
            cross=tuple(self._compact(j) for j in range(len(self._pairs))),
        )


def statistics(
    y: np.ndarray, X: np.ndarray, codes: np.ndarray, n_ids: Sequence[int], batch_rows: int = 0
) -> FEStatistics:
    """Pass-1 statistics of in-memory arrays (shapes as in :func:`batch_statistics`).

    ``batch_rows > 0`` splits the rows into batches, as the out-of-core driver does.
    """
    X = np.asarray(X, np.float64).reshape(len(y), -1)
    codes = np.asarray(codes, np.int64).reshape(len(y), -1)
    acc = StatisticsAccumulator(n_ids, X.shape[1])
    step = batch_rows if batch_rows > 0 else max(len(y), 1)
    for lo in range(0, len(y), step):
        acc.add(batch_statistics(y[lo : lo + step], X[lo : lo + step], codes[lo : lo + step]))
    return acc.result()


# -- solve -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FESolution:
    """Exact least-squares fit from :class:`FEStatistics`.

    Attributes:
        coef: (p,) b; with no fixed-effect family, the intercept is ``intercept``.
        intercept: c, after shifting each family to zero mean over its seen ids.
        fixed_effects: per family, (n_f,) a_f (zero mean over seen ids; 0 for unseen).
        proj_x: per family, (n_f, p) P_X,f: x̃_i = x_i − Σ_f proj_x[f][id_f(i)] is x_i
            with the fixed effects partialled out (pass 2 needs it).
        x_center: (p,) subtracted from every row besides the projections: the mean of X
            when there is no family (OLS), else zeros.
        xtx_tilde: (p, p) X̃ᵀX̃, the Hessian after partialling out (bread = its inverse).
        rss: residual sum of squares, from the statistics.
        tss_within: ỹᵀỹ, the sum of squares of y after partialling out the fixed effects.
        n: rows.   n_seen: per family, ids with count > 0.
        n_components: connected components of the graph of seen ids linked by shared
            rows (1 when connected; fixed effects are identified only within a
            component: comparisons across components are arbitrary).
        null_dim: dimension of the null space found in DᵀD (F − 1 when connected and
            nothing else is collinear); -1 when the CG path does not measure it.
        method: "dense" (pseudo-inverse), "cg" or "none" (at most one family).
        cg_iterations: per right-hand side (empty unless method is "cg").
    """

    coef: np.ndarray
    intercept: float
    fixed_effects: tuple[np.ndarray, ...]
    proj_x: tuple[np.ndarray, ...]
    x_center: np.ndarray
    xtx_tilde: np.ndarray
    rss: float
    tss_within: float
    n: int
    n_seen: tuple[int, ...]
    n_components: int
    null_dim: int
    method: str
    cg_iterations: tuple[int, ...]


def _offsets(n_ids: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(n_ids)]).astype(np.int64)


def id_components(stats: FEStatistics) -> int:
    """Connected components among seen ids (ids linked when they share a row); 1 if F ≤ 1."""
    F = len(stats.counts)
    if F <= 1:
        return 1
    off = _offsets(stats.n_ids)
    blocks = []
    for (f, g), c in zip(itertools.combinations(range(F), 2), stats.cross, strict=True):
        coo = c.tocoo()
        blocks.append((coo.row + off[f], coo.col + off[g]))
    rows = np.concatenate([b[0] for b in blocks])
    cols = np.concatenate([b[1] for b in blocks])
    adj = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(off[-1], off[-1]))
    _, labels = connected_components(adj, directed=False)
    seen = np.concatenate(stats.counts) > 0
    return int(len(np.unique(labels[seen])))


def _solve_projection(
    stats: FEStatistics, rhs: list[np.ndarray], dense_max: int, cg_rtol: float
) -> tuple[list[np.ndarray], str, int, tuple[int, ...]]:
    """Solve (DᵀD) P = R, R given per family as (n_f, r); return P per family.

    The largest family's diagonal block is eliminated exactly; the Schur complement
    over the others is solved densely (pseudo-inverse) or by Jacobi-preconditioned CG.
    Unseen ids get 0.
    """
    F = len(stats.counts)
    r = rhs[0].shape[1]
    e = int(np.argmax([(c > 0).sum() for c in stats.counts]))
    others = [f for f in range(F) if f != e]
    a = stats.counts[e].astype(np.float64)
    inv_a = np.divide(1.0, a, out=np.zeros_like(a), where=a > 0)
    if not others:
        return [rhs[e] * inv_a[:, None]], "none", 0, ()
    # Schur complement over the other families: S = C − Bᵀ diag(1/a) B
    n_o = [stats.n_ids[f] for f in others]
    off = _offsets(n_o)
    m = int(off[-1])
    B = sp.hstack([stats.crosstab(e, f) for f in others]).tocsr()  # (n_e, m)
    c_diag = np.concatenate([stats.counts[f] for f in others]).astype(np.float64)
    C_off = sp.csr_matrix((m, m))
    for i, j in itertools.combinations(range(len(others)), 2):
        ct = stats.crosstab(others[i], others[j]).tocoo()
        blk = sp.csr_matrix(
            (ct.data, (ct.row + off[i], ct.col + off[j])), shape=(m, m), dtype=np.float64
        )
        C_off = C_off + blk + blk.T
    R_o = np.concatenate([rhs[f] for f in others], axis=0)  # (m, r)
    rhs_s = R_o - B.T @ (rhs[e] * inv_a[:, None])
    seen = c_diag > 0
    Q = np.zeros((m, r))
    BinvA = sp.diags(inv_a) @ B
    if m <= dense_max:
        idx = np.flatnonzero(seen)
        S = (C_off - B.T @ BinvA).toarray()[np.ix_(idx, idx)]
        S[np.diag_indices_from(S)] += c_diag[idx]
        # scale by sqrt(counts) so the eigenvalue cut-off is relative to a unit diagonal
        s = np.sqrt(c_diag[idx])
        w, V = scipy.linalg.eigh(S / s[:, None] / s[None, :])
        keep = w > EIG_RTOL * max(float(w.max()), 1.0)
        Vk = V[:, keep]
        Q[idx] = (Vk @ ((Vk.T @ (rhs_s[idx] / s[:, None])) / w[keep, None])) / s[:, None]
        method, null_dim, iters = "dense", int((~keep).sum()), ()
    else:
        # Jacobi preconditioner from diag(S); an id absorbed by the eliminated family can
        # have diag(S) = 0, so it falls back to its count
        d = c_diag - (B.multiply(B)).T @ inv_a
        d = np.where(d > 1e-9 * np.maximum(c_diag, 1.0), d, np.maximum(c_diag, 1.0))
        Bt = B.T.tocsr()

        def matvec(V: np.ndarray) -> np.ndarray:
            return c_diag[:, None] * V + C_off @ V - Bt @ (BinvA @ V)

        Q, counts = block_cg(matvec, rhs_s, 1.0 / d, cg_rtol, maxiter=min(20 * m, 20_000))
        method, null_dim, iters = "cg", -1, tuple(counts)
    P_e = (rhs[e] - B @ Q) * inv_a[:, None]
    out: list[np.ndarray] = [np.empty(0)] * F
    out[e] = P_e
    for i, f in enumerate(others):
        out[f] = Q[off[i] : off[i + 1]]
    return out, method, null_dim, iters


def block_cg(
    matvec: Callable[[np.ndarray], np.ndarray],
    rhs: np.ndarray,
    inv_diag: np.ndarray,
    rtol: float,
    maxiter: int,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Jacobi-preconditioned CG on r right-hand sides at once (independent per column).

    ``matvec`` maps (m, r) to (m, r) for a symmetric positive semi-definite operator;
    ``rhs`` (m, r) must be in its range (consistent). One sparse product per iteration
    serves all columns, and inner products are column sums rather than BLAS calls, which
    oversubscribed machines make slow. Stops a column at ‖b − Ax‖ ≤ rtol ‖b‖. Returns
    (x (m, r), iterations per column); raises RuntimeError if a column does not converge.
    """
    X = np.zeros_like(rhs)
    R = rhs.copy()
    Z = R * inv_diag[:, None]
    P = Z.copy()
    rz = (R * Z).sum(0)
    target = rtol * np.sqrt((rhs * rhs).sum(0))
    iters = np.zeros(rhs.shape[1], np.int64)
    for _ in range(maxiter):
        active = np.sqrt((R * R).sum(0)) > target
        if not active.any():
            break
        AP = matvec(P)
        pap = (P * AP).sum(0)
        alpha = np.where(active & (pap > 0), rz / np.where(pap > 0, pap, 1.0), 0.0)
        X += alpha * P
        R -= alpha * AP
        Z = R * inv_diag[:, None]
        rz_new = (R * Z).sum(0)
        beta = np.where(active & (rz > 0), rz_new / np.where(rz > 0, rz, 1.0), 0.0)
        P = Z + beta * P
        rz = rz_new
        iters += active
    # the recurrence can drift from the true residual: check it, allowing rounding slack
    res = np.sqrt(((rhs - matvec(X)) ** 2).sum(0))
    bad = np.flatnonzero(res > 1e3 * np.maximum(target, 1e-300))
    if bad.size:
        j = int(bad[0])
        raise RuntimeError(
            f"CG did not converge for right-hand side {j} in {maxiter} iterations: "
            f"relative residual {res[j] / (target[j] / rtol):.2e}"
        )
    return X, tuple(int(i) for i in iters)


def solve(
    stats: FEStatistics,
    *,
    coef_names: Sequence[str] | None = None,
    dense_max: int = DENSE_MAX,
    cg_rtol: float = CG_RTOL,
) -> FESolution:
    """Exact least squares y ~ c + X b + Σ_f FE_f from pass-1 statistics.

    With no family this is OLS with an intercept. Raises ValueError when a regressor is
    collinear with the fixed effects (e.g. a buyer-level feature with a buyer effect),
    naming it when ``coef_names`` is given.
    """
    F, p, n = len(stats.counts), stats.p, stats.n
    n_seen = tuple(int((c > 0).sum()) for c in stats.counts)
    if F == 0:
        # OLS with an explicit intercept column: Z = [1, X]
        ztz = np.block([[np.array([[n]]), stats.x_sum[None]], [stats.x_sum[:, None], stats.xtx]])
        zty = np.concatenate([[stats.y_sum], stats.xty])
        _check_rank(ztz, ["(intercept)", *(coef_names or [f"x{j}" for j in range(p)])])
        theta = scipy.linalg.solve(ztz, zty, assume_a="pos")
        rss = stats.yty - theta @ zty
        xtx_t = stats.xtx - np.outer(stats.x_sum, stats.x_sum) / n
        return FESolution(
            coef=theta[1:],
            intercept=float(theta[0]),
            fixed_effects=(),
            proj_x=(),
            x_center=stats.x_sum / n,
            xtx_tilde=xtx_t,
            rss=float(rss),
            tss_within=float(stats.yty - stats.y_sum**2 / n),
            n=n,
            n_seen=(),
            n_components=1,
            null_dim=0,
            method="none",
            cg_iterations=(),
        )
    rhs = [np.column_stack([stats.dx[f], stats.dy[f]]) for f in range(F)]
    P, method, null_dim, iters = _solve_projection(stats, rhs, dense_max, cg_rtol)
    P_x = [Pf[:, :p] for Pf in P]
    P_y = [Pf[:, p] for Pf in P]
    xtx_t = stats.xtx - sum(stats.dx[f].T @ P_x[f] for f in range(F))
    xty_t = stats.xty - sum(stats.dx[f].T @ P_y[f] for f in range(F))
    yty_t = stats.yty - sum(stats.dy[f] @ P_y[f] for f in range(F))
    xtx_t = (xtx_t + xtx_t.T) / 2
    if p:
        _check_rank(xtx_t, list(coef_names or [f"x{j}" for j in range(p)]), stats.xtx)
        b = scipy.linalg.solve(xtx_t, xty_t, assume_a="pos")
    else:
        b = np.zeros(0)
    a = [P_y[f] - P_x[f] @ b for f in range(F)]
    # RSS of a least-squares solution (b, a): yᵀy − bᵀXᵀy − Σ_f a_fᵀ D_fᵀy
    rss = stats.yty - b @ stats.xty - sum(a[f] @ stats.dy[f] for f in range(F))
    intercept = 0.0
    for f in range(F):
        seen = stats.counts[f] > 0
        shift = float(a[f][seen].mean()) if seen.any() else 0.0
        a[f] = np.where(seen, a[f] - shift, 0.0)
        intercept += shift
    return FESolution(
        coef=b,
        intercept=intercept,
        fixed_effects=tuple(a),
        proj_x=tuple(P_x),
        x_center=np.zeros(p),
        xtx_tilde=xtx_t,
        rss=float(max(rss, 0.0)),
        tss_within=float(yty_t),
        n=n,
        n_seen=n_seen,
        n_components=id_components(stats),
        null_dim=null_dim,
        method=method,
        cg_iterations=iters,
    )


def _check_rank(h: np.ndarray, names: list[str], raw: np.ndarray | None = None) -> None:
    """Raise ValueError if the (p, p) Hessian ``h`` is singular; name absorbed columns."""
    raw = h if raw is None else raw
    scale = np.sqrt(np.maximum(np.diag(raw), 1e-300))
    hs = h / scale[:, None] / scale[None, :]
    w = np.linalg.eigvalsh(hs)
    if w.size and w.min() > 1e-10 * max(w.max(), 1.0):
        return
    absorbed = [nm for nm, v in zip(names, np.diag(hs), strict=True) if v < 1e-8]
    what = f"absorbed by the fixed effects: {absorbed}" if absorbed else "collinear"
    raise ValueError(f"regressors are {what}; drop them or move them into beta/the FE")


# -- pass 2: scores ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchScores:
    """Pass-2 sums over one batch's rows.

    Attributes:
        n: rows.   rss: Σ e_i².
        meat: (p, p) Σ e_i² x̃_i x̃_iᵀ.
        cluster_ids: (k,) codes of the cluster family present (empty without clusters).
        cluster_scores: (k, p) Σ_{i in cluster} e_i x̃_i.
    """

    n: int
    rss: float
    meat: np.ndarray
    cluster_ids: np.ndarray
    cluster_scores: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flatten to two 1-D arrays (float64 and int64) for transport in a one-row batch."""
        p = self.meat.shape[0]
        return {
            "ints": np.concatenate([[self.n, p], self.cluster_ids]).astype(np.int64),
            "floats": np.concatenate([[self.rss], self.meat.ravel(), self.cluster_scores.ravel()]),
        }

    @staticmethod
    def from_arrays(ints: np.ndarray, floats: np.ndarray) -> BatchScores:
        """Inverse of :meth:`to_arrays`."""
        n, p = int(ints[0]), int(ints[1])
        ids = ints[2:]
        meat = floats[1 : 1 + p * p].reshape(p, p)
        return BatchScores(n, float(floats[0]), meat, ids, floats[1 + p * p :].reshape(len(ids), p))


def residuals(
    y: np.ndarray, X: np.ndarray, codes: np.ndarray, sol: FESolution
) -> tuple[np.ndarray, np.ndarray]:
    """(e (n,), x̃ (n, p)): residuals and fixed-effect-demeaned regressors of some rows."""
    y = np.asarray(y, np.float64)
    X = np.asarray(X, np.float64).reshape(len(y), -1)
    codes = np.asarray(codes, np.int64).reshape(len(y), -1)
    xt = X - sol.x_center
    fit = sol.intercept + X @ sol.coef
    for f in range(codes.shape[1]):
        xt -= sol.proj_x[f][codes[:, f]]
        fit += sol.fixed_effects[f][codes[:, f]]
    return y - fit, xt


def batch_scores(
    y: np.ndarray,
    X: np.ndarray,
    codes: np.ndarray,
    sol: FESolution,
    cluster: int | None = None,
) -> BatchScores:
    """Pass-2 sums of one batch (shapes as in :func:`batch_statistics`)."""
    e, xt = residuals(y, X, codes, sol)
    s = xt * e[:, None]
    if cluster is None:
        ids, sums = np.zeros(0, np.int64), np.zeros((0, xt.shape[1]))
    else:
        ids, inv, _ = _group(np.asarray(codes, np.int64)[:, cluster])
        sums = np.stack([np.bincount(inv, s[:, j], len(ids)) for j in range(s.shape[1])], 1)
    return BatchScores(len(e), float(e @ e), s.T @ s, ids.astype(np.int64), sums)


class ScoreAccumulator:
    """Adds :class:`BatchScores`; the cluster sums are dense, (n_clusters, p)."""

    def __init__(self, n_clusters: int, p: int) -> None:
        self.n, self.rss = 0, 0.0
        self.meat = np.zeros((p, p))
        self.cluster_scores = np.zeros((n_clusters, p))

    def add(self, s: BatchScores) -> None:
        self.n += s.n
        self.rss += s.rss
        self.meat += s.meat
        # cluster ids are unique within a batch, so fancy-index += is exact
        self.cluster_scores[s.cluster_ids] += s.cluster_scores

    def result(self) -> BatchScores:
        ids = np.arange(len(self.cluster_scores), dtype=np.int64)
        return BatchScores(self.n, self.rss, self.meat.copy(), ids, self.cluster_scores.copy())


def scores(
    y: np.ndarray,
    X: np.ndarray,
    codes: np.ndarray,
    sol: FESolution,
    cluster: int | None = None,
    n_clusters: int = 0,
    batch_rows: int = 0,
) -> BatchScores:
    """Pass-2 sums of in-memory arrays, in batches of ``batch_rows`` (0: one batch)."""
    X = np.asarray(X, np.float64).reshape(len(y), -1)
    codes = np.asarray(codes, np.int64).reshape(len(y), -1)
    acc = ScoreAccumulator(n_clusters if cluster is not None else 0, X.shape[1])
    step = batch_rows if batch_rows > 0 else max(len(y), 1)
    for lo in range(0, len(y), step):
        sl = slice(lo, lo + step)
        acc.add(batch_scores(y[sl], X[sl], codes[sl], sol, cluster))
    return acc.result()


# -- inference ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FEInference:
    """Coefficients with standard errors, as pyfixest ``feols(...).tidy()`` reports them.

    Attributes:
        names: (p,) coefficient names.
        coef, se, t, p_value, ci_low, ci_high: (p,) each; ``t`` distribution with
            ``df_t`` degrees of freedom for p-values and the (1 − alpha) interval.
        vcov: (p, p) covariance of ``coef``.
        vcov_type: "iid", "hetero" or "CRV1".   cluster: family index for CRV1.
        n_clusters: G for CRV1 (else None).
        df_k: parameters counted in the small-sample correction.
        df_t: degrees of freedom of the t distribution (N − df_k, or G − 1).
        ssc: the small-sample factor the raw sandwich was multiplied by.
        nested: families counted as nested in the cluster (CRV1), not in df_k.
    """

    names: tuple[str, ...]
    coef: np.ndarray
    se: np.ndarray
    t: np.ndarray
    p_value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    vcov: np.ndarray
    vcov_type: str
    cluster: int | None
    n_clusters: int | None
    df_k: int
    df_t: int
    ssc: float
    alpha: float
    nested: tuple[int, ...]

    def to_dict(self) -> dict:
        """JSON-ready: {name: {coef, se, t, p_value, ci_low, ci_high}} plus the settings."""
        return {
            "coefficients": {
                nm: {
                    "coef": float(self.coef[j]),
                    "se": float(self.se[j]),
                    "t": float(self.t[j]),
                    "p_value": float(self.p_value[j]),
                    "ci_low": float(self.ci_low[j]),
                    "ci_high": float(self.ci_high[j]),
                }
                for j, nm in enumerate(self.names)
            },
            "vcov_type": self.vcov_type,
            "cluster": self.cluster,
            "n_clusters": self.n_clusters,
            "df_k": self.df_k,
            "df_t": self.df_t,
            "ssc": self.ssc,
            "alpha": self.alpha,
        }


def nested_in(stats: FEStatistics, f: int, cluster: int) -> bool:
    """True when every seen id of family ``f`` occurs with exactly one cluster id."""
    if f == cluster:
        return True
    ct = stats.crosstab(f, cluster)
    per_id = np.diff(ct.indptr)
    return bool(np.all(per_id[stats.counts[f] > 0] == 1))


def inference(
    sol: FESolution,
    stats: FEStatistics,
    vcov: VcovType = "iid",
    score_sums: BatchScores | None = None,
    cluster: int | None = None,
    coef_names: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> FEInference:
    """Standard errors with pyfixest feols' default small-sample corrections.

    ``iid`` uses the RSS of the statistics; ``hetero`` (HC1) and ``CRV1`` (clustered by
    family ``cluster``) need ``score_sums`` from pass 2 (:func:`scores`).

    Corrections, as in ``pyfixest.utils.utils.get_ssc`` with ``ssc()`` defaults:
    df_k = k + k_fe − (F − 1) (k_fe: seen ids; the −(F − 1) only when F > 1), where for
    CRV1 the families nested in the cluster leave k_fe and count 1 each; k = p, plus 1
    for the intercept when there is no family. iid: RSS/(N − df_k) · bread; hetero:
    N/(N − df_k) · sandwich; CRV1: (N − 1)/(N − df_k) · G/(G − 1) · sandwich, df_t = G − 1.
    """
    from scipy import stats as sps  # lazily: Ray Data tasks import this module, not this

    F, p, N = len(stats.counts), stats.p, stats.n
    check_vcov(vcov, cluster, F)
    names = tuple(coef_names) if coef_names is not None else tuple(f"x{j}" for j in range(p))
    if len(names) != p:
        raise ValueError(f"{len(names)} coef_names for {p} coefficients")
    if vcov != "iid" and score_sums is None:
        raise ValueError(f"vcov={vcov!r} needs score_sums from pass 2")
    k = p + (1 if F == 0 else 0)
    k_fe = sum(sol.n_seen)
    k_fe_adj = k_fe - (F - 1) if F > 1 else k_fe
    df_k = k + k_fe_adj
    bread = np.linalg.inv(sol.xtx_tilde)
    nested: tuple[int, ...] = ()
    n_clusters = None
    if vcov == "iid":
        ssc = 1.0
        V = bread * (sol.rss / (N - df_k))
        df_t = N - df_k
    elif vcov == "hetero":
        ssc = N / (N - df_k)
        V = ssc * bread @ score_sums.meat @ bread
        df_t = N - df_k
    else:
        assert cluster is not None
        nested = tuple(f for f in range(F) if nested_in(stats, f, cluster))
        if nested:
            df_k = df_k - sum(sol.n_seen[f] for f in nested) + len(nested)
        G = sol.n_seen[cluster]
        n_clusters = G
        ssc = (N - 1) / (N - df_k) * G / (G - 1)
        sc = score_sums.cluster_scores
        V = ssc * bread @ (sc.T @ sc) @ bread
        df_t = G - 1
    V = (V + V.T) / 2
    se = np.sqrt(np.diag(V))
    t = sol.coef / se
    pval = 2 * sps.t.sf(np.abs(t), df_t)
    q = sps.t.ppf(1 - alpha / 2, df_t)
    return FEInference(
        names=names,
        coef=sol.coef,
        se=se,
        t=t,
        p_value=pval,
        ci_low=sol.coef - q * se,
        ci_high=sol.coef + q * se,
        vcov=V,
        vcov_type=vcov,
        cluster=cluster,
        n_clusters=n_clusters,
        df_k=int(df_k),
        df_t=int(df_t),
        ssc=float(ssc),
        alpha=alpha,
        nested=nested,
    )


def fit_arrays(
    y: np.ndarray,
    X: np.ndarray,
    codes: np.ndarray,
    n_ids: Sequence[int],
    vcov: VcovType = "iid",
    cluster: int | None = None,
    coef_names: Sequence[str] | None = None,
    batch_rows: int = 0,
    dense_max: int = DENSE_MAX,
) -> tuple[FESolution, FEInference]:
    """Both passes on in-memory arrays (the reference for the out-of-core driver)."""
    check_vcov(vcov, cluster, len(n_ids))
    st = statistics(y, X, codes, n_ids, batch_rows)
    sol = solve(st, coef_names=coef_names, dense_max=dense_max)
    sc = None
    if vcov != "iid":
        n_cl = st.n_ids[cluster] if cluster is not None else 0
        sc = scores(y, X, codes, sol, cluster, n_cl, batch_rows)
    return sol, inference(sol, st, vcov, sc, cluster, coef_names)
