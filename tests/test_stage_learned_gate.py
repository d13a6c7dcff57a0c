"""The learned gate of an LVLM stage (``cascade.stages[i].gate: learned``, cascadevlm/gating/stage_gate.py):
the fit against scikit-learn's, cross-fitting on the budget split, a learned signal on held-out images,
the refusals, and end-to-end three-stage runs (cost budget; fixed thresholds) against a walk by hand,
with a resume that asks only what is missing.

The end-to-end runs reuse tests/test_stages.py's small copy of the demo data and its ScoredLVLM stages.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_stages
from PIL import Image
from test_stages import args, stage, stage_columns, walk

from cascadevlm.cascade.lvlm_stage import LVLMResult, read_answers
from cascadevlm.cascade.stages import (
    fit_learned_gates,
    lvlm_column,
    lvlm_uncertainty,
    parse_stages,
    stage_features,
    stages_identity_hash,
)
from cascadevlm.cli import run_evaluate as main
from cascadevlm.gating.stage_gate import FEATURES, L2, StageGate, cross_fitted_uncertainty, folds_of
from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.records import PredictionRecord, read_records
from cascadevlm.testing.oracle_lvlm import image_digest
from cascadevlm.testing.scored_lvlm import ScoredLVLM

CLASSES = [f"class{c}" for c in range(10)]
# the multi-stage tests' fixtures: their small copy of the demo data, its answer key, the request log reset
small_root, truth, clean_log = test_stages.small_root, test_stages.truth, test_stages.clean_log


# ------------------------------------------------------------------------------- synthetic images
def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))


def synthetic_stage(n: int, seed: int, tmp_path, candidates: int = 5):
    """``n`` CLIP records and one ScoredLVLM stage's answers on them. Half the images CLIP is sure of
    (p1 in [0.6, 0.95], low entropy), half not (p1 in [0.2, 0.4]); the LVLM is told (``truth``, skill
    3) the right class on 85% of the sure images and a wrong one on 85% of the others: it is as
    confident either way, so its margin hardly tells when it is right, CLIP's record does."""
    rng = np.random.default_rng(seed)
    records, key, requests = [], {}, []
    for i in range(n):
        index = seed * 100_000 + i
        label = int(rng.integers(10))
        others = [c for c in rng.permutation(10).tolist() if c != label][: candidates - 1]
        cands = list(others)
        cands.insert(int(rng.integers(candidates)), label)
        sure = rng.random() < 0.5
        p1 = rng.uniform(0.6, 0.95) if sure else rng.uniform(0.2, 0.4)
        p2 = (1 - p1) * rng.uniform(0.3, 0.6)
        rest = (1 - p1 - p2) / 8
        probs = np.array([p1, p2, *[rest] * 8])
        entropy = float(-(probs * np.log(probs)).sum())
        records.append(PredictionRecord(index, label, cands, [float(p1), float(p2), rest, rest, rest], entropy,
                                        cands[0]))  # fmt: skip
        told_right = rng.random() < (0.85 if sure else 0.15)
        told = label if told_right else others[int(rng.integers(len(others)))]
        img = _image(index)
        key[image_digest(img)] = CLASSES[told]
        requests.append(LVLMRequest(img, [CLASSES[c] for c in cands], key=f"im/{index}"))
    path = tmp_path / f"truth{seed}.json"
    path.write_text(json.dumps(key))
    got = ScoredLVLM(model="synthetic", salt=seed, sharpness=1.0, truth=str(path), skill=3.0).choose(requests)
    answers = {
        r.index: LVLMResult(r.index, list(r.clip_topk), r.clip_topk[a.choice], a.raw, a.scores, None)
        for r, a in zip(records, got, strict=True)
    }
    return records, answers


def _auroc(uncertainty: np.ndarray, wrong: np.ndarray) -> float:
    """P(a wrong answer is more uncertain than a right one), ties half (brute force over pairs)."""
    u_w, u_r = uncertainty[wrong][:, None], uncertainty[~wrong][None, :]
    return float(((u_w > u_r) + 0.5 * (u_w == u_r)).mean())


# ------------------------------------------------------------------------------- the fit
def test_the_fit_is_scikit_learns_logistic_regression_and_its_gradient_is_zero(tmp_path):
    from sklearn.linear_model import LogisticRegression

    records, answers = synthetic_stage(400, 1, tmp_path)
    x = stage_features(records, answers)
    right = np.asarray([answers[r.index].lvlm_choice == r.label for r in records])
    assert x.shape == (400, len(FEATURES)) and np.isfinite(x).all() and 0.2 < right.mean() < 0.8
    gate = StageGate.fit(x, right)
    mean, std = x.mean(0), x.std(0)
    assert np.array_equal(gate.mean, mean) and np.allclose(gate.std, std)
    z = (x - mean) / std
    # scikit-learn minimises C * sum(log-loss) + ||w||^2 / 2 (bias free): C = 1 / (2 * l2 * n)
    ref = LogisticRegression(C=1 / (2 * L2 * len(x)), tol=1e-12, max_iter=10_000).fit(z, right)
    assert np.allclose(gate.weight, ref.coef_[0], atol=1e-4) and gate.bias == pytest.approx(
        ref.intercept_[0], abs=1e-4
    )
    assert np.allclose(gate.p_right(x), ref.predict_proba(z)[:, 1], atol=1e-4)
    # the optimum of mean log-loss + l2 ||w||^2: its gradient, written out here, vanishes
    p = 1 / (1 + np.exp(-(z @ gate.weight + gate.bias)))
    assert np.abs(z.T @ (p - right) / len(x) + 2 * L2 * gate.weight).max() < 1e-7
    assert abs((p - right).mean()) < 1e-7
    # the features, column by column, from the records and the scores
    j = 7
    r, a = records[j], answers[records[j].index]
    s = np.exp(np.asarray(a.scores) - max(a.scores))
    top = np.sort(s / s.sum())[::-1]
    assert x[j].tolist() == pytest.approx([r.entropy, r.clip_topk_probs[0], r.clip_topk_probs[1], top[0], top[1],
                                           top[0] - top[1], lvlm_uncertainty(a.scores, "entropy"),
                                           float(a.lvlm_choice == r.clip_pred),
                                           a.candidate_ids.index(a.lvlm_choice)])  # fmt: skip
    # deterministic, and exact through gate.json
    again = StageGate.fit(x, right)
    assert json.dumps(again.to_dict()) == json.dumps(gate.to_dict())
    back = StageGate.from_dict(json.loads(json.dumps(gate.to_dict())))
    assert np.array_equal(back.uncertainty(x), gate.uncertainty(x))
    # an answer without scores has no features: NaN, as the other gates
    answers[records[0].index].scores = None
    assert np.isnan(stage_features(records[:1], answers)).all()


def test_a_validation_image_is_scored_by_a_gate_not_fitted_on_it(tmp_path):
    records, answers = synthetic_stage(200, 2, tmp_path)
    index = np.asarray([r.index for r in records])
    assert sorted(np.bincount(folds_of(index))) == [40] * 5  # consecutive indices: five equal folds

    class St:  # the parts of a StageSpec that fit_learned_gates reads
        index, gate, name, where = 1, "learned", "small", "cascade.stages[0]"

    def fitted(recs):
        cols = [None, lvlm_column("small", recs, answers, "learned", None)]
        assert np.isnan(cols[1].uncertainty).all()  # no gate yet: set by the fit
        gates = fit_learned_gates(recs, cols, [St])
        return cols[1].uncertainty, gates["1"]

    base, full = fitted(records)
    x = stage_features(records, answers)
    right = np.asarray([answers[r.index].lvlm_choice == r.label for r in records])
    assert np.array_equal(base, cross_fitted_uncertainty(x, right, index))
    assert full == StageGate.fit(x, right).to_dict()
    for j in (0, 57, 199):
        flipped = list(records)
        r = records[j]
        new = answers[r.index].lvlm_choice if r.label != answers[r.index].lvlm_choice else (r.label + 1) % 10
        flipped[j] = PredictionRecord(r.index, new, r.clip_topk, r.clip_topk_probs, r.entropy, r.clip_pred)
        changed, full2 = fitted(flipped)
        assert changed[j] == base[j]  # its own score: from the folds without it
        others = folds_of(index) != folds_of(index)[j]
        assert (changed[others] != base[others]).any()  # the label is used: the other folds' scores move
        assert full2 != full  # and by the gate fitted on every image (for the test split)


def test_the_learned_gate_orders_held_out_images_better_than_the_margin(tmp_path):
    val_records, val_answers = synthetic_stage(1000, 3, tmp_path)
    test_records, test_answers = synthetic_stage(1000, 4, tmp_path)

    def right_of(records, answers):
        return np.asarray([answers[r.index].lvlm_choice == r.label for r in records])

    gate = StageGate.fit(stage_features(val_records, val_answers), right_of(val_records, val_answers))
    wrong = ~right_of(test_records, test_answers)
    learned = lvlm_column("s", test_records, test_answers, "learned", None, gate).uncertainty
    margin = lvlm_column("s", test_records, test_answers, "margin", None).uncertainty
    assert np.array_equal(learned, gate.uncertainty(stage_features(test_records, test_answers)))
    auc_learned, auc_margin = _auroc(learned, wrong), _auroc(margin, wrong)
    assert auc_learned > 0.8 and auc_learned > auc_margin + 0.2, (auc_learned, auc_margin)
    # sending the 40% least likely right on: the learned order catches more of the wrong answers
    k = 400
    caught = {name: int(wrong[np.argsort(-u, kind="stable")[:k]].sum()) for name, u in
              (("learned", learned), ("margin", margin))}  # fmt: skip
    assert caught["learned"] > caught["margin"] + 50, caught


# ------------------------------------------------------------------------------- refusals
def _learned_stages(truth: str, tau=None, big_gate=None) -> list[dict]:
    small = stage("small", truth, 1.5, 1, gate="learned", **({"tau": tau} if tau is not None else {}))
    big = stage(
        "big", truth, 4.0, 2, candidates="previous", topk=3, **({"gate": big_gate} if big_gate else {})
    )
    return [small, big]


def test_each_refusal_is_one_line_before_any_stage(small_root, truth, tmp_path):
    gen = _learned_stages(truth, tau=0.5)
    gen[0]["lvlm"]["init_args"]["mode"] = "generate"
    bad_gate = _learned_stages(truth, tau=0.5)
    bad_gate[0]["gate"] = "logistic"
    cases = [
        (_learned_stages(truth, tau=0.5), ["--cascade.tau", "0.6"],
         "cascade.stages[0].gate learned is fitted on every stage's answers on the val split: set "
         "--cascade.lvlm_on_val true (with --cascade.cost_budget or the stages' tau)"),
        (_learned_stages(truth, tau=0.5), ["--cascade.tau", "0.6", "--cascade.budget_split", "train"],
         "cascade.stages[0].gate learned is fitted on every stage's answers on the train split: set "
         "--cascade.lvlm_on_val true (with --cascade.cost_budget or the stages' tau)"),
        (_learned_stages(truth, tau=0.5, big_gate="learned"), ["--cascade.tau", "0.6", "--cascade.lvlm_on_val", "true"],
         "cascade.stages[1].gate learned is fitted to choose the images that go on from a stage, and the last "
         "stage has none after it: leave out cascade.stages[1].gate"),
        (gen, ["--cascade.tau", "0.6", "--cascade.lvlm_on_val", "true"],
         "cascade.stages[0] ('small') answers in mode generate without candidate scores, which its gate "
         "'learned' needs: set cascade.stages[0].lvlm's init_args.mode score, or make it the last stage"),
        (bad_gate, ["--cascade.tau", "0.6"],
         "cascade.stages[0].gate must be one of margin, max_prob, entropy, learned, got 'logistic'"),
    ]  # fmt: skip
    for i, (stages, extra, message) in enumerate(cases):
        with pytest.raises(ValueError) as err:
            main(args(small_root, tmp_path, f"bad{i}", stages, *extra))
        assert str(err.value) == message, i
        assert not (tmp_path / f"bad{i}").exists()  # no stage ran: not even CLIP's parts
    assert ScoredLVLM.log == {}


# ------------------------------------------------------------------------------- end to end
def _check_learned_columns(run, gate: dict) -> None:
    """Stage 1's uncertainties: on val the cross-fitted ones, on test the gate fitted on all of val."""
    val = read_records(run / "val_records.parquet")
    vcols = stage_columns(run / "val_stages.parquet")
    vans = read_answers(run / "parts" / "val")
    x = stage_features(val, vans)
    right = np.asarray([vans[r.index].lvlm_choice == r.label for r in val])
    index = np.asarray([r.index for r in val])
    assert np.array_equal(vcols[1]["uncertainty"], cross_fitted_uncertainty(x, right, index))
    fitted = StageGate.fit(x, right)
    assert gate["learned_gates"]["1"] == json.loads(json.dumps(fitted.to_dict()))
    records = read_records(run / "records.parquet")
    cols = stage_columns(run / "stages.parquet")
    ans = read_answers(run / "parts")
    expected = fitted.uncertainty(stage_features(records, ans))
    assert np.array_equal(cols[1]["uncertainty"], expected, equal_nan=True)
    assert np.isfinite(expected[cols[1]["answered"]]).all()
    # the other stages' gates are as before: stage 2 (last) the margin of its scores
    big = read_answers(run / "parts" / "stage2")
    for i, r in enumerate(records):
        if r.index in big:
            assert cols[2]["uncertainty"][i] == lvlm_uncertainty(big[r.index].scores, "margin")


def test_three_stages_with_a_learned_gate_under_a_cost_budget_and_resume(small_root, truth, tmp_path):
    from cascadevlm.gating.cost import outcome, read_cost_table

    stages = _learned_stages(truth)
    stages[0]["price"], stages[1]["price"] = {"usd_per_image": 0.002}, {"usd_per_image": 0.01}
    usd = ("--cascade.cost_unit", "usd", "--cascade.clip_price", '{"usd_per_image": 0.001}',
           "--cascade.lvlm_on_val", "true", "--cascade.lvlm_on", "deferred", "--cascade.cost_budget", "6")  # fmt: skip
    m = main(args(small_root, tmp_path, None, stages, *usd))
    run = next(p for p in tmp_path.iterdir() if (p / "metrics.json").exists())
    # the gate is in the stages' identity: another run name than the same run with the margin gate
    margin = [dict(s) for s in stages]
    margin[0]["gate"] = "margin"
    h_learned, h_margin = (
        stages_identity_hash(parse_stages(s, [], 5, 10, 6.0, True)) for s in (stages, margin)
    )
    assert h_learned != h_margin and f"_st{h_learned}_" in run.name and "_deferred_" in run.name
    gate = m["gate"]
    assert m["stages"][1]["gate"] == "learned" and set(gate["learned_gates"]) == {"1"}
    _check_learned_columns(run, gate)
    # the choice on val (cross-fitted uncertainties) is within the budget there
    val = read_cost_table(run / "val_stages.parquet", run / "val_records.parquet", "usd")
    combo = tuple(gate["combination_stages"])
    ts = [gate["thresholds"][s] for s in combo[:-1]]
    ref = outcome(val, ts, combo)
    assert ref["cost_per_1000"] <= 6 + 1e-9 and ref["acc"] == pytest.approx(gate["budget_split_acc1"])
    assert ref["cost_per_1000"] == pytest.approx(gate["budget_split_cost_per_1000"])
    # test: the records are the walk at the chosen thresholds; each stage asked exactly the images reaching it
    cols = stage_columns(run / "stages.parquet")
    thresholds = [math.inf if t is None else t for t in gate["thresholds"]]
    assert combo == (0, 1, 2), combo  # the walk below is the whole chain's
    last, final = walk(cols, thresholds)
    records = read_records(run / "records.parquet")
    assert [r.final for r in records] == final.tolist()
    assert [r.deferred for r in records] == (last > 0).tolist()
    assert 0 < (last >= 2).sum() < (last >= 1).sum() < 40
    assert sorted(read_answers(run / "parts")) == [
        r.index for r, s in zip(records, last, strict=True) if s >= 1
    ]
    big = read_answers(run / "parts" / "stage2")
    assert sorted(big) == [r.index for r, s in zip(records, last, strict=True) if s >= 2]
    labels = np.asarray([r.label for r in records])
    assert m["methods"]["cascade"]["acc1"] == pytest.approx((final == labels).mean())

    # resume: the run stopped halfway through the big model's test images (its part file cut, no
    # report written); the rerun refits the same gate, asks big only what is missing, gives the same bytes
    before = {f: (run / f).read_bytes() for f in ("records.parquet", "stages.parquet", "val_stages.parquet")}
    part = run / "parts" / "stage2" / "lvlm.rank0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[: len(lines) // 2]))
    kept = {json.loads(line)["index"] for line in lines[: len(lines) // 2]}
    for f in ("metrics.json", "records.parquet", "stages.parquet"):
        (run / f).unlink()
    ScoredLVLM.log.clear()
    again = main(args(small_root, tmp_path, None, stages, *usd))
    assert "small" not in ScoredLVLM.log  # every answer of the small model (val and test) was kept
    asked = {int(k.split("/")[1]) for k in ScoredLVLM.log["big"]}
    assert asked == set(big) - kept and len(ScoredLVLM.log["big"]) == len(big) - len(kept)
    assert (run / "records.parquet").read_bytes() == before["records.parquet"]
    assert (run / "val_stages.parquet").read_bytes() == before["val_stages.parquet"]
    # stages.parquet: the same but the seconds the re-asked answers took
    new, old = (pq.read_table(pa.BufferReader(b)).drop(["seconds"]).to_pandas() for b in
                ((run / "stages.parquet").read_bytes(), before["stages.parquet"]))  # fmt: skip
    assert list(new.columns) == list(old.columns)
    for c in new.columns:
        np.testing.assert_array_equal(new[c].to_numpy(), old[c].to_numpy(), err_msg=c)
    assert again["gate"].pop("search")["seconds"] > 0 and again["gate"] == {
        k: v for k, v in gate.items() if k != "search"
    }


def test_a_learned_gate_with_fixed_thresholds_is_fitted_on_validation_first(small_root, truth, tmp_path):
    stages = _learned_stages(truth, tau=0.4)
    extra = ("--cascade.tau", "0.6", "--cascade.lvlm_on_val", "true", "--cascade.lvlm_on", "deferred")
    m = main(args(small_root, tmp_path, "fixed", stages, *extra))
    run = tmp_path / "fixed"
    assert m["gate"]["source"] == "config" and m["params"]["thresholds"] == [0.6, 0.4]
    _check_learned_columns(run, m["gate"])
    cols = stage_columns(run / "stages.parquet")
    last, final = walk(cols, [0.6, 0.4])
    records = read_records(run / "records.parquet")
    assert [r.final for r in records] == final.tolist()
    assert 0 < (last >= 2).sum() < (last >= 1).sum()
    assert (
        len(ScoredLVLM.log["big"]) == 60 + (last >= 2).sum()
    )  # every val image, then the test images reaching it
    # val_records: the walk over the cross-fitted uncertainties at the same thresholds
    vcols = stage_columns(run / "val_stages.parquet")
    _, vfinal = walk(vcols, [0.6, 0.4])
    assert [r.final for r in read_records(run / "val_records.parquet")] == vfinal.tolist()
    assert pq.read_table(run / "stages.parquet").num_rows == 3 * 40
