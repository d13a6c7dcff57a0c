"""Cost of a multi-stage cascade from its per-stage records: outcomes, a threshold search under a cost
budget, and the accuracy-cost Pareto front of every combination of stages.

Stage 0 is CLIP; stages 1.. are LVLMs. An image reaches stage ``s+1`` of a combination when it reached
stage ``s`` and that stage's uncertainty is strictly greater than its threshold; its answer is the last
reached stage's, its cost the sum of every reached stage's cost. A NaN uncertainty counts as the most
uncertain value (a stage that cannot say how sure it is is not trusted: the image goes on unless the
threshold is +inf). Everything here is a function of the records (``stages.parquet`` and
``records.parquet``); no model runs. See docs/cost.md for the search and where it is exact.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

UNITS = ("seconds", "usd")

#: ``stages.parquet`` / ``val_stages.parquet``: one row per (image, stage); stage 0 is CLIP. usd null =
#: unknown price (never 0); pred -1 and uncertainty NaN where the stage gave no answer.
STAGES_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("stage", pa.int32()),
        ("name", pa.string()),
        ("answered", pa.bool_()),
        ("pred", pa.int64()),
        ("uncertainty", pa.float64()),
        ("seconds", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("usd", pa.float64()),
    ]
)

#: The exact search of a three-stage combination costs about N x (distinct CLIP uncertainties) steps;
#: above this many, CLIP's threshold comes from a quantile grid (the inner thresholds stay exact).
EXACT_WORK_LIMIT = 400_000_000
#: Quantile points per threshold of the earlier stages of a combination longer than three stages.
OUTER_GRID_POINTS = 9
#: Rows of t0 evaluated at once in the vectorised sweep (memory: BLOCK x N per array).
BLOCK = 256

PRICE_KEYS = "price.usd_per_image, price.usd_per_1m_prompt_tokens, price.usd_per_1m_completion_tokens or price.usd_per_hour"


@dataclass
class StageColumn:
    """One stage's answers on every image: ``pred`` (-1 = no answer), ``uncertainty``, ``cost`` (NaN =
    unknown)."""

    name: str
    pred: np.ndarray
    uncertainty: np.ndarray
    cost: np.ndarray


@dataclass
class CostTable:
    """The images' labels (-1 = unknown) and every stage's column (stage 0 = CLIP), costs in ``unit``."""

    labels: np.ndarray
    stages: list[StageColumn]
    unit: str = "seconds"

    @property
    def n(self) -> int:
        return len(self.labels)


@dataclass
class ThresholdChoice:
    """The thresholds :func:`choose_thresholds` found, what they give on the table it searched, and how."""

    thresholds: list[float]
    acc: float
    cost_per_1000: float
    calls: list[int]
    exact: bool
    points_searched: int
    seconds: float
    note: str
    stages: tuple[int, ...] = ()  # the combination searched (stage ids, starting 0)
    #: :func:`choose_combination`: each combination's best setting within the budget (what it chose among)
    per_combination: list[dict] = field(default_factory=list)


@dataclass
class ParetoPoint:
    """One threshold setting of one combination of stages and what it gives."""

    stages: tuple[str, ...]
    thresholds: list[float]
    acc: float
    cost_per_1000: float
    calls: list[int]
    on_front: bool = False
    stage_ids: tuple[int, ...] = field(default=(), compare=False)
    exact: bool = field(default=True, compare=False)


# ----------------------------------------------------------------------------------------- reading
def read_cost_table(stages_path: str | Path, records_path: str | Path, unit: str = "seconds") -> CostTable:
    """The cost table of a run: ``stages.parquet`` (one row per image and stage) and the labels of
    ``records.parquet``. Images are the records' indices; a stage without a row for an image has no
    answer there."""
    import pyarrow.parquet as pq

    if unit not in UNITS:
        raise ValueError(f"cost unit {unit!r} is not one of {', '.join(UNITS)}; set --cascade.cost_unit")
    for path in (stages_path, records_path):
        if not Path(path).exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist")
    rec = pq.read_table(records_path, columns=["index", "label"]).to_pydict()
    index = np.asarray(rec["index"], dtype=np.int64)
    labels = np.asarray(rec["label"], dtype=np.int64)
    order = np.argsort(index, kind="stable")
    index, labels = index[order], labels[order]
    if len(index) == 0:
        raise ValueError(f"{records_path} holds no records: a cost table needs the run's images")
    if len(np.unique(index)) != len(index):
        raise ValueError(f"{records_path}: image indices repeat")
    cols = ["index", "stage", "name", "answered", "pred", "uncertainty", unit]
    st = pq.read_table(stages_path, columns=cols).to_pydict()
    stage_ids = np.asarray(st["stage"], dtype=np.int64)
    present = sorted(set(stage_ids.tolist()))
    if present != list(range(len(present))) or not present:
        raise ValueError(f"{stages_path}: stages must be numbered 0..S-1 (0 = CLIP), found {present}")
    row_index = np.asarray(st["index"], dtype=np.int64)
    pos = np.searchsorted(index, row_index)
    pos_ok = (pos < len(index)) & (index[np.minimum(pos, len(index) - 1)] == row_index)
    if not pos_ok.all():
        missing = row_index[~pos_ok][:3].tolist()
        raise ValueError(f"{stages_path}: images {missing} have no record in {records_path}")
    answered = np.asarray(st["answered"], dtype=bool)
    pred = np.asarray(st["pred"], dtype=np.int64)
    unc = np.asarray([np.nan if u is None else u for u in st["uncertainty"]], dtype=np.float64)
    cost = np.asarray([np.nan if c is None else c for c in st[unit]], dtype=np.float64)
    stages = []
    for s in present:
        rows = np.nonzero(stage_ids == s)[0]
        col = StageColumn(
            name=str(st["name"][rows[0]]),
            pred=np.full(len(index), -1, dtype=np.int64),
            uncertainty=np.full(len(index), np.nan),
            cost=np.full(len(index), np.nan),
        )
        p = pos[rows]
        if len(np.unique(p)) != len(p):
            raise ValueError(f"{stages_path}: stage {s} has more than one row for an image")
        col.pred[p] = np.where(answered[rows], pred[rows], -1)
        col.uncertainty[p] = unc[rows]
        col.cost[p] = cost[rows]
        stages.append(col)
    return CostTable(labels=labels, stages=stages, unit=unit)


# ----------------------------------------------------------------------------------------- outcome
def _combination(table: CostTable, stages: Sequence[int] | None) -> list[int]:
    combo = list(range(len(table.stages))) if stages is None else [int(s) for s in stages]
    if not combo or combo[0] != 0:
        raise ValueError(f"a combination of stages starts with stage 0 (CLIP), got {combo}")
    if any(b <= a for a, b in itertools.pairwise(combo)) or combo[-1] >= len(table.stages):
        raise ValueError(f"stages {combo} must increase and lie in 0..{len(table.stages) - 1}")
    return combo


def _gate_uncertainty(u: np.ndarray) -> np.ndarray:
    """NaN (no scores) counts as the most uncertain value."""
    return np.where(np.isnan(u), np.inf, u)


def outcome(table: CostTable, thresholds: Sequence[float], stages: Sequence[int] | None = None) -> dict:
    """Accuracy, cost and calls per stage of one combination at ``thresholds`` (one per stage but the last).

    ``cost_per_image`` is NaN when an image reached a stage whose cost on it is unknown. Raises
    ValueError when an image reaches a stage that has no answer for it.
    """
    combo = _combination(table, stages)
    if len(thresholds) != len(combo) - 1:
        raise ValueError(f"{len(combo)} stages take {len(combo) - 1} thresholds, got {len(thresholds)}")
    n = table.n
    reach = np.ones(n, dtype=bool)
    final = np.full(n, -1, dtype=np.int64)
    cost = np.zeros(n)
    calls = []
    for k, s in enumerate(combo):
        col = table.stages[s]
        calls.append(int(reach.sum()))
        lacking = reach & (col.pred < 0)
        if lacking.any():
            raise ValueError(
                f"stage {s} ({col.name}) has no answer on {int(lacking.sum())} image(s) that reach it "
                f"at thresholds {list(thresholds)}"
            )
        cost = cost + np.where(reach, col.cost, 0.0)
        final = np.where(reach, col.pred, final)
        if k < len(combo) - 1:
            reach = reach & (_gate_uncertainty(col.uncertainty) > thresholds[k])
    known = table.labels >= 0
    acc = float((final[known] == table.labels[known]).mean()) if known.any() else math.nan
    per_image = float(cost.mean()) if n else math.nan
    return {
        "acc": acc,
        "cost_per_image": per_image,
        "cost_per_1000": per_image * 1000,
        "calls": calls,
        "final": final,
    }


# ---------------------------------------------------------------------------------------- the sweep
# Costs are summed as integers in fixed point (a power-of-two scale that puts the combination's total
# cost near 2**60): integer cumulative sums are exact and several times faster than floating-point ones;
# the rounding of each image's cost is below 1e-15 of the total.
FIXED_POINT_BITS = 60


@dataclass
class _Arrays:
    """Per-image values of one stage for the sweep: correct (0/1), cost (fixed point, 0 where unknown),
    blocked (1 where reaching it is not allowed: no answer, or unknown cost), gate uncertainty."""

    correct: np.ndarray
    cost: np.ndarray
    blocked: np.ndarray
    unc: np.ndarray


def _fixed_point_scale(table: CostTable, combo: Sequence[int]) -> float:
    total = sum(float(np.nansum(np.abs(table.stages[s].cost))) for s in combo)
    return math.ldexp(1.0, FIXED_POINT_BITS - (math.frexp(total)[1] if total > 0 else 0))


def _arrays(table: CostTable, s: int, scale: float) -> _Arrays:
    col = table.stages[s]
    known = table.labels >= 0
    unknown_cost = np.isnan(col.cost)
    return _Arrays(
        correct=((col.pred == table.labels) & known & (col.pred >= 0)).astype(np.int64),
        cost=np.rint(np.where(unknown_cost, 0.0, col.cost) * scale).astype(np.int64),
        blocked=((col.pred < 0) | unknown_cost).astype(np.int64),
        unc=_gate_uncertainty(col.uncertainty),
    )


def _candidates(u: np.ndarray, max_points: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ordered most uncertain first, the prefix lengths a threshold can send on (group ends of
    equal values: 0 .. n), and each prefix's threshold (+inf for none, -inf for all). With
    ``max_points``, only the prefixes nearest to evenly spaced quantiles are kept."""
    order = np.argsort(-u, kind="stable")
    su = u[order]
    n = len(u)
    ends = np.nonzero(su[1:] != su[:-1])[0] + 1 if n > 1 else np.zeros(0, dtype=np.int64)
    prefixes = np.concatenate([[0], ends, [n]]).astype(np.int64) if n else np.zeros(1, dtype=np.int64)
    if max_points is not None and len(prefixes) > max_points:
        want = np.linspace(0, n, max_points)
        pick = np.unique(np.clip(np.searchsorted(prefixes, want), 0, len(prefixes) - 1))
        prefixes = np.unique(np.concatenate([[0, n], prefixes[pick]]))
    thresholds = np.where(prefixes == 0, math.inf, -math.inf)
    inner = (prefixes > 0) & (prefixes < n)
    thresholds[inner] = su[prefixes[inner]]  # the first image kept: everything above it goes on
    return order, prefixes, thresholds


@dataclass
class _Points:
    """Evaluated settings: correct counts, total cost (fixed point), calls per stage, thresholds."""

    correct: np.ndarray
    cost: np.ndarray
    calls: np.ndarray  # (P, stages)
    thresholds: np.ndarray  # (P, stages - 1)


def _empty(n_stages: int) -> _Points:
    z = np.zeros(0, dtype=np.int64)
    return _Points(z, z, np.zeros((0, n_stages), np.int64), np.zeros((0, n_stages - 1)))


def _reduce(points: _Points, budget: int | None) -> _Points:
    """The best setting within ``budget`` (one row: most correct, then cheapest, then first), or each
    correct count's cheapest setting (the first of equals)."""
    if not len(points.correct):
        return points
    if budget is not None:
        ok = points.cost <= budget
        if not ok.any():
            return _take(points, np.zeros(0, dtype=np.int64))
        best = points.correct[ok].max()
        cand = np.nonzero(ok & (points.correct == best))[0]
        return _take(points, cand[[np.argmin(points.cost[cand])]])
    c = points.correct
    lowest = np.full(c.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(lowest, c, points.cost)
    hit = np.nonzero(points.cost == lowest[c])[0]
    _, first = np.unique(c[hit], return_index=True)
    return _take(points, hit[first])


def _take(points: _Points, idx: np.ndarray) -> _Points:
    return _Points(points.correct[idx], points.cost[idx], points.calls[idx], points.thresholds[idx])


def _concat(parts: list[_Points], n_stages: int) -> _Points:
    if not parts:
        return _empty(n_stages)
    fields_ = ("correct", "cost", "calls", "thresholds")
    return _Points(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields_))


def _sweep_one(a: list[_Arrays], sub: np.ndarray) -> _Points:
    """Only stage x (the first of ``a``) on the images ``sub``."""
    x = a[0]
    if x.blocked[sub].sum():
        return _empty(1)
    correct, cost = np.array([x.correct[sub].sum()]), np.array([x.cost[sub].sum()])
    return _Points(correct, cost, np.array([[len(sub)]]), np.zeros((1, 0)))


def _sweep_two(a: list[_Arrays], sub: np.ndarray, budget: int | None) -> _Points:
    """Stages x -> y on the images ``sub``: every candidate threshold of x."""
    x, y = a
    order, prefixes, thr = _candidates(x.unc[sub], None)
    o = sub[order]
    zero = np.zeros(1, dtype=np.int64)
    corr = x.correct[sub].sum() + np.concatenate([zero, np.cumsum(y.correct[o] - x.correct[o])])[prefixes]
    cost = x.cost[sub].sum() + np.concatenate([zero, np.cumsum(y.cost[o])])[prefixes]
    blocked = x.blocked[sub].sum() + np.concatenate([zero, np.cumsum(y.blocked[o])])[prefixes]
    calls = np.stack([np.full(len(prefixes), len(sub)), prefixes], axis=1)
    pts = _Points(corr, cost, calls, thr[:, None])
    return _reduce(_take(pts, np.nonzero(blocked == 0)[0]), budget)


def _sweep_three(a: list[_Arrays], sub: np.ndarray, budget: int | None, max_x: int | None) -> _Points:
    """Stages x -> y -> z on the images ``sub``: every candidate threshold of x (or a quantile grid of
    ``max_x``) times every candidate threshold of y, evaluated BLOCK rows of x at a time with cumulative
    sums over the images ordered by y's uncertainty."""
    x, y, z = a
    n = len(sub)
    order_x, pre_x, thr_x = _candidates(x.unc[sub], max_x)
    order_y, pre_y, thr_y = _candidates(y.unc[sub], None)
    ox, oy = sub[order_x], sub[order_y]
    pos_x = np.empty(n, dtype=np.int64)
    pos_x[order_x] = np.arange(n)
    rank_x_of_y = pos_x[order_y]  # for the image at y-rank r: its x-rank
    # One integer per setting for accuracy and feasibility: correct - (n + 1) x blocked is >= 0 exactly
    # when no reached image is blocked, and then it is the correct count.
    big = n + 1
    zero = np.zeros(1, dtype=np.int64)
    val_x = x.correct[sub].sum() - big * x.blocked[sub].sum()
    base_val = val_x + np.concatenate([zero, np.cumsum(y.correct[ox] - x.correct[ox] - big * y.blocked[ox])])
    base_cost = x.cost[sub].sum() + np.concatenate([zero, np.cumsum(y.cost[ox])])
    d_val = z.correct[oy] - y.correct[oy] - big * z.blocked[oy]
    d_cost = z.cost[oy]
    every_prefix = len(pre_y) == n + 1  # all of y's uncertainties distinct: every column is a candidate
    val_buf = np.zeros((BLOCK, n + 1), dtype=np.int64)  # column m1 = what the first m1 y-ranks add
    cost_buf = np.zeros((BLOCK, n + 1), dtype=np.int64)
    found: list[tuple[np.ndarray, ...]] = []  # (value, cost, row, column) of the best settings
    for start in range(0, len(pre_x), BLOCK):
        m0 = pre_x[start : start + BLOCK]
        inside = rank_x_of_y[None, :] < m0[:, None]  # (B, n): the image at y-rank r reached y
        val, cost = val_buf[: len(m0)], cost_buf[: len(m0)]
        val[:, 0] = cost[:, 0] = 0  # nobody goes on to z (the buffers hold the last block's sums)
        np.cumsum(inside * d_val, axis=1, out=val[:, 1:])
        np.cumsum(inside * d_cost, axis=1, out=cost[:, 1:])
        if not every_prefix:
            val, cost = np.take(val, pre_y, axis=1), np.take(cost, pre_y, axis=1)
        val += base_val[m0][:, None]
        cost += base_cost[m0][:, None]
        if budget is not None:
            score = np.where(cost > budget, -1, val)
            top = score.max()
            if top < 0:
                if base_cost[m0[0]] > budget:
                    break  # costs only grow with the rows: no later block fits either
                continue
            flat = int(np.argmin(np.where(score == top, cost, np.iinfo(np.int64).max)))
            r, c = divmod(flat, val.shape[1])
            found.append(
                (val[r, c : c + 1].copy(), cost[r, c : c + 1].copy(), np.array([start + r]), np.array([c]))
            )
            continue
        # each correct count's cheapest setting in the block; infeasible ones go to a slot past the end
        v = np.where(val >= 0, val, n + 1).ravel()
        cst = cost.ravel()
        lowest = np.full(n + 2, np.iinfo(np.int64).max)
        np.minimum.at(lowest, v, cst)
        hit = np.flatnonzero((cst == lowest[v]) & (v <= n))
        _, first = np.unique(v[hit], return_index=True)  # the first of equals
        pick = hit[first]
        r, c = np.divmod(pick, val.shape[1])
        found.append((v[pick], cst[pick], start + r, c))
    if not found:
        return _empty(3)
    v, cst, rows, colj = (np.concatenate(f) for f in zip(*found, strict=True))
    m0, m1 = pre_x[rows], pre_y[colj]
    calls_z = np.empty(len(rows), dtype=np.int64)
    y_rank = np.arange(n)
    for i in range(0, len(rows), BLOCK):  # images reaching z: x-rank < m0 and y-rank < m1
        sl = slice(i, i + BLOCK)
        reach = (rank_x_of_y[None, :] < m0[sl, None]) & (y_rank[None, :] < m1[sl, None])
        calls_z[sl] = reach.sum(axis=1)
    calls = np.stack([np.full(len(rows), n), m0, calls_z], axis=1)
    return _reduce(_Points(v, cst, calls, np.stack([thr_x[rows], thr_y[colj]], axis=1)), budget)


def _search(
    table: CostTable, combo: list[int], budget_total: float | None
) -> tuple[_Points, float, bool, int, str]:
    """The settings of ``combo``: the best within ``budget_total`` (total cost over the table), or each
    correct count's cheapest; the fixed-point scale of their costs; whether exact; settings evaluated;
    a note on how."""
    n = table.n
    scale = _fixed_point_scale(table, combo)
    a = [_arrays(table, s, scale) for s in combo]
    budget = None if budget_total is None else math.floor(budget_total * scale)
    everyone = np.arange(n)
    if len(combo) == 1:
        return _sweep_one(a, everyone), scale, True, 1, "exact: one setting (CLIP only)"
    if len(combo) == 2:
        distinct = len(_candidates(a[0].unc)[1])
        return (
            _sweep_two(a, everyone, budget),
            scale,
            True,
            distinct,
            f"exact: all {distinct} candidate thresholds",
        )
    if len(combo) == 3:
        n_x = len(_candidates(a[0].unc)[1])
        n_y = len(_candidates(a[1].unc)[1])
        max_x = None if n * n_x <= EXACT_WORK_LIMIT else max(EXACT_WORK_LIMIT // max(n, 1), 2)
        pts = _sweep_three(a, everyone, budget, max_x)
        if max_x is None:
            return pts, scale, True, n_x * n_y, f"exact: all {n_x} x {n_y} candidate threshold pairs"
        searched_x = len(_candidates(a[0].unc, max_x)[1])
        note = (
            f"approximate: {table.stages[combo[0]].name}'s threshold from a quantile grid of {searched_x} of "
            f"its {n_x} candidates (N x candidates above {EXACT_WORK_LIMIT:,}); the next threshold exact"
        )
        return pts, scale, False, searched_x * n_y, note
    # longer combinations: quantile grids on all but the last two thresholds, then the three-stage sweep
    outer = len(combo) - 3
    grids = [_candidates(a[k].unc, OUTER_GRID_POINTS)[2] for k in range(outer)]
    max_x = max(EXACT_WORK_LIMIT // max(n * OUTER_GRID_POINTS**outer, 1), 2)
    parts = []
    searched = 0
    for ts in itertools.product(*grids):
        reach = np.ones(n, dtype=bool)
        base_c = base_cost = base_b = 0
        calls = []
        for k, t in enumerate(ts):
            calls.append(int(reach.sum()))
            base_cost += int(a[k].cost[reach].sum())
            base_b += int(a[k].blocked[reach].sum())
            goes = reach & (a[k].unc > t)
            base_c += int(a[k].correct[reach & ~goes].sum())
            reach = goes
        if base_b or (budget is not None and base_cost > budget):
            continue
        sub = np.nonzero(reach)[0]
        tail = _sweep_three(a[outer:], sub, None if budget is None else budget - base_cost, max_x)
        searched += len(_candidates(a[outer].unc[sub], max_x)[1]) * len(_candidates(a[outer + 1].unc[sub])[1])
        p = len(tail.correct)
        tail.correct = tail.correct + base_c
        tail.cost = tail.cost + base_cost
        tail.calls = np.concatenate([np.tile(calls, (p, 1)), tail.calls], axis=1).astype(np.int64)
        tail.thresholds = np.concatenate([np.tile(ts, (p, 1)), tail.thresholds], axis=1)
        parts.append(_reduce(tail, budget))
    note = (
        f"approximate: {len(combo)} stages; the first {outer} threshold(s) from quantile grids of "
        f"{OUTER_GRID_POINTS} points, the next from at most {max_x} quantiles, the last exact"
    )
    return _reduce(_concat(parts, len(combo)), budget), scale, False, searched, note


# --------------------------------------------------------------------------------------- the budget
def _check_costs_known(table: CostTable, combo: list[int]) -> None:
    for s in combo:
        col = table.stages[s]
        if (col.cost < 0).any():
            raise ValueError(f"stage {s} ({col.name}) has negative {table.unit} costs; costs must be >= 0")
        unknown = int(np.isnan(col.cost).sum())
        if not unknown:
            continue
        if table.unit == "usd":
            raise ValueError(
                f"stage {s} ({col.name}) has no usd price ({unknown} image(s) of unknown cost): set {PRICE_KEYS} "
                f"in its config, or budget in seconds (--cascade.cost_unit seconds)"
            )
        raise ValueError(
            f"stage {s} ({col.name}) has no measured {table.unit} on {unknown} image(s): rerun it on the "
            f"validation split, or budget in another unit (--cascade.cost_unit)"
        )


def choose_thresholds(
    table: CostTable, budget_per_1000: float, stages: Sequence[int] | None = None
) -> ThresholdChoice:
    """The thresholds of ``stages`` (default: every stage, in order) that maximise accuracy on ``table``
    (the validation records) with cost per 1000 images at most ``budget_per_1000``; ties go to the lower
    cost. Exact up to three stages (see docs/cost.md; ``exact`` and ``note`` say when it is not)."""
    started = time.perf_counter()
    combo = _combination(table, stages)
    unit = table.unit
    if not math.isfinite(budget_per_1000) or budget_per_1000 < 0:
        raise ValueError(
            f"--cascade.cost_budget must be a finite cost >= 0 per 1000 images, got {budget_per_1000}"
        )
    if table.n == 0:
        raise ValueError("no validation records to choose thresholds on (--cascade.cost_budget needs them)")
    if not (table.labels >= 0).any():
        raise ValueError(
            "no validation image has a known label; --cascade.cost_budget cannot measure accuracy"
        )
    for s in combo:
        col = table.stages[s]
        lacking = int((col.pred < 0).sum())
        if lacking:
            raise ValueError(
                f"stage {s} ({col.name}) has no answer on {lacking} of {table.n} validation image(s) it could "
                f"reach; --cascade.cost_budget needs every stage's answers on the validation split"
            )
    _check_costs_known(table, combo)
    clip_cost = float(table.stages[0].cost.mean()) * 1000
    tol = 1e-9 * max(1.0, abs(budget_per_1000))
    if budget_per_1000 < clip_cost - tol:
        raise ValueError(
            f"--cascade.cost_budget {budget_per_1000:g} {unit} per 1000 images is below CLIP alone's cost "
            f"({clip_cost:.6g} {unit} per 1000 images)"
        )
    budget_total = (budget_per_1000 + tol) * table.n / 1000
    pts, _, exact, searched, note = _search(table, combo, budget_total)
    if not len(pts.correct):  # cannot happen above CLIP's cost: CLIP alone is always a setting
        raise ValueError(
            f"no thresholds fit --cascade.cost_budget {budget_per_1000:g} {unit} per 1000 images"
        )
    thresholds = [float(t) for t in pts.thresholds[0]]
    res = outcome(table, thresholds, combo)
    return ThresholdChoice(
        thresholds=thresholds,
        acc=res["acc"],
        cost_per_1000=res["cost_per_1000"],
        calls=res["calls"],
        exact=exact,
        points_searched=searched,
        seconds=time.perf_counter() - started,
        note=note,
        stages=tuple(combo),
    )


def choose_combination(
    table: CostTable, budget_per_1000: float, combos: Sequence[Sequence[int]] | None = None
) -> ThresholdChoice:
    """The combination of stages and its thresholds that maximise accuracy on ``table`` within
    ``budget_per_1000``: :func:`choose_thresholds` for each of ``combos`` (default: every combination,
    :func:`combinations`), then the most accurate, ties to the cheaper, then to the earlier in
    ``combos`` (fewer stages first: a longer chain whose extra stage nobody reaches gives the same point).
    ``stages`` of the result is the chosen combination, ``per_combination`` each one's best;
    ``points_searched`` and ``seconds`` add up over the combinations, ``exact`` holds when every one was."""
    started = time.perf_counter()
    combos = [tuple(int(s) for s in c) for c in (combinations(table) if combos is None else combos)]
    if not combos:
        raise ValueError("no combination of stages to choose among (give at least CLIP alone)")
    best: ThresholdChoice | None = None
    rows = []
    searched = 0
    for combo in combos:
        choice = choose_thresholds(table, budget_per_1000, combo)
        searched += choice.points_searched
        rows.append(
            {"stages": list(combo), "names": [table.stages[s].name for s in combo],
             "thresholds": choice.thresholds, "acc": choice.acc, "cost_per_1000": choice.cost_per_1000,
             "calls": choice.calls, "exact": choice.exact}
        )  # fmt: skip
        if (
            best is None
            or choice.acc > best.acc
            or (choice.acc == best.acc and choice.cost_per_1000 < best.cost_per_1000)
        ):
            best = choice
    exact = all(r["exact"] for r in rows)
    names = " > ".join(table.stages[s].name for s in best.stages)
    note = (
        f"{names} chosen among {len(combos)} combinations; "
        + ("exact: every combination's thresholds" if exact else "approximate: " + "; ".join(
            f"{' > '.join(r['names'])}: not exact" for r in rows if not r["exact"]))
    )  # fmt: skip
    return ThresholdChoice(
        thresholds=best.thresholds,
        acc=best.acc,
        cost_per_1000=best.cost_per_1000,
        calls=best.calls,
        exact=exact,
        points_searched=searched,
        seconds=time.perf_counter() - started,
        note=note,
        stages=best.stages,
        per_combination=rows,
    )


# ------------------------------------------------------------------------------------------- Pareto
def combinations(table: CostTable) -> list[tuple[int, ...]]:
    """CLIP, then every ordered subset of the LVLM stages."""
    lvlms = range(1, len(table.stages))
    return [(0, *c) for r in range(len(table.stages)) for c in itertools.combinations(lvlms, r)]


def pareto_points(table: CostTable) -> list[ParetoPoint]:
    """Every combination's best points (its own accuracy-cost front over all its thresholds), each marked
    ``on_front`` when no point of any combination dominates it. Settings where an image would reach a
    stage without an answer or of unknown cost are left out, and so are settings where no image reaches
    one of the stages (they are a shorter combination's points)."""
    n_labelled = int((table.labels >= 0).sum())
    points: list[ParetoPoint] = []
    for combo in combinations(table):
        pts, scale, exact, _, _ = _search(table, list(combo), None)
        order = np.argsort(-pts.correct, kind="stable")
        cheapest = math.inf
        for i in order:  # the combination's own front: cheaper than every more accurate setting
            if (pts.calls[i] == 0).any():
                continue  # a stage nobody reaches: the same point as a shorter combination
            if pts.cost[i] >= cheapest:
                continue
            cheapest = pts.cost[i]
            points.append(
                ParetoPoint(
                    stages=tuple(table.stages[s].name for s in combo),
                    thresholds=[float(t) for t in pts.thresholds[i]],
                    acc=float(pts.correct[i]) / n_labelled if n_labelled else math.nan,
                    cost_per_1000=float(pts.cost[i]) / scale / table.n * 1000 if table.n else math.nan,
                    calls=[int(c) for c in pts.calls[i]],
                    stage_ids=combo,
                    exact=exact,
                )
            )
    front = {id(p) for p in pareto_front(points)}
    for p in points:
        p.on_front = id(p) in front
    return points


def pareto_front(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point dominates (no more cost and no less accuracy, one of them strictly), by
    increasing cost; of equal points the first listed is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i].cost_per_1000, -points[i].acc, i))
    front: list[ParetoPoint] = []
    best = -math.inf
    for i in order:
        p = points[i]
        if math.isnan(p.acc) or math.isnan(p.cost_per_1000):
            continue
        if p.acc > best:
            front.append(p)
            best = p.acc
    return front


def single_model_points(table: CostTable) -> list[ParetoPoint]:
    """CLIP alone, and each LVLM on every image (CLIP's threshold -inf, nothing after), where answered."""
    out = []
    for combo, thresholds in [((0,), [])] + [((0, s), [-math.inf]) for s in range(1, len(table.stages))]:
        try:
            res = outcome(table, thresholds, combo)
        except ValueError:
            continue  # an LVLM without answers on every image has no single-model point
        out.append(
            ParetoPoint(
                stages=tuple(table.stages[s].name for s in combo),
                thresholds=list(thresholds),
                acc=res["acc"],
                cost_per_1000=res["cost_per_1000"],
                calls=res["calls"],
                stage_ids=combo,
            )
        )
    return out


__all__ = [
    "CostTable",
    "ParetoPoint",
    "StageColumn",
    "ThresholdChoice",
    "choose_combination",
    "choose_thresholds",
    "combinations",
    "outcome",
    "pareto_front",
    "pareto_points",
    "read_cost_table",
    "single_model_points",
]
