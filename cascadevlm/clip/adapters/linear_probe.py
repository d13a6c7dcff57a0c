"""Linear probe on frozen CLIP image features, initialised from the zero-shot head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cascadevlm.clip.adapters.base import register_adapter_kind
from cascadevlm.clip.adapters.module import AdapterModule


class LinearProbe(torch.nn.Module):
    """A linear head on normalised image features, initialised from the zero-shot head.

    ``logits = logit_scale * f @ W_eff.T + bias`` with ``W_eff = (1 - blend) * weight + blend * W_zs``.
    At initialisation ``weight = W_zs`` and ``bias = 0``, so the logits equal CLIP's zero-shot logits;
    ``blend`` > 0 keeps a share of the zero-shot head whatever the training does (a WiSE-style blend).

    Args:
        zero_shot_weight: the normalised zero-shot head [C, D] (:func:`build_zero_shot_head`).
        logit_scale: CLIP's (exponentiated) logit scale, kept fixed so weights stay on the unit scale.
        blend: share of the frozen zero-shot head in the effective weights, in [0, 1].
    """

    kind = "linear_probe"

    def __init__(self, zero_shot_weight: torch.Tensor, logit_scale: float, blend: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must be in [0, 1], got {blend}")
        w = zero_shot_weight.detach().float().clone()
        self.weight = torch.nn.Parameter(w.clone())
        self.bias = torch.nn.Parameter(torch.zeros(w.shape[0]))
        self.register_buffer("zero_shot_weight", w)
        self.logit_scale = float(logit_scale)
        self.blend = float(blend)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.weight.shape[1])

    def effective_weight(self) -> torch.Tensor:
        if self.blend == 0.0:
            return self.weight
        return (1.0 - self.blend) * self.weight + self.blend * self.zero_shot_weight

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(image_features.float(), dim=-1)
        return self.logit_scale * feats @ self.effective_weight().T + self.bias

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, "zero_shot_weight": self.zero_shot_weight}

    def adapter_params(self) -> dict:
        return {"blend": self.blend}


def load_linear_probe(tensors: dict[str, torch.Tensor], params: dict, logit_scale: float) -> LinearProbe:
    """The saved linear probe, frozen (called by :func:`load_adapter`)."""
    probe = LinearProbe(tensors["zero_shot_weight"], logit_scale, blend=float(params.get("blend", 0.0)))
    with torch.no_grad():
        probe.weight.copy_(tensors["weight"])
        probe.bias.copy_(tensors["bias"])
    return probe.requires_grad_(False).eval()


register_adapter_kind(
    "linear_probe",
    "linear_probe",
    lambda f: load_linear_probe(f.tensors, f.params, f.logit_scale),
    feature_dim=lambda tensors: int(tensors["weight"].shape[-1]),
)


class LinearProbeModule(AdapterModule):
    """Linear probe on frozen image features, initialised from the zero-shot head (untrained = zero-shot).

    Args (besides :class:`AdapterModule`'s): ``blend``, the share of the frozen zero-shot head kept in
    the weights (0: plain probe). Regularise with ``weight_decay`` (AdamW, decoupled) and ``blend``.
    """

    method = "linear_probe"

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
        blend: float = 0.0,
        class_batch_size: int = 64,
        log_confusion_matrix: bool = True,
        optimizer: str = "adamw",
        model_config: str | None = None,
    ) -> None:
        super().__init__(
            model_name,
            pretrained,
            clip_precision,
            class_names,
            templates,
            lr,
            weight_decay,
            warmup_steps,
            class_batch_size,
            log_confusion_matrix,
            optimizer,
            model_config,
        )
        self.save_hyperparameters()
        if self.class_names:
            self.build()

    def build_adapter(self) -> torch.nn.Module:
        return LinearProbe(self.zero_shot_head, self.logit_scale, blend=self.hparams.blend)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.adapter(features)
