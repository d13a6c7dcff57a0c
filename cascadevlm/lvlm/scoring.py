"""Candidate scoring: the log-likelihood of each candidate's answer tokens after the prompt.

All candidates of a batch of prompts are scored in one forward, as long as a bare forward of the
prompts (the floor): row ``b`` holds the (left-padded) prompt ``b``, then candidate 1's answer tokens
(all but the last), candidate 2's, ...; a 4-D attention mask lets the prompt attend causally as usual
and each answer token see its prompt and the earlier tokens of its own candidate only. Logits are kept
for the prompt's last position and the answer tokens only (``logits_to_keep``: a 7B model's
full-prompt logits would be batch x length x vocabulary floats) and no key/value cache is kept at all
(the earlier designs kept the prompt's cache, once, or once per candidate: ~77 GiB for LLaVA-1.5-7B
with 6 images, batch 8, top-5).

Models with a per-token input of their own beside the ids and mask (Gemma 3's and PaliGemma's
``token_type_ids``, which let image tokens attend both ways) build their prompt mask themselves: their
prompts run first, keeping the cache and last-position logits, then every candidate's tokens in one
forward on that cache under the same kind of mask (two forwards). Attention implementations that take
no 4-D mask (FlashAttention) score one candidate slot at a time on that cache, cropped back to the
prompt after each slot. Models with sliding-window layers (Gemma 3) whose prompt outgrows the window
get each candidate slot appended to the prompts, one plain forward per slot: the sliding layers' cache
keeps only the window, and a custom mask would let them see past it. Nothing is generated, so there is
nothing to parse.

Positions: text-only rotary models (LLaVA's Llama, Idefics3, ...) get ``cumsum(mask) - 1`` so a left-
padded prompt sees the same positions as an unpadded one. Multimodal-rope models (Qwen2-VL, Qwen2.5-VL)
get the 3-D positions their own ``get_rope_index`` computes for the prompt; answer tokens continue from
the offset it returns (or, on a cache, the offset the model stored).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding: ``cumsum(mask) - 1`` (pad positions get 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def rope_state_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The submodule holding multimodal-rope offsets (``rope_deltas``), or None for 1-D rope models."""
    for module in model.modules():
        if "rope_deltas" in vars(module) and hasattr(module, "get_rope_index"):
            return module
    return None


def _cache_kwarg(model: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.x) or ``past_key_values`` (older and remote-code models)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the forward
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_inputs(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict:
    """Processor outputs plus the position ids this model needs for left-padded batches."""
    kwargs = dict(inputs)
    if rope_state_module(model) is None and "position_ids" not in kwargs:
        kwargs["position_ids"] = text_position_ids(kwargs["attention_mask"])
    return kwargs


def append_answers(
    inputs: Mapping[str, torch.Tensor], answers: list[list[int]], pad_id: int
) -> tuple[dict, torch.Tensor]:
    """Prompts (left-padded processor outputs, one row each) followed by one answer each (right-padded).

    Returns the model inputs and ``labels``: the answer ids, ``-100`` on the prompt and on padding. Other
    per-token tensors (e.g. ``mm_token_type_ids``) are extended with zeros (text).
    """
    ids = inputs["input_ids"]
    batch, length = ids.shape
    if len(answers) != batch:
        raise ValueError(f"{len(answers)} answers for {batch} prompts")
    width = max(len(a) for a in answers)
    ans = torch.full((batch, width), pad_id, dtype=ids.dtype, device=ids.device)
    ans_mask = torch.zeros((batch, width), dtype=inputs["attention_mask"].dtype, device=ids.device)
    for i, a in enumerate(answers):
        ans[i, : len(a)] = torch.tensor(a, dtype=ids.dtype)
        ans_mask[i, : len(a)] = 1
    out = dict(inputs)
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 2 and tuple(value.shape) == (batch, length):
            out[key] = torch.cat(
                [value, torch.zeros((batch, width), dtype=value.dtype, device=value.device)], 1
            )
    out["input_ids"] = torch.cat([ids, ans], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], ans_mask], 1)
    labels = torch.full_like(out["input_ids"], -100)
    labels[:, length:] = torch.where(ans_mask.bool(), ans, torch.full_like(ans, -100))
    return out, labels


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of ``log p(label_t | tokens < t)`` over labelled positions (labels != -100).

    ``logits[:, t]`` predicts token ``t + 1``, as a causal LM's output does.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens only (the LoRA objective)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _attn_implementation(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    names = [getattr(config, "_attn_implementation", None)]
    for sub in ("text_config", "language_config"):
        names.append(getattr(getattr(config, sub, None), "_attn_implementation", None))
    return " ".join(str(n) for n in names if n)


def supports_tree_mask(model: torch.nn.Module) -> bool:
    """Whether the model takes a custom 4-D attention mask (eager / sdpa / flex, not FlashAttention)."""
    return "flash" not in _attn_implementation(model)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


@torch.inference_mode()
def score_candidates(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    answers: list[list[list[int]]],
    pad_id: int,
    length_norm: bool = False,
    tree_mask: bool | None = None,
    one_forward: bool | None = None,
) -> list[list[float]]:
    """Log-likelihood of every answer of every prompt, sharing each prompt's forward and cache.

    Args:
        model: a causal image-text-to-text model.
        inputs: processor outputs for ``B`` left-padded prompts (images included).
        answers: per prompt, the token ids of each candidate's answer.
        pad_id: token id used to pad answers (masked out).
        length_norm: divide each sum by its number of tokens (mean log-probability per token).
        tree_mask: all candidates in one forward under a 4-D mask (default: where the attention
            implementation takes one), else one forward per candidate slot.
        one_forward: with the tree mask, the prompts and every candidate in a single forward and no
            cache (default: where :func:`one_forward_possible`), else the prompts first, then the
            candidates on their cache.

    Returns:
        ``scores[b][i]``: the summed (or mean) log-probability of ``answers[b][i]``.
    """
    mask = inputs["attention_mask"]
    batch, length = mask.shape
    if len(answers) != batch:
        raise ValueError(f"{len(answers)} answer lists for {batch} prompts")
    if any(len(a) == 0 for row in answers for a in row):
        raise ValueError("every candidate answer needs at least one token")
    if any(len(row) == 0 for row in answers):
        raise ValueError("every prompt needs at least one candidate answer")
    if tree_mask is None:
        tree_mask = supports_tree_mask(model)
    if one_forward is None:
        one_forward = tree_mask and one_forward_possible(inputs)
    window = sliding_window(model)
    if window is not None and length + max(len(a) for row in answers for a in row) > window:
        sums = _appended_scores(model, inputs, answers, pad_id)
    elif one_forward:
        sums = _one_forward_scores(model, inputs, answers)
    else:
        out = model(**forward_inputs(model, inputs), use_cache=True, logits_to_keep=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # next-token distribution after each prompt
        del out
        rest = _tree_scores if tree_mask else _slot_scores
        sums = rest(model, cache, mask, first, answers)  # per prompt, per candidate: summed log-probability
    if length_norm:
        sums = [
            [v / len(a) for v, a in zip(row, ans, strict=True)]
            for row, ans in zip(sums, answers, strict=True)
        ]
    return sums


def sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window of the model's sliding-window layers (Gemma 3, Mistral, ...), or None."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None) or ["sliding_attention"]
    if not window or getattr(text, "use_sliding_window", True) is False or "sliding_attention" not in types:
        return None
    return int(window)


def _appended_scores(model, inputs: Mapping[str, torch.Tensor], answers, pad_id: int) -> list[list[float]]:
    """Candidate slot ``j`` of every prompt appended to it, one plain forward per slot (2-D mask, no
    cache). For prompts longer than a sliding window: the sliding layers' cache keeps only the window
    (the shared cache does not fit the candidates' mask) and a custom 4-D mask would let those layers
    see past it; a plain mask lets the model build its own window."""
    sums = [[0.0] * len(row) for row in answers]
    for j in range(max(len(row) for row in answers)):
        rows = [row[j] if j < len(row) else row[0] for row in answers]
        extended, labels = append_answers(inputs, rows, pad_id)
        keep = max(len(a) for a in rows) + 1  # the prompt's last position, then the answers
        logits = model(**forward_inputs(model, extended), use_cache=False, logits_to_keep=keep).logits
        got = label_logprobs(logits, labels[:, -keep:]).tolist()
        for b, row in enumerate(answers):
            if j < len(row):
                sums[b][j] = got[b]
    return sums


# Per-token inputs the single forward extends for the candidates' tokens. Any other per-token input
# (e.g. Gemma 3's or PaliGemma's ``token_type_ids``, which make image tokens attend both ways) means the
# model builds a prompt mask of its own: those prompts run first, on their own (two forwards).
_EXTENDED_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids")


def one_forward_possible(inputs: Mapping[str, torch.Tensor]) -> bool:
    """Whether the prompts can run in the same forward as the candidates under one custom causal mask:
    no per-token input other than ids, mask and Qwen2-VL's modality types."""
    ids = inputs["input_ids"]
    return not any(
        isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == tuple(ids.shape)
        for k, v in inputs.items()
        if k not in _EXTENDED_INPUTS
    )


def _prompt_positions(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]):
    """The prompts' position ids and what the answer tokens' positions add to ``prompt length + offset``:
    ``cumsum(mask) - 1`` and 0 for 1-D rope; the model's own 3-D positions and offsets for mrope."""
    mask = inputs["attention_mask"]
    rope = rope_state_module(model)
    if rope is None:
        return text_position_ids(mask), 0
    import inspect

    params = inspect.signature(rope.get_rope_index).parameters
    kwargs = {k: v for k, v in inputs.items() if k in params and k != "attention_mask"}
    positions, deltas = rope.get_rope_index(**kwargs, attention_mask=mask)
    return positions, deltas.to(mask.device).view(-1, 1)


def _one_forward_scores(model, inputs: Mapping[str, torch.Tensor], answers) -> list[list[float]]:
    """Prompts and every candidate's tokens (but the last) in one forward without a cache: row ``b`` is
    prompt ``b`` (left-padded, causal) then its candidates one after another, each seeing the prompt and
    its own earlier tokens only; logits are kept for the prompt's last position and the candidates."""
    mask = inputs["attention_mask"]
    device = mask.device
    batch, length = mask.shape
    ids, seg, offset, target = _tree_layout(answers, device)
    width = ids.shape[1]
    real = seg >= 0
    valid = mask.bool()
    causal = torch.ones((length, length), dtype=torch.bool, device=device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=device)  # pads see themselves (no empty row)
    prompt_rows = torch.cat(
        [
            (causal & valid[:, None, :]) | diagonal,
            torch.zeros((batch, length, width), dtype=torch.bool, device=device),
        ],
        -1,
    )
    same = (seg[:, :, None] == seg[:, None, :]) & real[:, :, None]
    own = (same & torch.ones((width, width), dtype=torch.bool, device=device).tril()) | torch.eye(
        width, dtype=torch.bool, device=device
    )
    answer_rows = torch.cat([valid[:, None, :].expand(-1, width, -1) & real[:, :, None], own], -1)
    allowed = torch.cat([prompt_rows, answer_rows], 1)
    dtype = _model_dtype(model)
    full_mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )
    positions, shift = _prompt_positions(model, inputs)
    after = mask.long().sum(-1, keepdim=True) + offset + shift
    if positions.dim() == 3:  # mrope: (3, batch, length)
        after = after.unsqueeze(0).expand(positions.shape[0], -1, -1)
    kwargs = dict(inputs)
    kwargs["input_ids"] = torch.cat([inputs["input_ids"], ids.to(inputs["input_ids"].dtype)], 1)
    kwargs["attention_mask"] = full_mask[:, None]
    if "mm_token_type_ids" in inputs:  # the candidates are text
        types = inputs["mm_token_type_ids"]
        kwargs["mm_token_type_ids"] = torch.cat([types, types.new_zeros((batch, width))], 1)
    kwargs["position_ids"] = torch.cat([positions, after.to(positions.dtype)], -1)
    out = model(**kwargs, use_cache=False, logits_to_keep=width + 1)
    logits = out.logits  # (batch, width + 1, vocab): the prompt's last position, then the candidates
    del out
    sums = _first_token_scores(F.log_softmax(logits[:, 0].float(), dim=-1), answers)
    if width == 0:
        return sums
    return _add_answer_scores(sums, logits[:, 1:], seg, target, answers)


def _add_answer_scores(sums, logits: torch.Tensor, seg: torch.Tensor, target: torch.Tensor, answers):
    """``sums`` plus, per candidate, the log-probabilities of its tokens after the first (``logits[b, t]``
    predicts ``target[b, t]`` of candidate ``seg[b, t]``; padding, -1, goes to a dropped extra slot)."""
    real = seg >= 0
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    most = max(len(row) for row in answers)
    slot = torch.where(real, seg, most)
    totals = torch.zeros((seg.shape[0], most + 1), dtype=logp.dtype, device=seg.device)
    totals = totals.scatter_add_(1, slot, logp * real).tolist()
    return [[s + totals[b][c] for c, s in enumerate(row)] for b, row in enumerate(sums)]


def _continuation_positions(
    model: torch.nn.Module, mask: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Position ids of tokens ``offsets`` (``B x W``) after each left-padded prompt."""
    pos = mask.long().sum(-1, keepdim=True) + offsets
    rope = rope_state_module(model)
    if rope is not None:  # 3-D multimodal rope: text continues from the prompt's stored offset
        pos = (pos + rope.rope_deltas.to(mask.device).view(-1, 1)).unsqueeze(0).expand(3, -1, -1)
    return pos


def _first_token_scores(first: torch.Tensor, answers) -> list[list[float]]:
    """``log p(first answer token | prompt)`` of every candidate, gathered at once (one host copy)."""
    most = max(len(row) for row in answers)
    idx = torch.tensor(
        [[a[0] for a in row] + [0] * (most - len(row)) for row in answers], device=first.device
    )
    got = first.gather(1, idx).tolist()
    return [got[b][: len(row)] for b, row in enumerate(answers)]


def _tree_layout(answers, device) -> tuple[torch.Tensor, ...]:
    """Per prompt row, every candidate's tokens but the last, one after another: token ids, candidate
    of each token (-1 on padding), its offset in the candidate and the token it predicts (-1 on padding).
    Built as Python lists and copied once (not one small tensor per candidate)."""
    rows = []
    for row in answers:
        ids, seg, off, tgt = [], [], [], []
        for c, a in enumerate(row):
            n = len(a) - 1
            ids += a[:-1]
            seg += [c] * n
            off += range(n)
            tgt += a[1:]
        rows.append((ids, seg, off, tgt))
    width = max(len(r[0]) for r in rows)

    def padded(j: int, fill: int) -> torch.Tensor:
        return torch.tensor(
            [r[j] + [fill] * (width - len(r[j])) for r in rows], dtype=torch.long, device=device
        )

    return padded(0, 0), padded(1, -1), padded(2, 0), padded(3, -1)


def _tree_scores(model, cache, mask: torch.Tensor, first: torch.Tensor, answers) -> list[list[float]]:
    """All candidates' tokens (but the last) in one row per prompt, each seeing only its prompt and itself."""
    device = mask.device
    sums = _first_token_scores(first, answers)
    if all(len(a) == 1 for row in answers for a in row):  # one-token answers: the prompt's logits decide
        return sums
    ids, seg, offset, target = _tree_layout(answers, device)
    width = ids.shape[1]
    real = seg >= 0
    same = (seg[:, :, None] == seg[:, None, :]) & real[:, :, None]
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    own = (same & causal) | torch.eye(width, dtype=torch.bool, device=device)  # pads see themselves
    allowed = torch.cat([mask.bool()[:, None, :].expand(-1, width, -1) & real[:, :, None], own], -1)
    dtype = _model_dtype(model)
    tree = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )
    out = model(
        input_ids=ids,
        attention_mask=tree[:, None],
        position_ids=_continuation_positions(model, mask, offset),
        use_cache=True,
        **{_cache_kwarg(model): cache},
    )
    return _add_answer_scores(sums, out.logits, seg, target, answers)


def _slot_scores(model, cache, mask: torch.Tensor, first: torch.Tensor, answers) -> list[list[float]]:
    """Candidate slot ``j`` of every prompt per forward, on the shared cache cropped back after each."""
    device = mask.device
    batch = mask.shape[0]
    sums = _first_token_scores(first, answers)
    for j in range(max(len(row) for row in answers)):
        rows = [row[j] if j < len(row) else row[0][:1] for row in answers]
        width = max(len(a) for a in rows) - 1
        if width == 0:
            continue
        ids = torch.zeros((batch, width), dtype=torch.long, device=device)
        target = torch.full((batch, width), -1, dtype=torch.long, device=device)
        live = torch.zeros((batch, width), dtype=mask.dtype, device=device)
        for b, a in enumerate(rows):
            n = len(a) - 1
            if n and j < len(answers[b]):
                ids[b, :n] = torch.tensor(a[:-1])
                target[b, :n] = torch.tensor(a[1:])
                live[b, :n] = 1
        steps = torch.arange(width, device=device).expand(batch, -1)
        out = model(
            input_ids=ids,
            attention_mask=torch.cat([mask, torch.ones_like(live)], 1),
            position_ids=_continuation_positions(model, mask, steps),
            use_cache=True,
            **{_cache_kwarg(model): cache},
        )
        cache.crop(-width)  # back to the prompt for the next slot
        logp = F.log_softmax(out.logits.float(), -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        totals = (logp * live).sum(-1).tolist()
        for b in range(batch):
            if j < len(answers[b]):
                sums[b][j] += totals[b]
    return sums
