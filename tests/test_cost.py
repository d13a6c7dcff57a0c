"""Cost of a multi-stage cascade (cascadevlm/gating/cost.py) and its Pareto report (report/pareto.py):
the budget search and the front against brute force over every threshold tuple."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cascadevlm.gating import cost as cost_module
from cascadevlm.gating.cost import (
    STAGES_SCHEMA,
    CostTable,
    StageColumn,
    choose_combination,
    choose_thresholds,
    combinations,
    outcome,
    pareto_front,
    pareto_points,
    read_cost_table,
)
from cascadevlm.gating.gate import defer_mask


def random_table(
    seed: int, n: int = 40, stages: int = 3, classes: int = 4, levels: int = 5, exact_costs=True
):
    """Labels with some unknown (-1), predictions, uncertainties with many ties (``levels`` values; None:
    all distinct) and some NaN, per-image costs (multiples of 1/4 when ``exact_costs``: sums are exact in floating point)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    labels[rng.random(n) < 0.15] = -1
    cols = []
    for s in range(stages):
        skill = 0.4 + 0.2 * s  # later stages answer better
        pred = np.where(rng.random(n) < skill, labels, rng.integers(0, classes, n))
        pred = np.where(pred < 0, rng.integers(0, classes, n), pred)
        unc = rng.integers(0, levels, n).astype(np.float64) if levels else rng.random(n)
        if s > 0:
            unc[rng.random(n) < 0.1] = np.nan  # no scores: counts as most uncertain
        if exact_costs:
            cost = rng.choice([0.25, 0.5, 1.0], n) * (1 + 4 * s)
        else:
            cost = rng.uniform(0.5, 1.5, n) * (1 + 4 * s)
        cols.append(StageColumn(f"stage{s}", pred.astype(np.int64), unc, cost.astype(np.float64)))
    return CostTable(labels=labels.astype(np.int64), stages=cols, unit="seconds")


def candidates(u: np.ndarray) -> list[float]:
    """Every threshold that gives a distinct set of images going on: +inf, -inf and each value seen."""
    return [math.inf, -math.inf, *sorted({float(v) for v in u if not math.isnan(v)})]


def brute_force(table: CostTable, combo: tuple[int, ...]) -> list[tuple[float, float, tuple]]:
    """(accuracy, cost per 1000, thresholds) of every threshold tuple of ``combo`` that is feasible."""
    grids = [candidates(table.stages[s].uncertainty) for s in combo[:-1]]
    out = []
    for ts in itertools.product(*grids):
        try:
            res = outcome(table, list(ts), combo)
        except ValueError:
            continue
        if math.isnan(res["cost_per_1000"]):
            continue
        out.append((res["acc"], res["cost_per_1000"], ts))
    return out


def brute_front(values: list[tuple[float, float]]) -> set[tuple[float, float]]:
    return {
        (a, c)
        for a, c in values
        if not any((a2 >= a and c2 <= c) and (a2 > a or c2 < c) for a2, c2 in values)
    }


@pytest.fixture(params=[256, 3], ids=["one_block", "blocks_of_3"])
def block(request, monkeypatch):
    """The sweep evaluates CLIP's thresholds in blocks: also with many small blocks."""
    monkeypatch.setattr(cost_module, "BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("levels", [5, None], ids=["ties", "distinct"])
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_choose_thresholds_equals_brute_force(stages, seed, levels, block):
    table = random_table(seed, stages=stages, levels=levels)
    combo = tuple(range(stages))
    settings = brute_force(table, combo)
    costs = sorted({c for _, c, _ in settings})
    for budget in [costs[0], *np.quantile(costs, [0.1, 0.3, 0.5, 0.8]), costs[-1], costs[-1] * 2]:
        choice = choose_thresholds(table, float(budget))
        fits = [(a, c) for a, c, _ in settings if c <= budget + 1e-9]
        best = max(a for a, _ in fits)
        assert choice.acc == pytest.approx(best, abs=1e-12)
        assert choice.cost_per_1000 == pytest.approx(min(c for a, c in fits if a == best), abs=1e-9)
        assert choice.cost_per_1000 <= budget + 1e-9
        assert choice.exact and choice.stages == combo
        again = outcome(table, choice.thresholds)
        assert (again["acc"], again["cost_per_1000"], again["calls"]) == (
            choice.acc,
            choice.cost_per_1000,
            choice.calls,
        )


@pytest.mark.parametrize("levels", [5, None], ids=["ties", "distinct"])
@pytest.mark.parametrize("seed", range(3))
def test_choose_combination_equals_brute_force_over_every_combination(seed, levels, block):
    """The best feasible accuracy over every combination x thresholds, ties to the cheaper, then to the
    earlier combination; a combination that skips a stage is chosen where it is strictly better."""
    table = random_table(seed + 40, n=30, stages=3, levels=levels)
    small = table.stages[1]  # a middle LVLM that mostly repeats CLIP: it costs and seldom helps
    repeat = np.random.default_rng(seed).random(table.n) < 0.7
    small.pred = np.where(repeat, table.stages[0].pred, small.pred)
    combos = combinations(table)
    assert combos == [(0,), (0, 1), (0, 2), (0, 1, 2)]
    settings = {c: brute_force(table, c) for c in combos}
    costs = sorted({c for v in settings.values() for _, c, _ in v})
    skipped_better = 0
    big_on_all = outcome(table, [-math.inf], (0, 2))["cost_per_1000"]
    for budget in [*np.linspace(costs[0], costs[-1], 12), big_on_all]:
        choice = choose_combination(table, float(budget))
        fits = {c: [(a, k) for a, k, _ in v if k <= budget + 1e-9] for c, v in settings.items()}
        best = max(a for v in fits.values() for a, _ in v)
        cheapest = min(k for v in fits.values() for a, k in v if a == best)
        first = next(c for c in combos if (best, cheapest) in fits[c])
        assert (choice.acc, choice.cost_per_1000, choice.stages) == (best, cheapest, first)
        again = outcome(table, choice.thresholds, choice.stages)
        assert (again["acc"], again["cost_per_1000"], again["calls"]) == (best, cheapest, choice.calls)
        assert [r["stages"] for r in choice.per_combination] == [list(c) for c in combos]
        chain = choose_thresholds(table, float(budget))  # the whole chain only, as before
        skipped_better += choice.acc > chain.acc
    assert skipped_better  # a budget where only skipping the middle stage reaches the best


def test_choose_combination_among_the_given_combinations_only():
    table = random_table(43, n=30, stages=3)
    budget = outcome(table, [-math.inf], (0, 2))["cost_per_1000"]  # the big LVLM on every image fits
    assert choose_combination(table, budget).stages == (0, 2)
    allowed = [(0,), (0, 1), (0, 1, 2)]  # e.g. stage 2 takes stage 1's candidates
    choice = choose_combination(table, budget, allowed)
    assert choice.stages != (0, 2) and [tuple(r["stages"]) for r in choice.per_combination] == allowed
    with pytest.raises(
        ValueError, match=r"^a combination of stages starts with stage 0 \(CLIP\), got \[1, 2\]$"
    ):
        choose_combination(table, budget, [(1, 2)])


def test_choose_thresholds_never_exceeds_budget_on_validation(block):
    val = random_table(11, n=400, stages=3, levels=60, exact_costs=False)
    clip = val.stages[0].cost.mean() * 1000
    everything = outcome(val, [-math.inf, -math.inf])["cost_per_1000"]
    accs = []
    for budget in np.linspace(clip, everything, 15):
        choice = choose_thresholds(val, float(budget))
        assert outcome(val, choice.thresholds)["cost_per_1000"] <= budget * (1 + 1e-12)
        accs.append(choice.acc)
    assert accs == sorted(accs)  # more budget never lowers the best accuracy
    assert accs[-1] > accs[0]


@pytest.mark.parametrize("levels", [5, None], ids=["ties", "distinct"])
@pytest.mark.parametrize("seed", range(2))
def test_pareto_front_equals_brute_force(seed, levels, block):
    table = random_table(seed + 20, n=30, stages=3, levels=levels)
    table.stages[2].pred[[3, 7]] = -1  # the big LVLM did not answer two images: settings reaching them go
    values = []
    for combo in [(0,), (0, 1), (0, 2), (0, 1, 2)]:
        values += [(a, c) for a, c, _ in brute_force(table, combo)]
    points = pareto_points(table)
    front = pareto_front(points)
    assert {(p.acc, p.cost_per_1000) for p in front} == brute_front(values)
    assert sorted((p for p in points if p.on_front), key=lambda p: p.cost_per_1000) == front
    for p in points:  # every point is what its thresholds give
        res = outcome(table, p.thresholds, p.stage_ids)
        assert (res["acc"], res["cost_per_1000"], res["calls"]) == (p.acc, p.cost_per_1000, p.calls)


def test_two_stages_at_tau_are_todays_entropy_gate():
    rng = np.random.default_rng(3)
    n = 50
    labels = rng.integers(0, 5, n)
    entropy = rng.uniform(0, 1.6, n)
    entropy[:5] = 0.8  # ties at tau
    clip_pred, lvlm_choice = rng.integers(0, 5, n), rng.integers(0, 5, n)
    table = CostTable(
        labels,
        [
            StageColumn("clip", clip_pred, entropy, np.full(n, 0.002)),
            StageColumn("lvlm", lvlm_choice, np.full(n, np.nan), np.full(n, 0.05)),
        ],
    )
    for tau in [0.8, 0.3, math.inf, -math.inf]:
        deferred = defer_mask(entropy, tau)  # today's gate: entropy > tau
        final = np.where(deferred, lvlm_choice, clip_pred)
        res = outcome(table, [tau])
        assert np.array_equal(res["final"], final)
        assert res["calls"] == [n, int(deferred.sum())]
        assert res["acc"] == (final == labels).mean()
        assert res["cost_per_image"] == pytest.approx(0.002 + 0.05 * deferred.mean())


def test_budget_below_clip_alone_is_refused_in_one_line():
    table = random_table(0, stages=2)
    table.stages[0].cost[:] = 0.002
    with pytest.raises(ValueError) as err:
        choose_thresholds(table, 1.5)
    assert str(err.value) == (
        "--cascade.cost_budget 1.5 seconds per 1000 images is below CLIP alone's cost (2 seconds per 1000 images)"
    )


def test_missing_answers_where_needed_are_refused_in_one_line():
    table = random_table(1, stages=3)
    table.stages[1].pred[[2, 9]] = -1
    with pytest.raises(ValueError) as err:
        choose_thresholds(table, 10_000)
    assert str(err.value) == (
        "stage 1 (stage1) has no answer on 2 of 40 validation image(s) it could reach; "
        "--cascade.cost_budget needs every stage's answers on the validation split"
    )
    # a combination without that stage is searched
    assert choose_thresholds(table, 10_000, stages=[0, 2]).stages == (0, 2)


def test_unknown_usd_price_is_refused_naming_the_stage_and_the_price_key():
    table = random_table(2, stages=3)
    table.unit = "usd"
    table.stages[2].cost[:] = np.nan  # no price table for the big LVLM
    with pytest.raises(ValueError) as err:
        choose_thresholds(table, 10_000)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "stage 2 (stage2) has no usd price (40 image(s) of unknown cost): set price.usd_per_image"
    )
    assert msg.endswith("or budget in seconds (--cascade.cost_unit seconds)")


def test_longer_combinations_are_approximate_and_say_so():
    table = random_table(5, n=30, stages=4, levels=3)
    budget = outcome(table, [-math.inf] * 3)["cost_per_1000"] * 0.6
    choice = choose_thresholds(table, budget)
    assert not choice.exact and choice.note.startswith("approximate: 4 stages")
    assert choice.cost_per_1000 <= budget + 1e-9
    best = max(a for a, c, _ in brute_force(table, (0, 1, 2, 3)) if c <= budget + 1e-9)
    assert choice.acc <= best + 1e-12
    assert choice.acc >= outcome(table, [math.inf, math.inf, math.inf])["acc"]


@pytest.mark.parametrize("seed", range(2))
def test_longer_combinations_equal_brute_force_where_the_grids_hold_every_candidate(seed, block):
    """Four stages, CLIP with 3 distinct uncertainties: its quantile grid of OUTER_GRID_POINTS holds every
    candidate, so the search (grid, then the three-stage sweep on the images reaching it) finds the best."""
    table = random_table(seed + 60, n=30, stages=4, levels=3)
    settings = brute_force(table, (0, 1, 2, 3))
    costs = sorted({c for _, c, _ in settings})
    for budget in [costs[0], *np.quantile(costs, [0.1, 0.3, 0.5, 0.8]), costs[-1]]:
        choice = choose_thresholds(table, float(budget))
        fits = [(a, c) for a, c, _ in settings if c <= budget + 1e-9]
        best = max(a for a, _ in fits)
        assert choice.acc == pytest.approx(best, abs=1e-12)
        assert choice.cost_per_1000 == pytest.approx(min(c for a, c in fits if a == best), abs=1e-9)
        assert not choice.exact and choice.stages == (0, 1, 2, 3)


def test_above_the_exact_size_clip_threshold_comes_from_a_grid_and_says_so(monkeypatch):
    table = random_table(6, n=60, stages=3, levels=None)
    monkeypatch.setattr(cost_module, "EXACT_WORK_LIMIT", 60 * 10)  # at most 10 CLIP thresholds
    budget = outcome(table, [-math.inf, -math.inf])["cost_per_1000"] * 0.5
    choice = choose_thresholds(table, budget)
    assert not choice.exact and choice.note.startswith("approximate: stage0's threshold from a quantile grid")
    assert choice.cost_per_1000 <= budget + 1e-9
    best = max(a for a, c, _ in brute_force(table, (0, 1, 2)) if c <= budget + 1e-9)
    assert choice.acc <= best
    assert all(not p.exact for p in pareto_points(table) if len(p.stage_ids) == 3)


def write_stage_rows(path, table: CostTable, skip=()):
    rows = []
    for s, col in enumerate(table.stages):
        for i in range(table.n):
            if (s, i) in skip:
                continue
            answered = bool(col.pred[i] >= 0)
            rows.append(
                {
                    "index": 100 + i,
                    "stage": s,
                    "name": col.name,
                    "answered": answered,
                    "pred": int(col.pred[i]),
                    "uncertainty": float(col.uncertainty[i]),
                    "seconds": float(col.cost[i]),
                    "prompt_tokens": None,
                    "completion_tokens": None,
                    "usd": None if s == 2 else float(col.cost[i]) / 100,
                }
            )
    pq.write_table(pa.Table.from_pylist(rows, schema=STAGES_SCHEMA), path)


def write_label_records(path, labels):
    from cascadevlm.records import PredictionRecord, write_records

    records = [
        PredictionRecord(
            index=100 + i, label=int(y), clip_topk=[0], clip_topk_probs=[1.0], entropy=0.0, clip_pred=0
        )
        for i, y in enumerate(labels)
    ]
    write_records(path, records[::-1])  # order of rows does not matter


def test_read_cost_table_round_trip(tmp_path):
    table = random_table(4, n=12, stages=3)
    table.stages[1].pred[5] = -1
    write_stage_rows(tmp_path / "stages.parquet", table, skip={(2, 7)})
    write_label_records(tmp_path / "records.parquet", table.labels)
    back = read_cost_table(tmp_path / "stages.parquet", tmp_path / "records.parquet")
    assert np.array_equal(back.labels, table.labels) and back.unit == "seconds"
    for s, (got, want) in enumerate(zip(back.stages, table.stages, strict=True)):
        pred, unc, cost = want.pred.copy(), want.uncertainty.copy(), want.cost.copy()
        if s == 2:  # no row: no answer, unknown cost
            pred[7], unc[7], cost[7] = -1, np.nan, np.nan
        assert got.name == want.name
        assert np.array_equal(got.pred, pred)
        assert np.array_equal(got.uncertainty, unc, equal_nan=True)
        assert np.array_equal(got.cost, cost, equal_nan=True)
    usd = read_cost_table(tmp_path / "stages.parquet", tmp_path / "records.parquet", unit="usd")
    assert np.isnan(usd.stages[2].cost).all()
    assert np.allclose(usd.stages[1].cost, table.stages[1].cost / 100)
    with pytest.raises(
        ValueError, match=r"^cost unit 'euro' is not one of seconds, usd; set --cascade.cost_unit$"
    ):
        read_cost_table(tmp_path / "stages.parquet", tmp_path / "records.parquet", unit="euro")
    write_label_records(tmp_path / "none.parquet", [])  # a run with no records (it was an IndexError)
    with pytest.raises(
        ValueError, match=r"none.parquet holds no records: a cost table needs the run's images$"
    ):
        read_cost_table(tmp_path / "stages.parquet", tmp_path / "none.parquet")


def read_csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def floats(text: str) -> list[float]:
    return [float(t) for t in text.split()]


def test_pareto_report_files_and_front(tmp_path):
    from cascadevlm.report.pareto import write_pareto_report

    table = random_table(7, n=30, stages=3)
    paths = write_pareto_report(table, tmp_path / "out", "demo run")
    for name in ("pareto.csv", "pareto.md", "pareto.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert paths["png"] == tmp_path / "out" / "pareto.png"
    rows = read_csv_rows(paths["csv"])
    front = pareto_front(pareto_points(table))
    front_rows = [r for r in rows if r["kind"] == "point" and r["on_front"] == "True"]
    got = sorted(
        (float(r["cost_per_1000"]), float(r["acc"]), r["stage_ids"], tuple(floats(r["thresholds"])))
        for r in front_rows
    )
    want = sorted(
        (p.cost_per_1000, p.acc, " ".join(map(str, p.stage_ids)), tuple(p.thresholds)) for p in front
    )
    assert got == want
    singles = {r["combination"]: r for r in rows if r["kind"] == "single"}
    assert set(singles) == {"stage0 only", "stage1 on every image", "stage2 on every image"}
    everything = outcome(table, [-math.inf], [0, 2])
    assert float(singles["stage2 on every image"]["acc"]) == everything["acc"]
    assert floats(singles["stage2 on every image"]["calls"]) == [30, 30]
    md = paths["md"].read_text()
    assert "## Pareto front (every combination)" in md and "### stage0 -> stage1 -> stage2" in md


def test_pareto_entry_on_a_run_directory(tmp_path, capsys):
    from cascadevlm.report.pareto import main

    table = random_table(8, n=25, stages=3)
    run = tmp_path / "run"
    run.mkdir()
    write_stage_rows(run / "val_stages.parquet", table)
    write_label_records(run / "val_records.parquet", table.labels)
    main([str(run), "--split", "val", "--unit", "seconds"])
    rows = read_csv_rows(run / "pareto_val" / "pareto.csv")
    front = pareto_front(pareto_points(table))
    assert sorted(
        float(r["cost_per_1000"]) for r in rows if r["on_front"] == "True" and r["kind"] == "point"
    ) == sorted(p.cost_per_1000 for p in front)
    assert (run / "pareto_val" / "pareto.png").exists()
    assert "Pareto front" in capsys.readouterr().out
    main([str(run), "--split", "val", "--unit", "usd", "--out", str(tmp_path / "usd")])  # stage2 has no price
    usd_rows = read_csv_rows(tmp_path / "usd" / "pareto.csv")
    assert not [r for r in usd_rows if r["kind"] == "point" and "2" in r["stage_ids"].split()]
    assert "| stage2 on every image | -inf |" in (tmp_path / "usd" / "pareto.md").read_text()
    assert "| unknown |" in (tmp_path / "usd" / "pareto.md").read_text()
    with pytest.raises(SystemExit):  # no test-split stages in this run: one line, exit 2
        main([str(run)])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "stages.parquet" in err and "\n" not in err
