"""What a run shows a person (report/summary.py, report/formats.py): the headline table first, only the
parameters that apply, numbers rounded for display, the deferred count, CSVs without float32 noise, and
the closing block both entry points end with."""

import csv
from pathlib import Path

import torch

from cascadevlm.cli import fit_numbers
from cascadevlm.report.formats import markdown_table, plain_float
from cascadevlm.report.summary import (
    closing_block,
    evaluate_closing_block,
    summary_markdown,
    write_run_outputs,
)

TAU = 1.0449005365371704  # a float32 entropy, as the gate returns it
METHODS = {
    "clip": {"acc1": 0.578, "deferral": 0.0},
    "cascade": {"acc1": 0.651, "deferral": 0.3085, "tau": TAU},
    "lvlm_all": {"acc1": 0.7255, "deferral": 1.0},
}
PARAMS = {"dataset": "fashion_mnist", "images": 2000, "adapter": None, "adapter_method": None,
          "shots": 16, "seed": 1, "lvlm": "TransformersBackend", "tau": TAU, "topk": 5, "incontext_shots": 0,
          "candidates": "topk", "alpha": 0.1, "fusion": "none", "fusion_weight": None, "lvlm_on_val": False,
          "lvlm_calls_val": 0, "lvlm_calls": 2000, "lvlm_calls_this_attempt": 2000}  # fmt: skip
DEFERRED = {"images": 2000, "deferred": 617, "deferral": 0.3085, "deferred_clip_acc1": 0.3, "fallbacks": {},
            "lvlm_fixed": 200}  # fmt: skip


def _payload(**over) -> dict:
    return {"params": PARAMS, "metrics": {"n": 2000, "acc1": 0.651}, "methods": METHODS,
            "deferred": DEFERRED, **over}  # fmt: skip


def _table(md: str, header: str) -> dict[str, str]:
    """The rows of the two-column table whose first header cell is ``header``."""
    lines = md.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"| {header} |")))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1]
    return rows


def test_the_headline_table_comes_first_with_the_cascades_rounded_tau():
    md = summary_markdown("r", _payload(), ["a note"])
    lines = md.splitlines()
    assert lines[:7] == [
        "# r",
        "",
        "| method | top-1 acc | sent to LVLM |",
        "|---|---:|---:|",
        "| CLIP | 57.80% | 0.0% |",
        "| cascade (tau 1.045) | 65.10% | 30.9% |",
        "| LVLM on all | 72.55% | 100.0% |",
    ]
    assert lines[8] == "> a note"
    assert md.index("| parameter |") > md.index("| metric |")  # the details after
    assert "1.0449005365371704" not in md


def test_parameters_that_do_not_apply_are_left_out_of_the_summary():
    shown = _table(summary_markdown("r", _payload(), []), "parameter")
    assert shown == {"dataset": "fashion_mnist", "images": "2000", "lvlm": "TransformersBackend",
                     "tau": "1.045", "topk": "5", "incontext_shots": "0", "candidates": "topk",
                     "fusion": "none", "lvlm_calls": "2000"}  # fmt: skip
    conformal = {**PARAMS, "candidates": "aps", "fusion": "logprob", "fusion_weight": 0.25}
    shown = _table(summary_markdown("r", _payload(params=conformal), []), "parameter")
    assert shown["alpha"] == "0.1" and shown["fusion_weight"] == "0.25"
    clip_only = {"dataset": "d", "lvlm": None, "tau": float("inf"), "topk": 5, "alpha": 0.1, "adapter": "a.st",
                 "shots": 4, "seed": 2}  # fmt: skip
    shown = _table(summary_markdown("r", _payload(params=clip_only), []), "parameter")
    assert shown == {"dataset": "d", "adapter": "a.st", "shots": "4", "seed": "2"}


def test_the_deferred_table_starts_with_the_deferred_count_not_the_total():
    rows = _table(summary_markdown("r", _payload(), []), "on deferred images")
    assert list(rows.items())[0] == ("deferred images", "617 of 2000 (30.9%)")
    assert "images" not in rows and rows["deferred_clip_acc1"] == "0.3" and "fallbacks" not in rows


def test_sweep_csv_has_no_float32_noise(tmp_path):
    acc = float(torch.tensor(0.578))  # what a torchmetrics value becomes: 0.578000009059906
    assert acc != 0.578
    rows = [{"tau": float(torch.tensor(TAU)), "deferral": 2 / 3, "acc1": acc}]
    paths = write_run_outputs(tmp_path, [], _payload(), [], rows)
    with Path(paths["sweep"]).open() as fh:
        written = next(csv.DictReader(fh))
    assert written == {"tau": "1.0449005", "deferral": repr(2 / 3), "acc1": "0.578"}
    assert plain_float(acc) == 0.578 and plain_float(2 / 3) == 2 / 3 and plain_float("x") == "x"


def test_markdown_table_aligns_numbers_right():
    assert markdown_table(["a", "b"], [(1, "x")], "rl") == ["| a | b |", "|---:|---|", "| 1 | x |"]


def test_evaluate_and_fit_end_with_the_same_closing_block(tmp_path):
    block = evaluate_closing_block("runs/r", ["records.parquet", "metrics.json"], METHODS)
    assert block.splitlines() == [
        "run          runs/r/",
        "wrote        records.parquet, metrics.json",
        "CLIP         57.80%",
        "cascade      65.10% (30.9% sent to the LVLM)",
        "LVLM on all  72.55%",
    ]
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    metrics = {"epoch": 7, "val_acc": 0.6660000085830688, "zero_shot_val_acc": 0.577, "test_acc": 0.6515,
               "zero_shot_test_acc": 0.578000009059906, "test_size": 2000, "selection": "val_split"}  # fmt: skip
    block = closing_block(tmp_path, ["adapter.safetensors", "metrics.json"], fit_numbers(tmp_path, metrics))
    assert block.splitlines() == [
        f"run         {tmp_path}/",
        "wrote       adapter.safetensors, metrics.json",
        f"adapter     {tmp_path / 'adapter.safetensors'}",
        "best epoch  7",
        "val acc     66.60% (zero-shot 57.70%)",
        "test acc    65.15% (zero-shot 57.80%) on 2000 images",
    ]
