"""Results tables across runs, grouped by each run's result identity; mean +/- std over seeds only.

Every finished run directory (``evaluate.py``'s ``metrics.json``, a ``train.py`` adapter run's flat
``metrics.json``, a settings-sweep cell) yields a **result identity**: everything that changes its
numbers except the seed (split, number of images, CLIP model and weights, adapter method, k, selection
and training settings, gate, budget or tau, calibration, candidates, fusion, the LVLM and its prompt
settings). Rows are groups of runs with one identity; the seeds of a group are counted as distinct
seeds; runs that differ in anything else are never averaged. Each cell lists the runs behind it (the
``runs`` column of the CSV, a numbered footnote in Markdown). One seed shows no ±; Markdown rounds,
CSV and JSON keep full precision.

    python -m cascadevlm.report.tables runs/ [--out runs/tables]

Imports no Lightning and no torch (the TensorBoard text is written with tensorboard's own writer).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from cascadevlm.errors import one_line_errors
from cascadevlm.report.formats import markdown_table
from cascadevlm.report.kshot import mean_std  # one mean / sample-std for every seed table

# Keys of evaluate.py's resolved config that never change a run's numbers (where files go, how fast it
# runs) or that are the seed itself. Dotted paths into metrics.json's ``config``; ``trainer`` keeps only
# ``precision``. A key not listed here is part of the identity (unknown keys split rows, never merge).
EVAL_NOT_IDENTITY = {
    "output_dir", "run_name", "cache_dir", "answer_store", "config", "verbose", "quiet",
    "seed_everything", "data.seed",  # the seed
    "model.adapter",  # a path per seed; the adapter's method, k, selection, mix and training config count
    "model.class_batch_size", "data.data_root", "data.batch_size", "data.num_workers", "data.splits_dir",
    "data.streaming", "data.cache_features", "cascade.lvlm_batch_size", "cascade.sweep_points",
}  # fmt: skip
# The LVLM backends' CONNECTION_FIELDS (how answers are fetched, never which): kept here as data so the
# tables import no backend; tests/test_report.py checks this covers every backend's own list.
LVLM_CONNECTION_FIELDS = {
    "base_url", "api_key_env", "cache_path", "max_concurrency", "stage_batch_size", "requests_per_minute",
    "max_retries", "max_consecutive_failures", "timeout_s", "backoff_s", "backoff_max_s", "max_tokens_param",
    "progress",
}  # fmt: skip
# evaluate.py's params that are outcomes or bookkeeping, not settings (tau and fusion_weight are
# outcomes when fitted: the config's cascade.* holds what was asked for).
PARAMS_NOT_IDENTITY = {
    "seed", "adapter", "tau", "fusion_weight", "gate", "lvlm_calls", "lvlm_calls_this_attempt",
    "lvlm_calls_val", "lvlm_api_errors", "devices",
    "rethreshold_of",  # a re-thresholded run is the experiment evaluate.py would have run with its settings
    # cascade.stages runs: calls per stage are counts; thresholds and the combination are what a cost budget
    # chose (outcomes), or the config's stage taus and stage list, which cascade.* in the config holds
    "lvlm_calls_by_stage", "thresholds", "combination",
}  # fmt: skip
# A train.py adapter run's metrics.json: its numbers and bookkeeping; everything else is identity.
ADAPTER_NUMBERS = ("val_acc", "test_acc", "zero_shot_val_acc", "zero_shot_test_acc", "best_epoch", "epoch")
# Keys of an adapter's training config (adapter.yaml) that change no number, or are the seed.
TRAIN_NOT_IDENTITY_LEAVES = {
    "seed", "seed_everything", "data_root", "splits_dir", "num_workers", "default_root_dir", "logger",
    "callbacks", "enable_progress_bar", "enable_model_summary", "enable_checkpointing", "accelerator",
    "devices", "strategy", "num_nodes", "log_every_n_steps", "ckpt_path", "config", "verbose", "quiet",
}  # fmt: skip


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _adapter_training_config(adapter: str | None) -> dict:
    """The adapter's training config (``adapter.yaml`` beside the adapter file), seed and paths left out."""
    if not adapter:
        return {}
    path = Path(adapter).with_name("adapter.yaml")
    if not path.is_file():
        return {}
    import yaml

    cfg = flatten(yaml.safe_load(path.read_text()) or {})
    return {f"train.{k}": v for k, v in cfg.items() if k.rsplit(".", 1)[-1] not in TRAIN_NOT_IDENTITY_LEAVES}


def run_identity(payload: dict) -> dict:
    """A run's result identity (flat, JSON-able): everything in its ``metrics.json`` that changes its
    numbers except the seed. ``kind`` is ``cascade`` (evaluate.py) or ``adapter`` (train.py)."""
    if "params" not in payload:  # train.py's flat metrics.json
        ident = {k: v for k, v in payload.items() if k not in ADAPTER_NUMBERS and k != "seed"}
        return {"kind": "adapter", **ident}
    p = payload["params"]
    ident = {"kind": "cascade", **{k: v for k, v in p.items() if k not in PARAMS_NOT_IDENTITY}}
    if p.get("gate") is not None and "config" not in payload:  # old or hand-written payloads
        ident["gate"] = p["gate"] if p["gate"] != "config" else f"tau {p.get('tau')}"
    cfg = payload.get("config")
    if cfg:
        flat = flatten(cfg)
        for key, value in flat.items():
            leaf = key.rsplit(".", 1)[-1]
            if key in EVAL_NOT_IDENTITY or (key.startswith("trainer.") and key != "trainer.precision"):
                continue
            if key.startswith("lvlm.init_args.") and leaf in LVLM_CONNECTION_FIELDS:
                continue
            if key == "cascade.tau" and flat.get("cascade.budget") is not None:
                continue  # tau is chosen from the budget: an outcome
            ident[key] = value
        ident.update(_adapter_training_config((cfg.get("model") or {}).get("adapter")))
    return ident


def identity_key(identity: dict) -> str:
    """A short stable hash of an identity (the CSV's ``identity`` column, the JSON's key)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _adapter_label(p: dict) -> str | None:
    adapter_method = p.get("adapter_method")
    if adapter_method and p.get("adapter_selection") not in (None, "val_split"):
        adapter_method += f", selection {p['adapter_selection']}"  # the k-shot protocol, when not the default
    if adapter_method and p.get("adapter_mix") not in (None, 1.0):
        adapter_method += f", mix {p['adapter_mix']:g}"  # WiSE-FT-style mixing with zero-shot
    return adapter_method


def _methods(payload: dict) -> dict[str, dict]:
    """``method -> {"acc1", "deferral"}``: evaluate.py's ``methods``; an adapter run's test (or
    validation) accuracy as ``clip (<method>)`` and its zero-shot one as ``clip_zero_shot``."""
    if "params" in payload:
        return {m: a for m, a in (payload.get("methods") or {}).items() if a is not None}
    split = "test" if payload.get("test_acc") is not None else "val"
    out = {}
    if payload.get(f"{split}_acc") is not None:
        out["clip"] = {"acc1": payload[f"{split}_acc"], "deferral": 0.0}
    if payload.get(f"zero_shot_{split}_acc") is not None:
        out["clip_zero_shot"] = {"acc1": payload[f"zero_shot_{split}_acc"], "deferral": 0.0}
    return out


def collect_results(run_dirs: list[str | Path]) -> list[dict]:
    """One row per (run, method): its accuracy, deferral, seed and result identity."""
    rows = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{d} has no metrics.json (the run did not finish): rerun it or leave it out"
            )
        payload = json.loads(path.read_text())
        identity = run_identity(payload)
        p = payload.get("params", payload)
        # k, seed and the adapter's method come from the adapter file (evaluate.py writes them into
        # params), so a 16-shot CoOp run is never listed under data.shots' default of 0
        shots = int(p.get("shots") or 0)
        adapter_method = _adapter_label(p) if "params" in payload else p.get("method")
        for method, acc in _methods(payload).items():
            if adapter_method and method != "clip_zero_shot":
                method = f"{method} ({adapter_method})"  # runs of different adapters never mix
            if p.get("selection_on_eval") and method not in ("clip", "clip_zero_shot"):
                # tau / the routing fitted on the evaluated images (cascade.allow_selection_on_eval)
                method = f"{method} [selected on the evaluated images]"
            rows.append(
                {
                    "dataset": p["dataset"],
                    "setting": f"{shots}-shot",
                    "shots": shots,
                    "seed": p.get("seed"),
                    "method": method,
                    "acc1": float(acc["acc1"]),
                    "deferral": float(acc.get("deferral", 0.0)),
                    "run": str(d),
                    "identity": identity,
                }
            )
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (result identity, method): distinct seeds, runs, mean and std over seeds.

    Two runs of one identity and one seed are the same experiment twice: refused (leave one out)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(identity_key(r["identity"]), r["method"])].append(r)
    out = []
    for (ident, method), rs in groups.items():
        seeds = [r["seed"] for r in rs]
        dup = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if dup:
            runs = sorted({r["run"] for r in rs if str(r["seed"]) in dup})
            raise ValueError(
                f"runs {', '.join(runs)} have the same settings and seed {', '.join(dup)} (the same "
                "experiment twice): leave all but one out of the table"
            )
        acc_mean, acc_std = mean_std([100 * r["acc1"] for r in rs])
        deferral_mean, _ = mean_std([100 * r["deferral"] for r in rs])
        first = rs[0]
        out.append(
            {
                "dataset": first["dataset"],
                "setting": first["setting"],
                "method": method,
                "seeds": len(rs),
                "acc1_mean": acc_mean,
                "acc1_std": acc_std if len(rs) > 1 else None,  # undefined for one seed
                "deferral_mean": deferral_mean,
                "seed_list": sorted(seeds, key=str),
                "runs": sorted(r["run"] for r in rs),
                "identity": ident,
                "identity_fields": first["identity"],
            }
        )
    out.sort(key=lambda r: (r["dataset"], r["setting"], r["method"], json.dumps(r["identity_fields"],
                                                                                 sort_keys=True, default=str)))  # fmt: skip
    return out


def differing_fields(agg: list[dict]) -> list[str]:
    """Identity fields a reader needs to tell the rows apart, in a stable order: those with two or more
    values among the rows that have them (a field only some rows have, e.g. an adapter's training
    settings, is shown when it varies among them; the method's label already names the adapter). When
    rows would still read the same, ``identity`` (the hash) is added."""
    keys = sorted({k for r in agg for k in r["identity_fields"]})

    def value(r, k):
        return json.dumps(r["identity_fields"].get(k), sort_keys=True, default=str)

    fields = [
        k for k in keys
        if k not in ("dataset", "kind")
        and len({value(r, k) for r in agg if r["identity_fields"].get(k) is not None}) > 1
    ]  # fmt: skip
    shown = [(r["dataset"], r["setting"], r["method"], *(value(r, k) for k in fields)) for r in agg]
    return fields + (["identity"] if len(set(shown)) < len(shown) else [])


def _field(row: dict, key: str) -> str:
    """A row's displayed value of an identity field (``identity``: the group's hash)."""
    return row["identity"] if key == "identity" else _cell(row["identity_fields"].get(key))


def _short(key: str) -> str:
    return key.removeprefix("lvlm.init_args.").removeprefix("model.").removeprefix("cascade.")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v).replace("|", "\\|")


def format_accuracy(mean: float, std: float | None) -> str:
    """``61.95 ± 3.38`` for several seeds, ``61.95`` for one (no spread to show)."""
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def to_markdown(agg: list[dict]) -> str:
    """The table, rounded for reading; a column per identity field that differs between rows, and a
    numbered footnote per row listing the runs behind it."""
    extra = differing_fields(agg)
    head = ["dataset", "setting", "method", "seeds", "top-1 acc (%)", "sent to LVLM (%)",
            *map(_short, extra), "runs"]  # fmt: skip
    rows, notes = [], []
    for i, r in enumerate(agg, 1):
        rows.append([r["dataset"], r["setting"], r["method"], str(r["seeds"]),
                     format_accuracy(r["acc1_mean"], r["acc1_std"]), f"{r['deferral_mean']:.1f}",
                     *(_field(r, k) for k in extra), f"[{i}]"])  # fmt: skip
        seeds = ", ".join(map(str, r["seed_list"]))
        notes.append(f"[{i}] seeds {seeds}: {', '.join(r['runs'])}")
    lines = markdown_table(head, rows, "lllrrr")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


CSV_COLUMNS = ["dataset", "setting", "method", "seeds", "acc1_mean", "acc1_std", "deferral_mean",
               "seed_list", "runs", "identity"]  # fmt: skip


def to_csv(agg: list[dict]) -> str:
    """Full precision; ``runs`` and ``seed_list`` joined with ``;``; ``identity`` the group's hash (the
    JSON file holds its fields); one column per differing identity field."""
    extra = [k for k in differing_fields(agg) if k not in CSV_COLUMNS]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*CSV_COLUMNS, *extra])
    w.writeheader()
    for r in agg:
        row = {c: r[c] for c in CSV_COLUMNS}
        row["acc1_mean"], row["acc1_std"] = (
            repr(r["acc1_mean"]),
            "" if r["acc1_std"] is None else repr(r["acc1_std"]),
        )
        row["deferral_mean"] = repr(r["deferral_mean"])
        row["seed_list"], row["runs"] = ";".join(map(str, r["seed_list"])), ";".join(r["runs"])
        row.update({k: _field(r, k) for k in extra})
        w.writerow(row)
    return buf.getvalue()


def write_text_event(log_dir: str | Path, tag: str, text: str) -> Path:
    """A TensorBoard text summary (its TEXT tab) with tensorboard's own writer: no torch import."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.text.summary_v2 import text_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    from cascadevlm.report.tensorboard import fresh_log_dir

    log_dir = fresh_log_dir(log_dir)
    writer = EventFileWriter(str(log_dir))
    try:
        import time

        writer.add_event(Event(wall_time=time.time(), step=0, summary=text_pb(tag, text)))
    finally:
        writer.close()
    return log_dir


def _is_k_field(key: str) -> bool:
    """Fields that follow k (the x axis of the k figure): data.shots, the adapter's, in-context shots."""
    leaf = key.rsplit(".", 1)[-1]
    return "shots" in leaf or key.startswith(("train.", "adapter_"))


def series_labels(agg: list[dict], fields: list[str]) -> list[str]:
    """Each row's legend label: its method and the values of ``fields`` (those that tell rows apart)."""
    return [r["method"] + "".join(f", {_short(f)} {_field(r, f)}" for f in fields)
            for r in agg]  # fmt: skip


def accuracy_vs_k_series(agg: list[dict]) -> dict[str, list[tuple[int, float, float | None]]]:
    """The k figure's lines: label -> [(k, mean %, std % or None)] from the table's rows; a line per
    method and per setting other than k; zero-shot ``clip`` starts each adapter's ``clip (<method>)``."""
    fields = [f for f in differing_fields(agg) if not _is_k_field(f)]
    series: dict[str, list[tuple[int, float, float | None]]] = defaultdict(list)
    for r, label in zip(agg, series_labels(agg, fields), strict=True):
        points = series[label]
        k = int(r["setting"].split("-")[0])
        if any(p[0] == k for p in points):  # settings beyond the label (an adapter's lr, ...): keep apart
            label = f"{label} [{r['identity']}]"
        series[label].append((k, r["acc1_mean"], r["acc1_std"]))
    # k = 0 of "clip (linear_probe)" is zero-shot "clip": start each adapter's line there
    for label in [m for m in series if " (" in m]:
        base = label.split(" (")[0] + label.split(")", 1)[1]
        series[label] += [
            p for p in series.get(base, []) if p[0] == 0 and all(q[0] != 0 for q in series[label])
        ]
    for label in list(series):
        used = any(m != label and m.split(" (")[0] + m.split(")", 1)[1] == label for m in series if " (" in m)
        if used and all(p[0] == 0 for p in series[label]):
            series.pop(label)
    return dict(series)


def save_accuracy_vs_k(agg: list[dict], path: str | Path) -> dict[str, Path]:
    """``accuracy_vs_k.png`` (+ PDF, + the JSON of its points), titled from the runs' parameters."""
    from cascadevlm.report.plots import accuracy_vs_k_figure, save_figure, study_title

    series = accuracy_vs_k_series(agg)
    title = study_title("top-1 accuracy vs k (mean ± std over seeds)", [r["identity_fields"] for r in agg])
    data = {"title": title, "series": {k: [list(p) for p in sorted(v)] for k, v in series.items()}}
    return save_figure(accuracy_vs_k_figure(series, title), path, data)


def _read_sweep(run: str | Path) -> list[dict] | None:
    path = Path(run) / "sweep.csv"
    if not path.is_file():
        return None
    with path.open() as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def save_accuracy_vs_sent(agg: list[dict], path: str | Path) -> dict[str, Path] | None:
    """``accuracy_vs_sent.png`` (+ PDF, + JSON): every cascade row of the table as one line (mean over
    its seeds' sweeps, ±1 std band), its operating point the table's numbers. None without sweeps."""
    from cascadevlm.report.plots import (
        SENT_GRID,
        _mean_std,
        accuracy_at_sent,
        accuracy_vs_sent_figure,
        save_figure,
        study_title,
    )

    rows = [r for r in agg if r["method"].split(" (")[0] == "cascade"]
    sweeps = [[_read_sweep(run) for run in r["runs"]] for r in rows]
    keep = [i for i, s in enumerate(sweeps) if s and all(x for x in s)]
    if not keep:
        return None
    rows = [rows[i] for i in keep]
    labels = series_labels(rows, differing_fields(rows))
    series = []
    for r, label, runs in zip(rows, labels, [sweeps[i] for i in keep], strict=True):
        curves = [accuracy_at_sent(s) for s in runs]
        stats = [_mean_std([c[j] for c in curves]) for j in range(len(SENT_GRID))]
        series.append({
            "label": label, "identity": r["identity"], "runs": r["runs"], "grid": [100 * g for g in SENT_GRID],
            "mean": [m for m, _ in stats], "std": None if len(curves) < 2 else [s for _, s in stats],
            "operating_point": {"deferral": r["deferral_mean"], "acc1": r["acc1_mean"]},
        })  # fmt: skip
    title = study_title("top-1 accuracy vs images sent to the LVLM", [r["identity_fields"] for r in rows])
    return save_figure(accuracy_vs_sent_figure(series, title), path, {"title": title, "series": series})


def write_results_tables(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """``results.md``, ``results.csv``, ``results.json`` (and the k-shot figure when several k) in
    ``out_dir``; the Markdown table also in TensorBoard's text tab."""
    agg = aggregate(collect_results(run_dirs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(to_markdown(agg))
    (out_dir / "results.csv").write_text(to_csv(agg))
    (out_dir / "results.json").write_text(json.dumps(agg, indent=1, default=str))
    # the same table in TensorBoard's text tab; a rerun replaces it rather than adding a second one
    write_text_event(out_dir / "tensorboard", "results/text_summary", to_markdown(agg))
    paths = {
        "markdown": out_dir / "results.md",
        "csv": out_dir / "results.csv",
        "json": out_dir / "results.json",
        "tensorboard": out_dir / "tensorboard",
    }
    if len({r["setting"] for r in agg}) > 1:  # a k-shot sweep: accuracy against k
        paths["plot"] = save_accuracy_vs_k(agg, out_dir / "accuracy_vs_k.png")["png"]
    sent = save_accuracy_vs_sent(agg, out_dir / "accuracy_vs_sent.png")
    if sent is not None:
        paths["sent_plot"] = sent["png"]
    return paths


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories: each path that holds ``metrics.json``, else every such directory below it."""
    dirs: list[Path] = []
    for r in map(Path, paths):
        if (r / "metrics.json").exists():
            dirs.append(r)
        else:
            dirs += sorted(p.parent for p in r.rglob("metrics.json") if "tables" not in p.parent.parts)
    if not dirs:
        raise FileNotFoundError(
            f"no finished run (a directory with metrics.json) in {', '.join(map(str, paths))}"
        )
    return dirs


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """``python -m cascadevlm.report.tables RUN_DIR... --out DIR``: one row per result identity."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument(
        "runs", nargs="+", help="run directories (each with metrics.json), or directories above them"
    )
    ap.add_argument("--out", default="runs/tables")
    args = ap.parse_args(argv)
    paths = write_results_tables(find_runs(args.runs), args.out)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()
