"""The paper's architectures at full size with random weights, built offline: for memory, speed, shapes
and prompts, never for accuracy.

* CLIP: open_clip's own configs (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ``ViT-L-14-336``) created
  without pretrained weights; :func:`write_clip_checkpoint` saves one so it loads through the user's
  route, ``load_clip(name, pretrained=PATH)``.
* LVLMs: configs written from the published ``config.json`` / ``preprocessor_config.json`` of
  Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct and llava-hf/llava-1.5-7b-hf (layers, widths,
  heads, key/value heads, vocabulary size, vision tower, patch / merge size, pixel limits), built
  directly in bfloat16 on the target device (or on the meta device, allocating nothing), with no float32
  copy. Each comes with a processor of its family around :func:`~cascadevlm.zoo.tiny_lvlm.real_shape_tokenizer`:
  the real chat template and special-token settings, but a vocabulary of a few hundred tokens trained
  here (the model keeps the published vocabulary size, so embedding and LM-head cost are real; the
  token ids of the text differ from the real tokenizer's, and text is split into more, shorter tokens).

``reduce_layers`` keeps the widths and cuts the depth, for machines that cannot hold the full model (the
``cpu`` preset of ``bench/realsize.py``); a reduced model is named as such everywhere it is reported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cascadevlm.records import atomic_path

CLIP_MODELS = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


@dataclass
class LVLMSpec:
    """A published LVLM architecture: its transformers config, processor settings and parameter count."""

    name: str
    family: str  # qwen2vl, qwen25vl, llava15 (the processor and tokenizer shape)
    config: dict
    processor: dict = field(default_factory=dict)
    published_params: float = 0.0  # as the model card / hub page states it


# Qwen/Qwen2-VL-7B-Instruct config.json and preprocessor_config.json.
QWEN2_VL_7B = LVLMSpec(
    name="Qwen2-VL-7B-Instruct",
    family="qwen2vl",
    config={
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [16, 24, 24],
            },
        },
        "vision_config": {
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 3584,
            "mlp_ratio": 4,
            "num_heads": 16,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "tie_word_embeddings": False,
    },
    processor={
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "min_pixels": 3136,
        "max_pixels": 12845056,
    },
    published_params=8.29e9,
)

# Qwen/Qwen2.5-VL-7B-Instruct: the same language model, a window-attention vision tower with SwiGLU MLPs.
QWEN25_VL_7B = LVLMSpec(
    name="Qwen2.5-VL-7B-Instruct",
    family="qwen25vl",
    config={
        "text_config": {
            **QWEN2_VL_7B.config["text_config"],
            "max_position_embeddings": 128000,
        },
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
        },
        "tie_word_embeddings": False,
    },
    processor=dict(QWEN2_VL_7B.processor),
    published_params=8.29e9,
)

# llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (penultimate layer, CLS dropped: 576 image tokens),
# a 2-layer GELU projector, Vicuna-7B (Llama) with the vocabulary padded to 32064.
LLAVA_15_7B = LVLMSpec(
    name="llava-1.5-7b-hf",
    family="llava15",
    config={
        "text_config": {
            "model_type": "llama",
            "vocab_size": 32064,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
        },
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": 576,
        "tie_word_embeddings": False,
    },
    processor={"image_size": 336, "patch_size": 14},
    published_params=7.06e9,
)

# Qwen/Qwen2-VL-2B-Instruct: the smallest of the family (for machines without a large GPU).
QWEN2_VL_2B = LVLMSpec(
    name="Qwen2-VL-2B-Instruct",
    family="qwen2vl",
    config={
        "text_config": {
            **QWEN2_VL_7B.config["text_config"],
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
        "vision_config": {**QWEN2_VL_7B.config["vision_config"], "hidden_size": 1536},
        "tie_word_embeddings": True,
    },
    processor=dict(QWEN2_VL_7B.processor),
    published_params=2.21e9,
)

LVLM_SPECS = {s.name: s for s in (QWEN2_VL_7B, QWEN25_VL_7B, LLAVA_15_7B, QWEN2_VL_2B)}


def reduce_layers(spec: LVLMSpec, text_layers: int, vision_layers: int) -> LVLMSpec:
    """The same widths with fewer layers (named ``<name> [<t>/<T> text, <v>/<V> vision layers]``)."""
    out = copy.deepcopy(spec)
    text, vision = out.config["text_config"], out.config["vision_config"]
    depth_key = "depth" if "depth" in vision else "num_hidden_layers"
    full_t, full_v = text["num_hidden_layers"], vision[depth_key]
    text["num_hidden_layers"] = text_layers
    vision[depth_key] = vision_layers
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_layers]
    out.name = f"{spec.name} [{text_layers}/{full_t} text, {vision_layers}/{full_v} vision layers]"
    out.published_params = 0.0  # no published figure for a cut-down model
    return out


def _model_class(family: str):
    import transformers as tf

    return {
        "qwen2vl": (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration),
        "qwen25vl": (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration),
        "llava15": (tf.LlavaConfig, tf.LlavaForConditionalGeneration),
    }[family]


def build_processor(spec: LVLMSpec, max_pixels: int | None = None):
    """The family's processor with the published image settings around the real-shaped tokenizer.

    ``max_pixels`` overrides the published maximum image area (Qwen2-VL / Qwen2.5-VL only).
    """
    import transformers as tf

    from cascadevlm.zoo.tiny_lvlm import real_shape_tokenizer

    tok = real_shape_tokenizer(spec.family)
    p = spec.processor
    if spec.family == "llava15":
        size = p["image_size"]
        image = tf.CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        )
        return tf.LlavaProcessor(
            image_processor=image,
            tokenizer=tok,
            patch_size=p["patch_size"],
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tok.chat_template,
        )
    pixels = {"shortest_edge": p["min_pixels"], "longest_edge": max_pixels or p["max_pixels"]}
    grid = {k: p[k] for k in ("patch_size", "merge_size", "temporal_patch_size")}
    cls = tf.Qwen2VLProcessor if spec.family == "qwen2vl" else tf.Qwen2_5_VLProcessor
    return cls(
        image_processor=tf.Qwen2VLImageProcessor(size=pixels, **grid),
        tokenizer=tok,
        video_processor=tf.Qwen2VLVideoProcessor(size=pixels, **grid),
        chat_template=tok.chat_template,
    )


def build_config(spec: LVLMSpec, tokenizer):
    """The transformers config, with the special-token ids of ``tokenizer`` (the offline one)."""
    config_cls, _ = _model_class(spec.family)
    cfg = copy.deepcopy(spec.config)
    ids = tokenizer.convert_tokens_to_ids
    text = cfg["text_config"]
    text.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.family == "llava15":
        cfg["image_token_index"] = ids("<image>")
    else:
        cfg.update(
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
    return config_cls(**cfg)


def build_lvlm(
    spec: LVLMSpec,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    max_pixels: int | None = None,
    seed: int = 0,
):
    """``(model, processor)``: random weights created directly in ``dtype`` on ``device`` (``meta``
    allocates nothing: for shapes and parameter counts)."""
    _, model_cls = _model_class(spec.family)
    processor = build_processor(spec, max_pixels=max_pixels)
    config = build_config(spec, processor.tokenizer)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval(), processor


def count_params(model: torch.nn.Module) -> int:
    """Parameters, tied weights counted once (as the hub pages count them)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def write_clip_checkpoint(model_name: str, path: str | Path, seed: int = 0) -> Path:
    """Create open_clip's ``model_name`` with random weights (no download) and save its state dict at
    ``path`` (written once), loadable with ``load_clip(model_name, pretrained=path)``."""
    import open_clip

    path = Path(path)
    if not path.exists():
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # a file of this writer's own: concurrent writers never collide
            torch.save(model.state_dict(), tmp)
    return path
