"""CLIP-LoRA: zero-shot at initialisation, merged for inference, its own feature-cache key, refused
for another model or weights, and better than zero-shot on held-out Fashion-MNIST photos."""

import lightning as L
import pytest
import torch
from adapter_fixtures import fit

from cascadevlm.clip.adapters import AdapterMismatchError, adapter_info, load_adapter
from cascadevlm.clip.adapters.clip_lora import ClipLoraModule, KShotImageDataModule
from cascadevlm.clip.features import feature_key
from cascadevlm.clip.model import load_clip
from cascadevlm.clip.zero_shot import build_zero_shot_head, clip_logits
from cascadevlm.testing.images import sample_photos
from cascadevlm.zoo.tiny_clip import (
    TINY_CLIP,
    TINY_CUSTOM_TEXT_CLIP,
    build_tiny_clip,
    build_tiny_custom_text_clip,
)

NAMES = ["cat", "horse", "astronaut", "coffee"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_lora")
    return {TINY_CLIP: build_tiny_clip(out), TINY_CUSTOM_TEXT_CLIP: build_tiny_custom_text_clip(out)}


@pytest.fixture(scope="module")
def pixels(tiny_clip_bundle):
    photos = sample_photos()
    names = ["chelsea", "horse", "astronaut", "coffee", "rocket", "coins"]
    return torch.stack([tiny_clip_bundle.preprocess(photos[n]) for n in names])


def _module(name, path):
    return ClipLoraModule(
        name, str(path), class_names=NAMES, templates=TEMPLATES, rank=4, alpha=8, log_confusion_matrix=False
    )


def _zero_shot(bundle, pixels):
    with torch.no_grad():
        head = build_zero_shot_head(bundle.model, bundle.tokenizer, NAMES, TEMPLATES)
        return clip_logits(
            bundle.model.encode_image(pixels, normalize=True), head, bundle.model.logit_scale.exp()
        )


def _perturb(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.adapter.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


@pytest.mark.parametrize("name", [TINY_CLIP, TINY_CUSTOM_TEXT_CLIP])
def test_zero_initialised_lora_is_zero_shot_exactly_and_gets_its_own_feature_key(
    name, tiny_paths, pixels, tmp_path
):
    module = _module(name, tiny_paths[name])
    plain = load_clip(name, str(tiny_paths[name]))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.startswith("adapter.lora.model.visual.") for n in trainable)  # both encoders
    assert any(".text." in n or n.startswith("adapter.lora.model.transformer.") for n in trainable)
    tokens = plain.tokenizer(["a photo of a cat."])
    # the training forward (grad on) of the wrapped model is the plain model's (q, k, v computed by three
    # linears instead of one fused in-projection: the same numbers up to float rounding)
    for encode, x in (("encode_image", pixels), ("encode_text", tokens)):
        torch.testing.assert_close(getattr(module.bundle.model, encode)(x), getattr(plain.model, encode)(x),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip

    path = module.save_adapter(tmp_path / "lora.safetensors")
    merged = load_clip(name, str(tiny_paths[name]))
    head = load_adapter(path, merged, NAMES)
    # B = 0: the merged weights are the zero-shot weights exactly, so are the logits
    plain_state, merged_state = plain.model.state_dict(), merged.model.state_dict()
    assert plain_state.keys() == merged_state.keys()
    assert all(torch.equal(plain_state[k], merged_state[k]) for k in plain_state)
    with torch.no_grad():
        logits = head(merged.model.encode_image(pixels, normalize=True))
    assert torch.equal(logits, _zero_shot(plain, pixels))
    # ... yet merged features never share a cache entry with plain ones (the adapter's content hash)
    assert merged.weights_id == plain.weights_id
    assert merged.feature_identity()["weights"].startswith(plain.weights_id + "+clip_lora:sha256:")
    assert feature_key(merged.feature_identity(), "fp", "test", 6) != feature_key(
        plain.feature_identity(), "fp", "test", 6
    )
    # one training step reaches LoRA's B matrices in both encoders (A's gradient is 0 while B = 0)
    loss = torch.nn.functional.cross_entropy(module(pixels), torch.tensor([0, 1, 2, 3, 0, 1]))
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if "lora_B" in n}
    assert any(n.startswith("adapter.lora.model.visual.") and g.abs().sum() > 0 for n, g in grads.items())
    assert any(not n.startswith("adapter.lora.model.visual.") and g.abs().sum() > 0 for n, g in grads.items())


def test_saved_lora_reloads_with_identical_logits_in_evaluation(tiny_paths, pixels, tmp_path):
    from cascadevlm.clip.module import ClipClassifier

    module = _perturb(_module(TINY_CLIP, tiny_paths[TINY_CLIP])).eval()
    path = module.save_adapter(tmp_path / "lora.safetensors", config="model: {}\n")
    with torch.no_grad():
        live = module(pixels)
    first = load_clip(TINY_CLIP, str(tiny_paths[TINY_CLIP]))
    second = load_clip(TINY_CLIP, str(tiny_paths[TINY_CLIP]))
    with torch.no_grad():
        a = load_adapter(path, first, NAMES)(first.model.encode_image(pixels, normalize=True))
        b = load_adapter(path, second, NAMES)(second.model.encode_image(pixels, normalize=True))
        assert torch.equal(a, b)
        torch.testing.assert_close(a, live, rtol=1e-4, atol=1e-4)  # merged vs W x + B A x: rounding only
        zero_shot = _zero_shot(load_clip(TINY_CLIP, str(tiny_paths[TINY_CLIP])), pixels)
        assert (a - zero_shot).abs().max() > 1e-2  # the perturbed adapter is not zero-shot
        # evaluate.py's CLIP stage merges at construction, before any feature or cache key is made
        clf = ClipClassifier(TINY_CLIP, str(tiny_paths[TINY_CLIP]), class_names=NAMES, adapter=str(path))
        assert clf.bundle.feature_identity() == first.feature_identity()
        clf.ensure_head()
        assert torch.equal(clf({"pixel_values": pixels}), a)
    info = adapter_info(path)
    assert info["method"] == "clip_lora" and info["kind"] == "clip_lora"
    # WiSE-FT in weight space: mix 0 is zero-shot CLIP exactly, mix 0.5 neither end, each its own cache key
    keys = {first.feature_identity()["weights"]}
    for mix, expected in ((0.0, zero_shot), (0.5, None)):
        wise = ClipClassifier(
            TINY_CLIP, str(tiny_paths[TINY_CLIP]), class_names=NAMES, adapter=str(path), adapter_mix=mix
        )
        wise.ensure_head()
        with torch.no_grad():
            got = wise({"pixel_values": pixels})
        if expected is not None:
            assert torch.equal(got, expected)
        else:
            assert (got - a).abs().max() > 1e-3 and (got - zero_shot).abs().max() > 1e-3
        keys.add(wise.bundle.feature_identity()["weights"])
    assert len(keys) == 3


def test_lora_for_another_model_or_weights_is_refused(tiny_paths, tmp_path):
    path = _module(TINY_CLIP, tiny_paths[TINY_CLIP]).save_adapter(tmp_path / "lora.safetensors")
    other_model = load_clip(TINY_CUSTOM_TEXT_CLIP, str(tiny_paths[TINY_CUSTOM_TEXT_CLIP]))
    with pytest.raises(
        AdapterMismatchError, match=r"\(clip_lora\) does not fit: model_name: adapter 'cascadevlm-tiny-vit'"
    ):
        load_adapter(path, other_model, NAMES)
    other_weights = load_clip(TINY_CLIP, str(build_tiny_clip(tmp_path / "seed1", seed=1)))
    with pytest.raises(AdapterMismatchError, match="weights_id: adapter 'sha256:"):
        load_adapter(path, other_weights, NAMES)
    # refused before anything was merged: the loaded CLIP is untouched
    fresh = load_clip(
        TINY_CLIP, str(tmp_path / "seed1" / "cascadevlm-tiny-vit-seed1.safetensors")
    ).model.state_dict()
    state = other_weights.model.state_dict()
    assert state.keys() == fresh.keys() and all(torch.equal(state[k], fresh[k]) for k in fresh)
    assert other_weights.weight_adapters == ()


# ------------------------------------------------------------------------------ learning on real photos
@pytest.mark.slow
def test_clip_lora_beats_zero_shot_on_held_out_photos_with_the_demo_clip(data_root, tmp_path):
    """16 Fashion-MNIST photos per class, 3 epochs on CPU; test accuracy on 300 other photos."""
    from cascadevlm.clip.features import image_features
    from cascadevlm.zoo.miniature import CLIP_CHECKPOINT, CLIP_MODEL

    dm = KShotImageDataModule(
        "fashion_mnist",
        shots=16,
        seed=1,
        val_limit=100,
        test_limit=300,
        selection="last",
        data_root=str(data_root),
        splits_dir=str(tmp_path / "splits"),
        batch_size=32,
        eval_batch_size=256,
        augment="none",  # 3 epochs of 28-pixel photos: the paper's crops need its 500 x k steps
    )
    module = ClipLoraModule(  # 3 epochs, not the paper's 500 x k steps: a CPU test
        CLIP_MODEL, str(CLIP_CHECKPOINT), lr=5e-3, rank=4, alpha=4, iterations_per_shot=0,
        log_confusion_matrix=False,
    )  # fmt: skip
    L.seed_everything(0)  # the order the k-shot photos are shuffled in
    fit(module, dm, tmp_path, 3)
    adapter = tmp_path / "adapter.safetensors"
    info = adapter_info(adapter)
    assert (info["method"], info["shots"], info["seed"], info["dataset"], info["selection"]) == (
        "clip_lora",
        16,
        1,
        "fashion_mnist",
        "last",
    )
    test = dm.source.dsd["test"].select(range(300))
    labels = torch.tensor(test["label"])

    def accuracy(bundle, head) -> float:
        feats = image_features(bundle, test, "test", batch_size=300)
        with torch.no_grad():
            return float((head(feats).argmax(-1) == labels).float().mean())

    plain = load_clip(CLIP_MODEL, str(CLIP_CHECKPOINT))
    zero_shot = build_zero_shot_head(plain.model, plain.tokenizer, dm.class_names, dm.templates)
    zs_acc = accuracy(plain, lambda f: clip_logits(f, zero_shot, 1.0))
    merged = load_clip(CLIP_MODEL, str(CLIP_CHECKPOINT))
    lora_acc = accuracy(merged, load_adapter(adapter, merged, dm.class_names))
    print(f"held-out test accuracy: zero-shot {zs_acc:.3f}, clip_lora {lora_acc:.3f}")
    assert lora_acc >= zs_acc + 0.03, (zs_acc, lora_acc)


@pytest.mark.parametrize("encoders, visual, text", [("text", False, True), ("vision", True, False)])
def test_lora_goes_only_into_the_chosen_encoder(encoders, visual, text, tiny_paths):
    """Classic CLIP's text layer names are suffixes of the image tower's: LoRA must not leak across."""
    module = ClipLoraModule(
        TINY_CLIP,
        str(tiny_paths[TINY_CLIP]),
        class_names=NAMES,
        encoders=encoders,
        log_confusion_matrix=False,
    )
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any(n.startswith("adapter.lora.model.visual.") for n in names) == visual
    assert any(n.startswith("adapter.lora.model.transformer.") for n in names) == text


def test_clip_lora_with_the_feature_data_module_is_refused_in_one_line(tiny_paths):
    from types import SimpleNamespace

    module = ClipLoraModule(
        TINY_CLIP, str(tiny_paths[TINY_CLIP]), class_names=NAMES, log_confusion_matrix=False
    )
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(class_names=NAMES))  # a feature data module
    with pytest.raises(
        ValueError, match=r"trains on images, not cached features: use --data .*KShotImageDataModule"
    ):
        module.setup("fit")
    with pytest.raises(ValueError, match="clip_lora encoders must be one of"):
        ClipLoraModule(TINY_CLIP, str(tiny_paths[TINY_CLIP]), encoders="image")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("rank", 0, "clip_lora rank must be in [1, 1024], got 0; set --model.rank"),
        ("rank", 5000, "clip_lora rank must be in [1, 1024], got 5000; set --model.rank"),
        ("alpha", -1.0, "clip_lora alpha must be in (0, 1024], got -1.0; set --model.alpha"),
        ("alpha", 1e6, "clip_lora alpha must be in (0, 1024], got 1000000.0; set --model.alpha"),
        ("dropout", 1.5, "clip_lora dropout must be in [0, 1), got 1.5; set --model.dropout"),
        (
            "recipe",
            "fancy",
            "clip_lora has no recipe 'fancy'; known: ['paper', 'peft_mha']: set --model.recipe",
        ),
        (
            "lora_params",
            "qx",
            "clip_lora lora_params must be letters of 'qkvo' (query, key, value, out; e.g. "
            "qkv, v, qkvo) or 'mha', got 'qx'; set --model.lora_params",
        ),
        (
            "iterations_per_shot",
            -1,
            "clip_lora iterations_per_shot must be >= 0 (0: the trainer's epochs), "
            "got -1; set --model.iterations_per_shot",
        ),
    ],
)
def test_absurd_lora_settings_are_refused_when_the_module_is_built(option, value, message):
    with pytest.raises(ValueError) as err:  # before any model is loaded
        ClipLoraModule("no-such-model-is-loaded", **{option: value})
    assert str(err.value) == message


def test_an_unknown_augmentation_is_refused_in_one_line():
    with pytest.raises(ValueError) as err:
        KShotImageDataModule("fashion_mnist", augment="cutmix")
    assert str(err.value) == (
        "augmentation 'cutmix' is unknown; choose one of ['none', 'flip_crop', 'flip_crop_wide']: set --data.augment"
    )


# ------------------------------------------------------------------------------ the paper's structure
def _lora_layers(module) -> dict[str, torch.nn.Module]:
    """Module name (in the plain model) -> peft LoRA layer."""
    prefix = "adapter.lora.model."
    return {
        n[len(prefix) :]: m
        for n, m in module.named_modules()
        if hasattr(m, "lora_A") and n.startswith(prefix)
    }


def _attention_layers(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention))


def _delta(layer) -> torch.Tensor:
    """The weight update of a peft Linear LoRA layer, from its own A, B and scaling."""
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


@pytest.mark.parametrize(
    "lora_params, projections", [("qkv", {"q_proj", "k_proj", "v_proj"}), ("v", {"v_proj"}),
                                 ("qkvo", {"q_proj", "k_proj", "v_proj", "out_proj"})],
)  # fmt: skip
def test_the_papers_lora_is_separate_on_q_k_v_of_every_attention_layer_with_rank_r_each(
    lora_params, projections, tiny_paths
):
    rank, alpha = 2, 1.0
    plain = load_clip(TINY_CLIP, str(tiny_paths[TINY_CLIP]))
    attention = _attention_layers(plain.model)
    assert any(a.startswith("visual.") for a in attention) and any(
        a.startswith("transformer.") for a in attention
    )
    module = _perturb(ClipLoraModule(TINY_CLIP, str(tiny_paths[TINY_CLIP]), class_names=NAMES,
                                     lora_params=lora_params, log_confusion_matrix=False))  # fmt: skip
    assert (module.lora_params, module.rslora, module.hparams.rank, module.hparams.alpha) == (
        lora_params,
        True,
        2,
        1.0,
    )
    layers = _lora_layers(module)
    assert set(layers) == {f"{a}.{p}" for a in attention for p in projections}  # nothing else carries LoRA
    for a in attention:
        deltas = []
        for p in sorted(projections):
            layer = layers[f"{a}.{p}"]
            assert layer.scaling["default"] == pytest.approx(alpha / rank**0.5)  # rsLoRA, the paper's code
            delta = _delta(layer)
            assert torch.linalg.matrix_rank(delta) == rank
            deltas.append(delta)
            # the adapted projection is x (W + alpha/sqrt(r) B A)^T + b (an independent formula)
            x = torch.randn(3, delta.shape[1])
            base = layer.base_layer
            expected = x @ (base.weight + delta).T + (base.bias if base.bias is not None else 0)
            with torch.no_grad():
                torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-5, atol=1e-5)
        # separate A per projection: the joint update of q, k, v has rank 3r, not peft's shared-A r
        assert torch.linalg.matrix_rank(torch.cat(deltas)) == rank * len(projections)


def test_the_peft_mha_recipe_keeps_the_earlier_shared_lora(tiny_paths):
    module = _perturb(ClipLoraModule(TINY_CLIP, str(tiny_paths[TINY_CLIP]), class_names=NAMES, recipe="peft_mha",
                                     log_confusion_matrix=False))  # fmt: skip
    assert module.method == "clip_lora_peft_mha" and (module.lora_params, module.rslora) == ("mha", False)
    layers = _lora_layers(module)
    attention = _attention_layers(load_clip(TINY_CLIP, str(tiny_paths[TINY_CLIP])).model)
    # peft's nn.MultiheadAttention LoRA: the fused in-projection, and out_proj inside it
    assert set(layers) == set(attention) | {f"{a}.base_layer.out_proj" for a in attention}
    layer = layers[attention[0]]
    assert layer.scaling["default"] == pytest.approx(1.0 / 2)  # alpha / r
    joint = _delta(layer)  # one A shared by q, k and v: the joint in-projection update has rank r
    assert torch.linalg.matrix_rank(joint) == 2


@pytest.mark.parametrize("name", [TINY_CLIP, TINY_CUSTOM_TEXT_CLIP])
def test_split_attention_gives_the_multihead_attention_outputs(name, tiny_paths, pixels):
    from cascadevlm.clip.adapters.clip_lora import fuse_attention, split_attention

    plain = load_clip(name, str(tiny_paths[name]))
    split = load_clip(name, str(tiny_paths[name]))
    names = _attention_layers(split.model)
    assert split_attention(split.model, names) == names
    assert not _attention_layers(split.model)
    tokens = plain.tokenizer(["a photo of a cat.", "a horse"])
    with torch.no_grad():
        for encode, x in (("encode_image", pixels), ("encode_text", tokens)):
            torch.testing.assert_close(getattr(split.model, encode)(x), getattr(plain.model, encode)(x),
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
    fuse_attention(split.model)  # and back: the same state dict, bit for bit
    a, b = plain.model.state_dict(), split.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_images_and_their_augmentation_for_a_feature_method_are_refused_in_one_line(data_root, tmp_path):
    from types import SimpleNamespace

    dm = KShotImageDataModule("fashion_mnist", shots=1, data_root=str(data_root), splits_dir=str(tmp_path))
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(method="linear_probe"))
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        "linear_probe trains on cached image features and cannot use images or their augmentation "
        "(--data.augment flip_crop_wide); only clip_lora reads images: use --data "
        "cascadevlm.clip.adapters.KShotFeatureDataModule"
    )
