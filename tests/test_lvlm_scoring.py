"""Candidate scoring and generation with tiny LLaVA / Qwen2-VL models (cascadevlm/lvlm/scoring.py,
cascadevlm/lvlm/transformers_backend.py)."""

from __future__ import annotations

import pytest
import torch
from lvlm_fixtures import (  # noqa: F401
    gemma3_dir,
    gemma3_short_window_dir,
    llava_dir,
    photos,
    qwen2vl_dir,
    tiny_lvlm_dir,
)

from cascadevlm.lvlm.base import Exemplar, LVLMRequest
from cascadevlm.lvlm.prompts import PromptConfig, build_prompt
from cascadevlm.lvlm.transformers_backend import TransformersBackend


def _requests(photos):  # noqa: F811
    """Five requests with 2-4 candidates (different prompt and answer lengths) and one in-context turn."""
    names = sorted(photos)
    reqs = []
    for i, true in enumerate(["cat", "horse", "rocket", "flower", "coffee"]):
        others = [n for n in names if n != true]
        cands = [true, *others[i : i + 1 + i % 3]]
        reqs.append(LVLMRequest(image=photos[true], candidates=cands, fallback=0, key=f"img{i}"))
    reqs[1].candidates = ["horse", "Boeing 737-800 (winglets)", "cat"]  # a long multi-token name
    reqs[3].examples = [Exemplar(photos["astronaut"], reqs[3].candidates[1])]
    return reqs


def _hand_logprob(backend: TransformersBackend, request: LVLMRequest, candidate: int) -> float:
    """log p(answer tokens | prompt) from one unbatched, uncached forward over prompt + answer."""
    enc = backend.encoder
    prompt = build_prompt(request, backend.prompt)
    text = enc.render(prompt.messages)
    inputs = enc.processor(
        text=[text],
        images=prompt.images,
        return_tensors="pt",
        add_special_tokens=enc.add_special_tokens(text),
    )
    answer = enc.answer_ids(prompt.answers[prompt.display_of(candidate)])
    n = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    for key in ("mm_token_type_ids", "token_type_ids"):  # Qwen2-VL's / Gemma 3's: the answer is text
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], torch.zeros((1, len(answer)), dtype=torch.long)], 1)
    with torch.no_grad():
        logits = backend.net(**inputs).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[n - 1 + j, tok]) for j, tok in enumerate(answer))


@pytest.mark.parametrize("options,shuffle", [("letters", False), ("names", True)])
def test_scores_equal_hand_computed_logprobs(tiny_lvlm_dir, photos, options, shuffle):  # noqa: F811
    prompt = PromptConfig(options=options, shuffle=shuffle, shuffle_seed=3)
    backend = TransformersBackend(str(tiny_lvlm_dir), prompt=prompt, device="cpu", batch_size=8)
    reqs = _requests(photos)
    answers = backend.choose(reqs)
    assert backend.calls == len(reqs)
    for req, ans in zip(reqs, answers, strict=True):
        hand = [_hand_logprob(backend, req, c) for c in range(len(req.candidates))]
        assert ans.scores == pytest.approx(hand, abs=2e-4)
        assert ans.choice == max(range(len(hand)), key=hand.__getitem__)
        assert ans.raw == "" and ans.fallback is None
    if shuffle:  # the shuffle really reorders some prompts, and scores still map back to candidates
        assert any(build_prompt(r, prompt).order != list(range(len(r.candidates))) for r in reqs)


def test_batched_scores_equal_one_by_one(tiny_lvlm_dir, photos):  # noqa: F811
    backend = TransformersBackend(str(tiny_lvlm_dir), device="cpu", batch_size=8)
    reqs = _requests(photos)
    batched = backend.choose(reqs)
    single = [backend.choose([r])[0] for r in reqs]
    for b, s in zip(batched, single, strict=True):
        assert b.scores == pytest.approx(s.scores, abs=1e-4)
        assert b.choice == s.choice


@pytest.mark.parametrize("batch_size,window", [(3, "long"), (2, "short")])
def test_gemma3_batched_scores_equal_per_candidate_forwards(request, photos, batch_size, window):  # noqa: F811
    """Gemma 3 (token_type_ids: the prompts first, then the candidates on their cache) at batch 2 and 3,
    one prompt with an in-context image (two images in it), against one uncached forward per candidate.
    The processor used to get one flat image list for the whole batch and refuse it. With prompts longer
    than the sliding window (``short``), the sliding layers' cache keeps the window only and a custom
    mask would let them see past it: the candidates are appended to the prompts instead."""
    from cascadevlm.lvlm.scoring import one_forward_possible

    model = request.getfixturevalue("gemma3_dir" if window == "long" else "gemma3_short_window_dir")
    backend = TransformersBackend(
        str(model), prompt=PromptConfig(options="names"), device="cpu", batch_size=batch_size
    )
    reqs = _requests(photos)[1:4]
    batch = backend.prepare(reqs[:batch_size])
    assert not one_forward_possible(batch.inputs)  # the two-forward path
    answers = backend.choose(reqs)
    assert backend.fitted_batch_size == batch_size and backend.calls == len(reqs)
    for req, ans in zip(reqs, answers, strict=True):
        hand = [_hand_logprob(backend, req, c) for c in range(len(req.candidates))]
        assert ans.scores == pytest.approx(hand, abs=2e-4)
        assert ans.choice == max(range(len(hand)), key=hand.__getitem__)


def test_length_norm_divides_by_answer_tokens(llava_dir, photos):  # noqa: F811
    reqs = _requests(photos)[1:2]
    plain = TransformersBackend(str(llava_dir), device="cpu", prompt=PromptConfig(options="names"))
    normed = TransformersBackend(
        str(llava_dir), device="cpu", prompt=PromptConfig(options="names"), length_norm=True
    )
    sums, means = plain.score(reqs)[0], normed.score(reqs)[0]
    lengths = [len(plain.encoder.answer_ids(c)) for c in reqs[0].candidates]
    assert len(set(lengths)) > 1
    assert means == pytest.approx([s / n for s, n in zip(sums, lengths, strict=True)], abs=1e-5)


def _force_tokens(backend: TransformersBackend, texts: list[str]):
    """Make the LM head emit the tokens of ``texts`` in order (one per generation step), then EOS."""
    tok = backend.encoder.tokenizer
    plan = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"]]
    plan.append(backend.net.generation_config.eos_token_id)
    step = {"n": 0}

    def hook(module, args, output):
        target = plan[min(step["n"], len(plan) - 1)]
        step["n"] += 1
        output = output.clone()
        output[..., target] += 1e4
        return output

    return backend.net.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize(
    "answer,expected", [(" B", "display1"), ("The answer is horse.", "horse"), (" ???", None)]
)
def test_generate_mode_parses_and_maps_back(tiny_lvlm_dir, photos, answer, expected):  # noqa: F811
    prompt = PromptConfig(shuffle=True, shuffle_seed=1)
    backend = TransformersBackend(
        str(tiny_lvlm_dir), mode="generate", prompt=prompt, device="cpu", max_new_tokens=12
    )
    req = LVLMRequest(
        image=photos["horse"], candidates=["cat", "horse", "rocket", "coffee"], fallback=2, key="h"
    )
    handle = _force_tokens(backend, [answer])
    try:
        (ans,) = backend.choose([req])
    finally:
        handle.remove()
    assert ans.raw.strip() == answer.strip()
    if expected is None:
        assert (ans.choice, ans.fallback) == (2, "unparseable")
    elif expected == "display1":
        assert ans.choice == build_prompt(req, prompt).order[1] and ans.fallback is None
    else:
        assert req.candidates[ans.choice] == expected and ans.fallback is None


def test_reasoning_prompt_generates_past_the_short_length_and_reads_the_final_answer(qwen2vl_dir, photos):  # noqa: F811
    """A reasoning prompt: the model explains (longer than the 16 tokens of a direct answer), names
    another option on the way, and ends with "Answer: B"; the record keeps the raw text, the choice is B."""
    prompt = PromptConfig(reasoning=True)
    backend = TransformersBackend(str(qwen2vl_dir), mode="generate", prompt=prompt, device="cpu")
    req = LVLMRequest(image=photos["horse"], candidates=["cat", "horse", "rocket"], fallback=0, key="h")
    said = "<think>A cat? The mane says no.</think>\nThe animal is large, not A. Answer: B"
    assert len(backend.encoder.tokenizer(said)["input_ids"]) > 16
    handle = _force_tokens(backend, [said])
    try:
        (ans,) = backend.choose([req])
    finally:
        handle.remove()
    assert ans.raw == said
    assert (ans.choice, ans.fallback) == (1, None)
    text = backend.encoder.render(build_prompt(req, prompt).messages)
    assert "end with a final line of the form 'Answer: X'" in text


def test_generate_batched_equals_one_by_one_and_falls_back(tiny_lvlm_dir, photos):  # noqa: F811
    backend = TransformersBackend(str(tiny_lvlm_dir), mode="generate", device="cpu", max_new_tokens=6)
    reqs = _requests(photos)
    for i, r in enumerate(reqs):
        r.fallback = i % len(r.candidates)
    batched = backend.choose(reqs)
    single = [backend.choose([r])[0] for r in reqs]
    assert [a.raw for a in batched] == [a.raw for a in single]
    assert backend.calls == 2 * len(reqs)
    for r, a in zip(reqs, batched, strict=True):  # random weights: gibberish, never a crash
        assert 0 <= a.choice < len(r.candidates)
        if a.fallback == "unparseable":
            assert a.choice == r.fallback


@torch.inference_mode()
def _reference_scores(model, inputs, answers, pad_id):
    """The previous implementation, kept as the reference: full-prompt logits, and a copy of each
    prompt's cache per candidate (``reorder_cache``), all candidates in one forward."""
    import torch.nn.functional as F

    from cascadevlm.lvlm.scoring import _cache_kwarg, forward_inputs, rope_state_module

    mask = inputs["attention_mask"]
    rows = [(b, a) for b in range(mask.shape[0]) for a in answers[b]]
    rope = rope_state_module(model)
    out = model(**forward_inputs(model, inputs), use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
    owner = torch.tensor([b for b, _ in rows])
    width = max(len(a) for _, a in rows)
    ans = torch.full((len(rows), width), pad_id, dtype=torch.long)
    ans_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
    for i, (_, a) in enumerate(rows):
        ans[i, : len(a)] = torch.tensor(a)
        ans_mask[i, : len(a)] = 1
    token_logp = torch.zeros((len(rows), width))
    token_logp[:, 0] = first[owner].gather(-1, ans[:, :1]).squeeze(-1)
    if width > 1:
        cache.reorder_cache(owner)
        pos = mask.long().sum(-1)[owner, None] + torch.arange(width - 1)
        if rope is not None:
            pos = (pos + rope.rope_deltas[owner].view(-1, 1)).unsqueeze(0).expand(3, -1, -1)
        out2 = model(
            input_ids=ans[:, :-1],
            attention_mask=torch.cat([mask[owner], ans_mask[:, :-1]], 1),
            position_ids=pos,
            use_cache=True,
            **{_cache_kwarg(model): cache},
        )
        logp = F.log_softmax(out2.logits.float(), dim=-1)
        token_logp[:, 1:] = logp.gather(-1, ans[:, 1:].unsqueeze(-1)).squeeze(-1)
    flat = (token_logp * ans_mask).sum(-1).tolist()
    scores, i = [], 0
    for b in range(mask.shape[0]):
        scores.append(flat[i : i + len(answers[b])])
        i += len(answers[b])
    return scores


@pytest.mark.parametrize("tree_mask, one_forward", [(True, True), (True, False), (False, False)])
def test_shared_cache_scores_equal_reference(tiny_lvlm_dir, photos, tree_mask, one_forward):  # noqa: F811
    """Prompts and candidates in one forward under one mask, or one shared prompt cache + last-position
    logits (tree mask, or one forward per candidate slot) give the scores of the copy-the-cache-per-
    candidate implementation."""
    from cascadevlm.lvlm.scoring import score_candidates

    backend = TransformersBackend(str(tiny_lvlm_dir), prompt=PromptConfig(options="names"), device="cpu")
    reqs = _requests(photos)
    prompts = [build_prompt(r, backend.prompt) for r in reqs]
    enc = backend.encoder
    inputs = enc.encode(prompts)
    ids = [[enc.answer_ids(a) for a in p.answers] for p in prompts]
    ids[0][0] = ids[0][0][-1:]  # a one-token answer among longer ones
    assert len({len(a) for row in ids for a in row}) > 2
    ours = score_candidates(
        backend.net, inputs, ids, enc.pad_id, tree_mask=tree_mask, one_forward=one_forward
    )
    ref = _reference_scores(backend.net, enc.encode(prompts), ids, enc.pad_id)
    for o, r in zip(ours, ref, strict=True):
        assert o == pytest.approx(r, abs=1e-4)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_out_of_memory_halves_the_batch_with_the_same_answers(qwen2vl_dir, photos, caplog, mode):  # noqa: F811
    """A forward that fails on more than 2 prompts (as a GPU out of memory would): the backend goes on
    with batches of 2, says so once, and answers as a batch-2 backend does."""
    reqs = _requests(photos) * 2
    backend = TransformersBackend(str(qwen2vl_dir), mode=mode, device="cpu", batch_size=8, max_new_tokens=4)
    sizes = []

    def fail_on_large(module, args, kwargs):
        ids = kwargs.get("input_ids")
        images = kwargs.get("pixel_values", kwargs.get("mm_encoder_outputs"))  # generate encodes first
        if ids is not None and images is not None:  # a prompt forward
            sizes.append(ids.shape[0])
            if ids.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    handle = backend.net.register_forward_pre_hook(fail_on_large, with_kwargs=True)
    try:
        with caplog.at_level("WARNING", logger="cascadevlm.lvlm.transformers_backend"):
            answers = backend.choose(reqs)
    finally:
        handle.remove()
    small = TransformersBackend(str(qwen2vl_dir), mode=mode, device="cpu", batch_size=2, max_new_tokens=4)
    expected = small.choose(reqs)
    assert [a.choice for a in answers] == [a.choice for a in expected]
    assert [a.raw for a in answers] == [a.raw for a in expected]
    if mode == "score":
        for a, e in zip(answers, expected, strict=True):
            assert a.scores == pytest.approx(e.scores, abs=1e-4)
    assert backend.fitted_batch_size == 2 and backend.calls == len(reqs)
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2  # halved twice, then batches of 2 throughout
    messages = [r.getMessage() for r in caplog.records if "did not fit" in r.getMessage()]
    assert messages == [
        "LVLM batch of 8 did not fit in cpu memory; going on with batches of 4",
        "LVLM batch of 4 did not fit in cpu memory; going on with batches of 2",
    ]


def test_out_of_memory_at_batch_one_names_the_options(qwen2vl_dir, photos):  # noqa: F811
    backend = TransformersBackend(str(qwen2vl_dir), device="cpu", batch_size=2)

    def always(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = backend.net.register_forward_pre_hook(always, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="lower max_pixels or prompt.max_images"):
            backend.choose(_requests(photos)[:2])
    finally:
        handle.remove()


def test_prompt_longer_than_the_window_is_refused_before_the_model_runs(llava_dir, photos):  # noqa: F811
    backend = TransformersBackend(str(llava_dir), device="cpu", prompt=PromptConfig(max_images=3))
    calls = []
    handle = backend.net.register_forward_pre_hook(lambda *a: calls.append(1))
    backend.net.config.text_config.max_position_embeddings = 40  # a window shorter than any prompt here
    try:
        with pytest.raises(ValueError) as err:
            backend.choose(_requests(photos)[:2])
    finally:
        handle.remove()
        backend.net.config.text_config.max_position_embeddings = 1024
    message = str(err.value)
    assert "\n" not in message and "context window of 40" in message
    assert "prompt.max_images (now 3)" in message and "max_pixels" in message
    assert calls == []


def test_max_pixels_bounds_qwen2vl_image_tokens_and_is_refused_for_llava(qwen2vl_dir, llava_dir, photos):  # noqa: F811
    from cascadevlm.lvlm.transformers_backend import image_token_count

    small = TransformersBackend(str(qwen2vl_dir), device="cpu", max_pixels=28 * 28).load()
    big = TransformersBackend(str(qwen2vl_dir), device="cpu").load()
    image = photos["cat"].resize((56, 56))
    assert image_token_count(big.encoder.processor, image) == 4  # (56 / 14) ** 2 / 4
    assert image_token_count(small.encoder.processor, image) == 1  # (28 / 14) ** 2 / 4
    with pytest.raises(ValueError, match="remove min_pixels / max_pixels"):
        TransformersBackend(str(llava_dir), device="cpu", max_pixels=28 * 28).load()


def test_preprocessing_in_dataloader_workers_gives_the_same_scores(tiny_lvlm_dir, photos):  # noqa: F811
    """``backend.prepare`` as a DataLoader collate_fn in 2 worker processes: same scores as choose()."""
    backend = TransformersBackend(str(tiny_lvlm_dir), device="cpu", batch_size=3)
    reqs = _requests(photos)
    direct = backend.choose(reqs)
    loader = torch.utils.data.DataLoader(reqs, batch_size=3, collate_fn=backend.prepare, num_workers=2)
    from_workers = [a for batch in loader for a in backend.choose(batch)]
    assert [a.choice for a in from_workers] == [a.choice for a in direct]
    for a, d in zip(from_workers, direct, strict=True):
        assert a.scores == pytest.approx(d.scores, abs=1e-5)
