"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on the image features.

``f' = ratio * A(f) + (1 - ratio) * f`` with ``A(f) = relu(W2 relu(W1 f))`` (``W1`` [D/r, D], ``W2``
[D, D/r], no biases, as the paper), then the zero-shot text head on the normalised ``f'``. ``ratio = 0``
is zero-shot CLIP exactly (``f' = f``); the paper uses 0.2 and reduction 4.
"""

from __future__ import annotations

import torch

from cascadevlm.clip.adapters.base import register_adapter_kind
from cascadevlm.clip.adapters.module import AdapterModule
from cascadevlm.clip.zero_shot import clip_logits


class ClipAdapterHead(torch.nn.Module):
    """Residual feature adapter before the frozen zero-shot head; ``forward(features [N, D]) -> [N, C]``.

    Args:
        zero_shot_weight: the normalised zero-shot head [C, D].
        logit_scale: CLIP's (exponentiated) logit scale.
        ratio: share of the adapted feature in the residual mix, in [0, 1].
        reduction: bottleneck width is ``D // reduction``.
    """

    kind = "clip_adapter"

    def __init__(
        self, zero_shot_weight: torch.Tensor, logit_scale: float, ratio: float = 0.2, reduction: int = 4
    ) -> None:
        super().__init__()
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"CLIP-Adapter ratio must be in [0, 1], got {ratio}: set --model.ratio")
        w = zero_shot_weight.detach().float().clone()
        dim = int(w.shape[1])
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(
                f"CLIP-Adapter reduction must be in [1, {dim}] for {dim}-d features, got {reduction}: "
                "set --model.reduction"
            )
        self.register_buffer("zero_shot_weight", w)
        self.fc1 = torch.nn.Linear(dim, dim // reduction, bias=False)
        self.fc2 = torch.nn.Linear(dim // reduction, dim, bias=False)
        self.logit_scale = float(logit_scale)
        self.ratio = float(ratio)
        self.reduction = int(reduction)

    @property
    def num_classes(self) -> int:
        return int(self.zero_shot_weight.shape[0])

    def adapt(self, image_features: torch.Tensor) -> torch.Tensor:
        """The mixed (unnormalised) features ``ratio * A(f) + (1 - ratio) * f``."""
        f = image_features.float()
        a = torch.relu(self.fc2(torch.relu(self.fc1(f))))
        return self.ratio * a + (1.0 - self.ratio) * f

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return clip_logits(self.adapt(image_features), self.zero_shot_weight, self.logit_scale)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "fc1.weight": self.fc1.weight,
            "fc2.weight": self.fc2.weight,
            "zero_shot_weight": self.zero_shot_weight,
        }

    def adapter_params(self) -> dict:
        return {"ratio": self.ratio, "reduction": self.reduction}


def load_clip_adapter(tensors: dict[str, torch.Tensor], params: dict, logit_scale: float) -> ClipAdapterHead:
    """The saved CLIP-Adapter, frozen (called by :func:`load_adapter`)."""
    head = ClipAdapterHead(
        tensors["zero_shot_weight"], logit_scale, float(params["ratio"]), int(params["reduction"])
    )
    with torch.no_grad():
        head.fc1.weight.copy_(tensors["fc1.weight"])
        head.fc2.weight.copy_(tensors["fc2.weight"])
    return head.requires_grad_(False).eval()


def _check_clip_adapter_fits(tensors: dict[str, torch.Tensor], meta: dict[str, str], bundle) -> list[str]:
    d = int(tensors["zero_shot_weight"].shape[-1])
    if tensors["fc1.weight"].shape[-1] != d or tensors["fc2.weight"].shape[0] != d:
        return [
            f"adapter MLP shapes {tuple(tensors['fc1.weight'].shape)}, {tuple(tensors['fc2.weight'].shape)}"
        ]
    return []


register_adapter_kind(
    "clip_adapter",
    "clip_adapter",
    lambda f: load_clip_adapter(f.tensors, f.params, f.logit_scale),
    check=_check_clip_adapter_fits,
    feature_dim=lambda tensors: int(tensors["fc1.weight"].shape[-1]),
)


class ClipAdapterModule(AdapterModule):
    """CLIP-Adapter trained on cached k-shot features (only the MLP trains).

    Args (besides :class:`AdapterModule`'s): ``ratio`` (share of the adapted feature, 0: zero-shot),
    ``reduction`` (bottleneck factor); ``seed_everything`` fixes the MLP's initialisation.
    """

    method = "clip_adapter"

    def __init__(
        self,
        model_name: str = "cascadevlm-tiny-vit",
        pretrained: str | None = None,
        clip_precision: str = "fp32",
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 0,
        ratio: float = 0.2,
        reduction: int = 4,
        class_batch_size: int = 64,
        log_confusion_matrix: bool = True,
        optimizer: str = "adamw",
        model_config: str | None = None,
    ) -> None:
        super().__init__(
            model_name=model_name,
            pretrained=pretrained,
            clip_precision=clip_precision,
            class_names=class_names,
            templates=templates,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            class_batch_size=class_batch_size,
            log_confusion_matrix=log_confusion_matrix,
            optimizer=optimizer,
            model_config=model_config,
        )
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"CLIP-Adapter ratio must be in [0, 1], got {ratio}: set --model.ratio")
        self.save_hyperparameters()
        if self.class_names:
            self.build()

    def build_adapter(self) -> torch.nn.Module:
        hp = self.hparams
        return ClipAdapterHead(self.zero_shot_head, self.logit_scale, hp.ratio, hp.reduction)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.adapter(features)
