"""In-context k-shot examples (cascadevlm/lvlm/incontext.py) through a tiny LVLM."""

from __future__ import annotations

import pytest
from lvlm_fixtures import llava_dir, photo_dataset, photos, qwen2vl_dir, tiny_lvlm_dir  # noqa: F401

from cascadevlm.data.kshot import KShotSplit
from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.lvlm.incontext import ExemplarPool
from cascadevlm.lvlm.prompts import PromptConfig, build_prompt
from cascadevlm.lvlm.transformers_backend import TransformersBackend


def test_examples_come_from_the_kshot_split_for_the_candidates(photo_dataset):  # noqa: F811
    data_dir, split_path = photo_dataset
    pool = ExemplarPool.from_source(str(data_dir), str(split_path), shots_per_class=2, max_examples=5)
    split = KShotSplit.load(split_path)
    names = pool.class_names
    ex = pool.for_candidates(["horse", "cat", "rocket"])
    # round-robin in CLIP's order, capped at 5: horse, cat, rocket, horse, cat
    assert [e.class_name for e in ex] == ["horse", "cat", "rocket", "horse", "cat"]
    rows = split.indices[names.index("horse")]
    assert list(ex[0].image.getdata()) == list(pool.image(rows[0]).getdata())
    assert list(ex[3].image.getdata()) == list(pool.image(rows[1]).getdata())
    # the query's own row is never its own example; unknown names get none
    only = pool.for_candidates(["horse"], exclude_rows={rows[0]})
    assert len(only) == 1 and list(only[0].image.getdata()) == list(pool.image(rows[1]).getdata())
    assert pool.for_candidates(["unicorn"]) == []


@pytest.mark.parametrize("cap", [1, 3])
def test_image_cap_and_in_context_scoring(tiny_lvlm_dir, photo_dataset, photos, cap):  # noqa: F811
    data_dir, split_path = photo_dataset
    pool = ExemplarPool.from_source(str(data_dir), str(split_path), shots_per_class=2, max_examples=8)
    backend = TransformersBackend(str(tiny_lvlm_dir), device="cpu", prompt=PromptConfig(max_images=cap))
    reqs = pool.attach(
        [LVLMRequest(image=photos[n], candidates=[n, "coins", "galaxy"]) for n in ["cat", "flower"]]
    )
    assert all(len(r.examples) == 6 for r in reqs)
    prompts = [build_prompt(r, backend.prompt) for r in reqs]
    assert [len(p.images) for p in prompts] == [cap, cap]
    inputs = backend.encoder.encode(prompts)
    grids = inputs.get("image_grid_thw")  # Qwen2-VL: one grid per image; LLaVA: one pixel tensor each
    assert (len(grids) if grids is not None else len(inputs["pixel_values"])) == 2 * cap
    batched = backend.score(reqs)
    assert batched[1] == pytest.approx(backend.score(reqs[1:])[0], abs=1e-4)
