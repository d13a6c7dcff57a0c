"""CLIP-LoRA's inference head from the zero-shot head cache (cascadevlm/clip/adapters/clip_lora.py,
issue 27): the head is the merged text encoder's, so its key holds the adapter's content hash; a hit
equals a fresh build, another adapter (or another mix, or the plain CLIP) misses."""

import torch

from cascadevlm.clip.adapters import load_adapter
from cascadevlm.clip.adapters.clip_lora import ClipLoraModule
from cascadevlm.clip.model import load_clip
from cascadevlm.clip.zero_shot import HEAD_DIR, build_zero_shot_head, zero_shot_head
from cascadevlm.zoo.tiny_clip import TINY_CLIP

NAMES = ["cat", "horse", "astronaut", "coffee"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]


def _adapter(clip_path, out, seed):
    """A CLIP-LoRA file whose B matrices are random (so the merged text encoder differs from CLIP's)."""
    module = ClipLoraModule(TINY_CLIP, str(clip_path), class_names=NAMES, templates=TEMPLATES, rank=4,
                            alpha=8, log_confusion_matrix=False)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.adapter.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.save_adapter(out)


def _heads(tmp_path):
    return sorted((tmp_path / "cache" / HEAD_DIR).glob("zero-shot-head-*.safetensors"))


def test_clip_lora_head_is_cached_under_the_adapters_content(tiny_clip_path, tmp_path, text_calls):
    first, second = (
        _adapter(tiny_clip_path, tmp_path / "a.safetensors", 0),
        _adapter(tiny_clip_path, tmp_path / "b.safetensors", 1),
    )
    cache = tmp_path / "cache"

    def fresh(path):  # the merged text encoder's head, built without any cache
        bundle = load_clip(TINY_CLIP, str(tiny_clip_path))
        load_adapter(path, bundle, NAMES)
        return build_zero_shot_head(bundle.model, bundle.tokenizer, NAMES, TEMPLATES)

    ref_a, ref_b = fresh(first), fresh(second)
    assert (ref_a - ref_b).abs().max() > 1e-3  # the adapters change the text encoder
    text_calls.clear()
    head = load_adapter(first, load_clip(TINY_CLIP, str(tiny_clip_path)), NAMES, cache)
    assert text_calls and len(_heads(tmp_path)) == 1  # built and stored
    assert torch.equal(head.class_embeddings, ref_a)
    text_calls.clear()
    again = load_adapter(first, load_clip(TINY_CLIP, str(tiny_clip_path)), NAMES, cache)
    assert text_calls == []  # a hit: the text encoder never ran
    assert torch.equal(again.class_embeddings, ref_a)
    # another adapter misses (its own entry, its own head)
    other = load_adapter(second, load_clip(TINY_CLIP, str(tiny_clip_path)), NAMES, cache)
    assert text_calls and len(_heads(tmp_path)) == 2
    assert torch.equal(other.class_embeddings, ref_b)
    # the plain CLIP's head with the same names and templates is a third entry, not the adapter's
    text_calls.clear()
    plain = zero_shot_head(load_clip(TINY_CLIP, str(tiny_clip_path)), NAMES, TEMPLATES, cache)
    assert text_calls and len(_heads(tmp_path)) == 3
    assert (plain - ref_a).abs().max() > 1e-3


def test_evaluation_shares_the_adapters_head_entry(tiny_clip_path, tmp_path, text_calls):
    """evaluate.py's CLIP stage: the zero-shot head of the merged model and the adapter's head are one
    entry when the templates are the training ones; a rerun runs no text encoder at all."""
    from cascadevlm.clip.module import ClipClassifier

    path = _adapter(tiny_clip_path, tmp_path / "a.safetensors", 0)
    for run in range(2):
        clf = ClipClassifier(TINY_CLIP, str(tiny_clip_path), class_names=NAMES, templates=TEMPLATES,
                             adapter=str(path))  # fmt: skip
        clf.head_cache_dir = str(tmp_path / "cache")
        text_calls.clear()
        clf.ensure_head()
        assert len(_heads(tmp_path)) == 1
        assert (len(text_calls) > 0) == (run == 0)
        assert torch.equal(clf.adapter_module.class_embeddings, clf.head.cpu())
