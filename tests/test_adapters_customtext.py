"""Adapters on open_clip's custom-text models (``CustomTextCLIP``: SigLIP, EVA02, MobileCLIP, ...).

The tiny ``cascadevlm-tiny-customtext`` model has a SigLIP-like text tower (``model.text``: bidirectional
attention, last-token pooling, biased linear projection) and no classic ``token_embedding`` attributes.
"""

import pytest
import torch
import torch.nn.functional as F
from adapter_fixtures import fit, kshot_features

from cascadevlm.clip.adapters import (
    ClipAdapterModule,
    FrozenTextEncoder,
    LinearProbeModule,
    PromptLearner,
    PromptTuningModule,
    TipAdapterFModule,
    TipAdapterModule,
    load_adapter,
)
from cascadevlm.clip.model import load_clip
from cascadevlm.zoo.tiny_clip import TINY_CUSTOM_TEXT_CLIP, build_tiny_custom_text_clip

NAMES = ["t-shirt", "ankle boot", "Boeing 737-800", "Black-footed Albatross", "crème brûlée", "dog"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def custom_path(tmp_path_factory):
    return build_tiny_custom_text_clip(tmp_path_factory.mktemp("tiny_customtext"), seed=0)


@pytest.fixture(scope="module")
def custom_bundle(custom_path):
    return load_clip(TINY_CUSTOM_TEXT_CLIP, str(custom_path))


def test_tiny_custom_text_model_is_a_custom_text_clip_without_classic_text_attributes(custom_bundle):
    model = custom_bundle.model
    assert type(model).__name__ == "CustomTextCLIP" and type(model.text).__name__ == "TextTransformer"
    assert not hasattr(model, "token_embedding") and model.logit_bias is not None
    assert model.text.attn_mask is None and model.text.pool_type == "last"  # SigLIP's text tower
    assert custom_bundle.embed_dim == 64


@pytest.mark.parametrize("which", ["classic", "custom_text"])
def test_prompt_encoder_with_the_prompt_words_as_context_reproduces_encode_text(
    which, tiny_clip_bundle, custom_bundle
):
    b = tiny_clip_bundle if which == "classic" else custom_bundle
    learner = PromptLearner(FrozenTextEncoder(b.model), b.tokenizer, NAMES, ctx_init="a photo of a")
    assert learner.n_ctx == 4
    with torch.no_grad():
        got = learner()
        expected = b.model.encode_text(b.tokenizer([f"a photo of a {c}." for c in NAMES]), normalize=True)
    if which == "custom_text":  # the same ops on the same full-length sequence: bit for bit
        assert torch.equal(got, expected)
    else:  # classic CLIP drops the padding after the end token (causal mask): summation order only
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_pad_mask_and_class_token_text_towers_are_followed_too(custom_bundle):
    """open_clip's other TextTransformer options (pad mask, CoCa-style class token, causal + eos)."""
    import open_clip

    torch.manual_seed(0)
    for kw in (
        {"no_causal_mask": True, "use_pad_mask": True, "pool_type": "first"},
        {"embed_cls": True},
        {"pool_type": "eos", "eos_id": 49407},
    ):
        text = open_clip.transformer.TextTransformer(
            context_length=16, width=32, heads=2, layers=1, output_dim=16, **kw
        ).eval()
        holder = torch.nn.Module()
        holder.text = text
        tokens = custom_bundle.tokenizer([f"a photo of a {c}." for c in NAMES], context_length=16)
        enc = FrozenTextEncoder(holder)
        with torch.no_grad():
            torch.testing.assert_close(
                enc(enc.embed(tokens), tokens), F.normalize(text(tokens), dim=-1), rtol=0, atol=1e-6
            )


def test_prompt_tuning_on_a_text_tower_without_token_embeddings_is_refused(custom_path):
    model = load_clip(TINY_CUSTOM_TEXT_CLIP, str(custom_path)).model  # its own copy: the tower is replaced
    model.text = torch.nn.Linear(4, 4)  # stands for a Hugging Face text encoder: token ids in only
    with pytest.raises(
        NotImplementedError, match=r"CustomTextCLIP's text tower is a Linear .* token ids only"
    ):
        FrozenTextEncoder(model)


# ------------------------------------------------------------------------------ train and evaluate
@pytest.fixture(scope="module")
def custom_kshot(custom_bundle, data_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("kshot_customtext")
    return kshot_features(
        custom_bundle, data_root, work, shots=2, val_limit=100, test_split=None, batch_size=10
    )


@pytest.mark.parametrize(
    "cls, kw, learns",
    [
        (LinearProbeModule, {"lr": 0.003}, True),
        (PromptTuningModule, {"lr": 0.03}, True),
        (ClipAdapterModule, {"lr": 0.03}, True),
        (TipAdapterModule, {}, False),  # training-free: alpha, beta searched on validation
        (TipAdapterFModule, {"lr": 0.001}, False),
    ],
    ids=["linear_probe", "coop", "clip_adapter", "tip_adapter", "tip_adapter_f"],
)
def test_adapters_train_and_evaluate_on_the_custom_text_model(
    cls, kw, learns, custom_path, custom_bundle, custom_kshot, tmp_path
):
    from cascadevlm.clip.module import ClipClassifier

    dm = custom_kshot
    module = cls(
        model_name=TINY_CUSTOM_TEXT_CLIP,
        pretrained=str(custom_path),
        class_names=dm.class_names,
        templates=dm.templates,
        log_confusion_matrix=False,
        **kw,
    )
    x, y = dm.features["train"], torch.tensor(dm.targets["train"])
    with torch.no_grad():
        loss0 = float(F.cross_entropy(module(x), y))
    fit(module, dm, tmp_path, 5)
    module.eval()
    with torch.no_grad():
        loss1 = float(F.cross_entropy(module(x), y))
    if learns:  # random weights give near-identical features: little to learn, but the loss moves
        assert loss1 < loss0 - 0.05, (loss0, loss1)
    # evaluate.py's CLIP stage loads the exported adapter on the custom-text model
    clf = ClipClassifier(
        TINY_CUSTOM_TEXT_CLIP,
        str(custom_path),
        class_names=dm.class_names,
        adapter=str(tmp_path / "adapter.safetensors"),
    )
    clf.ensure_head()
    val = dm.features["val"]
    with torch.no_grad():
        saved = load_adapter(tmp_path / "adapter.safetensors", custom_bundle, dm.class_names)(val)
        torch.testing.assert_close(clf.logits(val), saved, rtol=0, atol=0)
    assert saved.shape == (100, 10)
