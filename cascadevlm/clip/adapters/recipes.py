"""Named recipes of the few-shot methods and the learning-rate schedules the papers use.

Every method follows its paper by default (recipe ``paper``); the project's earlier variants stay
available under their own names. A recipe other than ``paper`` is part of the run's method name
(``clip_lora_peft_mha``), so its runs, adapter files and table rows never mix with the paper's.
docs/methods.md lists each setting of each recipe beside the paper's code.
"""

from __future__ import annotations

import math

import torch

# method -> its recipes (the first is the default)
RECIPES: dict[str, tuple[str, ...]] = {
    "clip_lora": ("paper", "peft_mha"),
    "tip_adapter": ("paper", "plain_cache"),
    "coop": ("paper", "linear_warmup"),
}


def check_recipe(method: str, recipe: str) -> None:
    """Refuse, in one line, a recipe the method does not have."""
    known = RECIPES[method]
    if recipe not in known:
        raise ValueError(f"{method} has no recipe {recipe!r}; known: {list(known)}: set --model.recipe")


def method_name(method: str, recipe: str) -> str:
    """The run's method name: the method itself for the paper's recipe, else ``<method>_<recipe>``."""
    return method if recipe == "paper" else f"{method}_{recipe}"


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_lr: float | None = None,
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: ``warmup_steps`` at the constant ``warmup_lr`` (CoOp's constant warm-up; None:
    a linear ramp to the base rate), then a cosine from the base rate to ``min_lr`` over the remaining steps.

    CoOp (Dassl's ``ConstantWarmupScheduler`` + ``CosineAnnealingLR``) and CLIP-LoRA
    (``CosineAnnealingLR(eta_min=1e-6)``) are the two uses; the cosine restarts after the warm-up as
    Dassl's successor scheduler does.
    """
    base = optimizer.param_groups[0]["lr"]
    total = max(1, int(total_steps))
    warmup = max(0, min(int(warmup_steps), total - 1))
    floor = min_lr / base if base > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return warmup_lr / base if warmup_lr is not None and base > 0 else (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9 (CoOp's), over ``params``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
