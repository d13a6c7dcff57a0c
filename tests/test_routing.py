"""Routing from records: calibration, gates, conformal sets, fusion (cascadevlm/cascade/routing.py).

Real records: the tiny open_clip ViT on real Fashion-MNIST photos with a linear probe (CLIP) and a
pixel softmax regression standing in for the LVLM (see cascadevlm/testing/routing_records.py).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from cascadevlm.cascade.evaluate import combine
from cascadevlm.cascade.lvlm_stage import LVLMResult
from cascadevlm.gating.gate import tau_for_budget
from cascadevlm.gating.routing import (
    RoutingOptions,
    TopkTail,
    accuracy_at_budget,
    accuracy_curve,
    apply_routing,
    conformal_quantile,
    conformal_set_sizes,
    expected_calibration_error,
    fit_routing,
    fit_temperature,
    fused_choice,
    gate_score,
    log_softmax,
    nll,
    oracle_score,
    record_arrays,
    reliability_bins,
    restricted_choice,
    set_coverage,
)
from cascadevlm.records import PredictionRecord, read_records, write_records
from cascadevlm.testing.routing_records import fashion_mnist_routing_records


@pytest.fixture(scope="module")
def real(tiny_clip_bundle):
    return fashion_mnist_routing_records(tiny_clip_bundle, n_val=1500, n_test=1500, n_fit=1000)


def _answers(records, topk):
    """The LVLM stage's answers as ``combine`` reads them."""
    return {
        r.index: LVLMResult(r.index, r.clip_topk[:topk], r.lvlm_choice, r.lvlm_raw, r.lvlm_scores, r.fallback)
        for r in records
    }


def _bare(records):
    """CLIP-stage records (no LVLM fields), as evaluate.py passes them to ``combine``."""
    out = []
    for r in records:
        r = copy.copy(r)
        r.lvlm_choice = r.lvlm_raw = r.lvlm_scores = None
        out.append(r)
    return out


def test_records_fixture_is_realistic(real):
    """The simulated LVLM beats CLIP overall, CLIP's top-5 usually holds the label: gates have work."""
    t = record_arrays(real.test)
    clip_acc = (t.clip_pred == t.label).mean()
    lvlm_acc = (t.lvlm_choice == t.label).mean()
    assert 0.3 < clip_acc < lvlm_acc < 0.95
    assert (t.topk == t.label[:, None]).any(1).mean() > 0.85


@pytest.mark.parametrize("tau_source", ["tau", "budget"])
def test_defaults_equal_todays_cascade(real, tau_source):
    topk = 5
    clip_val = _bare(real.val)
    clip_test = _bare(real.test)
    answers = _answers(real.test, topk)
    if tau_source == "budget":  # evaluate.py: tau from the budget on the validation records' entropies
        tau = tau_for_budget([r.entropy for r in clip_val], 0.3)
        opts = RoutingOptions(budget=0.3, topk=topk)
    else:
        tau = float(np.median([r.entropy for r in clip_test]))
        opts = RoutingOptions(tau=tau, topk=topk)
    ref = combine(clip_test, answers, tau, topk)
    with_answers = combine(clip_test, answers, math.inf, topk)  # answers attached, nothing deferred
    got, info = apply_routing(with_answers, clip_val, opts)
    assert opts.is_paper_cascade() and not RoutingOptions(gate="margin").is_paper_cascade()
    assert got == ref
    assert 0.2 < info["deferral"] < 0.6


def test_defaults_equal_cascade_when_only_deferred_images_were_asked(real):
    """``lvlm_on: deferred``: confident images have no answer; a deferred one without an answer fails
    with combine's message."""
    topk, tau = 5, 1.0
    clip_test = _bare(real.test)
    sent = [r for r in clip_test if r.entropy > tau]
    answers = {k: v for k, v in _answers(real.test, topk).items() if k in {r.index for r in sent}}
    ref = combine(clip_test, answers, tau, topk)
    got, _ = apply_routing(combine(clip_test, answers, math.inf, topk), None, RoutingOptions(tau=tau))
    assert got == ref
    with pytest.raises(RuntimeError, match="was deferred but has no LVLM answer"):
        apply_routing(combine(clip_test, answers, math.inf, topk), None, RoutingOptions(tau=tau / 2))


def test_temperature_lowers_validation_nll_and_keeps_top1(real):
    v = record_arrays(real.val)
    t = fit_temperature(v.logits, v.label)
    assert t != pytest.approx(1.0, abs=1e-3)
    assert nll(v.logits, v.label, t) < nll(v.logits, v.label) - 1e-4
    for lo in (1.05, 0.95):  # a minimum: nudging T either way is worse
        assert nll(v.logits, v.label, t) <= nll(v.logits, v.label, t * lo) + 1e-9
    te = record_arrays(real.test)
    np.testing.assert_array_equal(log_softmax(te.logits, t).argmax(1), te.logits.argmax(1))
    np.testing.assert_array_equal(te.logits.argmax(1), te.clip_pred)


def test_temperature_fixes_a_known_miscalibration():
    """Logits drawn calibrated, then sharpened x3: the fitted temperature is ~3 and ECE drops."""
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(6000, 10, generator=g)
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1).numpy()
    sharp = 3.0 * logits.numpy()
    t = fit_temperature(sharp, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    ece_before = expected_calibration_error(np.exp(log_softmax(sharp)), labels)
    ece_after = expected_calibration_error(np.exp(log_softmax(sharp, t)), labels)
    assert ece_after < ece_before / 3


def test_reliability_bins_give_torchmetrics_ece(real):
    te = record_arrays(real.test)
    p = np.exp(log_softmax(te.logits))
    bins = reliability_bins(p, te.label, 15)
    n = np.array(bins["count"])
    ece = (n * np.abs(np.array(bins["accuracy"]) - np.array(bins["confidence"]))).sum() / n.sum()
    assert ece == pytest.approx(expected_calibration_error(p, te.label, 15), abs=1e-5)
    assert n.sum() == len(te)


@pytest.mark.parametrize("method", ["aps", "raps"])
def test_conformal_coverage_over_random_splits(real, method):
    """Pooled real records, 100 random calibration/test splits: mean coverage >= 1 - alpha - 0.01,
    each split within sampling noise; sets shrink as alpha grows."""
    a = record_arrays(real.val + real.test)
    logp = log_softmax(a.logits)
    rng = np.random.default_rng(0)
    mean_size = {}
    for alpha in (0.05, 0.1, 0.2):
        cov, size = [], []
        for _ in range(100):
            perm = rng.permutation(len(a))
            cal, test = perm[:1000], perm[1000:]
            q = conformal_quantile(logp[cal], a.label[cal], alpha, method)
            sizes = conformal_set_sizes(logp[test], q, method)
            cov.append(set_coverage(logp[test], a.label[test], sizes))
            size.append(sizes.mean())
        assert np.mean(cov) >= 1 - alpha - 0.01, (alpha, np.mean(cov))
        assert min(cov) >= 1 - alpha - 0.05
        mean_size[alpha] = float(np.mean(size))
    assert mean_size[0.05] > mean_size[0.1] > mean_size[0.2] >= 1.0
    assert mean_size[0.2] < 10  # informative: not every class


def test_conformal_sets_are_capped_and_one_class_sets_are_not_sent(real):
    wide = fit_routing(real.val, RoutingOptions(candidates="aps", alpha=0.02, tau=-math.inf, topk=5))
    v = record_arrays(real.test)
    assert (conformal_set_sizes(wide.log_probs(v), wide.qhat) > 5).any()  # uncapped sets can be larger
    assert wide.decide(real.test)[1].max() == 5
    opts = RoutingOptions(candidates="aps", alpha=0.3, tau=-math.inf, topk=5)
    recs, info = apply_routing(real.test, real.val, opts)
    sent, sizes = fit_routing(real.val, opts).decide(real.test)
    assert sizes.min() == 1 and (sizes == 1).any() and (sizes > 1).any()
    assert [r.deferred for r in recs] == list(sizes > 1) == list(sent)
    assert info["mean_set_size"] == pytest.approx(sizes.mean())
    for r, s in zip(recs, sizes, strict=True):
        if not r.deferred:
            assert r.final == r.clip_pred
        else:
            assert r.final in r.clip_topk[:s]
    with pytest.raises(ValueError, match="the LVLM was shown 5 candidates but routing topk is 3"):
        apply_routing(real.test, real.val, RoutingOptions(candidates="aps", tau=-math.inf, topk=3))


def test_restricted_choice_takes_the_best_scored_candidate_in_the_set():
    r = PredictionRecord(0, 2, [0, 1, 2, 3, 4], [0.4, 0.3, 0.1, 0.1, 0.1], 1.0, 0, lvlm_choice=2,
                         lvlm_scores=[-2.0, -1.0, -0.1, -3.0, -3.0])  # fmt: skip
    no_scores = PredictionRecord(1, 2, [0, 1, 2, 3, 4], [0.4, 0.3, 0.1, 0.1, 0.1], 1.0, 0, lvlm_choice=2)
    a = record_arrays([r, no_scores], num_classes=5)
    assert restricted_choice(a, np.array([5, 5]), 5).tolist() == [2, 2]
    assert restricted_choice(a, np.array([2, 2]), 5).tolist() == [1, 0]  # best of {0, 1}; CLIP top-1
    assert restricted_choice(a, np.array([3, 3]), 5).tolist() == [2, 2]


def test_oracle_is_never_below_any_gate_at_any_budget(real):
    te = record_arrays(real.test)
    logp = log_softmax(te.logits)
    clip_ok = te.clip_pred == te.label
    sent_ok = te.lvlm_choice == te.label
    _, oracle = accuracy_curve(oracle_score(clip_ok, sent_ok), clip_ok, sent_ok)
    fit = fit_routing(real.val, RoutingOptions(gate="learned"))
    scores = {g: gate_score(g, logp) for g in ("entropy", "max_prob", "margin")}
    scores["learned"] = fit.scores(te, logp)
    scores["random"] = np.random.default_rng(0).random(len(te))
    for name, s in scores.items():
        frac, acc = accuracy_curve(s, clip_ok, sent_ok)
        assert (oracle >= acc - 1e-12).all(), name
        assert acc[0] == pytest.approx(clip_ok.mean()) and acc[-1] == pytest.approx(sent_ok.mean())
    assert accuracy_at_budget(frac, oracle, 0.3) > accuracy_at_budget(frac, acc, 0.3)


def test_gates_beat_random_routing_on_held_out_records(real):
    """Every uncertainty gate sends the images the LVLM fixes more often than chance (test split)."""
    te = record_arrays(real.test)
    logp = log_softmax(te.logits)
    clip_ok, sent_ok = te.clip_pred == te.label, te.lvlm_choice == te.label
    rand = np.mean([accuracy_at_budget(*accuracy_curve(np.random.default_rng(s).random(len(te)), clip_ok, sent_ok), 0.3)
                    for s in range(5)])  # fmt: skip
    fit = fit_routing(real.val, RoutingOptions(gate="learned"))
    for name, s in {
        "entropy": gate_score("entropy", logp),
        "margin": gate_score("margin", logp),
        "learned": fit.scores(te, logp),
    }.items():
        assert accuracy_at_budget(*accuracy_curve(s, clip_ok, sent_ok), 0.3) > rand + 0.03, name


def test_budget_is_honoured_on_validation_for_every_gate(real):
    for gate in ("entropy", "max_prob", "margin", "learned"):
        opts = RoutingOptions(gate=gate, budget=0.2, calibration="temperature")
        fit = fit_routing(real.val, opts)
        sent, _ = fit.decide(real.val)
        assert 0.17 <= sent.mean() <= 0.2, gate
        _, info = apply_routing(real.test, real.val, opts)
        assert abs(info["deferral"] - 0.2) < 0.05, gate


def test_fusion_weight_is_chosen_on_validation_and_not_worse_there(real):
    hard = RoutingOptions(tau=-math.inf)
    fused = RoutingOptions(tau=-math.inf, fusion="logprob")
    fit = fit_routing(real.val, fused)
    assert 0.0 <= fit.fusion_weight <= 1.0
    v_hard, _ = apply_routing(real.val, real.val, hard)
    v_fused, info = apply_routing(real.val, real.val, fused)
    acc = lambda rs: np.mean([r.final == r.label for r in rs])  # noqa: E731
    assert acc(v_fused) >= acc(v_hard)
    assert info["fusion_weight"] == fit.fusion_weight
    # weight 1 with a score-mode LVLM is the hard cascade; weight 0 is CLIP alone
    one, _ = apply_routing(
        real.test, None, RoutingOptions(tau=-math.inf, fusion="logprob", fusion_weight=1.0)
    )
    assert [r.final for r in one] == [r.lvlm_choice for r in real.test]
    zero, _ = apply_routing(
        real.test, None, RoutingOptions(tau=-math.inf, fusion="logprob", fusion_weight=0.0)
    )
    assert [r.final for r in zero] == [r.clip_pred for r in real.test]


def test_options_are_refused_up_front_in_one_line(real):
    with pytest.raises(ValueError, match="routing gate 'oracle' is unknown"):
        apply_routing(real.test, real.val, RoutingOptions(gate="oracle"))
    with pytest.raises(ValueError, match="conformal alpha must be in"):
        apply_routing(real.test, real.val, RoutingOptions(candidates="aps", alpha=1.5))
    with pytest.raises(ValueError, match="fitted on validation records"):
        apply_routing(real.test, None, RoutingOptions(calibration="temperature"))
    with pytest.raises(ValueError, match="cascade.lvlm_on: all"):
        apply_routing(real.test, _bare(real.val), RoutingOptions(gate="learned", budget=0.3))


def test_records_without_logits_fall_back_to_the_stored_topk(real, tmp_path):
    """Old tables (no clip_logits column) still read; routing rebuilds log-probs from the top-k and says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_records(tmp_path / "new.parquet", real.test[:50])
    back = read_records(path)
    assert back[0].clip_logits == pytest.approx(real.test[0].clip_logits, rel=1e-6)
    old = pq.read_table(path).drop(["clip_logits"])
    pq.write_table(old, tmp_path / "old.parquet")
    legacy = read_records(tmp_path / "old.parquet")
    assert all(r.clip_logits is None for r in legacy)
    _, info = apply_routing(legacy, legacy, RoutingOptions(calibration="temperature", tau=1.0, topk=5))
    assert "approximated" in info["notes"][0]
    a = record_arrays(legacy, num_classes=10)
    assert isinstance(a.logits, TopkTail)  # top-k columns and one tail column (tests/test_routing_scale.py)
    np.testing.assert_allclose(
        np.exp(log_softmax(a.logits)).take(a.topk), [r.clip_topk_probs for r in legacy], rtol=1e-5
    )
    assert isinstance(pa.__version__, str)


def test_fusion_with_a_partly_scored_candidate_list():
    """A candidate without a score never wins for w > 0 and w = 0 is CLIP's top-1 (no NaN argmax)."""
    r = PredictionRecord(0, 1, [0, 1, 2, 3, 4], [0.5, 0.2, 0.1, 0.1, 0.1], 1.0, 0, lvlm_choice=1,
                         lvlm_scores=[-3.0, -0.1, float("nan"), -2.0, -2.0])  # fmt: skip
    a = record_arrays([r], num_classes=5)
    logp = np.log(np.array([[0.5, 0.2, 0.1, 0.1, 0.1]]))
    sizes = np.array([5])
    assert fused_choice(a, logp, sizes, 0.0).tolist() == [0]
    assert fused_choice(a, logp, sizes, 1.0).tolist() == [1]
    assert fused_choice(a, logp, sizes, 0.5).tolist() == [1]


# ------------------------------------------------------------------------------ RAPS as its paper tunes it
def test_raps_tunes_k_reg_and_lambda_on_a_split_of_the_calibration_records(real):
    """RAPS's code (pick_kreg, pick_lamda_size, pct_paramtune=0.3), reimplemented here by brute force."""
    opts = RoutingOptions(candidates="raps", alpha=0.1, tau=-math.inf, topk=10)
    fit = fit_routing(real.val, opts)
    v = record_arrays(real.val)
    logp = fit.log_probs(v)
    rows = np.flatnonzero(v.label >= 0)
    perm = np.random.default_rng(0).permutation(rows)
    n_tune = int(0.3 * len(rows))
    tune, cal = np.sort(perm[:n_tune]), np.sort(perm[n_tune:])
    # k_reg: 1 + the ceil((n-1)(1-alpha))-th smallest 0-based rank of the label on the tuning records
    ranks = np.array(
        [
            list(np.argsort(-row, kind="stable")).index(y)
            for row, y in zip(logp[tune], v.label[tune], strict=True)
        ]
    )
    k_reg = int(np.sort(ranks)[math.ceil((len(ranks) - 1) * 0.9)]) + 1
    sizes = {}
    for lam in (0.001, 0.01, 0.1, 0.2, 0.5):
        q = conformal_quantile(logp[tune], v.label[tune], 0.1, "raps", lam, k_reg)
        sizes[lam] = conformal_set_sizes(logp[tune], q, "raps", lam, k_reg).mean()
    lam = min(sizes, key=lambda k: (sizes[k], list(sizes).index(k)))
    assert fit.raps == (lam, k_reg)
    assert fit.qhat == conformal_quantile(logp[cal], v.label[cal], 0.1, "raps", lam, k_reg)  # on the rest
    assert (
        f"raps: lambda {lam:g}, k_reg {k_reg} tuned on {len(tune)} calibration records; quantile on {len(cal)}"
        in fit.notes
    )
    _, info = apply_routing(real.test, real.val, opts)
    assert (info["raps_lambda"], info["raps_k_reg"]) == (lam, k_reg)
    # given values are used as they are, the quantile on every calibration record
    given = fit_routing(
        real.val, RoutingOptions(candidates="raps", alpha=0.1, raps_lambda=0.05, raps_k_reg=2)
    )
    assert given.raps == (0.05, 2)
    assert given.qhat == conformal_quantile(logp[rows], v.label[rows], 0.1, "raps", 0.05, 2)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"raps_tune_fraction": 1.5}, r"raps_tune_fraction must be in \(0, 1\), got 1.5"),
        ({"raps_k_reg": -1}, r"raps_lambda and raps_k_reg must be >= 0 \(or None: tuned"),
        ({"raps_lambda": -0.1}, r"raps_lambda and raps_k_reg must be >= 0 \(or None: tuned"),
    ],
)
def test_bad_raps_options_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        RoutingOptions(candidates="raps", **kw).validate()
