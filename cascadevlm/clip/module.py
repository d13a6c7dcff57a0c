"""The CLIP stage as a LightningModule: image -> features -> logits over all classes -> records."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

from cascadevlm.clip.model import encode_images, load_clip
from cascadevlm.clip.zero_shot import (
    clip_logits,
    topk_probs_and_entropy,
    validate_templates,
    zero_shot_head,
)
from cascadevlm.data.registry import validate_class_names

MIN_STORED_TOPK = 5  # records keep at least the top-5, so acc5 can be computed from them
KEEP_LOGITS_MAX_CLASSES = 256  # records keep all logits up to this many classes (calibration, conformal)


class PresentClassRecall(MulticlassRecall):
    """Mean per-class recall over the classes present in the targets seen (absent classes are not 0s)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, average="none")

    def compute(self) -> torch.Tensor:
        tp, _, _, fn = self._final_state()
        present = (tp + fn) > 0
        return (tp[present].float() / (tp + fn)[present].float()).mean()


class ClipClassifier(L.LightningModule):
    """Zero-shot (or adapter) CLIP classification; predict/test steps emit per-image outputs.

    Args:
        model_name: open_clip architecture, e.g. ``ViT-L-14`` (or a project config for offline tests).
        pretrained: open_clip tag (``openai``) or a local checkpoint path.
        precision: open_clip precision of the frozen model (``fp32``, ``fp16``, ``bf16``, ``amp``,
            ``amp_bf16``): the CLIP stage computes in it; the Trainer's ``precision`` does not change it
            (features and logits are the same under ``16-mixed``/``bf16-mixed``).
        model_config: an open_clip model-config JSON named ``<model_name>.json`` (a custom architecture).
        class_names, templates: the classes and the prompt-template ensemble (linked from the data).
        class_batch_size: classes per text-encoder forward when building the zero-shot head.
        topk: candidates kept per image (at least 5 are stored in records).
        adapter: path of a trained few-shot adapter (``train.py``) replacing the zero-shot head.
        adapter_mix: WiSE-FT-style interpolation of the adapter with zero-shot CLIP, in [0, 1]: logits
            ``mix * adapter + (1 - mix) * zero-shot`` (1: the adapter alone, 0: zero-shot CLIP).
    """

    def __init__(
        self,
        model_name: str = "cascadevlm-tiny-vit",
        pretrained: str | None = None,
        precision: str = "fp32",
        # a list of names (or None); typed Any so that jsonargparse, which links it from data.class_names,
        # does not walk its elements when instantiating (120 ms at 10,000 names); validated below
        class_names: Any = None,
        templates: list[str] | None = None,
        class_batch_size: int = 64,
        topk: int = 5,
        adapter: str | None = None,
        model_config: str | None = None,
        adapter_mix: float = 1.0,
    ) -> None:
        super().__init__()
        from cascadevlm.clip.adapters.base import check_adapter_mix

        check_adapter_mix(adapter_mix, adapter)
        if isinstance(class_names, str):  # typed Any (above): a string would become one class per letter
            raise ValueError(
                f"model.class_names must be a list of names, got the string {class_names!r}; "
                "set --data.class_names"
            )
        if class_batch_size < 1:  # else range() refuses it once the image features are computed
            raise ValueError(
                f"model.class_batch_size must be >= 1, got {class_batch_size}; set --model.class_batch_size"
            )
        self.save_hyperparameters()
        self.bundle = load_clip(model_name, pretrained, precision=precision, model_config=model_config)
        if adapter:  # CLIP-LoRA merges into the weights now, before any feature (or cache key) is made
            from cascadevlm.clip.adapters.clip_lora import merge_clip_lora

            merge_clip_lora(self.bundle, adapter, mix=adapter_mix)  # WiSE-FT in weight space
        self.clip = self.bundle.model
        self.clip.requires_grad_(False)
        # refused here, before any stage runs (empty or duplicate names, templates without "{}")
        names = "the class list (--data.class_names)"
        self.class_names = validate_class_names(class_names, names) if class_names else None
        self.templates = validate_templates(templates) if templates else ["a photo of a {}."]
        self.head: torch.Tensor | None = None
        self.head_cache_dir: str | None = None  # where the head is cached: the run's --cache_dir (runner)
        self.adapter_module: torch.nn.Module | None = None
        self.num_classes = len(self.class_names) if self.class_names else 0
        # made by on_test_start, for a test loop only: evaluate.py's predict loop never updates them, and
        # their 12 class-count states cost ~60 ms to make at 10,000 classes (torchmetrics deep-copies each)
        self.metrics: MetricCollection | None = None

    def make_metrics(self) -> MetricCollection:
        """The test loop's metrics (acc1, acc5, mean per-class recall over the present classes), made once."""
        if self.metrics is None:
            self.metrics = MetricCollection(
                {
                    "acc1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
                    "acc5": MulticlassAccuracy(
                        self.num_classes, top_k=min(5, self.num_classes), average="micro"
                    ),
                    "mean_per_class_recall": PresentClassRecall(self.num_classes),
                },
                prefix="test/",
            ).to(self.device)
        return self.metrics

    @property
    def preprocess(self):
        return self.bundle.preprocess

    # ------------------------------------------------------------------------------------ the head
    def ensure_head(self) -> torch.Tensor:
        """The zero-shot head on the module's device, built once (from the head cache in ``head_cache_dir``
        when it has this model's, names' and templates' head); loads the adapter if one is set."""
        if self.head is None:
            if not self.class_names:
                raise ValueError(
                    "ClipClassifier has no class names: set model.class_names or link them from data"
                )
            self.head = zero_shot_head(
                self.bundle,
                self.class_names,
                self.templates,
                self.head_cache_dir,
                self.hparams.class_batch_size,
                self.device,
            )
            if self.hparams.adapter:
                from cascadevlm.clip.adapters import load_adapter

                self.adapter_module = load_adapter(
                    self.hparams.adapter, self.bundle, self.class_names, self.head_cache_dir
                )
                if self.hparams.adapter_mix != 1.0 and not self.bundle.weight_adapters:  # else mixed weights
                    from cascadevlm.clip.adapters.base import WiseHead

                    scale = float(self.clip.logit_scale.exp())
                    mix = self.hparams.adapter_mix
                    self.adapter_module = WiseHead(self.adapter_module, self.head, scale, mix)
                self.adapter_module = self.adapter_module.to(self.device)
        self.head = self.head.to(self.device)
        return self.head

    def on_predict_start(self) -> None:
        self.ensure_head()

    def on_test_start(self) -> None:
        self.ensure_head()
        self.make_metrics()

    # ------------------------------------------------------------------------------------ forward
    def encode(self, batch: dict) -> torch.Tensor:
        if "features" in batch:
            return batch["features"].float()
        # In the model's own dtype and precision (model.precision), whatever the trainer's autocast.
        return encode_images(self.bundle, batch["pixel_values"])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        # float32 whatever the trainer's autocast: a bf16 matmul here would change records and entropies.
        with torch.autocast(features.device.type, enabled=False):
            if self.adapter_module is not None:
                return self.adapter_module(features.float()).float()
            return clip_logits(features, self.ensure_head(), self.clip.logit_scale.exp())

    def forward(self, batch: dict) -> torch.Tensor:
        return self.logits(self.encode(batch))

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        feats = self.encode(batch)
        logits = self.logits(feats)
        probs, ids, entropy = topk_probs_and_entropy(logits, max(self.hparams.topk, MIN_STORED_TOPK))
        out = {
            "index": batch["index"].cpu(),
            "label": batch["label"].cpu(),
            "topk_ids": ids.cpu(),
            "topk_probs": probs.cpu(),
            "entropy": entropy.cpu(),
        }
        if logits.shape[-1] <= KEEP_LOGITS_MAX_CLASSES:
            out["logits"] = logits.cpu()
        # zero-shot beside the adapter, for the report; with merged weights (CLIP-LoRA) these features and
        # this head are the adapted model's: the CLIP stage runs zero_shot_twin() for that row instead
        if self.adapter_module is not None and not self.bundle.weight_adapters:
            with torch.autocast(feats.device.type, enabled=False):
                zs = clip_logits(feats, self.ensure_head(), self.clip.logit_scale.exp())
            out["zero_shot_pred"] = zs.argmax(-1).cpu()
        if "features" not in batch:
            out["features"] = feats.cpu()  # freshly computed: the writer may fill the feature cache
        return out

    def zero_shot_twin(self) -> ClipClassifier | None:
        """Zero-shot CLIP of the base weights, with these classes and templates, when an adapter was merged
        into this model's weights (CLIP-LoRA); None otherwise (zero-shot is this model's own head)."""
        if not self.bundle.weight_adapters:
            return None
        own = inspect.signature(ClipClassifier.__init__).parameters  # hparams also hold jsonargparse's keys
        hp = {k: v for k, v in self.hparams.items() if k in own}
        hp.update(adapter=None, adapter_mix=1.0, class_names=self.class_names, templates=self.templates)
        return ClipClassifier(**hp)

    def test_step(self, batch: dict, batch_idx: int = 0) -> None:
        logits = self(batch)
        self.metrics.update(logits, batch["label"])
        self.log_dict(self.metrics, on_epoch=True, batch_size=len(logits))
