"""Training few-shot CLIP adapters with Lightning: data from cached features, the shared LightningModule.

Both adapters see the CLIP image encoder only through cached features (it is frozen, so every epoch
would compute the same features): the data module computes them once per (model, weights, split) into a
:class:`FeatureCache`, then trains from [N, D] tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cascadevlm.clip.adapters.base import save_adapter
from cascadevlm.clip.adapters.checkpoint import (
    RUN_KEY,
    AdapterCheckpoint,
    confusion_figure,
    recorded_selection,
    run_identity,
)
from cascadevlm.clip.model import load_clip
from cascadevlm.clip.zero_shot import clip_logits, zero_shot_head

OPTIMIZERS = ("adamw", "sgd")


class AdapterModule(L.LightningModule):
    """What both adapter modules share: CLIP loading, metrics, logging, optimiser, adapter export.

    Subclasses set ``method`` and implement ``build_adapter()`` and ``logits(features)``.

    Args:
        model_name, pretrained: the frozen open_clip model (as :func:`load_clip`).
        clip_precision: open_clip precision of the frozen model (``fp32``, ``bf16``, ``fp16``, ``amp``,
            ``amp_bf16``): image features are computed in it, images cast to the model's dtype, and it is
            part of the feature-cache key (mixed precision of the training itself is the Trainer's
            ``precision`` flag, which does not change the features).
        model_config: an open_clip model-config JSON named ``<model_name>.json`` (a custom architecture).
        class_names, templates: default to the data module's (the zero-shot head uses the templates).
        lr, weight_decay, optimizer (``adamw`` or ``sgd`` with momentum 0.9), warmup_steps: the
            optimiser; the learning rate follows a cosine schedule over the whole run.
        class_batch_size: classes per text-encoder forward when building the zero-shot head.
        log_confusion_matrix: log the best epoch's validation confusion matrix to TensorBoard at the end.
    """

    method = "adapter"

    def __init__(
        self,
        model_name: str = "cascadevlm-tiny-vit",
        pretrained: str | None = None,
        clip_precision: str = "fp32",
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        class_batch_size: int = 64,
        log_confusion_matrix: bool = True,
        optimizer: str = "adamw",
        model_config: str | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r} is not one of {OPTIMIZERS}")
        self.bundle = load_clip(model_name, pretrained, precision=clip_precision, model_config=model_config)
        self.bundle.model.requires_grad_(False)
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates) if templates else None
        self.adapter: torch.nn.Module | None = None
        self.zero_shot_head: torch.Tensor | None = None
        self.best_confusion: tuple[float, torch.Tensor] | None = None
        self.strict_loading = False  # checkpoints hold only the adapter, never the frozen CLIP weights

    @property
    def logit_scale(self) -> float:
        return float(self.bundle.model.logit_scale.exp())

    # ------------------------------------------------------------------------------- building
    def setup(self, stage: str | None = None) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.class_names is None:
            if dm is None or not getattr(dm, "class_names", None):
                raise ValueError(
                    f"{type(self).__name__} has no class names: set model.class_names or use a data module"
                )
            self.class_names = list(dm.class_names)
        elif dm is not None and getattr(dm, "class_names", None) and list(dm.class_names) != self.class_names:
            raise ValueError(f"model.class_names differ from the data module's classes of {dm.name!r}")
        if self.templates is None:
            self.templates = list(getattr(dm, "templates", None) or ["a photo of a {}."])
        self.build()

    def build(self) -> None:
        """Build the zero-shot head and the adapter (once); needs ``class_names``."""
        if self.adapter is not None:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        cache = getattr(getattr(dm, "cache", None), "root", None)  # the feature cache's dir: heads go beside
        self.zero_shot_head = zero_shot_head(
            self.bundle,
            self.class_names,
            self.templates or ["a photo of a {}."],
            cache,
            self.hparams.class_batch_size,
            next(self.bundle.model.parameters()).device,  # custom-text models have no token_embedding
        ).cpu()
        self.adapter = self.build_adapter()
        n = len(self.class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.val_zero_shot_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc = MulticlassAccuracy(n, average="micro")
        self.test_zero_shot_acc = MulticlassAccuracy(n, average="micro")
        self.val_loss = MeanMetric()
        self.train_loss = MeanMetric()
        self.val_confusion = MulticlassConfusionMatrix(n) if self.hparams.log_confusion_matrix else None
        if self._trainer is not None:
            self.to(self.device)

    def build_adapter(self) -> torch.nn.Module:
        raise NotImplementedError

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features)

    # ------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.logits(batch["features"]).float()
        loss = F.cross_entropy(logits, batch["label"])
        n = len(logits)
        self.train_loss.update(loss.detach(), n)
        self.train_acc.update(logits.detach(), batch["label"])
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.logits(batch["features"]).float()
        n = len(logits)
        self.val_loss.update(F.cross_entropy(logits, batch["label"]), n)
        self.val_acc.update(logits, batch["label"])
        zs = clip_logits(batch["features"], self.zero_shot_head.to(self.device), self.logit_scale)
        self.val_zero_shot_acc.update(zs, batch["label"])
        if self.val_confusion is not None:
            self.val_confusion.update(logits, batch["label"])
        self.log("val/loss", self.val_loss, on_epoch=True, batch_size=n)
        self.log("val/acc", self.val_acc, on_epoch=True, batch_size=n, prog_bar=True)
        self.log("val/zero_shot_acc", self.val_zero_shot_acc, on_epoch=True, batch_size=n)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Accuracy of the adapter (the checkpoint tested) and of zero-shot CLIP on the test split."""
        logits = self.logits(batch["features"]).float()
        n = len(logits)
        self.test_acc.update(logits, batch["label"])
        zs = clip_logits(batch["features"], self.zero_shot_head.to(self.device), self.logit_scale)
        self.test_zero_shot_acc.update(zs, batch["label"])
        self.log("test/acc", self.test_acc, on_epoch=True, batch_size=n)
        self.log("test/zero_shot_acc", self.test_zero_shot_acc, on_epoch=True, batch_size=n)

    def on_validation_epoch_end(self) -> None:
        if self.val_confusion is None:
            return
        confusion = self.val_confusion.compute().cpu()  # synced across ranks
        self.val_confusion.reset()
        if self.trainer.sanity_checking:
            return
        acc = float(confusion.diag().sum() / confusion.sum().clamp(min=1))
        if self.best_confusion is None or acc > self.best_confusion[0]:
            self.best_confusion = (acc, confusion)

    def on_fit_end(self) -> None:
        logger = self.logger
        if self.best_confusion is None or logger is None or not hasattr(logger.experiment, "add_figure"):
            return
        if self.trainer.is_global_zero:
            acc, confusion = self.best_confusion
            title = f"val confusion (best epoch, acc {acc:.3f})"
            logger.experiment.add_figure(
                "val/confusion_matrix", confusion_figure(confusion, self.class_names, title)
            )
            logger.experiment.flush()

    # ------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        hp = self.hparams
        if hp.optimizer == "sgd":  # CoOp's recipe: SGD with momentum, cosine schedule
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total - 1)

        def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self):
        return [AdapterCheckpoint()]

    # ------------------------------------------------------------------------------- checkpoints
    frozen_prefixes: tuple[str, ...] = ()  # state-dict keys of frozen CLIP parts, left out of checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(self.frozen_prefixes)}
        checkpoint["class_names"] = self.class_names
        checkpoint["templates"] = self.templates
        if self._trainer is not None:  # what the weights were trained as: where their results may go
            checkpoint[RUN_KEY] = run_identity(self, self.trainer.datamodule)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.class_names is None:
            self.class_names = checkpoint.get("class_names")
            self.templates = checkpoint.get("templates")
        if self.class_names is not None:
            self.build()

    def save_adapter(self, path: str | Path, config: str = "", metrics: dict | None = None) -> Path:
        """Write the adapter alone (safetensors, with what it was made for) to ``path``."""
        b = self.bundle
        dm = self.trainer.datamodule if self._trainer is not None else None
        return save_adapter(
            path,
            self.adapter,
            model_name=b.model_name,
            weights_id=b.weights_id,
            pretrained=b.pretrained,
            class_names=self.class_names,
            logit_scale=self.logit_scale,
            embed_dim=b.embed_dim,
            config=config,
            metrics=metrics,
            method=self.method,
            shots=getattr(dm, "shots", None),
            seed=getattr(dm, "seed", None),
            dataset=getattr(dm, "name", None),
            kshot_fingerprint=getattr(dm, "kshot_fingerprint", None),
            selection=recorded_selection(dm),
        )
