"""Tiny, randomly initialised LVLMs of real architectures (LLaVA, Qwen2-VL, Gemma 3), built offline.

Each builder writes a complete Hugging Face model directory (config, safetensors weights, a byte-level
BPE tokenizer trained here with ``tokenizers``, a chat template, an image processor and a processor), so
``AutoModelForImageTextToText.from_pretrained(d)`` and ``AutoProcessor.from_pretrained(d)`` load it like
any hub checkpoint. Images are 28-56 pixels and give 4 image tokens, so a CPU forward takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

# Words the tokenizer is trained on: prompt wording, option letters, and the class names used in tests.
_CORPUS = [
    "Which of these objects is shown in the image? Answer with the letter of the correct option.",
    "Which of these aircraft variants is shown in the image? Answer with the name of the correct option.",
    "Options: A. astronaut B. cat C. coffee D. rocket E. camera F. horse G. coins H. galaxy",
    "I. china J. flower K. portrait L. Boeing 737-800 M. Airbus A320 N. Cessna 172",
    "The answer is B. It looks like a cat. This is a photo of a horse, a flower and a rocket.",
    "Here is an example image of a coffee cup. The correct option is the camera.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?()-'\" \n",
    "USER: ASSISTANT: system user assistant",
]

# Special tokens both tiny models know: LLaVA's, ChatML's and Qwen2-VL's vision tokens.
_QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_SPECIAL = ["<s>", "</s>", "<pad>", "<image>", *_QWEN_SPECIAL]

# LLaVA-1.5 style: "USER: <image>\n{question} ASSISTANT: {answer}</s>".
_LLAVA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ '\n' }}"
    "{%- else -%}"
    "{{ (message['role'] | upper) + ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

_CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


# Chat templates and tokenizer settings in the shape of the real checkpoints' (chat_template.json and
# tokenizer_config.json of llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct,
# HuggingFaceM4/Idefics3-8B-Llama3): what decides special tokens is kept, the vocabulary is ours.
# LLaVA-1.5: no BOS in the template (the tokenizer adds it), images before text, and the assistant turn
# ends with a space, no end-of-turn token.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen2-VL and Qwen2.5-VL (the same template): ChatML, a default system turn, no BOS, "<|im_end|>" ends turns.
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Idefics3 / SmolVLM: the template writes BOS itself (the tokenizer would add it again), and
# "<end_of_utterance>" ends turns.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Gemma 3 (gemma-3-4b-it's template, trimmed): the template writes BOS, a system turn is folded into the
# first user turn, the assistant is "model", "<end_of_turn>" ends turns and images are "<start_of_image>".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# kind -> (template, BOS, EOS, pad, tokenizer adds BOS, SentencePiece-style (Llama) or byte-level BPE)
REAL_SHAPES = {
    "llava15": (LLAVA15_TEMPLATE, "<s>", "</s>", "<pad>", True, True),
    "qwen2vl": (QWEN2VL_TEMPLATE, None, "<|im_end|>", "<|endoftext|>", False, False),
    "qwen25vl": (QWEN2VL_TEMPLATE, None, "<|im_end|>", "<|endoftext|>", False, False),
    "idefics3": (
        IDEFICS3_TEMPLATE,
        "<|begin_of_text|>",
        "<end_of_utterance>",
        "<|reserved_special_token_0|>",
        True,
        False,
    ),
    "gemma3": (GEMMA3_TEMPLATE, "<bos>", "<eos>", "<pad>", True, True),
}
_REAL_SPECIAL = {
    "llava15": ["<unk>", "<s>", "</s>", "<image>", "<pad>"],
    "qwen2vl": _QWEN_SPECIAL,
    "idefics3": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<end_of_utterance>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
    ],
}
_REAL_SPECIAL["qwen25vl"] = _REAL_SPECIAL["qwen2vl"]
_REAL_SPECIAL["gemma3"] = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
# Named special tokens a family's processor reads off its tokenizer (``tokenizer.image_token`` ...).
_NAMED_SPECIAL = {
    "gemma3": {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
    },
}


def real_shape_tokenizer(kind: str, vocab_size: int = 600):
    """A small tokenizer trained here, with the special-token behaviour of checkpoint family ``kind``
    (``llava15``, ``qwen2vl``, ``qwen25vl``, ``idefics3``; see :data:`REAL_SHAPES`) and its chat template."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in REAL_SHAPES:
        raise ValueError(f"tokenizer shape must be one of {sorted(REAL_SHAPES)}, got {kind!r}")
    template, bos, eos, pad, adds_bos, sentencepiece = REAL_SHAPES[kind]
    special = _REAL_SPECIAL[kind]
    if sentencepiece:  # Llama: "▁" marks a word start; unknown characters map to <unk>
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # Pieces learnt per word (as SentencePiece's), then applied to whole strings as transformers'
        # Llama tokenizer does (split=False): " B" on its own is "▁" + "▁B", unlike "ASSISTANT: B".
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        alphabet = list(string.printable)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if sentencepiece:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first", split=False
        )
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=4096,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>" if sentencepiece else None,
        extra_special_tokens=_NAMED_SPECIAL.get(
            kind, {"image_token": "<image>"} if "<image>" in special else None
        ),
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = template
    return tokenizer


# Wider than the usual 0.02 so that a 64-wide random LM can express confident answers at all (its
# logits are bounded by the output embeddings' norm); LoRA tests need a learnable signal.
_TEXT_INIT = 0.1


def _train_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on a few prompt sentences, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096)


def _finish_tokenizer(tokenizer, bos: str, eos: str, pad: str, template: str):
    tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.pad_token = pad
    tokenizer.padding_side = "left"
    tokenizer.chat_template = template
    return tokenizer


def _save_generation_config(model, tokenizer, eos: str) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(eos),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def _mark_random(out_dir: Path, kind: str, seed: int) -> None:
    """Mark the directory as the project's random-weight model (see :mod:`cascadevlm.provenance`)."""
    from cascadevlm.provenance import write_provenance

    desc = f"tiny {kind} with seeded random weights (seed {seed}), built by cascadevlm.zoo.tiny_lvlm"
    write_provenance(out_dir, {"kind": "random", "description": desc, "seed": seed})


def tiny_llava_processor(tokenizer):
    """A LLaVA processor for 28-pixel images (one 14-pixel patch grid: 4 image tokens) around ``tokenizer``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def _save_random(
    model_cls, config, seed: int, tokenizer, end_token: str, processor, out_dir: Path, kind: str
) -> Path:
    """Initialise ``model_cls(config)`` from ``seed`` and write it, its generation config and ``processor``
    to ``out_dir``, marked as random weights of ``kind``."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _save_generation_config(model, tokenizer, end_token)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    _mark_random(out_dir, kind, seed)
    return out_dir


# The widths every tiny LVLM shares: a 2-layer vision tower on 28x28 images in 14-pixel patches, and a
# 2-layer text model (grouped-query attention) with a 1024-token context.
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=28, patch_size=14)  # fmt: skip
_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip


def build_tiny_llava(out_dir: str | Path, seed: int = 0, real_template: bool = False) -> Path:
    """Write a tiny ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama) and its processor.

    28x28 images, 14-pixel patches: 4 image tokens per image (the CLS token is dropped).
    ``real_template``: llava-1.5-7b-hf's chat template and special-token settings (:data:`REAL_SHAPES`)
    instead of the demo's (which writes BOS and ends the assistant turn with EOS itself).
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    out_dir = Path(out_dir)
    if real_template:
        tokenizer = real_shape_tokenizer("llava15")
    else:
        tokenizer = _finish_tokenizer(_train_tokenizer(), "<s>", "</s>", "<pad>", _LLAVA_TEMPLATE)
    vision = CLIPVisionConfig(**_TINY_VISION, projection_dim=32)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        **_TINY_TEXT,
        initializer_range=_TEXT_INIT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=4,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return _save_random(LlavaForConditionalGeneration, config, seed, tokenizer, "</s>",
                        tiny_llava_processor(tokenizer), out_dir, "llava")  # fmt: skip


def build_tiny_qwen2vl(out_dir: str | Path, seed: int = 0, real_template: bool = False) -> Path:
    """Write a tiny ``Qwen2VLForConditionalGeneration`` and its processor (ChatML chat template).

    Images are resized to 56x56 at most: a 4x4 grid of 14-pixel patches, merged 2x2 into 4 image tokens.
    ``real_template``: Qwen2-VL-7B-Instruct's chat template (default system turn) and tokenizer settings.
    """
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    if real_template:
        tokenizer = real_shape_tokenizer("qwen2vl")
    else:
        tokenizer = _finish_tokenizer(
            _train_tokenizer(), "<|endoftext|>", "<|im_end|>", "<|endoftext|>", _CHATML_TEMPLATE
        )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "initializer_range": _TEXT_INIT,
            # head_dim 16 -> 8 rotary frequencies split over (time, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    _save_generation_config(model, tokenizer, "<|im_end|>")
    pixels = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(
            size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
        ),
        chat_template=tokenizer.chat_template,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    _mark_random(out_dir, "qwen2vl", seed)
    return out_dir


def tiny_gemma3_processor(tokenizer):
    """A Gemma 3 processor for 28-pixel images (4 image tokens after pooling) around ``tokenizer``."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=tokenizer.chat_template,
    )


def build_tiny_gemma3(out_dir: str | Path, seed: int = 0, sliding_window: int = 512) -> Path:
    """Write a tiny ``Gemma3ForConditionalGeneration`` (SigLIP vision tower + Gemma 3 text) and its processor.

    gemma-3's chat template and special tokens (:data:`REAL_SHAPES`); 28x28 images, 14-pixel patches
    pooled to 4 image tokens. Gemma 3 passes ``token_type_ids`` (image tokens attend both ways), so the
    scorer takes its two-forward path. ``sliding_window``: the window of its sliding-attention layer
    (shorter than a prompt to test prompts that outgrow it, as a real Gemma 3's 1024 do with 4+ images).
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    out_dir = Path(out_dir)
    tokenizer = real_shape_tokenizer("gemma3")
    ids = tokenizer.convert_tokens_to_ids
    vision = SiglipVisionConfig(**_TINY_VISION)
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        **_TINY_TEXT,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],  # both of Gemma 3's attention kinds
        initializer_range=_TEXT_INIT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, ids("<end_of_turn>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        initializer_range=_TEXT_INIT,
    )
    return _save_random(Gemma3ForConditionalGeneration, config, seed, tokenizer, "<end_of_turn>",
                        tiny_gemma3_processor(tokenizer), out_dir, "gemma3")  # fmt: skip


BUILDERS = {"llava": build_tiny_llava, "qwen2vl": build_tiny_qwen2vl, "gemma3": build_tiny_gemma3}


def main(argv: list[str] | None = None) -> None:
    """``python -m cascadevlm.zoo.tiny_lvlm OUT_DIR``: write ``OUT_DIR/llava``, ``OUT_DIR/qwen2vl`` and ``OUT_DIR/gemma3``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    for name, build in BUILDERS.items():
        print(build(Path(args.out_dir) / name))


if __name__ == "__main__":
    main()
