"""Several LVLM stages after CLIP (``cascade.stages``): records and stages.parquet against a walk by hand,
resume after kill -9 in the second LVLM stage, thresholds under a cost budget, and the refusals.

The stages are :class:`~cascadevlm.testing.scored_lvlm.ScoredLVLM` backends (instant, with candidate
scores; the one with a larger ``skill`` knows the true class more often), after the demo CLIP, on a small
copy of the demo data (40 test images, 60 validation images).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cascadevlm.cascade.lvlm_stage import read_answers, read_lvlm_calls
from cascadevlm.cascade.stages import lvlm_uncertainty, ranked_candidates
from cascadevlm.cli import run_evaluate as main
from cascadevlm.gating.cost import STAGES_SCHEMA
from cascadevlm.records import read_records
from cascadevlm.testing.scored_lvlm import EXIT_ENV, ScoredLVLM

REPO = Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "cascadevlm" / "zoo" / "checkpoints" / "clip.safetensors"
SCORED = "cascadevlm.testing.scored_lvlm.ScoredLVLM"
INTERFACE_COLUMNS = [
    ("index", "int64"), ("stage", "int32"), ("name", "string"), ("answered", "bool"), ("pred", "int64"),
    ("uncertainty", "double"), ("seconds", "double"), ("prompt_tokens", "int64"),
    ("completion_tokens", "int64"), ("usd", "double"),
]  # fmt: skip


@pytest.fixture(scope="module")
def small_root(data_root, tmp_path_factory) -> Path:
    """The demo data with 20 train, 60 val and 40 test images (a validation split that is quick to ask)."""
    import datasets

    full = datasets.load_from_disk(str(data_root / "fashion_mnist"))
    small = datasets.DatasetDict(
        {
            "train": full["train"].select(range(20)),
            "val": full["val"].select(range(0, 5000, 84)),
            "test": full["test"].select(range(40)),
        }  # fmt: skip
    )
    root = tmp_path_factory.mktemp("small_fm")
    small.save_to_disk(str(root / "fashion_mnist"))
    return root


@pytest.fixture(scope="module")
def truth(small_root, tmp_path_factory) -> str:
    """The answer key of every image of the small copy (for the ScoredLVLM's skill)."""
    import datasets

    from cascadevlm.data.loading import decode_image
    from cascadevlm.testing.oracle_lvlm import write_truth

    dd = datasets.load_from_disk(str(small_root / "fashion_mnist"))
    names = dd["test"].features["label"].names
    pairs = [(decode_image(row["image"], "t"), names[row["label"]]) for s in ("val", "test") for row in dd[s]]
    path = tmp_path_factory.mktemp("truth") / "truth.json"
    write_truth(path, pairs)
    return str(path)


@pytest.fixture(autouse=True)
def clean_log():
    ScoredLVLM.log.clear()
    yield
    ScoredLVLM.log.clear()


def stage(name: str, truth: str, skill: float, salt: int, **kw) -> dict:
    price = kw.pop("price", None)
    init = {"model": name, "salt": salt, "truth": truth, "skill": skill, **kw.pop("init", {})}
    out = {"name": name, "lvlm": {"class_path": SCORED, "init_args": init}, **kw}
    return {**out, **({"price": price} if price else {})}


def three_stages(truth: str, taus=(0.5, None), **big) -> list[dict]:
    small = stage("small", truth, 1.5, 1, gate="margin", **({"tau": taus[0]} if taus[0] is not None else {}))
    return [small, stage("big", truth, 4.0, 2, candidates="previous", topk=3, **big)]


def args(root: Path, out: Path, name: str | None, stages, *extra: str) -> list[str]:
    cfg = out / f"stages_{name or 'default'}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump({"cascade": {"stages": stages}}))
    a = [
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(DEMO_CLIP),
        "--data.dataset", "fashion_mnist", "--data.data_root", str(root), "--data.batch_size", "64",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--output_dir", str(out), "--cache_dir", str(out / "cache"), "--answer_store", "null",
        "--cascade.lvlm_batch_size", "4", "--config", str(cfg),
    ]  # fmt: skip
    return [*a, *(["--run_name", name] if name else []), *extra]


def stage_columns(path: Path) -> dict[int, dict[str, np.ndarray]]:
    t = pq.read_table(path).to_pandas()
    return {s: {c: g[c].to_numpy() for c in g.columns} for s, g in t.sort_values("index").groupby("stage")}


def walk(cols: dict, thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The last stage each image reaches and its answer, one image at a time (NaN uncertainty goes on)."""
    n = len(cols[0]["index"])
    last, final = np.zeros(n, dtype=int), np.zeros(n, dtype=int)
    for i in range(n):
        s = 0
        while s < len(thresholds):
            u = cols[s]["uncertainty"][i]
            if not (math.isnan(u) or u > thresholds[s]):
                break
            s += 1
        last[i], final[i] = s, cols[s]["pred"][i]
    return last, final


def test_three_stage_run_matches_a_walk_by_hand(small_root, truth, tmp_path):
    stages = three_stages(truth)
    m = main(
        args(small_root, tmp_path, None, stages, "--cascade.tau", "0.6", "--cascade.lvlm_on", "deferred")
    )
    run = next(p for p in tmp_path.iterdir() if (p / "metrics.json").exists())
    assert "_stages-small+big_st" in run.name and "_tau0.6_deferred_" in run.name
    table = pq.read_table(run / "stages.parquet")
    assert [(f.name, str(f.type)) for f in table.schema] == INTERFACE_COLUMNS
    assert table.schema.equals(STAGES_SCHEMA)
    cols = stage_columns(run / "stages.parquet")
    records = read_records(run / "records.parquet")
    thresholds = [0.6, 0.5]
    last, final = walk(cols, thresholds)
    assert [r.final for r in records] == final.tolist()
    assert [r.deferred for r in records] == (last > 0).tolist()
    assert [r.lvlm_choice for r in records] == [
        int(cols[s]["pred"][i]) if s else None for i, s in enumerate(last)
    ]
    # CLIP: entropy; each LVLM stage: the margin of the softmax of the scores it gave
    assert np.allclose(cols[0]["uncertainty"], [r.entropy for r in records])
    small = read_answers(run / "parts")
    big = read_answers(run / "parts" / "stage2")
    for i, r in enumerate(records):
        if r.index in small:
            assert cols[1]["uncertainty"][i] == pytest.approx(
                lvlm_uncertainty(small[r.index].scores, "margin")
            )
    # deferred: each stage was asked exactly about the images that reach it
    assert sorted(small) == [r.index for r, s in zip(records, last, strict=True) if s >= 1]
    assert sorted(big) == [r.index for r, s in zip(records, last, strict=True) if s >= 2]
    assert (
        len(ScoredLVLM.log["small"]) == (last >= 1).sum() and len(ScoredLVLM.log["big"]) == (last >= 2).sum()
    )
    # candidates previous: the big model is shown the small one's top-3 by its scores
    assert all(
        a.candidate_ids == ranked_candidates(small[i].candidate_ids, small[i].scores, 3)
        for i, a in big.items()
    )
    labels = np.asarray([r.label for r in records])
    assert m["methods"]["cascade"]["acc1"] == pytest.approx((final == labels).mean())
    assert m["cost"]["calls"] == [40, int((last >= 1).sum()), int((last >= 2).sum())]
    assert m["params"]["thresholds"] == thresholds
    # every combination the answers allow equals gating.cost's outcome from the files
    from cascadevlm.gating.cost import outcome, read_cost_table

    cost = read_cost_table(run / "stages.parquet", run / "records.parquet", "seconds")
    for key, combo, ts in [("clip", (0,), []), ("clip > small", (0, 1), [0.6]),
                           ("clip > small > big", (0, 1, 2), thresholds)]:  # fmt: skip
        ref = outcome(cost, ts, combo)
        assert m["combinations"][key]["acc1"] == pytest.approx(ref["acc"])
        assert m["combinations"][key]["calls"] == ref["calls"]
        assert m["combinations"][key]["cost_per_image"]["seconds"] == pytest.approx(ref["cost_per_image"])
    assert m["methods"]["clip > small"]["acc1"] == m["combinations"]["clip > small"]["acc1"]
    assert "clip > big" not in m["combinations"]  # big never saw the images small kept
    assert (run / "pareto" / "pareto.csv").exists()
    assert "| stage |" in (run / "summary.md").read_text()


@pytest.mark.slow
def test_kill_9_in_the_second_lvlm_stage_resumes_identically(small_root, truth, tmp_path):
    stages = three_stages(truth)
    extra = ("--cascade.tau", "0.6", "--cascade.lvlm_on", "all")
    main(args(small_root, tmp_path, "whole", stages, *extra))
    whole = read_records(tmp_path / "whole" / "records.parquet")

    # the big model's process dies (os._exit: no handler, nothing flushed) as its 4th batch of 4 starts
    env = {**os.environ, EXIT_ENV: "big:3"}
    cmd = [
        sys.executable,
        "-m",
        "cascadevlm.cli",
        "evaluate",
        *args(small_root, tmp_path, "resumed", stages, *extra),
    ]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-2000:]
    run = tmp_path / "resumed"
    assert not (run / "records.parquet").exists()
    assert len(read_answers(run / "parts")) == 40  # the first LVLM stage had finished
    done = set(read_answers(run / "parts" / "stage2"))
    assert len(done) == 12

    ScoredLVLM.log.clear()
    again = main(args(small_root, tmp_path, "resumed", stages, *extra))
    assert "small" not in ScoredLVLM.log  # nothing of the finished stage is asked again
    asked = {int(k.split("/")[1]) for k in ScoredLVLM.log["big"]}
    assert len(ScoredLVLM.log["big"]) == 28 and not asked & done
    assert read_records(run / "records.parquet") == whole
    assert again["params"]["lvlm_calls_by_stage"] == {"small": 40, "big": 40}
    a, b = stage_columns(tmp_path / "whole" / "stages.parquet"), stage_columns(run / "stages.parquet")
    for s in (0, 1, 2):
        assert (a[s]["pred"] == b[s]["pred"]).all()
        assert np.allclose(a[s]["uncertainty"], b[s]["uncertainty"], equal_nan=True)


COST_COLUMNS = ("seconds", "prompt_tokens", "completion_tokens", "usd")


@pytest.mark.slow
def test_two_ddp_processes_give_the_same_stages_as_one(small_root, truth, tmp_path):
    """CLIP -> small -> big, lvlm_on deferred, run by one process and by two DDP processes (the
    subprocess launch of tests/test_cascade.py's DDP test): the same records and stages.parquet but the
    cost columns (seconds differ), and each stage asked about each image it reaches once across ranks."""

    def run(name, *extra):
        a = args(small_root, tmp_path / name, "r", three_stages(truth), "--cascade.tau", "0.6",
                 "--cascade.lvlm_on", "deferred", *extra)  # fmt: skip
        p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *a], cwd=REPO, capture_output=True,
                           text=True, timeout=400, env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return tmp_path / name / "r", json.loads((tmp_path / name / "r" / "metrics.json").read_text())

    one, m1 = run("one")
    two, m2 = run("two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert m1["params"]["devices"] == 1 and m2["params"]["devices"] == 2
    r1, r2 = read_records(one / "records.parquet"), read_records(two / "records.parquet")
    assert [r.index for r in r2] == [r.index for r in r1] == list(range(40))
    floats = {"clip_topk_probs", "entropy", "clip_logits"}  # CLIP's numbers: batches of 20, not 40
    for a, b in zip(r1, r2, strict=True):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            assert x == (pytest.approx(y, abs=1e-5) if f.name in floats and y is not None else y), f.name

    t1, t2 = (
        pq.read_table(r / "stages.parquet").to_pandas().sort_values(["stage", "index"]) for r in (one, two)
    )
    assert len(t1) == len(t2) == 3 * 40
    for c in t1.columns.difference(COST_COLUMNS):
        a, b = t1[c].to_numpy(), t2[c].to_numpy()
        if c == "uncertainty":
            assert np.allclose(a, b, atol=1e-5, equal_nan=True)
        else:
            assert (a == b).all(), c

    # each stage asked exactly the images that reach it, once in total across both ranks
    cols = stage_columns(one / "stages.parquet")
    last, _ = walk(cols, [0.6, 0.5])
    for s, parts in ((1, "parts"), (2, "parts/stage2")):
        reach = sorted(int(i) for i in cols[0]["index"][last >= s])
        per_rank = [
            [json.loads(x)["index"] for x in (two / parts / f"lvlm.rank{k}.jsonl").read_text().splitlines()]
            for k in (0, 1)
        ]
        asked = per_rank[0] + per_rank[1]
        assert sorted(asked) == reach and len(set(asked)) == len(asked), s
        assert read_lvlm_calls(two / parts) == read_lvlm_calls(one / parts) == len(reach), s
        if s == 1:
            assert 1 < len(reach) < 40 and all(per_rank)  # both ranks answered a share of stage 1
    assert 0 < (last >= 2).sum() < (last >= 1).sum()
    calls = {"small": int((last >= 1).sum()), "big": int((last >= 2).sum())}
    assert m1["params"]["lvlm_calls_by_stage"] == m2["params"]["lvlm_calls_by_stage"] == calls
    assert m1["cost"]["calls"] == m2["cost"]["calls"] == [40, calls["small"], calls["big"]]
    assert m1["methods"]["cascade"]["acc1"] == m2["methods"]["cascade"]["acc1"]


def test_cost_budget_thresholds_stay_within_it_on_validation(small_root, truth, tmp_path):
    from cascadevlm.gating.cost import outcome, read_cost_table

    stages = three_stages(truth, taus=(None, None))
    stages[0]["price"], stages[1]["price"] = {"usd_per_image": 0.002}, {"usd_per_image": 0.01}
    usd = ("--cascade.cost_unit", "usd", "--cascade.clip_price", '{"usd_per_image": 0.001}',
           "--cascade.lvlm_on_val", "true")  # fmt: skip
    # 1 + 2 + 10 usd per 1000 images for CLIP, small, big: 6 affords the big model on about 3 in 10
    m = main(args(small_root, tmp_path, "budget", stages, *usd, "--cascade.cost_budget", "6"))
    run = tmp_path / "budget"
    gate = m["gate"]
    assert gate["source"] == "cost_budget 6 usd per 1000 images on val"
    val = read_cost_table(run / "val_stages.parquet", run / "val_records.parquet", "usd")
    ref = outcome(val, gate["thresholds"])
    assert ref["cost_per_1000"] <= 6 + 1e-9 and ref["cost_per_1000"] == pytest.approx(
        gate["budget_split_cost_per_1000"]
    )
    assert ref["acc"] == pytest.approx(gate["budget_split_acc1"])
    clip_only = outcome(val, [math.inf, math.inf])
    assert ref["acc"] >= clip_only["acc"]  # CLIP alone fits the budget: the choice is never worse there
    assert m["params"]["thresholds"] == gate["thresholds"]
    # every validation image was asked by every stage (one call each), the test images as lvlm_on all
    assert len(ScoredLVLM.log["small"]) == len(ScoredLVLM.log["big"]) == 60 + 40
    # on the test split: the walk at the chosen thresholds
    cols = stage_columns(run / "stages.parquet")
    _, final = walk(cols, gate["thresholds"])
    assert [r.final for r in read_records(run / "records.parquet")] == final.tolist()
    assert cols[2]["usd"][cols[2]["answered"]] == pytest.approx(0.01)


def test_cost_budget_skips_a_stage_when_that_is_better_and_asks_it_nothing(small_root, truth, tmp_path):
    """CLIP -> a guessing LVLM -> a strong one, each LVLM on CLIP's top-5, 10 usd per 1000 images each:
    within 12 per 1000 the strong one on every image (CLIP -> big) beats every setting of the whole
    chain on validation; the run chooses it and, with lvlm_on deferred, asks the skipped stage nothing
    on the test images."""
    from cascadevlm.gating.cost import choose_combination, choose_thresholds, outcome, read_cost_table

    stages = [stage("small", truth, 0.0, 1, gate="margin", price={"usd_per_image": 0.01}),
              stage("big", truth, 4.0, 2, price={"usd_per_image": 0.01})]  # fmt: skip
    usd = ("--cascade.cost_unit", "usd", "--cascade.clip_price", '{"usd_per_image": 0.001}',
           "--cascade.lvlm_on_val", "true", "--cascade.lvlm_on", "deferred")  # fmt: skip
    m = main(args(small_root, tmp_path, None, stages, *usd, "--cascade.cost_budget", "12"))
    run = next(p for p in tmp_path.iterdir() if (p / "metrics.json").exists())
    assert "_cost12u-val-combos_deferred_" in run.name
    gate = m["gate"]
    assert gate["combination"] == ["clip", "big"] and gate["combination_stages"] == [0, 2]
    assert gate["thresholds"][1] is None  # the skipped stage has none
    val = read_cost_table(run / "val_stages.parquet", run / "val_records.parquet", "usd")
    chosen = outcome(val, [gate["thresholds"][0]], (0, 2))
    assert chosen["cost_per_1000"] <= 12 + 1e-9
    assert (chosen["acc"], chosen["calls"]) == (gate["budget_split_acc1"], gate["budget_split_calls"])
    assert choose_combination(val, 12).stages == (0, 2)  # the same choice from the files
    chain = choose_thresholds(val, 12)  # the whole chain, all the search could choose before
    assert chosen["acc"] > chain.acc == gate["budget_split_combinations"]["clip > small > big"]["acc"]
    # the test images: small is asked nothing, big about the images CLIP sends it, records are the walk
    assert len(ScoredLVLM.log["small"]) == 60
    cols = stage_columns(run / "stages.parquet")
    sent = cols[0]["uncertainty"] > gate["thresholds"][0]
    assert not cols[1]["answered"].any() and cols[2]["answered"].tolist() == sent.tolist()
    assert len(ScoredLVLM.log["big"]) == 60 + sent.sum()
    records = read_records(run / "records.parquet")
    assert [r.final for r in records] == np.where(sent, cols[2]["pred"], cols[0]["pred"]).tolist()
    assert [r.deferred for r in records] == sent.tolist()
    labels = np.asarray([r.label for r in records])
    assert m["methods"]["cascade"]["acc1"] == pytest.approx(
        (np.asarray([r.final for r in records]) == labels).mean()
    )
    assert m["params"]["combination"] == "clip > big" and m["cost"]["calls"] == [40, 0, int(sent.sum())]
    assert [st["in_combination"] for st in m["stages"][1:]] == [False, True]
    assert m["cost"]["per_1000_images"] == pytest.approx(1 + 10 * sent.mean() * 1)
    assert "| combination | clip > big |" in (run / "summary.md").read_text()


def test_cost_budget_below_clip_alone_is_refused_before_any_lvlm_stage(small_root, truth, tmp_path):
    stages = three_stages(truth, taus=(None, None))
    stages[0]["price"], stages[1]["price"] = {"usd_per_image": 0.002}, {"usd_per_image": 0.01}
    with pytest.raises(ValueError) as err:
        main(args(small_root, tmp_path, "low", stages, "--cascade.cost_unit", "usd", "--cascade.clip_price",
                  '{"usd_per_image": 0.001}', "--cascade.lvlm_on_val", "true", "--cascade.cost_budget", "0.5"))  # fmt: skip
    assert str(err.value) == (
        "cascade.cost_budget 0.5 usd per 1000 images is below CLIP alone's cost on the val split (1): "
        "raise --cascade.cost_budget"
    )
    assert ScoredLVLM.log == {}


def _refusal_cases(truth: str, tmp: Path) -> list[tuple[list, list[str], str]]:
    ok = three_stages(truth)
    gen = three_stages(truth)
    gen[0]["lvlm"]["init_args"]["mode"] = "generate"
    unknown = three_stages(truth)
    unknown[1]["lvlm"] = {"class_path": "NoSuchBackend"}
    missing = three_stages(truth)
    missing[1]["lvlm"] = "no/such/lvlm.yaml"
    no_tau = three_stages(truth, taus=(None, None))
    unpriced = three_stages(truth, taus=(None, None))
    unpriced[0]["price"] = {"usd_per_image": 0.002}
    cb = ["--cascade.cost_budget", "5"]
    return [
        ([], [], "cascade.stages is empty: give at least one LVLM stage ({name, lvlm, gate, tau, candidates, "
                 "topk, price}), or leave cascade.stages unset for the two-stage cascade with --lvlm"),
        (ok, ["--lvlm.class_path", SCORED], "cascade.stages and lvlm are both set: the stages list every LVLM in "
                                           "order; give the LVLM as a stage and --lvlm null, or --cascade.stages "
                                           "null for the two-stage cascade"),
        (unknown, [], "cascade.stages[1].lvlm: unknown LVLM backend class 'NoSuchBackend'; known: "
                      "TransformersBackend, OpenAIBackend (or a full module.Class path of an LVLMBackend subclass)"),
        (missing, [], f"cascade.stages[1].lvlm: config file 'no/such/lvlm.yaml' not found (looked in {tmp}, "
                      f"{Path.cwd()}); give a path relative to the config file or the working directory, or an "
                      "inline {class_path, init_args}"),
        (gen, [], "cascade.stages[0] ('small') answers in mode generate without candidate scores, which its gate "
                  "'margin' needs: set cascade.stages[0].lvlm's init_args.mode score, or make it the last stage"),
        (no_tau, cb, "cascade.cost_budget chooses the thresholds on the val split from every stage's answers "
                     "there: set --cascade.lvlm_on_val true (each LVLM stage is asked about every validation "
                     "image)"),
        (no_tau, [*cb, "--cascade.lvlm_on_val", "true", "--cascade.tau", "1"],
         "cascade.tau 1 and cascade.cost_budget 5 are both set, and the cost budget chooses every threshold: "
         "give one, e.g. --cascade.tau inf"),
        (ok, [*cb, "--cascade.lvlm_on_val", "true"],
         "cascade.stages[0].tau 0.5 and cascade.cost_budget are both set, and the budget chooses every "
         "threshold: leave out the stages' tau, or --cascade.cost_budget null"),
        (unpriced, [*cb, "--cascade.lvlm_on_val", "true", "--cascade.cost_unit", "usd", "--cascade.clip_price",
                    '{"usd_per_image": 0.001}'],
         "cascade.cost_unit usd needs every stage's price, and stage 2 'big' has none: set "
         "cascade.stages[1].price (usd_per_image, usd_per_1m_prompt_tokens, usd_per_1m_completion_tokens or "
         "usd_per_hour), or --cascade.cost_unit seconds"),
        (ok, ["--cascade.cost_unit", "usd"],
         "cascade.cost_unit usd needs every stage's price, and stage 0 'clip' has none: set "
         "--cascade.clip_price '{usd_per_hour: ...}' (or usd_per_image), or --cascade.cost_unit seconds"),
    ]  # fmt: skip


def test_each_refusal_is_one_line_before_any_stage(small_root, truth, tmp_path):
    for i, (stages, extra, message) in enumerate(_refusal_cases(truth, tmp_path)):
        with pytest.raises(ValueError) as err:
            main(args(small_root, tmp_path, f"bad{i}", stages, *extra))
        assert str(err.value) == message, i
        assert not (tmp_path / f"bad{i}").exists()  # no stage ran: not even CLIP's parts
    assert ScoredLVLM.log == {}


def test_scored_lvlm_parts_and_configs_relative_to_the_config_file(small_root, truth, tmp_path):
    """A stage's lvlm given as a config file path is read relative to the config file."""
    lv = tmp_path / "cfgs" / "lvlm"
    lv.mkdir(parents=True)
    (lv / "small.yaml").write_text(yaml.safe_dump(stage("small", truth, 1.5, 1)["lvlm"]))
    stages = [{"name": "small", "lvlm": "lvlm/small.yaml", "gate": "entropy", "tau": 0.2}]
    cfg = tmp_path / "cfgs" / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"cascade": {"stages": stages, "tau": 0.6, "lvlm_on": "deferred"}}))
    a = args(small_root, tmp_path, "rel", [stage("x", truth, 0, 0)], "--config", str(cfg))
    m = main(a)
    assert m["params"]["stages"] == ["small"] and (tmp_path / "rel" / "stages.parquet").exists()
    assert json.loads((tmp_path / "rel" / "parts" / "lvlm.config.json").read_text())["config"]["stage"] == {
        "index": 1,
        "candidates": "clip",
    }


def test_three_tiny_llava_stages_follow_the_rule(tiny_clip_path, data_root, tiny_llava_dir, tmp_path):
    """CLIP -> tiny LLaVA (top-5, entropy gate) -> tiny LLaVA on its top-3 (the transformers backend's
    real scores): the records are the walk over stages.parquet, stage 2's candidates stage 1's top-3."""
    lv = {"class_path": "TransformersBackend",
          "init_args": {"model": str(tiny_llava_dir), "device": "cpu", "batch_size": 8}}  # fmt: skip
    stages = [{"name": "a", "lvlm": lv, "gate": "entropy", "tau": 0.0},
              {"name": "b", "lvlm": lv, "candidates": "previous", "topk": 3}]  # fmt: skip
    a = args(data_root, tmp_path, "tiny", stages, "--data.limit", "16", "--model.pretrained", str(tiny_clip_path),
             "--cascade.tau", "0.02", "--cascade.lvlm_on", "deferred", "--cascade.lvlm_batch_size", "8")  # fmt: skip
    m = main(a)
    run = tmp_path / "tiny"
    cols = stage_columns(run / "stages.parquet")
    last, final = walk(cols, [0.02, 0.0])
    assert (
        0 < (last >= 1).sum() and [r.final for r in read_records(run / "records.parquet")] == final.tolist()
    )
    first, second = read_answers(run / "parts"), read_answers(run / "parts" / "stage2")
    assert sorted(second) == sorted(i for i, s in zip(cols[0]["index"], last, strict=True) if s >= 2)
    assert all(
        b.candidate_ids == ranked_candidates(first[i].candidate_ids, first[i].scores, 3)
        for i, b in second.items()
    )
    assert (cols[1]["seconds"][cols[1]["answered"]] > 0).all()  # measured around the model's forward
    assert m["cost"]["calls"] == [16, int((last >= 1).sum()), int((last >= 2).sum())]


def test_two_stage_run_with_validation_answers_writes_val_stages(small_root, truth, tmp_path):
    lv = ["--lvlm.class_path", SCORED, "--lvlm.init_args.truth", truth, "--lvlm.init_args.skill", "2"]
    main(
        args(small_root, tmp_path, "two", None, *lv, "--cascade.tau", "0.6", "--cascade.lvlm_on_val", "true")
    )
    run = tmp_path / "two"
    val = read_records(run / "val_records.parquet")
    cols = stage_columns(run / "val_stages.parquet")
    assert cols[0]["index"].tolist() == [r.index for r in val] and len(val) == 60
    assert cols[1]["answered"].all() and cols[1]["pred"].tolist() == [r.lvlm_choice for r in val]
    assert np.allclose(cols[0]["uncertainty"], [r.entropy for r in val])


def test_the_server_refuses_stages_it_cannot_serve():
    from cascadevlm.cascade.evaluate import CascadeOptions
    from cascadevlm.serve import ServeConfigError, check_servable

    for opts in (CascadeOptions(stages=[{"lvlm": "x.yaml"}]), CascadeOptions(cost_budget=5.0)):
        with pytest.raises(ServeConfigError, match=r"^cascade.stages / cascade.cost_budget are not served"):
            check_servable(opts, False)


@pytest.mark.parametrize("gate", ["entropy", "margin", "max_prob"])
def test_an_lvlm_stage_gate_is_clips_formula_on_its_candidate_scores(gate):
    # One formula for CLIP's and an LVLM stage's gates: the LVLM's uncertainty is CLIP's gate score of
    # log softmax(scores), worked out by hand here; a candidate of probability 0 (score -inf) adds
    # nothing (it made the entropy NaN: 0 * log 0), and no scores at all read NaN (the most uncertain).
    rng = np.random.default_rng(0)
    for scores in [rng.normal(size=5).tolist() for _ in range(20)] + [[0.0, -1.0, -math.inf], [2.0]]:
        s = np.asarray(scores)
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        top = np.sort(p)[::-1]
        expected = {
            "entropy": -sum(q * math.log(q) for q in p if q > 0),
            "margin": 1 - (top[0] - (top[1] if len(top) > 1 else 0.0)),
            "max_prob": 1 - top[0],
        }[gate]
        assert lvlm_uncertainty(scores, gate) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(lvlm_uncertainty(None, gate)) and math.isnan(lvlm_uncertainty([math.nan, 1.0], gate))
    with pytest.raises(ValueError, match="unknown LVLM gate 'learned'"):
        lvlm_uncertainty([0.0, 1.0], "learned")


def test_a_refusal_on_rank_0_stops_every_rank_with_its_line(tmp_path):
    # The cost budget's choice is made on rank 0 and shared through a file after a barrier; a refusal
    # there (an unknown stage cost, a learned gate that cannot be fitted) left the other ranks waiting at
    # the barrier for a result that never came (a hung DDP run). Replayed rank by rank, one process.
    from types import SimpleNamespace

    from cascadevlm.cascade.evaluate import _decided_on_rank0

    def run(rank0, barriers):
        strategy = SimpleNamespace(barrier=lambda: barriers.append(rank0))
        return SimpleNamespace(rank0=rank0, cli=SimpleNamespace(trainer=SimpleNamespace(strategy=strategy)))

    def refuse():
        raise ValueError("stage 1 'small' has 0 right of 60: use another gate")

    path, barriers = tmp_path / "stage_thresholds.json", []
    for rank0 in (True, False):  # rank 0 first (the barrier orders them), then another rank
        with pytest.raises(ValueError, match=r"^stage 1 'small' has 0 right of 60: use another gate$"):
            _decided_on_rank0(run(rank0, barriers), path, refuse if rank0 else pytest.fail)
    assert barriers == [True, False]  # each rank passed the barrier once, none waits for more
    shared = [_decided_on_rank0(run(r, barriers), path, lambda: {"tau": 0.5}) for r in (True, False)]
    assert shared == [{"tau": 0.5}, {"tau": 0.5}]
