"""Stage-2 prompt augmentation in cascadevlm/lvlm/lora.py: names in varied spellings (one scheme per
prompt) and a share of lettered prompts, both options whose defaults keep the earlier prompts exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lvlm_fixtures import llava_dir  # noqa: F401
from PIL import Image

from cascadevlm.lvlm.lora import CascadePromptDataset, LoRAModule, collate_prompts, training_candidates

NAMES = ["cat", "dog", "horse", "cow", "duck", "owl"]
UPPER = [n.upper() for n in NAMES]
PLURAL = [n + "s" for n in NAMES]
ROWS = list(range(300))


def _ds(n: int = 300) -> list[dict]:
    im = Image.new("RGB", (8, 8), (120, 30, 200))
    return [{"image": im, "label": r % len(NAMES)} for r in range(n)]


def _topk(rows) -> dict[int, list[int]]:  # CLIP's top-k on every other row, as the demo's records
    return {r: [(r + j) % len(NAMES) for j in range(5)] for r in rows if r % 2 == 0}


def test_defaults_give_the_earlier_prompts_exactly():
    ds, topk = _ds(), _topk(ROWS)
    data = CascadePromptDataset(ds, ROWS, NAMES, 4, 3, topk)
    for r in ROWS:
        ids, target = training_candidates(r % len(NAMES), len(NAMES), 4, 3, r, topk.get(r))
        item = data[r]
        assert item["candidates"] == [NAMES[c] for c in ids] and item["target"] == target
        assert "options" not in item
    assert "options" not in collate_prompts([data[r] for r in range(4)])


def test_each_prompt_names_every_candidate_in_one_drawn_scheme_and_the_candidates_do_not_change():
    ds, topk = _ds(), _topk(ROWS)
    schemes = [NAMES, UPPER, PLURAL]
    data = CascadePromptDataset(ds, ROWS, NAMES, 4, 3, topk, name_variants=schemes)
    used = []
    for r in ROWS:
        ids, target = training_candidates(r % len(NAMES), len(NAMES), 4, 3, r, topk.get(r))
        item = data[r]
        which = [s for s, names in enumerate(schemes) if item["candidates"] == [names[c] for c in ids]]
        assert len(which) == 1 and item["target"] == target, item["candidates"]
        assert data[r]["candidates"] == item["candidates"]  # deterministic in (seed, row)
        used.append(which[0])
    counts = np.bincount(used, minlength=3)
    assert counts.min() >= 70, counts  # uniform: 100 each expected (binomial sd 8)
    # a zero weight is never drawn, and the weights set the shares
    weighted = CascadePromptDataset(
        ds, ROWS, NAMES, 4, 3, topk, name_variants=schemes, name_weights=[3, 1, 0]
    )
    firsts = [weighted[r]["candidates"][0] for r in ROWS]
    assert not any(f in PLURAL for f in firsts)
    assert 190 <= sum(f in NAMES for f in firsts) <= 260  # 225 expected (sd 7.5)


def test_a_share_of_prompts_is_lettered_and_the_module_asks_and_answers_them_by_letter(llava_dir):  # noqa: F811
    data = CascadePromptDataset(_ds(), ROWS, NAMES, 4, 3, {}, letters_fraction=0.25)
    modes = [data[r]["options"] for r in ROWS]
    assert set(modes) == {"letters", "names"} and 50 <= modes.count("letters") <= 100  # 75 expected (sd 7.5)
    module = LoRAModule(model=str(llava_dir), finetune="full")
    rows = [modes.index("letters"), modes.index("names")]
    batch = collate_prompts([data[r] for r in rows])
    assert batch["options"] == ["letters", "names"]
    lettered, named = module._prompts(batch)
    assert lettered.style == "letters" and lettered.answers == ["A", "B", "C", "D"]
    assert named.style == "names" and named.answers == batch["candidates"][1]
    assert module.prompt.options == "letters"  # the module's own wording is left as it was
    assert torch.isfinite(module.loss(batch))


def test_bad_augmentation_options_are_refused_in_one_line():
    ds = _ds(10)
    with pytest.raises(ValueError, match=r"^a name variant has 2 names for 6 classes: \['a', 'b'\] \(--data"):
        CascadePromptDataset(ds, ROWS[:10], NAMES, 4, 0, {}, name_variants=[NAMES, ["a", "b"]])
    with pytest.raises(
        ValueError, match=r"^name_weights \[1\] must be one non-negative weight per name variant"
    ):
        CascadePromptDataset(ds, ROWS[:10], NAMES, 4, 0, {}, name_variants=[NAMES, UPPER], name_weights=[1])
    with pytest.raises(ValueError, match=r"^name_weights \[0, 0\] must be one .*, not all 0 \(--data"):
        CascadePromptDataset(
            ds, ROWS[:10], NAMES, 4, 0, {}, name_variants=[NAMES, UPPER], name_weights=[0, 0]
        )
    with pytest.raises(
        ValueError, match=r"^letters_fraction must be in \[0, 1\], got 1.5 \(--data.init_args"
    ):
        CascadePromptDataset(ds, ROWS[:10], NAMES, 4, 0, {}, letters_fraction=1.5)
