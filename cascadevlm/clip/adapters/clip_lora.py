"""CLIP-LoRA: low-rank adapters on the attention of both CLIP encoders, trained on k-shot images.

peft's LoRA wraps the attention layers in place: open_clip's ``nn.MultiheadAttention`` (classic and
custom-text towers: q/k/v through ``in_proj_weight``, and ``out_proj``), and the ``qkv``/``proj``
linears of timm / Hugging Face attention when a tower has those. ``B`` starts at zero, so the adapted
model is the zero-shot model, weight for weight, until the first step.

Unlike the other adapters the image encoder changes, so training reads images (:class:`KShotImageDataModule`),
not cached features. The file holds the LoRA tensors alone; loading merges them into the CLIP weights
(:func:`merge_clip_lora`) and the class head is the zero-shot head of the merged text encoder with the
training templates. Merged weights give other image features, so the merge is recorded in the bundle's
feature identity (the adapter's content hash) and never shares feature-cache entries with plain CLIP.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from cascadevlm.clip.adapters.base import (
    AdapterMismatchError,
    read_adapter,
    register_adapter_kind,
)
from cascadevlm.clip.adapters.coop import PromptHead
from cascadevlm.clip.adapters.datamodule import KShotFeatureDataModule
from cascadevlm.clip.adapters.module import AdapterModule
from cascadevlm.clip.model import encode_images, file_sha256
from cascadevlm.clip.zero_shot import build_zero_shot_head, clip_logits
from cascadevlm.data.loading import ImageClassificationDataset

KIND = "clip_lora"
ENCODERS = ("both", "vision", "text")
# Linear layers of non-open_clip attention (timm ViTs, Hugging Face text encoders) LoRA applies to.
_LINEAR_ATTENTION_SUFFIXES = (
    "attn.qkv",
    "attn.proj",
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
)


def _towers(model: torch.nn.Module, encoders: str) -> list[tuple[str, torch.nn.Module]]:
    """(prefix, module) of the towers LoRA goes into; classic CLIP's text tower is the model minus visual."""
    out = []
    if encoders in ("both", "vision"):
        out.append(("visual", model.visual))
    if encoders in ("both", "text"):
        text = getattr(model, "text", None)
        if isinstance(text, torch.nn.Module):
            out.append(("text", text))
        else:  # classic CLIP: the text transformer sits on the model itself
            out.append(("transformer", model.transformer))
    return out


def lora_targets(model: torch.nn.Module, encoders: str = "both") -> list[str]:
    """Full module names of the attention layers LoRA wraps (sorted), for peft's ``target_modules``."""
    if encoders not in ENCODERS:
        raise ValueError(
            f"clip_lora encoders must be one of {ENCODERS}, got {encoders!r}; set --model.encoders"
        )
    names = []
    for prefix, tower in _towers(model, encoders):
        for name, mod in tower.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if isinstance(mod, torch.nn.MultiheadAttention):
                names.append(full)
            elif isinstance(mod, torch.nn.Linear) and full.endswith(_LINEAR_ATTENTION_SUFFIXES):
                if ".out_proj" in full and any(full.startswith(n + ".") for n in names):
                    continue  # the out_proj of an nn.MultiheadAttention: covered by its wrapper
                names.append(full)
    if not names:
        raise ValueError(
            f"clip_lora found no attention layers (nn.MultiheadAttention, or qkv/proj linears) in the "
            f"{encoders} encoder(s) of {type(model).__name__}"
        )
    return sorted(names)


def check_lora_options(rank: int, alpha: float, dropout: float) -> None:
    """Refuse, in one line, LoRA settings that cannot train (before any model is touched)."""
    if rank < 1:
        raise ValueError(f"clip_lora rank must be >= 1, got {rank}; set --model.rank")
    if not alpha > 0:
        raise ValueError(f"clip_lora alpha must be > 0, got {alpha}; set --model.alpha")
    if not 0 <= dropout < 1:
        raise ValueError(f"clip_lora dropout must be in [0, 1), got {dropout}; set --model.dropout")


def _lora_config(rank: int, alpha: float, dropout: float, targets: list[str]):
    from peft import LoraConfig

    check_lora_options(rank, alpha, dropout)
    # init_lora_weights=True: A Kaiming-uniform, B zero -> the adapted model starts as the zero-shot one
    # one regex of the exact names: peft matches a list by name suffix, and classic CLIP's text
    # "transformer.resblocks.0.attn" is a suffix of the image tower's "visual.transformer.resblocks.0.attn"
    pattern = "(?:" + "|".join(re.escape(t) for t in targets) + ")"
    return LoraConfig(
        r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=pattern
    )


def inject_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]):
    """Wrap ``targets`` of ``model`` in place with peft LoRA layers; returns peft's ``LoraModel``."""
    from peft.tuners.lora import LoraModel

    return LoraModel(model, _lora_config(rank, alpha, dropout, targets), "default")


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``model`` (peft's names without the adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


class ClipLora(torch.nn.Module):
    """The LoRA-wrapped CLIP being trained: image features and class embeddings through both encoders.

    Args:
        model: the open_clip model (wrapped in place; its own weights stay frozen).
        tokenizer, class_names, templates: the prompts (every template, as the zero-shot head).
        rank, alpha, dropout, encoders: LoRA's settings and which encoders get it.
        class_batch_size: classes per text-encoder forward (as the zero-shot head).
        seed: seeds the initialisation of the ``A`` matrices.
    """

    kind = KIND

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        class_names: list[str],
        templates: list[str],
        rank: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.0,
        encoders: str = "both",
        class_batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.targets = lora_targets(model, encoders)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.lora = inject_lora(model, rank, alpha, dropout, self.targets)  # holds model as .model
        self.rank, self.alpha, self.dropout, self.encoders = int(rank), float(alpha), float(dropout), encoders
        self.class_names, self.templates = list(class_names), list(templates)
        self.class_batch_size = int(class_batch_size)
        device = next(model.parameters()).device
        texts = [t.format(c) for c in self.class_names for t in self.templates]
        self.register_buffer("tokens", tokenizer(texts).to(device), persistent=False)

    @property
    def model(self) -> torch.nn.Module:
        return self.lora.model

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_embeddings(self) -> torch.Tensor:
        """Normalised class embeddings [C, D] (mean of the normalised template embeddings, as zero-shot)."""
        per_class = len(self.templates)
        rows = []
        step = self.class_batch_size * per_class
        for start in range(0, len(self.tokens), step):
            emb = self.model.encode_text(self.tokens[start : start + step], normalize=True)
            rows.append(F.normalize(emb.reshape(-1, per_class, emb.shape[-1]).mean(dim=1), dim=-1))
        return torch.cat(rows).float()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.model)

    def adapter_params(self) -> dict:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "encoders": self.encoders,
            "targets": self.targets,
            "templates": self.templates,
            "class_batch_size": self.class_batch_size,
        }


# ----------------------------------------------------------------------------------------- loading
def adapter_weights_tag(path: str | Path) -> str:
    """How a merged adapter shows in the bundle's feature identity: its kind and content hash."""
    return f"{KIND}:sha256:{file_sha256(path)}"


def merge_clip_lora(bundle, path: str | Path, mix: float = 1.0) -> bool:
    """Merge the CLIP-LoRA adapter at ``path`` into ``bundle.model`` (once); False for other kinds.

    ``mix`` is WiSE-FT's interpolation in weight space: ``W + mix * (alpha / r) B A`` (1: the adapter,
    0: zero-shot CLIP's weights exactly). Checks the adapter was made for this model and weights first;
    records the adapter's content hash (and a mix other than 1) in ``bundle.weight_adapters`` so features
    of the merged model get their own feature-cache key.
    """
    tensors, meta = read_adapter(path)
    if meta["kind"] != KIND:
        return False
    base_tag = adapter_weights_tag(path)
    tag = base_tag if float(mix) == 1.0 else f"{base_tag}@mix{float(mix)!r}"
    merged = tuple(getattr(bundle, "weight_adapters", ()))
    if any(t == base_tag or t.startswith(base_tag + "@") for t in merged):
        return True  # merged already (evaluation merges at construction, the head loader finds it done)
    problems = []
    if meta.get("model_name") != bundle.model_name:
        problems.append(f"model_name: adapter {meta.get('model_name')!r}, loaded CLIP {bundle.model_name!r}")
    if meta.get("weights_id") != bundle.weights_id:
        problems.append(f"weights_id: adapter {meta.get('weights_id')!r}, loaded CLIP {bundle.weights_id!r}")
    if merged:
        problems.append(f"the loaded CLIP already has another adapter merged ({merged[0]})")
    if problems:
        raise AdapterMismatchError(f"adapter {str(path)!r} ({KIND}) does not fit: " + "; ".join(problems))
    params = json.loads(meta.get("params") or "{}")
    model = bundle.model
    try:
        lora = inject_lora(model, params["rank"], params["alpha"], 0.0, params["targets"])
    except ValueError as err:  # peft: a target module missing from this architecture
        raise AdapterMismatchError(f"adapter {str(path)!r} ({KIND}) does not fit: {err}") from None
    from peft import set_peft_model_state_dict

    device = next(model.parameters()).device
    scaled = {k: (v * float(mix) if "lora_B" in k else v).to(device) for k, v in tensors.items()}
    result = set_peft_model_state_dict(model, scaled)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise AdapterMismatchError(
            f"adapter {str(path)!r} ({KIND}) does not fit: LoRA tensors unexpected "
            f"{list(result.unexpected_keys)[:3]}, missing {missing[:3]}"
        )
    lora.merge_and_unload()  # the model's own layers again, with W + (alpha/r) B A in place
    model.requires_grad_(False)
    bundle.weight_adapters = (*merged, tag)
    return True


def load_clip_lora_head(f) -> PromptHead:
    """The inference head of a CLIP-LoRA file: merge it into ``f.bundle`` (if not yet), then the zero-shot
    head of the merged text encoder with the training templates (called by :func:`load_adapter`)."""
    merge_clip_lora(f.bundle, f.path)
    model = f.bundle.model
    head = build_zero_shot_head(
        model,
        f.bundle.tokenizer,
        f.class_names,
        f.params["templates"],
        int(f.params.get("class_batch_size", 64)),
        next(model.parameters()).device,
    )
    return PromptHead(head.cpu(), float(model.logit_scale.exp())).eval()


def _check_lora_fits(tensors: dict[str, torch.Tensor], meta: dict[str, str], bundle) -> list[str]:
    params = json.loads(meta.get("params") or "{}")
    names = dict(bundle.model.named_modules())
    missing = [t for t in params.get("targets", []) if t not in names and not _is_wrapped(names, t)]
    return [f"attention layers missing in the loaded CLIP: {missing[:3]}"] if missing else []


def _is_wrapped(names: dict, target: str) -> bool:
    return f"{target}.base_layer" in names  # already LoRA-wrapped (a module being trained)


register_adapter_kind(KIND, KIND, load_clip_lora_head, check=_check_lora_fits)


# ----------------------------------------------------------------------------------------- training
class KShotImageDataModule(KShotFeatureDataModule):
    """The k-shot train split and the val (and test) splits as preprocessed images, for methods that
    change the image encoder (CLIP-LoRA): batches are ``{"index", "label", "pixel_values"}``.

    The same splits, k-shot draw, selection protocol and run names as :class:`KShotFeatureDataModule`
    (whose arguments it takes; ``cache_dir`` and ``feature_batch_size`` are unused: nothing is cached).
    """

    gives = "images"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.images: dict[str, ImageClassificationDataset] = {}  # ``features`` stays empty: none cached

    def _compute(self) -> None:
        bundle = self._get_bundle()
        for key, ds in self.split_datasets().items():
            self.images[key] = ImageClassificationDataset(ds, bundle.preprocess, key)
            self.targets[key] = [int(x) for x in ds["label"]]

    def prepare_data(self) -> None:  # nothing to cache
        pass

    def setup(self, stage: str | None = None) -> None:
        if not self.images:
            self._compute()

    def _loader(self, key: str, batch_size: int, shuffle: bool = False) -> torch.utils.data.DataLoader:
        if key not in self.images:
            self.setup()
        return torch.utils.data.DataLoader(
            self.images[key],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class ClipLoraModule(AdapterModule):
    """CLIP-LoRA: LoRA on the attention of the image and text encoders, trained on k-shot images.

    Args (besides :class:`AdapterModule`'s):
        rank, alpha: LoRA's rank and scaling (the update is ``alpha / rank * B A``).
        dropout: LoRA dropout on the layer inputs during training.
        encoders: ``both`` (CLIP-LoRA), ``vision`` or ``text``.
        init_seed: seed of the ``A`` initialisation (``B`` starts at zero).
    """

    method = KIND

    def __init__(
        self,
        model_name: str = "cascadevlm-tiny-vit",
        pretrained: str | None = None,
        clip_precision: str = "fp32",
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        rank: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.0,
        encoders: str = "both",
        init_seed: int = 0,
        class_batch_size: int = 64,
        log_confusion_matrix: bool = True,
        optimizer: str = "adamw",
        model_config: str | None = None,
    ) -> None:
        if encoders not in ENCODERS:
            raise ValueError(
                f"clip_lora encoders must be one of {ENCODERS}, got {encoders!r}; set --model.encoders"
            )
        check_lora_options(rank, alpha, dropout)
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
        self.save_hyperparameters()
        lora_targets(self.bundle.model, encoders)  # refuse a model without attention layers up front
        self._eval_embeddings: torch.Tensor | None = None
        self._zero_shot_val: dict[int, torch.Tensor] = {}
        if self.class_names:
            self.build()

    def setup(self, stage: str | None = None) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and getattr(dm, "gives", "features") != "images":
            raise ValueError(
                "clip_lora changes the image encoder, so it trains on images, not cached features: use "
                "--data cascadevlm.clip.adapters.KShotImageDataModule"
            )
        super().setup(stage)

    def build_adapter(self) -> torch.nn.Module:
        hp = self.hparams
        return ClipLora(
            self.bundle.model,
            self.bundle.tokenizer,
            self.class_names,
            self.templates or ["a photo of a {}."],
            rank=hp.rank,
            alpha=hp.alpha,
            dropout=hp.dropout,
            encoders=hp.encoders,
            class_batch_size=hp.class_batch_size,
            seed=hp.init_seed,
        )

    # ---- forward
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, D] through the LoRA-adapted image encoder."""
        return encode_images(self.bundle, pixels)

    def class_embeddings(self) -> torch.Tensor:
        if torch.is_grad_enabled():
            self._eval_embeddings = None
            return self.adapter.class_embeddings()
        if self._eval_embeddings is None:  # one text-encoder pass per validation/test epoch
            self._eval_embeddings = self.adapter.class_embeddings()
        return self._eval_embeddings

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [N, C] of image features [N, D] (from :meth:`encode`) under the adapted text encoder."""
        return clip_logits(features, self.class_embeddings(), self.logit_scale)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode(pixels))

    def _with_features(self, batch: dict) -> dict:
        return {**batch, "features": self.encode(batch["pixel_values"])}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return super().training_step(self._with_features(batch), batch_idx)

    def _zero_shot_logits(
        self, batch: dict, batch_idx: int, cache: dict[int, torch.Tensor] | None
    ) -> torch.Tensor:
        """Zero-shot CLIP's logits of the batch: plain CLIP's image features (LoRA off), the zero-shot head."""
        feats = cache.get(batch_idx) if cache is not None else None
        if feats is None:
            self.adapter.lora.disable_adapter_layers()
            try:
                with torch.no_grad():
                    feats = self.encode(batch["pixel_values"]).cpu()
            finally:
                self.adapter.lora.enable_adapter_layers()
            if cache is not None:  # the val loader is not shuffled: batch i is always the same images
                cache[batch_idx] = feats
        return clip_logits(feats.to(self.device), self.zero_shot_head.to(self.device), self.logit_scale)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.logits(self.encode(batch["pixel_values"])).float()
        n = len(logits)
        self.val_loss.update(F.cross_entropy(logits, batch["label"]), n)
        self.val_acc.update(logits, batch["label"])
        self.val_zero_shot_acc.update(
            self._zero_shot_logits(batch, batch_idx, self._zero_shot_val), batch["label"]
        )
        if self.val_confusion is not None:
            self.val_confusion.update(logits, batch["label"])
        self.log("val/loss", self.val_loss, on_epoch=True, batch_size=n)
        self.log("val/acc", self.val_acc, on_epoch=True, batch_size=n, prog_bar=True)
        self.log("val/zero_shot_acc", self.val_zero_shot_acc, on_epoch=True, batch_size=n)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.logits(self.encode(batch["pixel_values"])).float()
        n = len(logits)
        self.test_acc.update(logits, batch["label"])
        self.test_zero_shot_acc.update(self._zero_shot_logits(batch, batch_idx, None), batch["label"])
        self.log("test/acc", self.test_acc, on_epoch=True, batch_size=n)
        self.log("test/zero_shot_acc", self.test_zero_shot_acc, on_epoch=True, batch_size=n)

    def on_train_epoch_start(self) -> None:
        self._eval_embeddings = None
        # the frozen CLIP stays in eval mode; LoRA's own dropout is on while training
        for name, mod in self.adapter.named_modules():
            if "lora_dropout" in name:
                mod.train()

    def on_validation_epoch_start(self) -> None:
        self._eval_embeddings = None

    def on_test_epoch_start(self) -> None:
        self._eval_embeddings = None

    # ---- checkpoints: the LoRA tensors only
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
