"""Another budget, tau or routing for a finished run, from its records alone: no model, no LVLM call.

    python -m cascadevlm.rethreshold RUN_DIR --budget 0.1 [--gate max_prob] [--out DIR]

A run made with ``cascade.lvlm_on: all`` holds the LVLM's answer for every image, so any gate's result
is a function of its records: this writes a new run directory beside the old one (named as
``evaluate.py`` would name that run), with its records, metrics.json (``params.rethreshold_of`` names
the source; ``lvlm_calls`` is 0), summary, sweep and plots. A budget needs the validation split's CLIP
records, which a budget run, a run with ``cascade.lvlm_on_val`` or one with fitted routing keeps.
Imports no Lightning.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from cascadevlm.errors import one_line_errors
from cascadevlm.records import PredictionRecord, dedupe_sorted, read_jsonl, read_records

ROUTING_FLAGS = ("gate", "calibration", "candidates", "alpha", "fusion", "fusion_weight")


def _gate_part(cascade: dict) -> str:
    """The run-name part of the threshold, as evaluate.py writes it."""
    if cascade.get("budget") is not None:
        return f"budget{cascade['budget']:g}-{cascade.get('budget_split', 'val')}"
    return f"tau{float(cascade['tau']):g}"


def _routing_parts(cascade: dict) -> list[str]:
    """The run-name parts of routing other than the paper's cascade, in evaluate.py's order."""
    c = {"gate": "entropy", "calibration": "none", "candidates": "topk", "fusion": "none", **cascade}
    if (c["gate"], c["calibration"], c["candidates"], c["fusion"]) == ("entropy", "none", "topk", "none"):
        return []
    weight = "val" if c.get("fusion_weight") is None else f"{c['fusion_weight']:g}"
    parts = {
        f"g{c['gate']}": c["gate"] != "entropy",
        "temp": c["calibration"] == "temperature",
        f"{c['candidates']}{c.get('alpha', 0.1):g}": c["candidates"] != "topk",
        f"fuse{weight}": c["fusion"] == "logprob",
    }
    return [p for p, on in parts.items() if on]


def new_run_name(old_name: str, old: dict, new: dict) -> str:
    """``old_name`` with its threshold and routing parts replaced by ``new``'s (``cascade.*`` dicts).
    A name that does not hold the old threshold part (a ``--run_name`` of one's own) gets the new
    parts appended after ``rethreshold``."""
    tokens = old_name.split("_")
    gate = _gate_part(old)
    if gate not in tokens:
        return "_".join([old_name, "rethreshold", _gate_part(new), *_routing_parts(new)])
    old_routing = set(_routing_parts(old))
    kept = [t for t in tokens if t not in old_routing]
    at = kept.index(gate)
    kept[at] = _gate_part(new)
    # routing parts follow top<k> and ic<n> (which follow the threshold and lvlm_on)
    end = at + 1
    while end < len(kept) and (kept[end] in ("all", "deferred") or kept[end].startswith(("top", "ic"))):
        end += 1
    return "_".join(kept[:end] + _routing_parts(new) + kept[end:])


def _validation_records(run_dir: Path) -> list[PredictionRecord] | None:
    """The budget split's records a run kept: ``val_records.parquet`` (with LVLM answers under
    ``lvlm_on_val``), else the CLIP stage's part files of the budget split."""
    if (run_dir / "val_records.parquet").exists():
        return read_records(run_dir / "val_records.parquet")
    parts = sorted((run_dir / "parts" / "budget").glob("clip.rank*.jsonl"))
    if not parts:
        return None
    return dedupe_sorted(r for p in parts for r in read_jsonl(p))


def rethreshold(run_dir: str | Path, changes: dict, out_dir: str | Path | None = None) -> Path:
    """Write the run ``run_dir`` would have been with ``changes`` to its ``cascade.*`` options (tau,
    budget, budget_split, gate, calibration, candidates, alpha, fusion, fusion_weight); returns the new
    run directory (beside ``run_dir`` unless ``out_dir``)."""
    from cascadevlm.gating.gate import defer_mask, tau_for_budget, tau_grid
    from cascadevlm.gating.routing import RoutingOptions, fit_routing
    from cascadevlm.report.analysis import deferred_analysis, sweep
    from cascadevlm.report.metrics import classification_metrics
    from cascadevlm.report.plots import save_sweep_plots, sweep_references
    from cascadevlm.report.summary import write_run_outputs

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "records.parquet").is_file():
        raise FileNotFoundError(
            f"{run_dir} has no metrics.json and records.parquet (not a finished evaluate.py run)"
        )
    payload = json.loads((run_dir / "metrics.json").read_text())
    if "config" not in payload or "cascade" not in payload["config"]:
        raise ValueError(f"{run_dir}/metrics.json is not an evaluate.py run's (no config.cascade)")
    old = dict(payload["config"]["cascade"])
    new = {**old, **changes}
    if "tau" in changes and "budget" not in changes:
        new["budget"] = None  # a tau given replaces the source's budget
    records = read_records(run_dir / "records.parquet")
    if any(r.lvlm_choice is None for r in records):
        raise ValueError(
            f"{run_dir} has LVLM answers for the images its gate sent only (cascade.lvlm_on deferred); another "
            "gate needs them for every image: rerun evaluate.py with --cascade.lvlm_on all"
        )
    n = int(payload["params"]["classes"])
    ro = RoutingOptions(gate=new["gate"], tau=float(new["tau"]), budget=new["budget"], calibration=new["calibration"],
                        candidates=new["candidates"], topk=int(new["topk"]), alpha=float(new["alpha"]),
                        fusion=new["fusion"], fusion_weight=new["fusion_weight"])  # fmt: skip
    ro.validate()
    val = _validation_records(run_dir) if ro.needs_val() else None
    if ro.needs_val() and val is None:
        raise ValueError(
            f"{run_dir} kept no records of its {new['budget_split']!r} split, which a budget, calibration or conformal "
            "set is fitted on: give --tau, or rerun evaluate.py once with --cascade.budget (or --cascade.lvlm_on_val true)"
        )
    if ro.needs_val_answers() and any(r.lvlm_choice is None for r in val):
        raise ValueError(
            f"{run_dir}'s {new['budget_split']!r} records have no LVLM answers, which gate learned / fusion with "
            "fusion_weight null need: rerun evaluate.py once with --cascade.lvlm_on_val true"
        )
    routing = None
    if ro.is_paper_cascade():  # as evaluate.py: tau from the budget split's entropies, then combine
        tau, gate = float(new["tau"]), {"tau": float(new["tau"]), "source": "config"}
        if ro.budget is not None:
            tau = tau_for_budget([r.entropy for r in val], ro.budget)
            gate = {"tau": tau, "source": f"budget {ro.budget} on {new['budget_split']}",
                    "budget_split_deferral": float(defer_mask([r.entropy for r in val], tau).mean())}  # fmt: skip
        ro.tau, ro.budget = tau, None
        final, _ = fit_routing(None, ro, n).finalize(records)
    else:
        fit = fit_routing(val, ro, n)
        final, routing = fit.finalize(records)
        gate = {"tau": fit.threshold, "source": fit.threshold_source, "score": ro.gate}
    tau = float(gate["tau"])
    metrics = classification_metrics(final, n)
    out = copy.deepcopy(payload)
    out.pop("notes", None)
    deferral = float(sum(r.deferred for r in final)) / max(len(final), 1)
    out["methods"]["cascade"] = {"acc1": metrics.get("acc1", math.nan), "deferral": deferral, "tau": tau}
    out["metrics"], out["gate"], out["config"]["cascade"] = metrics, gate, new
    out["deferred"] = deferred_analysis(final, n, int(new["topk"]))
    if routing is not None:
        out["routing"] = routing
    else:
        out.pop("routing", None)
    out["params"].update(
        tau=tau, gate=gate["source"], gate_score=new["gate"], calibration=new["calibration"],
        candidates=new["candidates"], alpha=new["alpha"], fusion=new["fusion"],
        fusion_weight=(routing or {}).get("fusion_weight", new["fusion_weight"]),
        lvlm_calls=0, lvlm_calls_this_attempt=0, lvlm_calls_val=0, rethreshold_of=str(run_dir),
    )  # fmt: skip
    name = new_run_name(run_dir.name, old, new)
    target = Path(out_dir) / name if out_dir else run_dir.parent / name
    if target.resolve() == run_dir.resolve():
        raise ValueError(f"{run_dir} already is that run (same threshold and routing): nothing to write")
    labelled = [r for r in final if r.label >= 0]
    sweep_rows = sweep(final, n, tau_grid([r.entropy for r in labelled], int(new.get("sweep_points", 100))))
    notes = [*payload.get("notes", []), f"Re-thresholded from {run_dir} (its records; no model was run)."]
    write_run_outputs(target, final, out, notes, sweep_rows)
    op = {"tau": tau, "deferral": deferral, "acc1": out["methods"]["cascade"]["acc1"]}
    save_sweep_plots(sweep_rows, target / "plots", name, op, sweep_references(out["methods"], n))
    return target


def _flag_value(text: str):
    """A command-line value: a number, ``inf``/``-inf``, ``null``, or a word."""
    if text.lower() in ("null", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """``python -m cascadevlm.rethreshold RUN_DIR [--budget B | --tau T] [--gate G] ...``."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m cascadevlm.rethreshold", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("run_dir", help="a finished evaluate.py run with cascade.lvlm_on all")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--budget", type=float, help="send this fraction (tau chosen on the budget split)")
    group.add_argument("--tau", type=_flag_value, help="threshold on the gate's score (inf: CLIP only)")
    ap.add_argument("--budget_split", help="the split tau is chosen on (default: the run's)")
    for flag in ROUTING_FLAGS:
        ap.add_argument(f"--{flag}", type=_flag_value, help=f"cascade.{flag} (default: the run's)")
    ap.add_argument("--out", help="parent of the new run directory (default: beside RUN_DIR)")
    args = vars(ap.parse_args(argv))
    changes = {k: v for k, v in args.items() if k not in ("run_dir", "out") and v is not None}
    if "fusion_weight" in changes or "alpha" in changes:
        changes = {**changes, **{k: float(changes[k]) for k in ("fusion_weight", "alpha") if k in changes}}
    if not changes:
        raise ValueError(
            "nothing to change: give --budget, --tau or a routing flag (--gate, --calibration, ...)"
        )
    target = rethreshold(args["run_dir"], changes, args["out"])
    print((target / "summary.md").read_text())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
