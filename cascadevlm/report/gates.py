"""Gates, calibration, conformal candidate sets and fusion compared from a run's records alone.

    python -m cascadevlm.report.gates RUN_DIR [--val VAL] [--out DIR] [--topk K] [--alpha 0.1] ...

RUN_DIR holds ``records.parquet`` with the LVLM's answer on every test image (``cascade.lvlm_on: all``,
the default). VAL is a records table (or a run directory) of the validation split with LVLM answers
(default ``RUN_DIR/val_records.parquet``): temperature, thresholds, the learned gate, conformal
quantiles and the fusion weight are fitted there, never on the test split. Asking the LVLM about the
validation images costs one LVLM call per validation image (e.g. run ``evaluate.py`` with
``--data.split val --cascade.lvlm_on all``); everything here is then computed without any model.

Writes ``gates.json``, ``gates.md`` and ``plots/accuracy_vs_fraction.png``, ``plots/reliability.png``
into ``RUN_DIR/gates`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cascadevlm.gating.routing import (
    LearnedGate,
    RecordArrays,
    accuracy_at_budget,
    accuracy_curve,
    choose_fusion_weight,
    conformal_quantile,
    conformal_set_sizes,
    curve_area,
    expected_calibration_error,
    fit_temperature,
    fused_choice,
    gate_features,
    gate_score,
    log_softmax,
    nll,
    oracle_score,
    record_arrays,
    reliability_bins,
    restricted_choice,
    set_coverage,
)
from cascadevlm.records import PredictionRecord, read_records
from cascadevlm.report.formats import markdown_table

BUDGETS = (0.1, 0.2, 0.3)
ALPHAS = (0.05, 0.1, 0.2)
RULE_GATES = ("entropy", "max_prob", "margin")


def _acc(pred: np.ndarray, label: np.ndarray) -> float:
    return float((pred == label).mean()) if len(label) else float("nan")


def _labelled(records: Sequence[PredictionRecord]) -> list[PredictionRecord]:
    return [r for r in records if r.label >= 0]


def calibration_section(v: RecordArrays, t: RecordArrays, n_bins: int = 15) -> tuple[dict, float]:
    """Temperature fitted on validation; NLL, ECE and reliability bins before and after."""
    temp = fit_temperature(v.logits, v.label)
    p_raw, p_cal = np.exp(log_softmax(t.logits)), np.exp(log_softmax(t.logits, temp))
    sec = {
        "temperature": temp,
        "val_nll_before": nll(v.logits, v.label),
        "val_nll_after": nll(v.logits, v.label, temp),
        "test_nll_before": nll(t.logits, t.label),
        "test_nll_after": nll(t.logits, t.label, temp),
        "test_ece_before": expected_calibration_error(p_raw, t.label, n_bins),
        "test_ece_after": expected_calibration_error(p_cal, t.label, n_bins),
        "reliability_before": reliability_bins(p_raw, t.label, n_bins),
        "reliability_after": reliability_bins(p_cal, t.label, n_bins),
        "exact_logits": bool(v.exact_logits and t.exact_logits),
    }
    return sec, temp


def _curve_row(name: str, score: np.ndarray, clip_ok: np.ndarray, sent_ok: np.ndarray, budgets) -> dict:
    frac, acc = accuracy_curve(score, clip_ok, sent_ok)
    return {
        "gate": name,
        "at_budget": {f"{b:g}": accuracy_at_budget(frac, acc, b) for b in budgets},
        "auc": curve_area(frac, acc),
        "curve": {"fraction": frac, "accuracy": acc},
    }


def gates_section(
    v: RecordArrays,
    t: RecordArrays,
    temp: float,
    topk: int,
    budgets: Sequence[float],
    fusion_weight: float | None,
) -> dict:
    """Accuracy vs fraction sent for each gate (with and without temperature), the oracle, and the
    learned gate; the hard cascade with CLIP's top-k (and the fused cascade where a weight is known).

    The winner is the gate with the best accuracy at the largest budget on the validation images with LVLM
    answers (the test accuracy is then reported for it); without such images it is the best on test,
    and says so (``chosen_on``)."""
    full = np.full(len(t), topk)
    clip_ok = t.clip_pred == t.label
    sent_ok = restricted_choice(t, full, topk) == t.label
    b_max = max(budgets)
    keep = v.has_answers
    v_clip_ok = (v.clip_pred == v.label)[keep]
    v_sent_ok = (restricted_choice(v, np.full(len(v), topk), topk) == v.label)[keep]
    rows, scores, val_acc = [], {}, {}

    def add(name: str, score_t: np.ndarray, score_v: np.ndarray) -> None:
        scores[name] = score_t
        rows.append(_curve_row(name, score_t, clip_ok, sent_ok, budgets))
        if keep.any():
            val_acc[name] = accuracy_at_budget(*accuracy_curve(score_v[keep], v_clip_ok, v_sent_ok), b_max)

    for cal, tt in (("none", 1.0), ("temperature", temp)):
        logp_t, logp_v = log_softmax(t.logits, tt), log_softmax(v.logits, tt)
        for g in RULE_GATES:
            if g == "entropy" and cal == "none":
                add(g, t.entropy, v.entropy)
            else:
                add(g if cal == "none" else f"{g}+T", gate_score(g, logp_t), gate_score(g, logp_v))
        if keep.any():
            gain = (restricted_choice(v, np.full(len(v), topk), topk) == v.label).astype(int) - (
                v.clip_pred == v.label
            ).astype(int)
            gate = LearnedGate.fit(gate_features(logp_v)[keep], gain[keep])
            add("learned" if cal == "none" else "learned+T", gate.score(gate_features(logp_t)),
                gate.score(gate_features(logp_v)))  # fmt: skip
    oracle = _curve_row("oracle", oracle_score(clip_ok, sent_ok), clip_ok, sent_ok, budgets)
    sec = {
        "clip_acc1": _acc(t.clip_pred, t.label),
        "lvlm_all_acc1": float(sent_ok.mean()),
        "rows": rows,
        "oracle": oracle,
    }
    b_last = f"{b_max:g}"
    if val_acc:  # chosen where it is not measured (max keeps the first of equals: the table's order)
        best = max(rows, key=lambda r: val_acc[r["gate"]])
    else:
        best = max(rows, key=lambda r: r["at_budget"][b_last])
    entropy = next(r for r in rows if r["gate"] == "entropy")
    sec["winner"] = {
        "budget": b_max,
        "gate": best["gate"],
        "chosen_on": "validation" if val_acc else "test",
        "val_acc1": val_acc.get(best["gate"]),
        "acc1": best["at_budget"][b_last],
        "entropy_acc1": entropy["at_budget"][b_last],
        "gain_over_entropy": best["at_budget"][b_last] - entropy["at_budget"][b_last],
        "oracle_acc1": oracle["at_budget"][b_last],
    }
    if fusion_weight is not None:
        fused_ok = fused_choice(t, log_softmax(t.logits, temp), full, fusion_weight) == t.label
        fusion_rows = []
        for name in ("entropy", "learned+T"):
            row = next((r for r in rows if r["gate"] == name), None)
            if row is None:
                continue
            score = scores[name]
            fused = _curve_row(f"{name} fused", score, clip_ok, fused_ok, budgets)
            fusion_rows.append(
                {
                    "gate": name,
                    "hard": {**row["at_budget"], "1": float(sent_ok.mean()), "auc": row["auc"]},
                    "fused": {**fused["at_budget"], "1": float(fused_ok.mean()), "auc": fused["auc"]},
                    "curve": fused["curve"],
                }
            )
        sec["fusion"] = {"weight": fusion_weight, "calibration": "temperature", "rows": fusion_rows}
    return sec


def conformal_section(
    v: RecordArrays, t: RecordArrays, temp: float, topk: int, alphas: Sequence[float], method: str
) -> dict:
    """Split-conformal sets (quantile on validation, calibrated probabilities) on the test split:
    coverage against the target, set sizes, the cascade's accuracy with the sets as candidates (a set
    of one is not sent) against a fixed top-k of equal mean size."""
    logp_v, logp_t = log_softmax(v.logits, temp), log_softmax(t.logits, temp)
    k_max = t.topk.shape[1]
    fixed = {}
    for k in range(1, min(topk, k_max) + 1):
        sizes = np.full(len(t), k)
        pred = restricted_choice(t, sizes, topk) if k > 1 else t.clip_pred
        fixed[k] = {"acc1": _acc(pred, t.label), "coverage": set_coverage(logp_t, t.label, sizes)}
    rows = []
    for alpha in alphas:
        q = conformal_quantile(logp_v, v.label, alpha, method)
        raw = conformal_set_sizes(logp_t, q, method)
        capped = np.minimum(raw, topk)
        pred = np.where(capped > 1, restricted_choice(t, capped, topk), t.clip_pred)
        m = float(capped.mean())
        lo, hi = int(math.floor(m)), min(int(math.ceil(m)), max(fixed))
        w = m - lo if hi > lo else 0.0
        rows.append(
            {
                "alpha": alpha,
                "target": 1 - alpha,
                "qhat": q,
                "coverage": set_coverage(logp_t, t.label, raw),
                "mean_size": float(raw.mean()),
                "coverage_capped": set_coverage(logp_t, t.label, capped),
                "mean_size_capped": m,
                "sent": float((capped > 1).mean()),
                "acc1": _acc(pred, t.label),
                "fixed_topk_acc1": (1 - w) * fixed[lo]["acc1"] + w * fixed[hi]["acc1"],
                "fixed_topk_coverage": (1 - w) * fixed[lo]["coverage"] + w * fixed[hi]["coverage"],
                "fixed_topk_between": [lo, hi],
            }
        )
    return {"method": method, "cap": topk, "calibration": "temperature", "rows": rows, "fixed_topk": fixed}


def compute_gates(
    test_records: Sequence[PredictionRecord],
    val_records: Sequence[PredictionRecord],
    topk: int,
    budgets: Sequence[float] = BUDGETS,
    alphas: Sequence[float] = ALPHAS,
    method: str = "aps",
    num_classes: int | None = None,
) -> dict:
    """Everything the report shows, as plain data (curves as arrays; :func:`to_json` flattens them)."""
    test, val = _labelled(test_records), _labelled(val_records)
    if not test or not val:
        raise ValueError("the gates report needs labelled test and validation records")
    missing = sum(r.lvlm_choice is None for r in test)
    if missing:
        raise ValueError(
            f"{missing} of {len(test)} test records have no LVLM answer: the curves need the LVLM's answer "
            "on every image (run with --cascade.lvlm_on all)"
        )
    shown = max((len(r.lvlm_scores) for r in test if r.lvlm_scores is not None), default=0)
    if shown > topk:
        raise ValueError(
            f"the LVLM was shown {shown} candidates but --topk is {topk}; pass the run's cascade.topk"
        )
    t = record_arrays(test, num_classes)
    v = record_arrays(val, t.num_classes)
    notes = []
    if not (t.exact_logits and v.exact_logits):
        notes.append("records lack clip_logits: probabilities beyond CLIP's stored top-k are approximated")
    calib, temp = calibration_section(v, t)
    fusion_weight = None
    if v.has_answers.any():
        fusion_weight = choose_fusion_weight(v, log_softmax(v.logits, temp), np.full(len(v), topk))
    else:
        notes.append(
            "validation records have no LVLM answers: no learned gate and no fusion (run the validation "
            "split with --cascade.lvlm_on all: one LVLM call per validation image)"
        )
    return {
        "images": {"test": len(t), "val": len(v), "val_with_lvlm": int(v.has_answers.sum())},
        "topk": topk,
        "budgets": list(budgets),
        "calibration": calib,
        "gates": gates_section(v, t, temp, topk, budgets, fusion_weight),
        "conformal": conformal_section(v, t, temp, topk, alphas, method),
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------ output
def to_json(result: dict) -> dict:
    """JSON-ready copy: curves subsampled to at most 201 points, arrays as lists."""

    def conv(o):
        if isinstance(o, dict):
            if set(o) == {"fraction", "accuracy"}:
                n = len(o["fraction"])
                idx = np.unique(np.linspace(0, n - 1, min(n, 201)).round().astype(int))
                return {k: np.asarray(o[k])[idx].tolist() for k in o}
            return {str(k): conv(x) for k, x in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(x) for x in o]
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        return o

    return conv(result)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}" if math.isfinite(x) else "nan"


def gates_markdown(result: dict, title: str) -> str:
    g, c, cf = result["gates"], result["calibration"], result["conformal"]
    budgets = [f"{b:g}" for b in result["budgets"]]
    lines = [f"# Gates, calibration, candidate sets and fusion: {title}", ""]
    lines += [f"> {n}" for n in result["notes"]] + ([""] if result["notes"] else [])
    n = result["images"]
    lines += [
        f"{n['test']} test images; fitted on {n['val']} validation images ({n['val_with_lvlm']} with LVLM "
        f"answers). CLIP alone {_pct(g['clip_acc1'])}%, LVLM on every image {_pct(g['lvlm_all_acc1'])}% "
        f"(top-{result['topk']} candidates).",
        "",
        "## Gates: top-1 accuracy (%) at a budget of images sent to the LVLM",
        "",
    ]
    lines += markdown_table(
        ["gate", *(f"{100 * float(b):g}%" for b in budgets), "area under curve"],
        (
            [r["gate"], *(_pct(r["at_budget"][b]) for b in budgets), _pct(r["auc"])]
            for r in [*g["rows"], g["oracle"]]
        ),
        "l" + "r" * (len(budgets) + 1),
    )
    w = g["winner"]
    if w.get("chosen_on") == "validation":
        chosen = (
            f"the gate chosen on validation, **{w['gate']}** (validation {_pct(w['val_acc1'])}%; a learned "
            f"gate's is in-sample), has test {_pct(w['acc1'])}%"
        )
    else:  # no validation answers to choose on: the maximum over the test rows, an optimistic number
        chosen = f"best on test (no validation answers to choose on): **{w['gate']}** {_pct(w['acc1'])}%"
    lines += [
        "",
        f"At {100 * w['budget']:g}%: {chosen} "
        f"({100 * w['gain_over_entropy']:+.2f} points over entropy; oracle {_pct(w['oracle_acc1'])}%). "
        "'+T': on temperature-scaled probabilities. Budgets rank the test images by each gate's score.",
        "",
        "## Calibration (temperature fitted on validation by NLL)",
        "",
        *markdown_table(
            ["", "before", "after"],
            [
                ("temperature", 1, f"{c['temperature']:.4f}"),
                *(
                    (name, f"{c[key + '_before']:.4f}", f"{c[key + '_after']:.4f}")
                    for name, key in (
                        ("validation NLL", "val_nll"),
                        ("test NLL", "test_nll"),
                        ("test ECE (15 bins)", "test_ece"),
                    )
                ),
            ],
            "lrr",
        ),  # fmt: skip
        "",
        f"## Conformal candidate sets ({cf['method'].upper()}, capped at {cf['cap']}; a set of one is not sent)",
        "",
    ]
    header = ["alpha", "target", "coverage", "mean size", "coverage (capped)", "mean size (capped)", "sent",
              "acc", "fixed top-k acc, equal mean size", "fixed top-k coverage"]  # fmt: skip
    rows = [
        (f"{r['alpha']:g}", _pct(r["target"]), _pct(r["coverage"]), f"{r['mean_size']:.2f}",
         _pct(r["coverage_capped"]), f"{r['mean_size_capped']:.2f}", _pct(r["sent"]), _pct(r["acc1"]),
         _pct(r["fixed_topk_acc1"]), _pct(r["fixed_topk_coverage"]))
        for r in cf["rows"]
    ]  # fmt: skip
    lines += markdown_table(header, rows, "r" * len(header))
    lines += [
        "",
        "Fixed top-k at a fractional mean size interpolates between the two neighbouring k (all images sent "
        "for k >= 2). The LVLM's choice within a smaller set is read from its per-candidate scores "
        "(records-only; a run that shows it the sets may differ).",
    ]
    if "fusion" in g:
        fu = g["fusion"]
        cols = [*budgets, "1"]
        lines += [
            "",
            f"## Fusion: (1 - w) CLIP log-prob + w LVLM log-softmax(scores), w = {fu['weight']:g} chosen on validation",
            "",
        ]
        lines += markdown_table(
            ["gate", "cascade", *(f"{100 * float(b):g}%" for b in cols), "area under curve"],
            (
                [r["gate"], kind, *(_pct(r[kind][b]) for b in cols), _pct(r[kind]["auc"])]
                for r in fu["rows"]
                for kind in ("hard", "fused")
            ),
            "ll" + "r" * (len(cols) + 1),
        )
    return "\n".join(lines) + "\n"


def save_plots(result: dict, out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    g = result["gates"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in g["rows"]:
        cv = r["curve"]
        ax.plot(100 * np.asarray(cv["fraction"]), 100 * np.asarray(cv["accuracy"]), lw=1.2,
                ls=":" if r["gate"].endswith("+T") else "-", label=r["gate"])  # fmt: skip
    for r in g.get("fusion", {}).get("rows", []):
        cv = r["curve"]
        ax.plot(100 * np.asarray(cv["fraction"]), 100 * np.asarray(cv["accuracy"]), lw=1.2, ls="-.",
                label=f"{r['gate']} fused")  # fmt: skip
    cv = g["oracle"]["curve"]
    ax.plot(100 * np.asarray(cv["fraction"]), 100 * np.asarray(cv["accuracy"]), "k--", lw=1.5, label="oracle")
    ax.set_xlabel("images sent to the LVLM (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    from cascadevlm.report.plots import wrap_title

    ax.set_title(wrap_title(title), fontsize=9)  # a run directory's name: long, never cut
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths = [out_dir / "accuracy_vs_fraction.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    c = result["calibration"]
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for key, name in (
        ("reliability_before", "CLIP"),
        ("reliability_after", f"CLIP, T={c['temperature']:.2f}"),
    ):
        b = c[key]
        n = np.asarray(b["count"])
        keep = n > 0
        ax.plot(
            np.asarray(b["confidence"])[keep], np.asarray(b["accuracy"])[keep], marker="o", ms=3, label=name
        )
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {c['test_ece_before']:.3f} -> {c['test_ece_after']:.3f})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "reliability.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def _records_path(p: Path) -> Path:
    return p / "records.parquet" if p.is_dir() else p


def _run_topk(run_dir: Path, test: Sequence[PredictionRecord]) -> int:
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        topk = json.loads(metrics.read_text()).get("config", {}).get("cascade", {}).get("topk")
        if topk:
            return int(topk)
    return max((len(r.lvlm_scores) for r in test if r.lvlm_scores is not None), default=5)


def write_gates_report(
    run_dir: str | Path,
    val: str | Path | None = None,
    out: str | Path | None = None,
    topk: int | None = None,
    budgets: Sequence[float] = BUDGETS,
    alphas: Sequence[float] = ALPHAS,
    method: str = "aps",
) -> dict:
    """Compute the report for a run directory and write gates.json, gates.md and plots; returns the JSON."""
    run_dir = Path(run_dir)
    test_path = _records_path(run_dir)
    val_path = _records_path(Path(val)) if val else run_dir / "val_records.parquet"
    if not val_path.exists():
        raise FileNotFoundError(
            f"no validation records at {val_path}: pass --val <records table or run directory of the validation "
            "split, run with --cascade.lvlm_on all (one LVLM call per validation image)>"
        )
    test, val_recs = read_records(test_path), read_records(val_path)
    topk = topk or _run_topk(run_dir if run_dir.is_dir() else run_dir.parent, test)
    result = compute_gates(test, val_recs, topk, budgets, alphas, method)
    out = Path(out) if out else (run_dir if run_dir.is_dir() else run_dir.parent) / "gates"
    out.mkdir(parents=True, exist_ok=True)
    title = (run_dir if run_dir.is_dir() else run_dir.parent).name
    save_plots(result, out / "plots", title)
    payload = to_json(result)
    payload["sources"] = {"test": str(test_path), "val": str(val_path)}
    (out / "gates.json").write_text(json.dumps(payload, indent=1, allow_nan=True))
    (out / "gates.md").write_text(gates_markdown(result, title))
    return payload


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m cascadevlm.report.gates", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("run_dir", help="run directory (records.parquet with LVLM answers on every test image)")
    ap.add_argument(
        "--val", help="validation records table or run directory (default RUN_DIR/val_records.parquet)"
    )
    ap.add_argument("--out", help="output directory (default RUN_DIR/gates)")
    ap.add_argument(
        "--topk", type=int, help="candidates the LVLM was shown (default: the run's cascade.topk)"
    )
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument(
        "--alphas", type=float, nargs="+", default=list(ALPHAS), help="conformal miscoverage levels"
    )
    ap.add_argument("--method", choices=["aps", "raps"], default="aps")
    a = ap.parse_args(argv)
    for b in a.budgets:
        if not 0 <= b <= 1:
            ap.error(f"--budgets must be fractions in [0, 1], got {b}")
    for al in a.alphas:
        if not 0 < al < 1:
            ap.error(f"--alphas must be in (0, 1), got {al}")
    try:
        payload = write_gates_report(a.run_dir, a.val, a.out, a.topk, a.budgets, a.alphas, a.method)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(a.out) if a.out else Path(a.run_dir) / "gates"
    print((out / "gates.md").read_text())
    return payload


__all__ = ["compute_gates", "gates_markdown", "main", "save_plots", "to_json", "write_gates_report"]

if __name__ == "__main__":
    main()
