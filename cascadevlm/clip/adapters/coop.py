"""CoOp: context vectors learned in the text encoder's input (prompt tuning)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cascadevlm.clip.adapters.base import CTX_PLACEHOLDER, AdapterMismatchError, register_adapter_kind
from cascadevlm.clip.adapters.module import AdapterModule
from cascadevlm.clip.adapters.recipes import check_recipe, make_optimizer, method_name, warmup_cosine
from cascadevlm.data.registry import validate_class_names


def text_tower(clip_model: torch.nn.Module) -> torch.nn.Module:
    """The module holding the text transformer's parts: the model itself for open_clip's classic ``CLIP``,
    ``model.text`` for a ``CustomTextCLIP`` (SigLIP, EVA02, MobileCLIP, ...)."""
    text = getattr(clip_model, "text", None)
    return text if isinstance(text, torch.nn.Module) else clip_model


def prompt_tuning_problem(clip_model: torch.nn.Module) -> str | None:
    """Why prompt tuning cannot run through this model's text tower (one line), or None when it can."""
    tower = text_tower(clip_model)
    if not hasattr(tower, "token_embedding") or not hasattr(tower, "positional_embedding"):
        return (
            f"prompt tuning (CoOp) feeds learned vectors into the text transformer's token embeddings, but "
            f"{type(clip_model).__name__}'s text tower is a {type(tower).__name__} (e.g. a Hugging Face "
            "encoder) that takes token ids only; use a method on image features (linear_probe, "
            "tip_adapter, clip_adapter) or clip_lora"
        )
    pool = getattr(tower, "pool_type", getattr(tower, "text_pool_type", "argmax"))
    if pool not in ("argmax", "eos", "last", "first"):
        return f"prompt tuning needs pooled text features; this text tower's pool_type is {pool!r}"
    return None


class FrozenTextEncoder(torch.nn.Module):
    """An open_clip text tower from token embeddings on: ``encode_text`` minus the lookup.

    Works on classic ``CLIP`` (the parts are the model's attributes) and on ``CustomTextCLIP`` whose
    ``model.text`` is open_clip's ``TextTransformer`` (causal or bidirectional attention, pad mask, appended
    class token, argmax/eos/last/first pooling, linear or matrix projection), following
    ``TextTransformer.forward`` step by step. Holds references to the model's own (frozen) modules, so
    nothing is copied. A text tower without token embeddings (Hugging Face encoders) is refused.
    """

    def __init__(self, clip_model: torch.nn.Module) -> None:
        super().__init__()
        problem = prompt_tuning_problem(clip_model)
        if problem is not None:
            raise NotImplementedError(problem)
        tower = text_tower(clip_model)
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        if tower is clip_model:  # classic CLIP keeps the text settings under text_* names
            self.pool_type = getattr(tower, "text_pool_type", "argmax")
            self.eos_id = getattr(tower, "text_eos_id", None)
            self.cls_emb = None
            self.use_pad_mask = False
        else:
            self.pool_type = tower.pool_type
            self.eos_id = getattr(tower, "eos_id", None)
            self.cls_emb = getattr(tower, "cls_emb", None)
            self.use_pad_mask = bool(getattr(tower, "use_pad_mask", False))
        self._tower = [tower]  # a plain list: not a submodule (its parts are registered above)
        self.requires_grad_(False)

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def can_truncate(self) -> bool:
        """With a causal mask and end-token pooling, tokens after the end token never reach the output."""
        return (
            self.attn_mask is not None
            and self.pool_type in ("argmax", "eos", "first")
            and self.cls_emb is None
            and not self.use_pad_mask
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised text features [B, D] of prompt embeddings [B, L, W] (``tokens`` [B, L] for pooling
        and the pad mask).

        ``L`` may be shorter than the context length when :attr:`can_truncate` (the padding is cut).
        """
        cast_dtype = self.transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype)
        n = x.shape[1]
        if self.cls_emb is not None:  # appended class token (as TextTransformer._embeds)
            x = torch.cat([x, self.cls_emb.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)], dim=1)
            n += 1
        mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
        if self.use_pad_mask or self.cls_emb is not None:
            pad = self._tower[0]._build_additive_mask(tokens, n, x.dtype)
            mask = pad if mask is None else mask.unsqueeze(0) + pad
        x = x + self.positional_embedding[:n].to(cast_dtype)
        x = self.transformer(x, attn_mask=mask)
        if self.cls_emb is not None:  # the class token's output, normalised after pooling
            x = self.ln_final(x[:, -1])
        else:
            x = self.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), self.pool_index(tokens)]
        if self.text_projection is not None:
            x = (
                self.text_projection(x)
                if isinstance(self.text_projection, torch.nn.Linear)
                else x @ self.text_projection
            )
        return F.normalize(x.float(), dim=-1)


def count_phrase_tokens(tokenizer, phrase: str) -> int:
    """How many tokens ``phrase`` takes (without the tokenizer's start/end tokens)."""
    empty = tokenizer([""])[0]
    pad = empty[-1]  # the context is longer than the special tokens: the last position is padding
    return int((tokenizer([phrase])[0] != pad).sum() - (empty != pad).sum())


def prefix_length(tokenizer) -> int:
    """Positions before the first word of a prompt (1 for CLIP's [SOS]; 0 for tokenizers without one)."""
    empty = tokenizer([""])[0]
    word = tokenizer([CTX_PLACEHOLDER])[0]
    return int((empty != word).int().argmax())


class PromptLearner(torch.nn.Module):
    """CoOp: prompts ``[SOS] ctx_1 .. ctx_n <class name> . [EOS]`` with learnable context vectors.

    Only ``ctx`` is trainable; the class-name and punctuation embeddings are fixed buffers built once.

    Args:
        text_encoder: the frozen text tower (:class:`FrozenTextEncoder`).
        tokenizer: the CLIP model's tokenizer.
        class_names: one name per class, in class-id order.
        n_ctx: number of context vectors (ignored when ``ctx_init`` is given: its token count is used).
        ctx_init: a phrase to initialise the context from (``"a photo of a"``), or None for N(0, 0.02).
        class_specific: one context per class (CSC) instead of one shared context.
        seed: seeds the random initialisation.
    """

    kind = "prompt_tuning"

    def __init__(
        self,
        text_encoder: FrozenTextEncoder,
        tokenizer,
        class_names: Sequence[str],
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        class_specific: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        class_names = validate_class_names(class_names, "the class list")
        self.text_encoder = text_encoder
        self.ctx_init = ctx_init or None
        self.class_specific = bool(class_specific)
        width = text_encoder.width
        device = text_encoder.token_embedding.weight.device
        start = prefix_length(tokenizer)  # the context goes right after the start token, if any
        with torch.no_grad():
            if self.ctx_init:
                n_ctx = count_phrase_tokens(tokenizer, self.ctx_init)
                if n_ctx < 1:
                    raise ValueError(f"ctx_init {self.ctx_init!r} has no tokens")
                init_tokens = tokenizer([self.ctx_init]).to(device)
                ctx = text_encoder.embed(init_tokens)[0, start : start + n_ctx].float().cpu()
            else:
                if n_ctx < 1:
                    raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
                gen = torch.Generator().manual_seed(seed)
                ctx = torch.randn(n_ctx, width, generator=gen) * 0.02
            if self.class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(class_names), 1, 1)
            self.n_ctx = n_ctx
            self.ctx = torch.nn.Parameter(ctx.to(device))
            prefix = " ".join([CTX_PLACEHOLDER] * n_ctx)
            tokens = tokenizer([f"{prefix} {name}." for name in class_names]).to(device)
            # Drop the padding after the longest prompt: the same output, far cheaper.
            if text_encoder.can_truncate:
                tokens = tokens[:, : int(text_encoder.pool_index(tokens).max()) + 1]
            emb = text_encoder.embed(tokens).float()
        # Not saved: rebuilt from the class names and the CLIP model whenever the learner is built.
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", emb[:, :start], persistent=False)  # [SOS]
        self.register_buffer(
            "token_suffix", emb[:, start + n_ctx :], persistent=False
        )  # class, '.', [EOS], pad
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return int(self.tokens.shape[0])

    def prompt_embeddings(self) -> torch.Tensor:
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        return torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)

    def forward(self) -> torch.Tensor:
        """Normalised class embeddings [C, D]."""
        return self.text_encoder(self.prompt_embeddings(), self.tokens)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx}

    def adapter_params(self) -> dict:
        return {
            "n_ctx": self.n_ctx,
            "ctx_init": self.ctx_init,
            "class_specific": self.class_specific,
            "text_width": self.text_encoder.width,
        }


class PromptHead(torch.nn.Module):
    """A prompt-tuned adapter at inference: class embeddings computed once, CLIP's logit scale."""

    kind = "prompt_tuning"

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("class_embeddings", class_embeddings.detach().float())  # normalised already
        self.logit_scale = float(logit_scale)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(image_features.float(), dim=-1)
        return self.logit_scale * feats @ self.class_embeddings.T


def load_prompt_head(path, tensors, params: dict, logit_scale: float, bundle, class_names) -> PromptHead:
    """Run the text encoder once with the saved context: a fixed linear head (called by :func:`load_adapter`)."""
    encoder = FrozenTextEncoder(bundle.model)
    learner = PromptLearner(
        encoder,
        bundle.tokenizer,
        class_names,
        n_ctx=int(params["n_ctx"]),
        ctx_init=None,
        class_specific=bool(params["class_specific"]),
    )
    if tuple(learner.ctx.shape) != tuple(tensors["ctx"].shape):
        raise AdapterMismatchError(
            f"adapter {str(path)!r}: context shape {tuple(tensors['ctx'].shape)} != expected {tuple(learner.ctx.shape)}"
        )
    with torch.no_grad():
        learner.ctx.copy_(tensors["ctx"].to(learner.ctx.device))
        class_embeddings = learner().cpu()
    return PromptHead(class_embeddings, logit_scale).eval()


def _check_prompt_fits(tensors: dict[str, torch.Tensor], meta: dict[str, str], bundle) -> list[str]:
    width = int(tensors["ctx"].shape[-1])
    tower = text_tower(bundle.model)
    clip_width = int(getattr(getattr(tower, "token_embedding", None), "embedding_dim", -1))
    if width != clip_width:
        return [f"text width: adapter context vectors {width}, loaded CLIP {clip_width}"]
    return []


register_adapter_kind(
    "prompt_tuning",
    "coop",
    lambda f: load_prompt_head(f.path, f.tensors, f.params, f.logit_scale, f.bundle, f.class_names),
    check=_check_prompt_fits,
)


class PromptTuningModule(AdapterModule):
    """CoOp prompt tuning: learnable context vectors through the frozen open_clip text encoder.

    Args (besides :class:`AdapterModule`'s; the defaults are configs/method/coop.yaml's):
        recipe: ``paper``: CoOp's warm-up, one epoch at the constant ``warmup_lr`` (1e-5), then the cosine
            from ``lr`` (SGD, 0.002); ``linear_warmup``: the project's earlier ramp over ``warmup_steps``.
        warmup_lr: the constant warm-up rate of the ``paper`` recipe.
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
        clip_precision: str = "fp32",
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 5e-4,
        warmup_steps: int = 0,
        recipe: str = "paper",
        warmup_lr: float = 1e-5,
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        class_specific: bool = False,
        init_seed: int = 0,
        class_batch_size: int = 64,
        log_confusion_matrix: bool = True,
        optimizer: str = "sgd",
        model_config: str | None = None,
    ) -> None:
        check_recipe("coop", recipe)
        if recipe == "paper" and warmup_steps:
            raise ValueError(
                f"coop's paper recipe warms up for one epoch at the constant warmup_lr ({warmup_lr:g}); "
                f"warmup_steps={warmup_steps} is the linear_warmup recipe's: set --model.warmup_steps 0 or "
                "--model.recipe linear_warmup"
            )
        if not 0 < warmup_lr <= lr:
            raise ValueError(
                f"coop warmup_lr must be in (0, lr={lr:g}], got {warmup_lr}; set --model.warmup_lr"
            )
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
        self.method = method_name("coop", recipe)
        problem = prompt_tuning_problem(self.bundle.model)
        if problem is not None:  # refused before any data is read or feature computed
            raise ValueError(f"{model_name}: {problem}")
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

    def configure_optimizers(self):
        """SGD (or AdamW) on the context; the paper's recipe warms up one epoch at ``warmup_lr``
        (Dassl's ``ConstantWarmupScheduler``), then a cosine from ``lr`` to 0 over the other epochs."""
        hp = self.hparams
        opt = make_optimizer([self.adapter.ctx], hp.optimizer, hp.lr, hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        if hp.recipe == "paper":
            epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
            sched = warmup_cosine(opt, total, max(1, total // epochs), hp.warmup_lr)
        else:
            sched = warmup_cosine(opt, total, hp.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
