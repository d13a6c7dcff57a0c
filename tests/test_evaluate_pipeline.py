"""The cascade's wiring against references computed here: tau from the budget split's own records, the
final answer per image (``lvlm_on: all``), the LVLM's answer for its own image and candidates, the query
never its own in-context example; options refused before any stage; failed LVLM calls stop the run.

An oracle LVLM (:mod:`cascadevlm.testing.oracle_lvlm`) that knows every image's class from its pixels
makes the answers checkable; a small copy of Fashion-MNIST (12 train rows per class, 80 val, 60 test) keeps
each run to seconds. tools/planted_bugs.py plants the bugs these tests must catch.
"""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from fake_cascade import fake_args

from cascadevlm.cli import evaluate_main
from cascadevlm.cli import run_evaluate as main
from cascadevlm.data.loading import IMAGE_COLUMN, decode_image, load_dataset_dict
from cascadevlm.gating.gate import tau_for_budget
from cascadevlm.lvlm.api_backend import API_ERROR
from cascadevlm.records import read_records
from cascadevlm.testing.fake_lvlm import FakeLVLM
from cascadevlm.testing.oracle_lvlm import image_digest, write_truth

ORACLE = "cascadevlm.testing.oracle_lvlm.OracleLVLM"
SIZES = {"train": 120, "val": 80, "test": 60}
TOPK = 5

pytestmark = pytest.mark.usefixtures("clean_fake_lvlm")


@pytest.fixture(scope="module")
def small(data_root, tmp_path_factory):
    """A small Fashion-MNIST (the first rows of each split) and the oracle's answer key for it."""
    root = tmp_path_factory.mktemp("small")
    full = load_dataset_dict(str(data_root / "fashion_mnist"))
    labels = np.array(full["train"]["label"])  # the first train rows lack classes: 12 of each instead
    train_rows = np.sort(
        np.concatenate([np.flatnonzero(labels == c)[: SIZES["train"] // 10] for c in range(10)])
    )
    dsd = datasets.DatasetDict({"train": full["train"].select(train_rows),
                                **{s: full[s].select(range(SIZES[s])) for s in ("val", "test")}})  # fmt: skip
    dsd.save_to_disk(str(root / "fashion_mnist"))
    names = dsd["test"].features["label"].names
    images = [(decode_image(row[IMAGE_COLUMN], s), names[row["label"]]) for s in SIZES for row in dsd[s]]
    truth = write_truth(root / "truth.json", images)
    return {"root": root, "truth": root / "truth.json", "dsd": dsd, "known": set(truth)}


def _oracle_args(tiny_clip_path, small, out, name, *extra) -> list[str]:
    return fake_args(tiny_clip_path, small["root"], out, name, "--lvlm.class_path", ORACLE,
                     "--lvlm.init_args.truth", str(small["truth"]), *extra, limit=SIZES["test"])  # fmt: skip


@pytest.fixture(scope="module")
def budget_run(tiny_clip_path, small, tmp_path_factory):
    """The demo's setting on the small data: budget 0.3 on val, ``lvlm_on: all``; and CLIP alone on val."""
    out = tmp_path_factory.mktemp("runs")
    metrics = main(_oracle_args(tiny_clip_path, small, out, "all", "--cascade.budget", "0.3",
                                "--cascade.lvlm_on", "all"))  # fmt: skip
    main(fake_args(tiny_clip_path, small["root"], out, "val", "--lvlm", "null", "--data.split", "val",
                   limit=SIZES["val"]))  # fmt: skip
    return {
        "metrics": metrics,
        "records": read_records(out / "all" / "records.parquet"),
        "gate": json.loads((out / "all" / "gate.json").read_text()),
        "val": read_records(out / "val" / "records.parquet"),
    }


# ------------------------------------------------------------------------------------------ the gate
def test_budget_tau_is_chosen_on_the_budget_splits_own_records(budget_run):
    val_entropies = [r.entropy for r in budget_run["val"]]
    assert len(val_entropies) == SIZES["val"]
    tau = tau_for_budget(val_entropies, 0.3)
    gate = budget_run["gate"]
    assert gate["tau"] == pytest.approx(tau, rel=1e-9)
    assert gate["source"] == "budget 0.3 on val"
    assert gate["budget_split_deferral"] == pytest.approx(np.mean(np.array(val_entropies) > tau))
    # the evaluated images would give another tau: this test can tell the two apart
    test_tau = tau_for_budget([r.entropy for r in budget_run["records"]], 0.3)
    assert abs(test_tau - tau) > 1e-6
    assert budget_run["metrics"]["params"]["tau"] == pytest.approx(tau, rel=1e-9)


def test_lvlm_on_all_final_is_clip_where_confident_and_the_lvlm_where_deferred(budget_run):
    records, tau = budget_run["records"], budget_run["gate"]["tau"]
    deferred = [r.entropy > tau for r in records]  # the gate, written out: uncertain images are sent
    assert 0 < sum(deferred) < len(records)
    assert [r.deferred for r in records] == deferred
    assert all(r.lvlm_choice is not None for r in records)  # lvlm_on all: an answer everywhere
    # the LVLM disagrees with CLIP on some confident images: a final taken from it there would show
    assert any(r.lvlm_choice != r.clip_pred for r, d in zip(records, deferred, strict=True) if not d)
    expected = [r.lvlm_choice if d else r.clip_pred for r, d in zip(records, deferred, strict=True)]
    assert [r.final for r in records] == expected
    acc = np.mean([f == r.label for f, r in zip(expected, records, strict=True)])
    methods = budget_run["metrics"]["methods"]
    assert budget_run["metrics"]["metrics"]["acc1"] == pytest.approx(acc)
    assert methods["cascade"]["acc1"] == pytest.approx(acc)
    assert methods["cascade"]["deferral"] == pytest.approx(np.mean(deferred))


def test_each_lvlm_answer_is_for_its_own_image_its_label_and_candidates_in_clips_order(budget_run, small):
    """The oracle answers the true class when it is a candidate, else the first candidate: any image,
    candidate order, answer position or label mix-up makes the recorded choice differ."""
    records = budget_run["records"]
    labels = small["dsd"]["test"]["label"]
    assert [r.label for r in records] == labels[: len(records)]
    checked = top1_wrong = off_middle = 0
    for r in records:
        image = decode_image(small["dsd"]["test"][r.index][IMAGE_COLUMN], "test")
        if image_digest(image) not in small["known"]:
            continue
        candidates = r.clip_topk[:TOPK]
        expected = r.label if r.label in candidates else candidates[0]
        assert r.lvlm_choice == expected, (r.index, r.label, candidates, r.lvlm_choice)
        checked += 1
        top1_wrong += r.label in candidates[1:]
        off_middle += r.label in candidates and candidates.index(r.label) != TOPK // 2
    # enough images where CLIP's top-1 is wrong but the label is a candidate, and where reversing the
    # candidates moves the label, for those bugs to show
    assert checked >= len(records) - 2 and top1_wrong >= 5 and off_middle >= 5


def test_a_query_is_never_its_own_in_context_example(tiny_clip_path, small, tmp_path):
    """Evaluating the k-shot split's own split: every train row is asked, the 4-shot rows included."""
    main(fake_args(tiny_clip_path, small["root"], tmp_path, "r", "--data.split", "train", "--data.shots", "4",
                   "--cascade.incontext_shots", "1", "--cascade.tau=-inf", "--cascade.lvlm_on", "deferred",
                   limit=SIZES["train"]))  # fmt: skip
    assert len(FakeLVLM.log) == SIZES["train"]
    shown_itself = 0
    for req in FakeLVLM.log:
        query = image_digest(req.image)
        shown_itself += any(image_digest(ex.image) == query for ex in req.examples)
        assert len(req.examples) == 4  # max_examples: every candidate still has an example (another shot)
    assert shown_itself == 0


# ------------------------------------------------------------------------------------------ options
def test_selection_on_the_evaluated_split_is_refused_unless_asked_and_then_marked(
    tiny_clip_path, small, tmp_path
):
    args = ("--cascade.budget", "0.3", "--cascade.budget_split", "test")
    with pytest.raises(ValueError) as err:
        main(fake_args(tiny_clip_path, small["root"], tmp_path, "r", *args))
    assert str(err.value) == (
        "cascade.budget_split is the evaluated split data.split 'test': tau (and any fitted routing) would be "
        "chosen on the very images the accuracy is measured on; set --cascade.budget_split to another split "
        "(e.g. val), or --cascade.allow_selection_on_eval true to accept it (marked in the run name and "
        "metrics.json)"
    )
    assert not (tmp_path / "r").exists() and FakeLVLM.log == []
    honest = main(
        fake_args(tiny_clip_path, small["root"], tmp_path / "honest", None, "--cascade.budget", "0.3")
    )
    out = main(fake_args(tiny_clip_path, small["root"], tmp_path / "asked", None, *args,
                         "--cascade.allow_selection_on_eval", "true"))  # fmt: skip
    (run_dir,) = [d for d in (tmp_path / "asked").iterdir() if d.is_dir() and d.name != "cache"]
    assert "selOnEval" in run_dir.name
    assert out["params"]["selection_on_eval"] is True and honest["params"]["selection_on_eval"] is False
    assert out["gate"]["source"] == "budget 0.3 on test"
    (honest_dir,) = [d for d in (tmp_path / "honest").iterdir() if d.is_dir() and d.name != "cache"]
    assert "selOnEval" not in honest_dir.name


def test_a_tau_beside_a_configs_budget_is_refused_in_one_line(tiny_clip_path, small, tmp_path, capsys):
    """Through the real entry point and parser: the config sets a budget (as configs/demo.yaml does)."""
    config = tmp_path / "budget.yaml"
    config.write_text("cascade:\n  budget: 0.3\n  budget_split: val\n")
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--config", str(config), *fake_args(tiny_clip_path, small["root"], tmp_path, "r",
                                                           "--cascade.tau", "0.5")])  # fmt: skip
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: cascade.tau 0.5 and cascade.budget 0.3 are both set, and the budget chooses tau: give one, "
        "e.g. --cascade.budget null to use the tau"
    )
    assert not (tmp_path / "r").exists() and FakeLVLM.log == []
    # clearing the budget as the message says: the tau is used
    out = main(["--config", str(config), *fake_args(tiny_clip_path, small["root"], tmp_path, "r",
                                                    "--cascade.tau", "0.5", "--cascade.budget", "null")])  # fmt: skip
    assert out["gate"] == {"tau": 0.5, "source": "config"}


def test_sweep_points_are_bounded(tiny_clip_path, small, tmp_path):
    with pytest.raises(ValueError) as err:
        main(fake_args(tiny_clip_path, small["root"], tmp_path, "r", "--cascade.sweep_points", "1000000000"))
    assert str(err.value) == (
        "cascade.sweep_points must be <= 10000 (each point is a pass over the records), got 1000000000: "
        "set --cascade.sweep_points"
    )
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ failed calls
def test_a_run_whose_lvlm_calls_failed_stops_in_one_line_and_keeps_its_answers(
    tiny_clip_path, small, tmp_path, capsys
):
    args = fake_args(tiny_clip_path, small["root"], tmp_path, "r", "--cascade.tau=-inf",
                     "--cascade.lvlm_on", "deferred", limit=20)  # fmt: skip
    keys = [f"test/{i}" for i in range(20)]

    def run(failing: int) -> str:
        FakeLVLM.log.clear()
        FakeLVLM.fail_keys = set(keys[:failing])
        with pytest.raises(SystemExit) as exit_:
            evaluate_main(args)
        assert exit_.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert run(20) == (
        "error: none of the 20 LVLM calls succeeded (the records would hold CLIP's top-1 under the LVLM's "
        "name); the answers received are cached: rerun the same command once the LVLM answers (it asks only "
        "the failed images), or raise --cascade.max_failed_fraction"
    )
    assert not (tmp_path / "r" / "metrics.json").exists() and len(FakeLVLM.log) == 20
    assert run(11).startswith(
        "error: 11 of 20 LVLM calls failed, more than cascade.max_failed_fraction 0.5 (the records"
    )
    assert len(FakeLVLM.log) == 20  # every call had failed: all asked again
    assert not (tmp_path / "r" / "metrics.json").exists()
    FakeLVLM.log.clear()
    FakeLVLM.fail_keys = set(keys[:10])  # half failed: at the documented limit, the run goes on
    out = main(args)
    assert sorted(r.key for r in FakeLVLM.log) == sorted(keys[:11])  # only the failed ones asked again
    assert out["params"]["lvlm_api_errors"] == 10
    recs = read_records(tmp_path / "r" / "records.parquet")
    assert [r.index for r in recs if r.fallback == API_ERROR] == list(range(10))
    FakeLVLM.log.clear()
    FakeLVLM.fail_keys = set()
    assert main([*args, "--cascade.max_failed_fraction", "0"])["params"]["lvlm_api_errors"] == 0
    assert sorted(r.key for r in FakeLVLM.log) == sorted(keys[:10])
