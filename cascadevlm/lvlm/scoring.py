"""Candidate scoring: the log-likelihood of each candidate's answer tokens after the prompt.

All candidates of a batch of prompts are scored with two forwards: the (left-padded) prompts once,
keeping their key/value cache, then every candidate's answer tokens at once on top of a copy of its
prompt's cache. Nothing is generated, so there is nothing to parse.

Positions: text-only rotary models (LLaVA's Llama, Idefics3, ...) get ``cumsum(mask) - 1`` so a left-
padded prompt sees the same positions as an unpadded one. Multimodal-rope models (Qwen2-VL, Qwen2.5-VL)
compute their 3-D positions from the prompt; answer tokens continue from the offset they store.
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


@torch.inference_mode()
def score_candidates(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    answers: list[list[list[int]]],
    pad_id: int,
    length_norm: bool = False,
) -> list[list[float]]:
    """Log-likelihood of every answer of every prompt, sharing each prompt's forward.

    Args:
        model: a causal image-text-to-text model.
        inputs: processor outputs for ``B`` left-padded prompts (images included).
        answers: per prompt, the token ids of each candidate's answer.
        pad_id: token id used to pad answers (masked out).
        length_norm: divide each sum by its number of tokens (mean log-probability per token).

    Returns:
        ``scores[b][i]``: the summed (or mean) log-probability of ``answers[b][i]``.
    """
    mask = inputs["attention_mask"]
    batch = mask.shape[0]
    if len(answers) != batch:
        raise ValueError(f"{len(answers)} answer lists for {batch} prompts")
    rows = [(b, a) for b in range(batch) for a in answers[b]]
    if any(len(a) == 0 for _, a in rows):
        raise ValueError("every candidate answer needs at least one token")
    rope = rope_state_module(model)
    out = model(**forward_inputs(model, inputs), use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # next-token distribution after each prompt

    device = mask.device
    owner = torch.tensor([b for b, _ in rows], device=device)
    width = max(len(a) for _, a in rows)
    ans = torch.full((len(rows), width), pad_id, dtype=inputs["input_ids"].dtype, device=device)
    ans_mask = torch.zeros((len(rows), width), dtype=mask.dtype, device=device)
    for i, (_, a) in enumerate(rows):
        ans[i, : len(a)] = torch.tensor(a, dtype=ans.dtype)
        ans_mask[i, : len(a)] = 1

    token_logp = torch.zeros((len(rows), width), device=device)
    token_logp[:, 0] = first[owner].gather(-1, ans[:, :1]).squeeze(-1)
    if width > 1:
        cache.reorder_cache(owner)  # each candidate row gets a copy of its prompt's cache
        steps = torch.arange(width - 1, device=device)
        pos = mask.long().sum(-1)[owner, None] + steps
        if rope is not None:
            pos = (pos + rope.rope_deltas.to(device)[owner].view(-1, 1)).unsqueeze(0).expand(3, -1, -1)
        out2 = model(
            input_ids=ans[:, :-1],
            attention_mask=torch.cat([mask[owner], ans_mask[:, :-1]], 1),
            position_ids=pos,
            use_cache=True,
            **{_cache_kwarg(model): cache},
        )
        logp = F.log_softmax(out2.logits.float(), dim=-1)
        token_logp[:, 1:] = logp.gather(-1, ans[:, 1:].unsqueeze(-1)).squeeze(-1)
    token_logp = token_logp * ans_mask
    sums = token_logp.sum(-1)
    if length_norm:
        sums = sums / ans_mask.sum(-1)
    flat = sums.tolist()
    scores: list[list[float]] = []
    i = 0
    for b in range(batch):
        scores.append(flat[i : i + len(answers[b])])
        i += len(answers[b])
    return scores
