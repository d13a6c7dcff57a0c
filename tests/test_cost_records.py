"""Cost in every run: the two-stage cascade's records, metrics and run name are what they were without the
cost machinery; per-image seconds (CLIP's kept with the feature cache, an LVLM answer's with the answer
store), API tokens, dollars from price tables (unknown, never 0); older store entries and part files
still read."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from fake_cascade import fake_args

import cascadevlm.cascade.evaluate as evaluate_module
from cascadevlm.cascade.evaluate import COST_OPTION_DEFAULTS
from cascadevlm.cascade.lvlm_stage import LVLMResult, LVLMStage, read_answers
from cascadevlm.cascade.stages import check_price, usd_of
from cascadevlm.cli import run_evaluate as main
from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.lvlm.cache import AnswerStore, StoredAnswer
from cascadevlm.records import read_records
from cascadevlm.testing.scored_lvlm import ScoredLVLM

SCORED = "cascadevlm.testing.scored_lvlm.ScoredLVLM"


@pytest.fixture(autouse=True)
def clean_logs(clean_fake_lvlm):
    ScoredLVLM.log.clear()
    yield
    ScoredLVLM.log.clear()


def _only_run(out):
    (run,) = [p for p in out.iterdir() if (p / "metrics.json").exists()]
    return run


def test_two_stage_default_is_unchanged_by_the_cost_machinery(
    tiny_clip_path, data_root, tmp_path, monkeypatch
):
    out = tmp_path / "runs"
    a = fake_args(
        tiny_clip_path,
        data_root,
        out,
        None,
        "--cascade.tau",
        "0.02",
        "--cascade.lvlm_on",
        "deferred",
        "--answer_store",
        "null",
    )
    # the expectation: the same run with no cost written anywhere (today's code path before costs)
    with monkeypatch.context() as m:
        m.setattr(evaluate_module, "two_stage_costs", lambda *args, **kw: None)
        before = main(a)
    run = _only_run(out)
    name, records_before = run.name, (run / "records.parquet").read_bytes()
    assert not (run / "stages.parquet").exists() and "cost" not in before
    shutil.rmtree(run)

    after = main(a)
    run = _only_run(out)
    assert run.name == name  # the run name: no cost or stage part for the two-stage cascade
    assert (run / "records.parquet").read_bytes() == records_before  # byte for byte
    assert {k: v for k, v in after.items() if k != "cost"} == before
    assert not set(COST_OPTION_DEFAULTS) & set(after["config"]["cascade"])  # config as recorded before
    fingerprint = json.loads((run / "parts" / "lvlm.config.json").read_text())["config"]
    assert "stage" not in fingerprint and fingerprint["cascade"] == {
        "topk": 5,
        "incontext_shots": 0,
        "max_examples": 4,
    }

    # the cost block and stages.parquet agree with the records
    records = read_records(run / "records.parquet")
    table = pq.read_table(run / "stages.parquet").to_pandas().sort_values(["stage", "index"])
    clip, lvlm = table[table.stage == 0], table[table.stage == 1]
    assert clip.pred.tolist() == [r.clip_pred for r in records]
    assert np.allclose(clip.uncertainty, [r.entropy for r in records])
    assert lvlm.answered.tolist() == [r.deferred for r in records]  # lvlm_on deferred: asked = deferred
    assert lvlm.pred[lvlm.answered].tolist() == [r.lvlm_choice for r in records if r.deferred]
    assert (clip.seconds > 0).all() and (lvlm.seconds[lvlm.answered] >= 0).all()
    assert lvlm.usd.isna().all() and clip.usd.isna().all()  # no price: unknown, never 0
    deferred = sum(r.deferred for r in records)
    assert after["cost"]["calls"] == [40, deferred]
    assert after["cost"]["per_image"]["usd"] == "unknown"
    expected = (clip.seconds.sum() + lvlm.seconds[lvlm.answered].sum()) / 40
    assert after["cost"]["per_image"]["seconds"] == pytest.approx(expected)


def test_seconds_are_kept_with_the_feature_cache_and_the_answer_store(tiny_clip_path, data_root, tmp_path):
    out = tmp_path / "runs"
    lv = ("--lvlm.class_path", SCORED, "--lvlm.init_args.seconds_per_image", "0.01", "--cascade.tau=-inf",
          "--answer_store", "auto", "--data.limit", "12", "--cascade.lvlm_batch_size", "4",
          "--cascade.lvlm_price", '{"usd_per_image": 0.5, "usd_per_hour": 36}')  # fmt: skip
    first = main(fake_args(tiny_clip_path, data_root, out, "first", *lv))
    assert len(ScoredLVLM.log["scored-lvlm"]) == 12
    ScoredLVLM.log.clear()
    second = main(fake_args(tiny_clip_path, data_root, out, "second", *lv))
    assert ScoredLVLM.log == {}  # every answer from the store, every feature from the cache

    def cols(name):
        t = pq.read_table(out / name / "stages.parquet").to_pandas().sort_values(["stage", "index"])
        return t[t.stage == 0], t[t.stage == 1]

    (c1, l1), (c2, l2) = cols("first"), cols("second")
    assert (l1.seconds >= 0.01).all()  # measured: the backend sleeps 10 ms per image
    assert l2.seconds.tolist() == l1.seconds.tolist()  # a stored answer carries its first cost
    assert (c1.seconds > 0).all() and c2.seconds.tolist() == c1.seconds.tolist()  # the cached features' cost
    assert l2.usd.tolist() == pytest.approx((0.5 + l1.seconds * 0.01).tolist())
    for m in (first, second):
        assert m["cost"]["stages"][1]["usd_per_call"] == pytest.approx(0.5 + l1.seconds.mean() * 0.01)
        assert m["cost"]["per_image"]["usd"] == "unknown"  # CLIP has no price


def test_usd_of_a_price_table():
    assert usd_of(None, 1.0, 10, 3) is None and usd_of({}, 1.0, 10, 3) is None
    assert usd_of({"usd_per_image": 0.01}, math.nan, None, None) == 0.01
    assert usd_of({"usd_per_hour": 3.6}, 2.0, None, None) == pytest.approx(0.002)
    price = {"usd_per_1m_prompt_tokens": 2.0, "usd_per_1m_completion_tokens": 8.0, "usd_per_image": 0.001}
    assert usd_of(price, 0.5, 1000, 10) == pytest.approx(0.001 + 0.002 + 0.00008)
    assert usd_of(price, 0.5, None, None) is None  # a token rate without tokens: unknown, never 0
    assert usd_of({"usd_per_hour": 1.0}, math.nan, None, None) is None


def test_a_price_table_refuses_what_it_cannot_use():
    """A rate must be a finite number >= 0: an infinite one would make every dollar cost inf."""
    assert check_price({"usd_per_image": 2, "usd_per_hour": 0}, "p") == {
        "usd_per_image": 2.0,
        "usd_per_hour": 0.0,
    }
    for value in (math.inf, math.nan, -1.0, True, "1"):
        with pytest.raises(ValueError) as err:
            check_price({"usd_per_image": value}, "cascade.clip_price")
        assert (
            str(err.value) == f"cascade.clip_price.usd_per_image must be a finite number >= 0, got {value!r}"
        )
    with pytest.raises(
        ValueError, match=r"^cascade.clip_price has an unknown key 'usd'; known: usd_per_image"
    ):
        check_price({"usd": 1.0}, "cascade.clip_price")
    # an empty table prices nothing: refused here, not once CLIP has run and its usd cost is unknown
    with pytest.raises(ValueError) as err:
        check_price({}, "cascade.clip_price")
    assert str(err.value) == (
        "cascade.clip_price is empty: give at least one of usd_per_image, usd_per_1m_prompt_tokens, "
        "usd_per_1m_completion_tokens, usd_per_hour (or leave it unset: unknown)"
    )


def test_older_store_entries_and_part_files_still_read(tmp_path):
    store = AnswerStore(tmp_path / "answers.sqlite")
    store.put("k", "m", json.dumps({"choice": 1, "raw": "b", "scores": [0.0, 1.0], "fallback": None}))
    old = store.get_answer("k", 2)
    assert old == StoredAnswer(1, "b", [0.0, 1.0], None) and old.seconds is None and old.prompt_tokens is None
    parts = tmp_path / "parts"
    parts.mkdir()
    line = {
        "index": 3,
        "candidate_ids": [4, 5],
        "lvlm_choice": 5,
        "raw": "",
        "scores": None,
        "fallback": None,
    }
    (parts / "lvlm.rank0.jsonl").write_text(json.dumps(line) + "\n")
    (answer,) = read_answers(parts).values()
    assert answer == LVLMResult(3, [4, 5], 5, "", None, None) and answer.seconds is None


def test_api_token_usage_reaches_the_answer_and_the_store(photos, tmp_path, monkeypatch):
    from test_lvlm_api import KEY_ENV, SECRET, ChatServer, _backend

    monkeypatch.setenv(KEY_ENV, SECRET)
    reqs = [LVLMRequest(image=photos[n], candidates=[n, "horse", "rocket"], key=n) for n in ("cat", "coffee")]
    with ChatServer() as server:
        backend = _backend(server, tmp_path)
        answers = backend.choose(reqs)
        assert [(a.prompt_tokens, a.completion_tokens) for a in answers] == [(10, 3), (10, 3)]
        again = backend.choose(reqs)  # the API's own cache: no call, no tokens known
        assert [(a.prompt_tokens, a.completion_tokens) for a in again] == [(None, None), (None, None)]
        store = AnswerStore(tmp_path / "answers.sqlite")
        fresh = _backend(server, tmp_path, cache_path=None)
        stage = LVLMStage(fresh, ["cat", "coffee", "horse", "rocket"], store=store)
        batch = [
            {"index": i, "image": r.image, "candidate_ids": [i, 2, 3], "key": r.key}
            for i, r in enumerate(reqs)
        ]
        first = stage.predict_step(stage.collate()(batch))
        second = LVLMStage(fresh, stage.class_names, store=store).predict_step(stage.collate()(batch))
    assert [(r.prompt_tokens, r.completion_tokens) for r in first] == [(10, 3), (10, 3)]
    assert [(r.prompt_tokens, r.completion_tokens, r.seconds) for r in second] == [
        (r.prompt_tokens, r.completion_tokens, r.seconds) for r in first
    ]  # served by the store with what the first call cost
    assert all(r.seconds is not None and r.seconds > 0 for r in first)


@pytest.fixture
def photos():
    from lvlm_fixtures import PHOTO_CLASSES

    from cascadevlm.testing.images import sample_photos

    return {PHOTO_CLASSES[k]: v.convert("RGB") for k, v in sample_photos().items()}


def test_prices_and_the_cost_unit_name_their_own_run(tiny_clip_path, data_root, tmp_path):
    # A price or the usd unit changes the run's costs (metrics.json's cost block, stages.parquet's usd):
    # the two-stage run gets its own directory (it shared the unpriced run's and replaced its metrics);
    # the default's name is unchanged (test above). A price for an LVLM the run does not have is refused.
    out = tmp_path / "runs"
    clip_price, lvlm_price = '{"usd_per_hour": 3.6}', '{"usd_per_image": 0.5}'
    variants = {
        "default": (),
        "lvlm price": ("--cascade.lvlm_price", lvlm_price),
        "other lvlm price": ("--cascade.lvlm_price", '{"usd_per_image": 0.25}'),
        "both prices": ("--cascade.lvlm_price", lvlm_price, "--cascade.clip_price", clip_price),
        "usd": ("--cascade.lvlm_price", lvlm_price, "--cascade.clip_price", clip_price, "--cascade.cost_unit", "usd"),
    }  # fmt: skip
    for extra in variants.values():
        main(fake_args(tiny_clip_path, data_root, out, None, "--cascade.tau=-inf", *extra, limit=8))
    runs = sorted(p for p in out.iterdir() if p.name != "cache")
    assert len(runs) == len(variants), [p.name for p in runs]  # five runs, five directories: none replaced
    units = sorted(json.loads((p / "metrics.json").read_text())["cost"]["unit"] for p in runs)
    assert units == ["seconds"] * 4 + ["usd"]
    with pytest.raises(
        ValueError,
        match=r"^cascade.lvlm_price prices the LVLM, and this run has none: --cascade.lvlm_price null$",
    ):
        main(
            fake_args(
                tiny_clip_path, data_root, out, None, "--lvlm", "null", "--cascade.lvlm_price", lvlm_price
            )
        )
