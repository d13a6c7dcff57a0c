"""The cached zero-shot head (clip/zero_shot.py): equal to a fresh one, keyed by every part it depends on,
never trusted when unreadable or made from other parts; top-k and entropy without a full softmax."""

import dataclasses
import json
import math
import re

import pytest
import torch

from cascadevlm.clip.zero_shot import (
    HEAD_DIR,
    HeadCache,
    build_zero_shot_head,
    entropy_from_logits,
    head_key_parts,
    topk_probs,
    topk_probs_and_entropy,
    zero_shot_head,
)

NAMES = ["Parus major", "Parus major var1", "Turdus merula", "Anas crecca"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}."]


def test_cached_head_equals_a_fresh_one_and_skips_the_text_encoder(tiny_clip_bundle, tmp_path, text_calls):
    b = tiny_clip_bundle
    fresh = build_zero_shot_head(b.model, b.tokenizer, NAMES, TEMPLATES, class_batch_size=3)
    text_calls.clear()
    first = zero_shot_head(b, NAMES, TEMPLATES, tmp_path, class_batch_size=3)
    assert len(text_calls) == 2  # two class batches
    assert torch.equal(first, fresh)
    files = list((tmp_path / HEAD_DIR).glob("zero-shot-head-*.safetensors"))
    assert len(files) == 1
    text_calls.clear()
    again = zero_shot_head(b, NAMES, TEMPLATES, tmp_path, class_batch_size=3)
    assert text_calls == []  # served from the cache
    assert torch.equal(again, fresh)
    text_calls.clear()
    assert torch.equal(zero_shot_head(b, NAMES, TEMPLATES, None, class_batch_size=3), fresh)  # no cache
    assert len(text_calls) == 2 and len(list((tmp_path / HEAD_DIR).iterdir())) == 1


CHANGES = {
    "weights": lambda b, n, t: (dataclasses.replace(b, weights_id="sha256:other"), n, t),
    "merged CLIP-LoRA": lambda b, n, t: (
        dataclasses.replace(b, weight_adapters=("clip_lora:sha256:ab",)),
        n,
        t,
    ),
    "precision": lambda b, n, t: (dataclasses.replace(b, precision="bf16"), n, t),
    "architecture config": lambda b, n, t: (dataclasses.replace(b, config_id="0123"), n, t),
    "a class name": lambda b, n, t: (b, [*n[:-1], "Anas acuta"], t),
    "class order": lambda b, n, t: (b, [n[1], n[0], *n[2:]], t),
    "a template": lambda b, n, t: (b, n, [t[0], "a sketch of the {}."]),
    "template order": lambda b, n, t: (b, n, t[::-1]),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_of_any_key_part_misses_the_cache(tiny_clip_bundle, tmp_path, text_calls, change):
    b = tiny_clip_bundle
    zero_shot_head(b, NAMES, TEMPLATES, tmp_path)
    other, names, templates = CHANGES[change](b, NAMES, TEMPLATES)
    assert head_key_parts(other, names, templates) != head_key_parts(b, NAMES, TEMPLATES)
    text_calls.clear()
    head = zero_shot_head(other, names, templates, tmp_path)
    assert text_calls  # recomputed, not served
    assert torch.equal(head, build_zero_shot_head(other.model, other.tokenizer, names, templates))
    assert len(list((tmp_path / HEAD_DIR).glob("zero-shot-head-*.safetensors"))) == 2  # the first entry stays


def test_the_image_transform_is_not_part_of_the_heads_key(tiny_clip_bundle):
    b = tiny_clip_bundle
    other = dataclasses.replace(b, preprocess="another transform")  # changes image features, not text
    assert head_key_parts(other, NAMES, TEMPLATES) == head_key_parts(b, NAMES, TEMPLATES)


def _garbage(path, parts, b):
    path.write_bytes(b"\x00\x01 not a safetensors file")


def _truncated(path, parts, b):
    path.write_bytes(path.read_bytes()[:-40])


def _other_parts(path, parts, b):  # a file under this key holding another head (a foreign or renamed file)
    other = {**parts, "templates": ["a sketch of the {}."]}
    HeadCache(path.parent).save(other, torch.ones(len(NAMES), b.embed_dim))
    HeadCache(path.parent).path(other).replace(path)


def _wrong_shape(path, parts, b):
    from safetensors.torch import save_file

    save_file(
        {"head": torch.ones(2, 3)}, str(path), metadata={"key_parts": json.dumps(parts, sort_keys=True)}
    )


def _not_finite(path, parts, b):
    HeadCache(path.parent).save(parts, torch.full((len(NAMES), b.embed_dim), math.nan))


@pytest.mark.parametrize("spoil", [_garbage, _truncated, _other_parts, _wrong_shape, _not_finite])
def test_a_bad_cache_file_is_recomputed_and_replaced(tiny_clip_bundle, tmp_path, text_calls, spoil, caplog):
    b = tiny_clip_bundle
    fresh = zero_shot_head(b, NAMES, TEMPLATES, tmp_path)
    parts = head_key_parts(b, NAMES, TEMPLATES)
    path = HeadCache(tmp_path / HEAD_DIR).path(parts)
    spoil(path, parts, b)
    text_calls.clear()
    with caplog.at_level("WARNING", logger="cascadevlm"):
        head = zero_shot_head(b, NAMES, TEMPLATES, tmp_path)
    assert text_calls and torch.equal(head, fresh)
    assert "recomputing it" in caplog.text
    assert torch.equal(HeadCache(tmp_path / HEAD_DIR).load(parts), fresh)  # the file is good again


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["Parus major", "  "], "has empty class names (class ids [1])"),
        (["Parus major", "parus major "], "duplicate class names: ['parus major ']"),
    ],
)
def test_bad_class_lists_are_refused_before_the_cache_is_read(tiny_clip_bundle, tmp_path, names, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        zero_shot_head(tiny_clip_bundle, names, TEMPLATES, tmp_path)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_topk_and_entropy_without_a_full_softmax_match_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 10_000, generator=g) * 30  # CLIP-like spread over many classes
    probs = torch.softmax(logits.double(), -1)
    ref_p, ref_ids = probs.topk(8, -1)
    p, ids = topk_probs(logits, 8)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(p.double(), ref_p, rtol=1e-5, atol=1e-7)
    p2, ids2, ent = topk_probs_and_entropy(logits, 8)
    assert torch.equal(ids2, ref_ids)
    torch.testing.assert_close(p2.double(), ref_p, rtol=1e-5, atol=1e-7)
    ref_ent = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ent, entropy_from_logits(logits))


def test_adapter_training_builds_the_head_into_its_feature_cache_and_reads_it_back(
    tiny_clip_path, tiny_clip_bundle, data_root, tmp_path, text_calls
):
    from adapter_fixtures import fit, kshot_features

    from cascadevlm.clip.adapters import LinearProbeModule
    from cascadevlm.zoo.tiny_clip import TINY_CLIP

    b = tiny_clip_bundle
    dm = kshot_features(b, data_root, tmp_path, shots=1, val_limit=20, test_split=None, batch_size=16)
    fresh = build_zero_shot_head(b.model, b.tokenizer, dm.class_names, dm.templates)
    heads = []
    for run in ("a", "b"):
        text_calls.clear()
        module = LinearProbeModule(
            model_name=TINY_CLIP, pretrained=str(tiny_clip_path), log_confusion_matrix=False
        )
        fit(module, dm, tmp_path / run, epochs=1)
        heads.append((module.zero_shot_head, len(text_calls)))
    assert torch.equal(heads[0][0], fresh) and torch.equal(heads[1][0], fresh)
    assert heads[0][1] > 0 and heads[1][1] == 0  # the second run read the head the first one stored
    assert len(list((tmp_path / "features" / HEAD_DIR).glob("zero-shot-head-*.safetensors"))) == 1
