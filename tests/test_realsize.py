"""Real-size architectures with random weights (cascadevlm/zoo/realsize.py): published parameter counts,
image-token counts at the real processor settings, bf16 without a float32 copy, the CLIP checkpoint route."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cascadevlm.lvlm.transformers_backend import image_token_count
from cascadevlm.zoo.realsize import (
    LLAVA_15_7B,
    LVLM_SPECS,
    QWEN2_VL_2B,
    QWEN2_VL_7B,
    QWEN25_VL_7B,
    build_lvlm,
    build_processor,
    count_params,
    reduce_layers,
    write_clip_checkpoint,
)


@pytest.mark.parametrize("spec", [QWEN2_VL_7B, QWEN25_VL_7B, LLAVA_15_7B, QWEN2_VL_2B], ids=lambda s: s.name)
def test_lvlm_builds_on_meta_in_bf16_with_the_published_parameter_count(spec):
    model, _ = build_lvlm(spec, device="meta")
    assert count_params(model) == pytest.approx(spec.published_params, rel=0.01)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # created in bf16, no fp32 copy
    assert {p.device.type for p in model.parameters()} == {"meta"}


# (448 / 14) ** 2 patches, merged 2 x 2: 256 image tokens for Qwen2-VL / Qwen2.5-VL at 448 x 448;
# LLaVA-1.5 resizes every image to 336 px: (336 / 14) ** 2 = 576.
@pytest.mark.parametrize(
    "spec,size,tokens",
    [
        (QWEN2_VL_7B, (448, 448), 256),
        (QWEN25_VL_7B, (448, 448), 256),
        (QWEN2_VL_7B, (640, 480), (644 // 28) * (476 // 28)),  # rounded to multiples of 28 px
        (LLAVA_15_7B, (448, 448), 576),
        (LLAVA_15_7B, (640, 480), 576),
    ],
)
def test_image_tokens_at_real_processor_settings(spec, size, tokens):
    assert image_token_count(build_processor(spec), Image.new("RGB", size)) == tokens


def test_max_pixels_caps_qwen2vl_image_tokens():
    big = Image.new("RGB", (2048, 2048))
    assert (
        image_token_count(build_processor(QWEN2_VL_7B), big) == (2044 // 28) ** 2
    )  # published max allows it
    assert image_token_count(build_processor(QWEN2_VL_7B, max_pixels=448 * 448), big) == 256


def test_reduced_model_is_named_and_keeps_widths():
    spec = reduce_layers(QWEN2_VL_2B, 2, 1)
    assert spec.name == "Qwen2-VL-2B-Instruct [2/28 text, 1/32 vision layers]"
    full, _ = build_lvlm(QWEN2_VL_2B, device="meta")
    small, _ = build_lvlm(spec, device="meta")
    assert small.config.text_config.hidden_size == full.config.text_config.hidden_size
    assert (
        len(small.model.language_model.layers) == 2
        and QWEN2_VL_2B.config["text_config"]["num_hidden_layers"] == 28
    )


def test_lora_default_targets_match_idefics3_text_model_only():
    """peft's default target regex hits Idefics3 / SmolVLM's language model, not its vision tower."""
    import re

    import transformers as tf

    from cascadevlm.lvlm.lora import DEFAULT_TARGETS

    cfg = tf.Idefics3Config(
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": 64,
        },
    )
    with torch.device("meta"):
        model = tf.Idefics3ForConditionalGeneration(cfg)
    names = [n for n, _ in model.named_modules() if re.fullmatch(DEFAULT_TARGETS, n)]
    assert len(names) == 7 and all(".text_model." in n for n in names)


@pytest.mark.slow
def test_clip_checkpoint_loads_through_load_clip(tmp_path):
    from cascadevlm.clip.model import load_clip

    path = write_clip_checkpoint("ViT-B-32", tmp_path / "vit_b_32_random.pt")
    bundle = load_clip("ViT-B-32", pretrained=str(path))
    saved = torch.load(path, map_location="cpu")
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


def test_specs_are_registered_by_name():
    assert set(LVLM_SPECS) == {
        "Qwen2-VL-7B-Instruct",
        "Qwen2.5-VL-7B-Instruct",
        "llava-1.5-7b-hf",
        "Qwen2-VL-2B-Instruct",
    }
