"""The math of the CLIP stage: zero-shot head, logits, probabilities, entropy, top-k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cascadevlm.data.registry import normalise_templates, validate_class_names


def validate_templates(templates: Sequence[str]) -> list[str]:
    templates = [str(t) for t in templates]
    if not templates:
        raise ValueError("the prompt template list is empty; give at least one, e.g. 'a photo of a {}.'")
    return normalise_templates(templates, "--data.templates")  # CLIP_benchmark's "{c}" becomes "{}"


@torch.no_grad()
def build_zero_shot_head(
    model: torch.nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    class_batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Class embeddings [C, D]: per class, the normalised mean of its normalised template embeddings.

    Args:
        model: an open_clip model (``encode_text``).
        tokenizer: its tokenizer.
        class_names: one name per class, in class-id order.
        templates: format strings with ``{}`` for the class name (the template ensemble).
        class_batch_size: classes encoded per forward (x len(templates) prompts).
        device: where the text encoder runs.
    """
    class_names = validate_class_names(class_names, "the class list")
    templates = validate_templates(templates)
    rows = []
    for start in range(0, len(class_names), class_batch_size):
        batch = class_names[start : start + class_batch_size]
        texts = [t.format(c) for c in batch for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device), normalize=True)
        emb = emb.reshape(len(batch), len(templates), -1).mean(dim=1)
        rows.append(F.normalize(emb, dim=-1))
    return torch.cat(rows).float()


def clip_logits(
    image_features: torch.Tensor, head: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Scaled cosine similarities [N, C] of normalised image features [N, D] with a head [C, D]."""
    feats = F.normalize(image_features.float(), dim=-1)
    return float(logit_scale) * feats @ head.float().T


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row, computed stably in log space."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def topk_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (probabilities, class ids) of softmax(logits), most probable first; k is capped at C."""
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.topk(min(k, probs.shape[-1]), dim=-1)
