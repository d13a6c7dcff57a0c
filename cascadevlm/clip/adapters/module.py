"""Training few-shot CLIP adapters with Lightning: data from cached features, two modules, one callback.

Both adapters see the CLIP image encoder only through cached features (it is frozen, so every epoch
would compute the same features): the data module computes them once per (model, weights, split) into a
:class:`FeatureCache`, then trains from [N, D] tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cascadevlm.clip.adapters import FrozenTextEncoder, LinearProbe, PromptLearner, load_adapter, save_adapter
from cascadevlm.clip.features import FeatureCache, image_features
from cascadevlm.clip.model import ClipBundle, load_clip
from cascadevlm.clip.zero_shot import build_zero_shot_head, clip_logits
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.loading import FeatureDataset

OPTIMIZERS = ("adamw", "sgd")


# ------------------------------------------------------------------------------------------- data
class _ValidationSource(CascadeDataModule):
    """The adapters' view of a dataset: its evaluated split is the validation split."""

    split_flag = "--data.val_split"


class KShotFeatureDataModule(L.LightningDataModule):
    """The k-shot train split and the val (and test) splits of a dataset, as cached CLIP image features.

    Batches are ``{"index", "label", "features"}``. The CLIP model comes from the LightningModule being
    trained (its ``bundle``), or from :meth:`attach_bundle` when used without a Trainer.

    Args:
        dataset, benchmark, class_names, templates, splits_dir, data_root: as :class:`CascadeDataModule`.
        shots: k, images per class in the training split; ``seed`` picks the k-shot draw.
        train_split, val_split: where k-shot images and validation images come from.
        test_split: also serve this split (accuracy of the final adapter); None for none.
        val_limit, test_limit: use only the first rows of those splits (CPU demos, smoke runs).
        cache_dir: the feature cache (None: recompute every run).
        batch_size: training batch size (features, so large batches are cheap).
        num_workers: image-decoding workers while computing features.
        eval_batch_size: validation/test batch size.
        feature_batch_size: images per forward when computing features.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        benchmark: str | None = None,
        shots: int = 16,
        seed: int = 1,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = "test",
        val_limit: int | None = None,
        test_limit: int | None = None,
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 1024,
        feature_batch_size: int = 128,
        num_workers: int = 0,
        cache_dir: str | None = "artifacts/features",
        splits_dir: str = "artifacts/splits",
        data_root: str = "data",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if shots < 1:
            raise ValueError(f"shots must be >= 1 for adapter training, got {shots}")
        for flag, limit in (("val_limit", val_limit), ("test_limit", test_limit)):
            if limit is not None and limit < 1:
                raise ValueError(
                    f"data.{flag} must be >= 1 (or null for every image), got {limit}; set --data.{flag}"
                )
        self.source = _ValidationSource(
            dataset=dataset,
            benchmark=benchmark,
            split=val_split,
            train_split=train_split,
            val_split=val_split,
            class_names=class_names,
            templates=templates,
            shots=shots,
            seed=seed,
            splits_dir=splits_dir,
            data_root=data_root,
        )
        self.source.require_split(train_split, "--data.train_split", " to draw k-shot images from")
        if test_split is not None:
            self.source.require_split(test_split, "--data.test_split (or null for none)")
        self.shots = shots
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = FeatureCache(cache_dir) if cache_dir else None
        self.bundle: ClipBundle | None = None
        self.features: dict[str, torch.Tensor] = {}
        self.targets: dict[str, list[int]] = {}

    # ---------------------------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return self.source.name

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    @property
    def templates(self) -> list[str]:
        return self.source.templates

    @property
    def kshot_fingerprint(self) -> str | None:
        """The identity of the data the k-shot split was drawn from (recorded in the adapter file)."""
        return self.source.kshot_split().fingerprint

    def run_name(self, method: str) -> tuple[str, str]:
        """(experiment, version) naming a training run: ``<dataset>_<method>``, ``k<shots>_seed<seed>``."""
        return f"{self.name}_{method}", f"k{self.shots}_seed{self.seed}"

    # ---------------------------------------------------------------------------------- features
    def attach_bundle(self, bundle: ClipBundle) -> None:
        self.bundle = bundle

    def _get_bundle(self) -> ClipBundle:
        if self.bundle is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            bundle = getattr(module, "bundle", None)
            if bundle is None:
                raise RuntimeError(
                    "KShotFeatureDataModule needs a CLIP model for its features: train a module with a "
                    "`bundle` (LinearProbeModule, PromptTuningModule) or call attach_bundle(bundle)"
                )
            self.bundle = bundle
        return self.bundle

    def split_datasets(self) -> dict:
        """The HF datasets behind each stage: ``train`` (the k-shot rows), ``val`` and maybe ``test``."""
        dsd = self.source.dsd
        out = {"train": self.source.kshot_dataset()}
        for key, split, limit in (
            ("val", self.hparams.val_split, self.hparams.val_limit),
            ("test", self.hparams.test_split, self.hparams.test_limit),
        ):
            if split is None:
                continue
            ds = dsd[split]
            out[key] = ds.select(range(limit)) if limit is not None and limit < len(ds) else ds
        return out

    def _compute(self) -> None:
        bundle = self._get_bundle()
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        home = next(bundle.model.visual.parameters()).device
        for key, ds in self.split_datasets().items():
            split = f"{self.hparams.train_split}_k{self.shots}_seed{self.seed}" if key == "train" else key
            self.features[key] = image_features(
                bundle, ds, split, self.cache, self.hparams.feature_batch_size, self.num_workers, device
            )
            self.targets[key] = [int(x) for x in ds["label"]]
        bundle.model.to(home)  # the trained module decides where its own parts live

    def prepare_data(self) -> None:
        # One process per node fills the feature cache; setup() on every rank then reads it.
        if self.cache is not None:
            self._compute()

    def setup(self, stage: str | None = None) -> None:
        if not self.features:
            self._compute()

    def _loader(self, key: str, batch_size: int, shuffle: bool = False) -> torch.utils.data.DataLoader:
        if key not in self.features:
            self.setup()
        ds = FeatureDataset(self.features[key], self.targets[key])
        # Features are in memory: worker processes would only add start-up time.
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0)

    def train_dataloader(self):
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader("val", self.hparams.eval_batch_size)

    def test_dataloader(self):
        if self.hparams.test_split is None:
            raise ValueError("this data module has no test split (test_split=None)")
        return self._loader("test", self.hparams.eval_batch_size)


# ------------------------------------------------------------------------------------------- modules
class AdapterModule(L.LightningModule):
    """What both adapter modules share: CLIP loading, metrics, logging, optimiser, adapter export.

    Subclasses set ``method`` and implement ``build_adapter()`` and ``logits(features)``.

    Args:
        model_name, pretrained: the frozen open_clip model (as :func:`load_clip`).
        build_tiny: offline demo only: write the seeded tiny checkpoint ``pretrained`` if missing.
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
        build_tiny: bool = False,
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
        self.bundle = load_clip(
            model_name, pretrained, precision=clip_precision, build_tiny=build_tiny, model_config=model_config
        )
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
        self.zero_shot_head = build_zero_shot_head(
            self.bundle.model,
            self.bundle.tokenizer,
            self.class_names,
            self.templates or ["a photo of a {}."],
            self.hparams.class_batch_size,
            self.bundle.model.token_embedding.weight.device,
        ).cpu()
        self.adapter = self.build_adapter()
        n = len(self.class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.val_zero_shot_acc = MulticlassAccuracy(n, average="micro")
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
        build_tiny: bool = False,
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
            build_tiny,
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


class PromptTuningModule(AdapterModule):
    """CoOp prompt tuning: learnable context vectors through the frozen open_clip text encoder.

    Args (besides :class:`AdapterModule`'s):
        n_ctx: number of context vectors when ``ctx_init`` is empty (random init).
        ctx_init: phrase the context starts from (its token count sets n); ``""`` for random.
        class_specific: one context per class (CSC) instead of a shared one.
        init_seed: seed of the random context initialisation.
    """

    method = "coop"
    frozen_prefixes = ("adapter.text_encoder.",)

    def __init__(
        self,
        model_name: str = "cascadevlm-tiny-vit",
        pretrained: str | None = None,
        build_tiny: bool = False,
        clip_precision: str = "fp32",
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        class_specific: bool = False,
        init_seed: int = 0,
        class_batch_size: int = 64,
        log_confusion_matrix: bool = True,
        optimizer: str = "adamw",
        model_config: str | None = None,
    ) -> None:
        super().__init__(
            model_name,
            pretrained,
            build_tiny,
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
        self._eval_embeddings: torch.Tensor | None = None
        if self.class_names:
            self.build()

    def build_adapter(self) -> torch.nn.Module:
        learner = PromptLearner(
            FrozenTextEncoder(self.bundle.model),
            self.bundle.tokenizer,
            self.class_names,
            n_ctx=self.hparams.n_ctx,
            ctx_init=self.hparams.ctx_init or None,
            class_specific=self.hparams.class_specific,
            seed=self.hparams.init_seed,
        )
        return learner

    def class_embeddings(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            self._eval_embeddings = None
            return self.adapter()
        if self._eval_embeddings is None:  # one text-encoder pass per validation/test epoch
            self._eval_embeddings = self.adapter()
        return self._eval_embeddings

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(features.float(), dim=-1)
        return self.logit_scale * feats @ self.class_embeddings().float().T

    def on_validation_epoch_start(self) -> None:
        self._eval_embeddings = None

    def on_test_epoch_start(self) -> None:
        self._eval_embeddings = None

    def on_train_epoch_start(self) -> None:
        self._eval_embeddings = None


# ------------------------------------------------------------------------------------------- callback
class AdapterCheckpoint(ModelCheckpoint):
    """Keep the best checkpoint by ``val/acc``; next to it, write the adapter alone and its config.

    In the run directory (the logger's ``log_dir``): ``checkpoints/best.ckpt``, ``adapter.safetensors``,
    ``adapter.yaml`` (the run's config) and ``metrics.json`` (best val accuracy, epoch, and at the end
    the test accuracy of the saved adapter beside zero-shot when the data module has a test split).
    """

    def __init__(self, filename: str = "best", monitor: str = "val/acc", mode: str = "max", **kwargs) -> None:
        kwargs.setdefault("save_top_k", 1)
        kwargs.setdefault("enable_version_counter", False)
        kwargs.setdefault("auto_insert_metric_name", False)
        # Save right after validation, when val/acc is new (not at the end of the training epoch).
        kwargs.setdefault("save_on_train_epoch_end", False)
        super().__init__(filename=filename, monitor=monitor, mode=mode, **kwargs)
        self.metrics: dict = {}
        self._run_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # trainer.log_dir is a collective under DDP: read it here, on every rank, not in rank-0 code.
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)

    def run_dir(self, trainer: L.Trainer) -> Path:
        return self._run_dir

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        before = self.best_model_score
        super().on_validation_end(trainer, pl_module)
        improved = self.best_model_score is not None and (before is None or self.best_model_score != before)
        if trainer.sanity_checking or not improved or not trainer.is_global_zero:
            return
        self.metrics = {
            "val_acc": float(self.best_model_score),
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
        }
        zs = trainer.callback_metrics.get("val/zero_shot_acc")
        if zs is not None:
            self.metrics["zero_shot_val_acc"] = float(zs)
        self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: AdapterModule) -> Path:
        run = self.run_dir(trainer)
        config = run / "config.yaml"  # written by LightningCLI's SaveConfigCallback at setup
        config_text = config.read_text() if config.exists() else _hparams_yaml(trainer, pl_module)
        (run / "adapter.yaml").write_text(config_text)
        path = pl_module.save_adapter(
            run / "adapter.safetensors", config=config_text, metrics=self.describe(trainer)
        )
        self.write_metrics(trainer)
        return path

    def describe(self, trainer: L.Trainer) -> dict:
        pl_module = trainer.lightning_module
        dm = trainer.datamodule
        info = {"method": getattr(pl_module, "method", None)}
        bundle = getattr(pl_module, "bundle", None)
        if bundle is not None:
            info.update(model_name=bundle.model_name, weights_id=bundle.weights_id)
        for key in ("name", "shots", "seed"):
            info["dataset" if key == "name" else key] = getattr(dm, key, None)
        return {**info, **self.metrics}

    def write_metrics(self, trainer: L.Trainer) -> None:
        path = self.run_dir(trainer) / "metrics.json"
        path.write_text(json.dumps(self.describe(trainer), indent=1))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        adapter = self.run_dir(trainer) / "adapter.safetensors"
        if not trainer.is_global_zero or not self.metrics or not adapter.exists():
            return
        feats = getattr(dm, "features", {}).get("test")
        if feats is not None:
            # Reload the saved file (not the live module): the numbers describe what evaluate.py will load.
            head = load_adapter(adapter, bundle=pl_module.bundle, class_names=pl_module.class_names)
            labels = torch.tensor(dm.targets["test"])
            with torch.no_grad():
                pred = head.to("cpu")(feats).argmax(-1)
                zs = clip_logits(feats, pl_module.zero_shot_head.cpu(), pl_module.logit_scale).argmax(-1)
            self.metrics["test_acc"] = float((pred == labels).float().mean())
            self.metrics["zero_shot_test_acc"] = float((zs == labels).float().mean())
            self.metrics["test_size"] = len(labels)
        self.write_metrics(trainer)


def _hparams_yaml(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """A config when no LightningCLI config file exists (training from Python)."""
    import yaml

    def plain(hp) -> dict:
        return {k: v for k, v in dict(hp).items() if isinstance(v, (str, int, float, bool, list, type(None)))}

    cfg = {"model": {"class_path": f"{type(pl_module).__module__}.{type(pl_module).__name__}"}}
    cfg["model"]["init_args"] = plain(pl_module.hparams)
    dm = trainer.datamodule
    if dm is not None:
        cfg["data"] = {
            "class_path": f"{type(dm).__module__}.{type(dm).__name__}",
            "init_args": plain(dm.hparams),
        }
    return yaml.safe_dump(cfg, sort_keys=False)


def confusion_figure(confusion: torch.Tensor, class_names: list[str], title: str):
    """A matplotlib figure of a confusion matrix, rows normalised (true class -> predicted class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    rates = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(4 + 0.25 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 50:  # past that the labels are unreadable; the pattern still shows
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig
