"""Choosing three stages' thresholds under a cost budget from 10,000 records, against re-running the
stages, measured side by side in one run.

Records: SYNTHETIC (no model runs here): 10,000 validation and 10,000 test images of 100 classes, three
stages (CLIP, a small LVLM, a big LVLM) answering every image, each right more often on easy images and
less sure on hard ones, with per-image costs of about 0.002 s, 0.02 s and 0.1 s (log-normal spread, so
every cost and uncertainty is distinct: the exact search's worst case, 10,001 x 10,001 threshold pairs).
They are written as ``stages.parquet`` / ``records.parquet`` in the interface's schema and read back.

From records: ``read_cost_table`` + ``choose_thresholds`` (the exact search) at several budgets, and the
whole Pareto report's points (``pareto_points``: every combination, every threshold).

Re-running the stages (extrapolated from the records' per-image costs, i.e. the seconds each stage
took per image): one pass (every stage on every image: what these records need), and a naive sweep
that re-runs the cascade once per threshold setting, for a 100 x 100 grid and for every setting the
exact search compares.

Each timing is the best of ``--repeats`` (the machine may be shared).

    python bench/cost.py [--images 10000] [--repeats 2] [--budgets 20 40 60 80]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cascadevlm.flags import one_flag_style
from cascadevlm.gating.cost import (
    STAGES_SCHEMA,
    choose_thresholds,
    outcome,
    pareto_front,
    pareto_points,
    read_cost_table,
)

STAGES = [  # name, seconds per image (median), skill (how hard an image it still gets right)
    ("clip", 0.002, 0.55),
    ("small-lvlm", 0.02, 0.70),
    ("big-lvlm", 0.1, 0.85),
]
CLASSES = 100


def synthetic_run(run_dir: Path, n: int, seed: int) -> None:
    """``stages.parquet`` and ``records.parquet`` of ``n`` synthetic images (see the module docstring)."""
    from cascadevlm.records import PredictionRecord, write_records

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    difficulty = rng.random(n)
    parts = []
    for s, (name, seconds, skill) in enumerate(STAGES):
        # right when the image is easier than the stage's skill (with some luck either way)
        right = difficulty + rng.normal(0, 0.15, n) < skill
        wrong = (labels + rng.integers(1, CLASSES, n)) % CLASSES
        pred = np.where(right, labels, wrong)
        # less sure on harder images, less so on images it gets right
        uncertainty = np.clip(difficulty - 0.3 * right + rng.normal(0, 0.2, n), 0, None) + 1e-9 * rng.random(
            n
        )
        cost = seconds * rng.lognormal(0.0, 0.25, n)
        parts.append(
            pa.table(
                {
                    "index": np.arange(n),
                    "stage": np.full(n, s, dtype=np.int32),
                    "name": [name] * n,
                    "answered": np.ones(n, dtype=bool),
                    "pred": pred,
                    "uncertainty": uncertainty,
                    "seconds": cost,
                    "prompt_tokens": pa.nulls(n, pa.int64()),
                    "completion_tokens": pa.nulls(n, pa.int64()),
                    "usd": pa.nulls(n, pa.float64()),
                },
                schema=STAGES_SCHEMA,
            )
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(parts), run_dir / "stages.parquet")
    records = [
        PredictionRecord(index=i, label=int(y), clip_topk=[], clip_topk_probs=[], entropy=0.0, clip_pred=0)
        for i, y in enumerate(labels)
    ]
    write_records(run_dir / "records.parquet", records)


def best_of(repeats: int, fn):
    best, out = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def human(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:,.2f} s"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000, help="validation (and test) images")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--budgets", type=float, nargs="+", default=[20.0, 40.0, 60.0, 80.0], help="s per 1000 images"
    )
    a = one_flag_style(p).parse_args(argv)
    if a.images < 1:
        p.error(f"--images must be >= 1, got {a.images}; set --images")
    if a.repeats < 1:
        p.error(f"--repeats must be >= 1, got {a.repeats}; set --repeats")
    bad = [b for b in a.budgets if not math.isfinite(b) or b < 0]
    if bad:
        p.error(f"--budgets must be finite costs >= 0 (s per 1000 images), got {bad[0]:g}; set --budgets")
    with tempfile.TemporaryDirectory() as tmp:
        val_dir, test_dir = Path(tmp) / "val", Path(tmp) / "test"
        synthetic_run(val_dir, a.images, seed=0)
        synthetic_run(test_dir, a.images, seed=1)

        def read(d):
            return read_cost_table(d / "stages.parquet", d / "records.parquet", unit="seconds")

        read_s, val = best_of(a.repeats, lambda: read(val_dir))
        test = read(test_dir)
    n = val.n
    one_pass = float(sum(np.sum(s.cost) for s in val.stages))  # every stage on every image
    print(
        f"{n:,} synthetic validation records, stages: "
        + ", ".join(f"{s.name} {np.mean(s.cost) * 1000:.1f} s/1000 images" for s in val.stages)
    )
    print(f"reading stages.parquet + records.parquet: {read_s:.3f} s")
    print()
    print(
        "| budget (s/1000) | val acc % | val s/1000 | test acc % | test s/1000 | calls (val) | search s | exact |"
    )
    print("|---:|---:|---:|---:|---:|---|---:|---|")
    rows = []
    for budget in a.budgets:
        secs, choice = best_of(a.repeats, lambda b=budget: choose_thresholds(val, b))
        on_test = outcome(test, choice.thresholds)
        rows.append({"budget": budget, "seconds": secs, "choice": choice, "test": on_test})
        print(
            f"| {budget:g} | {100 * choice.acc:.2f} | {choice.cost_per_1000:.2f} | {100 * on_test['acc']:.2f} | "
            f"{on_test['cost_per_1000']:.2f} | {' / '.join(map(str, choice.calls))} | {secs:.2f} | {choice.exact} |"
        )
    for name, combo, th in [
        ("CLIP only", [0], []),
        ("small-lvlm on every image", [0, 1], [-math.inf]),
        ("big-lvlm on every image", [0, 2], [-math.inf]),
    ]:
        r = outcome(test, th, combo)
        print(f"test, {name}: {100 * r['acc']:.2f}% at {r['cost_per_1000']:.2f} s/1000 images")
    pareto_s, points = best_of(1, lambda: pareto_points(val))
    front = pareto_front(points)
    search_s = max(r["seconds"] for r in rows)
    settings = rows[0]["choice"].points_searched
    print()
    print(
        f"search (choose_thresholds, slowest budget): {search_s:.2f} s over {settings:,} threshold pairs "
        f"({rows[0]['choice'].note})"
    )
    print(
        f"full Pareto (every combination, every threshold): {pareto_s:.2f} s, {len(points):,} best points, "
        f"{len(front):,} on the front"
    )
    print()
    print("re-running the stages instead (extrapolated from the records' per-image seconds):")
    grid = 100 * 100
    for what, cost in [
        ("one pass (every stage on every image)", one_pass),
        ("a 100 x 100 threshold grid, one pass per setting", one_pass * grid),
        (f"every setting the search compares ({settings:,} passes)", one_pass * settings),
    ]:
        print(
            f"  {what}: {human(cost)} = {cost / search_s:,.0f}x the search, {cost / pareto_s:,.0f}x the full Pareto"
        )
    return {
        "search_s": search_s,
        "pareto_s": pareto_s,
        "read_s": read_s,
        "one_pass_s": one_pass,
        "rows": rows,
    }


if __name__ == "__main__":
    main()
