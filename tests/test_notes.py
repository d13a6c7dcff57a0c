"""Weight notes come from provenance marks, never from a name; deferred analysis uses cascade.topk."""

from __future__ import annotations

import json

import pytest
from fake_cascade import fake_args
from safetensors.torch import load_file, save_file

from cascadevlm.cascade.evaluate import DEMO_ON_OTHER_DATA_NOTE, RANDOM_WEIGHTS_NOTE, TRAINED_DEMO_NOTE
from cascadevlm.cli import run_evaluate as main
from cascadevlm.provenance import write_provenance
from cascadevlm.records import PredictionRecord
from cascadevlm.report.analysis import deferred_analysis


def _notes(tmp_path, name) -> list[str]:
    return json.loads((tmp_path / name / "metrics.json").read_text())["notes"]


def test_random_weight_notes_follow_the_mark_not_the_word_tiny(tiny_clip_path, data_root, tmp_path):
    # the same tiny weights without the mark, in a path full of "tiny": a stand-in for a real model
    unmarked = tmp_path / "tiny-models" / "tiny_real.safetensors"
    unmarked.parent.mkdir()
    save_file(load_file(str(tiny_clip_path)), str(unmarked))
    lvlm_plain = tmp_path / "tiny-lvlm"
    lvlm_plain.mkdir()
    lvlm_marked = tmp_path / "some-lvlm"
    lvlm_marked.mkdir()
    write_provenance(lvlm_marked, {"kind": "random", "description": "seeded random weights"})

    args = fake_args(
        unmarked, data_root, tmp_path, "plain", "--lvlm.init_args.model", str(lvlm_plain), limit=8
    )
    main(args)
    assert _notes(tmp_path, "plain") == []

    args = fake_args(tiny_clip_path, data_root, tmp_path, "marked", "--lvlm.init_args.model", str(lvlm_marked),
                     limit=8)  # fmt: skip
    main(args)
    assert _notes(tmp_path, "marked") == [RANDOM_WEIGHTS_NOTE["CLIP"], RANDOM_WEIGHTS_NOTE["LVLM"]]

    demo = tmp_path / "demo-lvlm"
    demo.mkdir()
    write_provenance(demo, {"kind": "trained-demo", "description": "trained here"})
    main(fake_args(unmarked, data_root, tmp_path, "demo", "--lvlm.init_args.model", str(demo), limit=8))
    assert _notes(tmp_path, "demo") == [TRAINED_DEMO_NOTE]
    assert "trained here on Fashion-MNIST's train split, evaluated on its test split" in TRAINED_DEMO_NOTE


def test_the_demo_note_names_its_data_only_for_the_demos_data(
    tiny_clip_path, data_root, photo_folder, tmp_path
):
    """Demo weights on another dataset used to get the note "evaluated on its test split" (of Fashion-MNIST)."""
    demo = tmp_path / "demo-lvlm"
    demo.mkdir()
    write_provenance(demo, {"kind": "trained-demo", "description": "trained here"})
    main(fake_args(tiny_clip_path, data_root, tmp_path, "photos", "--lvlm.init_args.model", str(demo),
                   "--data.dataset", str(photo_folder), "--cascade.topk", "2", limit=8))  # fmt: skip
    assert _notes(tmp_path, "photos") == [RANDOM_WEIGHTS_NOTE["CLIP"], DEMO_ON_OTHER_DATA_NOTE]


def test_topk_coverage_counts_only_the_candidates_shown():
    def rec(i, label, topk, deferred=True):
        return PredictionRecord(index=i, label=label, clip_topk=topk, clip_topk_probs=[0.2] * len(topk),
                                entropy=1.0, clip_pred=topk[0], deferred=deferred, lvlm_choice=topk[0])  # fmt: skip

    records = [rec(0, 4, [0, 1, 2, 3, 4]), rec(1, 1, [0, 1, 2, 3, 4]), rec(2, 2, [2, 0, 1, 3, 4], False)]
    shown3 = deferred_analysis(records, 5, topk=3)
    assert shown3["topk_coverage_deferred"] == pytest.approx(0.5)  # label 4 is 5th: not shown at topk 3
    assert shown3["topk_coverage_all"] == pytest.approx(2 / 3)
    assert deferred_analysis(records, 5, topk=5)["topk_coverage_deferred"] == 1.0


def test_cascade_reports_coverage_at_cascade_topk(tiny_clip_path, data_root, tmp_path):
    out = main(fake_args(tiny_clip_path, data_root, tmp_path, "r", "--cascade.topk", "1", "--cascade.tau=-inf",
                         limit=20))  # fmt: skip
    # with one candidate the LVLM can only be right where CLIP's top-1 is
    assert out["deferred"]["topk_coverage_deferred"] == pytest.approx(out["methods"]["clip"]["acc1"])
