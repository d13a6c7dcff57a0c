"""Prompts token for token as real checkpoints expect them (cascadevlm/lvlm/transformers_backend.py's
ChatEncoder): tokenizers and chat templates in the shape of LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Idefics3 and Gemma 3
(cascadevlm/zoo/tiny_lvlm.py's REAL_SHAPES), compared with transformers' own
``processor.apply_chat_template(..., tokenize=True)``."""

from __future__ import annotations

import pytest
import torch
from lvlm_fixtures import photos  # noqa: F401

from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.lvlm.prompts import PromptConfig, build_prompt
from cascadevlm.lvlm.transformers_backend import ChatEncoder, TransformersBackend
from cascadevlm.zoo.tiny_lvlm import (
    build_tiny_llava,
    real_shape_tokenizer,
    tiny_gemma3_processor,
    tiny_llava_processor,
)

KINDS = ["llava15", "qwen2vl", "qwen25vl", "idefics3", "gemma3"]


def make_processor(kind: str):
    """A processor of the family's class around the real-shaped tokenizer, with small images."""
    import transformers as tf

    tok = real_shape_tokenizer(kind)
    if kind == "llava15":
        return tiny_llava_processor(tok)
    if kind == "gemma3":
        return tiny_gemma3_processor(tok)
    if kind in ("qwen2vl", "qwen25vl"):
        pixels = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
        cls = tf.Qwen2VLProcessor if kind == "qwen2vl" else tf.Qwen2_5_VLProcessor
        return cls(
            image_processor=tf.Qwen2VLImageProcessor(size=pixels),
            tokenizer=tok,
            video_processor=tf.Qwen2VLVideoProcessor(size=pixels),
            chat_template=tok.chat_template,
        )
    image = tf.Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 28}, max_image_size={"longest_edge": 28}
    )
    return tf.Idefics3Processor(
        image_processor=image, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template
    )


@pytest.fixture(scope="module", params=KINDS)
def processor(request):
    return request.param, make_processor(request.param)


def _with_images(messages: list[dict], images: list) -> list[dict]:
    """The prompt's messages with each image part carrying its image, as apply_chat_template takes them."""
    it = iter(images)
    out = []
    for m in messages:
        parts = [{**p, "image": next(it)} if p["type"] == "image" else p for p in m["content"]]
        out.append({**m, "content": parts})
    return out


def test_prompt_ids_equal_apply_chat_template(processor, photos):  # noqa: F811
    kind, proc = processor
    enc = ChatEncoder(proc)
    req = LVLMRequest(image=photos["cat"], candidates=["cat", "horse", "rocket"], key="c")
    prompt = build_prompt(req, PromptConfig())
    ours = enc.encode([prompt])["input_ids"][0].tolist()
    ref = proc.apply_chat_template(
        _with_images(prompt.messages, prompt.images),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    ref = ref[0] if isinstance(ref[0], list) else ref
    assert ours == list(ref)
    tok = proc.tokenizer
    if tok.bos_token is None:  # Qwen: no BOS at all
        assert ours[0] == tok.convert_tokens_to_ids("<|im_start|>")
    else:  # exactly one BOS, first: LLaVA-1.5's from the tokenizer, Idefics3's from the template
        assert ours[0] == tok.bos_token_id and ours.count(tok.bos_token_id) == 1


# The reply "B" as the model writes it: LLaVA-1.5 ends its reply with end of sequence (its template has
# no end-of-turn token), ChatML with <|im_end|>, Idefics3 with <end_of_utterance>, Gemma 3 with
# <end_of_turn>.
ANSWER_TOKENS = {
    "llava15": ["\u2581B", "</s>"],
    "qwen2vl": ["B", "<|im_end|>"],
    "qwen25vl": ["B", "<|im_end|>"],
    "idefics3": ["\u0120B", "<end_of_utterance>"],
    "gemma3": ["B", "<end_of_turn>"],
}


def test_answer_tokens_end_the_turn(processor):
    kind, proc = processor
    enc = ChatEncoder(proc)
    assert proc.tokenizer.convert_ids_to_tokens(enc.answer_ids("B")) == ANSWER_TOKENS[kind]


def test_answer_ids_continue_the_conversation(processor, photos):  # noqa: F811
    """Prompt ids + answer ids are the ids of the conversation with the reply, as the template writes it
    (up to the end of the turn; LLaVA-1.5 gets end of sequence where its template writes a space)."""
    kind, proc = processor
    enc = ChatEncoder(proc)
    req = LVLMRequest(image=photos["horse"], candidates=["cat", "Boeing 737-800"], key="h")
    cfg = PromptConfig(options="names")
    prompt = build_prompt(req, cfg)
    ids = enc.encode([prompt])["input_ids"][0].tolist()
    full = proc.apply_chat_template(
        _with_images(
            [
                *prompt.messages,
                {"role": "assistant", "content": [{"type": "text", "text": "Boeing 737-800"}]},
            ],
            prompt.images,
        ),
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    full = list(full[0] if isinstance(full[0], list) else full)
    answer = enc.answer_ids("Boeing 737-800")
    tok = proc.tokenizer
    n = len(ids) + len(answer)
    if kind == "llava15":
        assert full[: n - 1] == ids + answer[:-1] and answer[-1] == tok.eos_token_id
    else:
        assert full[:n] == ids + answer


# ------------------------------------------------------------------------------ scoring a real template
@pytest.fixture(scope="module")
def llava15_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava15"), real_template=True)


def _reference_logprob(backend: TransformersBackend, request: LVLMRequest, candidate: int) -> float:
    """log p(answer | prompt), the prompt tokenized by transformers' apply_chat_template itself."""
    enc = backend.encoder
    prompt = build_prompt(request, backend.prompt)
    inputs = enc.processor.apply_chat_template(
        _with_images(prompt.messages, prompt.images),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    answer = enc.answer_ids(prompt.answers[prompt.display_of(candidate)])
    n = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logits = backend.net(**inputs).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[n - 1 + j, t]) for j, t in enumerate(answer))


def test_llava15_scores_use_bos_and_end_of_sequence(llava15_dir, photos):  # noqa: F811
    backend = TransformersBackend(str(llava15_dir), prompt=PromptConfig(options="names"), device="cpu")
    req = LVLMRequest(image=photos["cat"], candidates=["cat", "Boeing 737", "Boeing 737-800"], key="c")
    (ans,) = backend.choose([req])
    ref = [_reference_logprob(backend, req, c) for c in range(3)]
    assert ans.scores == pytest.approx(ref, abs=2e-4)


def test_a_name_that_is_a_prefix_of_another_can_lose(llava15_dir, photos):  # noqa: F811
    """The model makes end of sequence likely only after "A320": "Airbus A320" must win. Without the
    end-of-sequence token scored, "Airbus" (its tokens a prefix of the other's, so never less likely)
    would always win."""
    backend = TransformersBackend(str(llava15_dir), prompt=PromptConfig(options="names"), device="cpu")
    enc = backend.encoder
    short, long = enc.answer_ids("Airbus"), enc.answer_ids("Airbus A320")
    eos = enc.tokenizer.eos_token_id
    assert short[-1] == long[-1] == eos and long[: len(short) - 1] == short[:-1]
    last = long[-2]  # the token before end of sequence

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"][:, -output.logits.shape[1] :]
        output.logits[..., eos] += torch.where(ids == last, 30.0, -30.0).to(output.logits.dtype)
        return output

    handle = backend.net.register_forward_hook(hook, with_kwargs=True)
    try:
        req = LVLMRequest(image=photos["horse"], candidates=["Airbus", "Airbus A320"], key="b")
        (ans,) = backend.choose([req])
    finally:
        handle.remove()
    assert ans.choice == 1, ans.scores
