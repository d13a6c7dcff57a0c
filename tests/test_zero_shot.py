import math

import open_clip
import pytest
import torch

from cascadevlm.clip.model import load_clip
from cascadevlm.clip.zero_shot import build_zero_shot_head, clip_logits, entropy_from_logits, topk_probs
from cascadevlm.testing.images import sample_photos

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "a {} in a shop."]


def test_head_equals_open_clip_reference(tiny_clip_bundle):
    b = tiny_clip_bundle
    ours = build_zero_shot_head(b.model, b.tokenizer, CLASSES, TEMPLATES, class_batch_size=3)
    ref = open_clip.build_zero_shot_classifier(
        b.model, b.tokenizer, CLASSES, TEMPLATES, num_classes_per_batch=None
    )
    assert ours.shape == (len(CLASSES), b.embed_dim)
    torch.testing.assert_close(ours, ref.T.float(), rtol=1e-5, atol=1e-6)


def test_logits_match_the_models_own_forward(tiny_clip_bundle):
    b = tiny_clip_bundle
    photos = sample_photos()
    images = torch.stack([b.preprocess(photos[n]) for n in ("astronaut", "camera", "coffee")])
    head = build_zero_shot_head(b.model, b.tokenizer, CLASSES, ["a photo of a {}."])
    with torch.no_grad():
        img_f, txt_f, scale = b.model(images, b.tokenizer([f"a photo of a {c}." for c in CLASSES]))
        ref = scale * img_f @ txt_f.T
        ours = clip_logits(b.model.encode_image(images), head, scale)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_entropy_and_topk_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g) * 4
    probs = torch.softmax(logits, -1)
    direct = torch.tensor([-sum(float(p) * math.log(float(p)) for p in row) for row in probs])
    torch.testing.assert_close(entropy_from_logits(logits), direct.float(), rtol=1e-5, atol=1e-6)
    values, ids = topk_probs(logits, 4)
    for row in range(6):
        order = sorted(range(11), key=lambda c: -float(probs[row, c]))[:4]
        assert ids[row].tolist() == order
        torch.testing.assert_close(values[row], probs[row, order])
    assert topk_probs(logits, 50)[1].shape == (6, 11)  # k is capped at the number of classes
    # uniform distribution: entropy log(C); one-hot: 0
    assert entropy_from_logits(torch.zeros(1, 8)).item() == pytest.approx(math.log(8), rel=1e-6)
    assert entropy_from_logits(torch.tensor([[1000.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("names", "templates", "message"),
    [
        ([], TEMPLATES, "empty class list"),
        (["dog", "cat", "Dog"], TEMPLATES, "duplicate class names: ['Dog']"),
        (["dog"], [], "template list is empty"),
        (["dog"], ["a photo"], "must contain '{}'"),
    ],
)
def test_head_rejects_bad_classes_and_templates(tiny_clip_bundle, names, templates, message):
    b = tiny_clip_bundle
    with pytest.raises(ValueError) as err:
        build_zero_shot_head(b.model, b.tokenizer, names, templates)
    assert message in str(err.value)


def test_unknown_model_and_missing_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-Q-99'"):
        load_clip("ViT-Q-99")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint .*nope.safetensors.* does not exist"):
        load_clip("cascadevlm-tiny-vit", str(missing))


def test_checkpoint_roundtrip_through_the_users_route(tiny_clip_path, tiny_clip_bundle):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_clip_path))
    state = tiny_clip_bundle.model.state_dict()
    assert set(saved) == set(state)
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v)
    assert tiny_clip_bundle.weights_id.startswith("sha256:")
