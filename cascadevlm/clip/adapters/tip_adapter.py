"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a cache model of the k-shot features.

The cache's keys are the normalised image features of the k-shot images, its values their one-hot labels.
For a normalised feature ``f``::

    logits = s * f @ W_zs.T + alpha * exp(-beta * (1 - f @ keys.T)) @ values

with ``s`` CLIP's logit scale and ``W_zs`` the zero-shot head: the zero-shot term is computed exactly as
the zero-shot head's logits (so ``alpha = 0`` is zero-shot CLIP, bit for bit), the cache term as in the
paper. The paper's CLIP has ``s = 100``: Tip-Adapter-F's fixed initial alpha (1.17) is in those units and
applied as ``1.17 * s / 100`` (recipe ``paper``), so the cache starts with the paper's weight against the
zero-shot term. The searched alpha is on the model's own scale (the grid ``[0, alpha_max]``);
a search whose best alpha is the top of the grid widens the grid (doubling its top, said in the log):
a weak model's cache can need far more weight than the paper's grid gives.

The paper's order (recipe ``paper``, the default): the cache keys are the mean of the normalised features
of 10 augmented views of each k-shot image (:mod:`~cascadevlm.clip.adapters.augment`); Tip-Adapter is
training-free, ``fit`` builds the cache and searches ``alpha`` and ``beta`` on the validation features;
Tip-Adapter-F trains the keys with the fixed initial ``alpha`` and ``beta``, keeps the epoch best on
validation at those values, and searches ``alpha`` and ``beta`` once on the kept keys, for the file. An
adapter whose keys did not move in training is refused, never exported as Tip-Adapter-F.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from cascadevlm.clip.adapters.augment import augmented_features, cache_root_of, check_augment
from cascadevlm.clip.adapters.base import register_adapter_kind
from cascadevlm.clip.adapters.module import AdapterModule
from cascadevlm.clip.adapters.recipes import check_recipe, method_name

log = logging.getLogger(__name__)
PAPER_LOGIT_SCALE = 100.0  # CLIP's logit scale, in whose units the paper gives alpha
# recipe -> (views, augment, alpha in the paper's units): the paper's, and the project's earlier cache
TIP_RECIPES = {"paper": (10, "flip_crop", 1.17), "plain_cache": (1, "none", 1.0)}
WIDEN_AT_MOST = 4  # doublings of the alpha grid's top when the optimum sits on it


class TipAdapterHead(torch.nn.Module):
    """The zero-shot head plus the k-shot cache; ``forward(image_features [N, D]) -> logits [N, C]``.

    Args:
        zero_shot_weight: the normalised zero-shot head [C, D].
        logit_scale: CLIP's (exponentiated) logit scale.
        alpha, beta: the cache's weight and sharpness.
        train_keys: make the keys a trainable parameter (Tip-Adapter-F).
    """

    kind = "tip_adapter"

    def __init__(
        self,
        zero_shot_weight: torch.Tensor,
        logit_scale: float,
        alpha: float = 1.0,
        beta: float = 1.0,
        train_keys: bool = False,
    ) -> None:
        super().__init__()
        w = zero_shot_weight.detach().float().clone()
        self.register_buffer("zero_shot_weight", w)
        # empty until set_cache(): an empty cache adds nothing, so the head is zero-shot CLIP
        self.keys = torch.nn.Parameter(torch.zeros(0, w.shape[1]), requires_grad=train_keys)
        self.register_buffer("values", torch.zeros(0, w.shape[0]))
        self.logit_scale = float(logit_scale)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.train_keys = bool(train_keys)
        self.search: dict = {}  # how alpha and beta were chosen (recorded in the file's params)
        self.cache_from: dict = {}  # how the keys were made (views, augmentation; recorded in the params)

    @property
    def num_classes(self) -> int:
        return int(self.zero_shot_weight.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.zero_shot_weight.shape[1])

    @property
    def cache_size(self) -> int:
        return int(self.keys.shape[0])

    def set_cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Set the cache: ``keys`` [K, D] (normalised here) and ``values`` [K, C] (or labels [K])."""
        if values.dim() == 1:
            values = F.one_hot(values.long(), self.num_classes)
        device = self.zero_shot_weight.device
        keys = F.normalize(keys.detach().float(), dim=-1).to(device)
        self.keys = torch.nn.Parameter(keys, requires_grad=self.train_keys)
        self.values = values.detach().float().to(device)

    def zero_shot_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``s * f @ W_zs.T`` of normalised features, computed as :func:`clip_logits` does."""
        return self.logit_scale * feats @ self.zero_shot_weight.T

    def cache_logits(self, feats: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """``exp(-beta * (1 - f @ keys.T)) @ values`` of normalised features [N, C]."""
        beta = self.beta if beta is None else beta
        affinity = feats @ self.keys.T
        return torch.exp(-beta * (1.0 - affinity)) @ self.values

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(image_features.float(), dim=-1)
        zs = self.zero_shot_logits(feats)
        return zs + self.alpha * self.cache_logits(feats)

    @torch.no_grad()
    def search_alpha_beta(
        self, features: torch.Tensor, labels: torch.Tensor, alphas: list[float], betas: list[float]
    ) -> tuple[float, float, float]:
        """Set (and return with its accuracy) the (alpha, beta) of the grid most accurate on ``features``.

        Ties go to the first in the grid (betas outer, alphas inner, both ascending), so with alpha 0 in
        the grid a cache that does not help leaves zero-shot CLIP.
        """
        feats = F.normalize(features.float().to(self.keys.device), dim=-1)
        labels = labels.to(feats.device)
        zs = self.zero_shot_logits(feats)
        best = (-1.0, self.alpha, self.beta)
        for beta in betas:
            cache = self.cache_logits(feats, beta)
            for alpha in alphas:
                acc = float(((zs + alpha * cache).argmax(-1) == labels).float().mean())
                if acc > best[0]:
                    best = (acc, float(alpha), float(beta))
        acc, self.alpha, self.beta = best
        return self.alpha, self.beta, acc

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"zero_shot_weight": self.zero_shot_weight, "keys": self.keys, "values": self.values}

    def adapter_params(self) -> dict:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "train_keys": self.train_keys,
            "cache_size": self.cache_size,
            "cache_from": self.cache_from,
            "search": self.search,
        }


def load_tip_adapter(tensors: dict[str, torch.Tensor], params: dict, logit_scale: float) -> TipAdapterHead:
    """The saved cache model, frozen (called by :func:`load_adapter`)."""
    head = TipAdapterHead(
        tensors["zero_shot_weight"],
        logit_scale,
        alpha=float(params["alpha"]),
        beta=float(params["beta"]),
        train_keys=bool(params.get("train_keys", False)),
    )
    head.keys = torch.nn.Parameter(tensors["keys"].float().clone())  # as trained: not renormalised
    head.values = tensors["values"].float().clone()
    head.search = params.get("search") or {}
    head.cache_from = params.get("cache_from") or {}
    return head.requires_grad_(False).eval()


def _check_tip_fits(tensors: dict[str, torch.Tensor], meta: dict[str, str], bundle) -> list[str]:
    keys, values, w = tensors["keys"], tensors["values"], tensors["zero_shot_weight"]
    problems = []
    if keys.shape[0] != values.shape[0] or values.shape[-1] != w.shape[0] or keys.shape[-1] != w.shape[-1]:
        problems.append(
            f"cache shapes: keys {tuple(keys.shape)}, values {tuple(values.shape)}, head {tuple(w.shape)}"
        )
    return problems


register_adapter_kind(
    "tip_adapter",
    "tip_adapter",
    lambda f: load_tip_adapter(f.tensors, f.params, f.logit_scale),
    check=_check_tip_fits,
    feature_dim=lambda tensors: int(tensors["zero_shot_weight"].shape[-1]),
)


def _grid(top: float, steps: int) -> list[float]:
    return [top * i / steps for i in range(steps + 1)]


class TipAdapterModule(AdapterModule):
    """Tip-Adapter: training-free; ``fit`` builds the cache from the k-shot images and searches
    ``alpha`` in ``[0, alpha_max]`` and ``beta`` in ``(0, beta_max]`` on the validation features.

    The run still goes through a Trainer (one epoch, no optimiser step), so it writes the adapter file,
    its metrics and TensorBoard logs like the trained methods. With ``data.selection last`` nothing is
    chosen on validation data: ``alpha`` and ``beta`` stay as given.

    Args (besides :class:`AdapterModule`'s):
        recipe: ``paper`` (10 augmented views; the given alpha in the paper's units of a logit scale of
            100) or ``plain_cache`` (the project's earlier cache: one plain view, alpha as is).
        views, augment: the cache's views per image and their augmentation (``flip_crop``: random
            resized crop 0.5-1 and flip; ``none``); None: the recipe's.
        alpha, beta: used as given when not searched, and Tip-Adapter-F's fixed values while training;
            alpha None: the recipe's, for ``paper`` 1.17 in the paper's units (``1.17 * s / 100`` on a
            model whose logit scale is ``s``), for ``plain_cache`` 1; a given alpha is on the model's scale.
        search: False: keep them. ``alpha_max``, ``alpha_steps``, ``beta_max``, ``beta_steps``: the grid.
    """

    method = "tip_adapter"
    train_keys = False

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
        recipe: str = "paper",
        views: int | None = None,
        augment: str | None = None,
        alpha: float | None = None,
        beta: float = 1.0,
        search: bool = True,
        alpha_max: float = 3.0,
        alpha_steps: int = 30,
        beta_max: float = 7.0,
        beta_steps: int = 35,
        class_batch_size: int = 64,
        log_confusion_matrix: bool = True,
        optimizer: str = "adamw",
        model_config: str | None = None,
    ) -> None:
        check_recipe("tip_adapter", recipe)
        r_views, r_augment, r_alpha = TIP_RECIPES[recipe]
        self.views = r_views if views is None else int(views)
        self.augment = r_augment if augment is None else augment
        # None: the recipe's start; the paper's 1.17 is in units of CLIP's logit scale of 100
        self.paper_alpha = alpha is None and recipe == "paper"
        self.start_alpha = r_alpha if alpha is None else float(alpha)
        check_tip_options(self.views, self.augment, self.start_alpha, beta, self.train_keys)
        if alpha_max <= 0 or beta_max <= 0 or alpha_steps < 1 or beta_steps < 1:
            raise ValueError(
                "Tip-Adapter's search grid needs alpha_max, beta_max > 0 and alpha_steps, beta_steps >= 1: "
                "set --model.alpha_max, --model.beta_max, --model.alpha_steps, --model.beta_steps"
            )
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
        self.method = method_name(type(self).method, recipe)
        self.automatic_optimization = self.train_keys  # Tip-Adapter itself takes no optimiser step
        self._validated = False
        self._initial_keys: torch.Tensor | None = None
        self._final: tuple[int, float, float, dict] | None = None  # (step, alpha, beta, search) for the file
        if self.class_names:
            self.build()

    @property
    def initial_alpha(self) -> float:
        """The alpha the head starts with (Tip-Adapter-F trains at it): the paper's in its units scaled to
        this model's logit scale, or the given one (the searched grid is always on the model's own scale)."""
        unit = self.logit_scale / PAPER_LOGIT_SCALE if self.paper_alpha else 1.0
        return self.start_alpha * unit

    def build_adapter(self) -> torch.nn.Module:
        hp = self.hparams
        return TipAdapterHead(
            self.zero_shot_head, self.logit_scale, self.initial_alpha, hp.beta, self.train_keys
        )

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.adapter(features)

    # ------------------------------------------------------------------------------- the cache
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.adapter.cache_size == 0 and dm is not None and "train" in getattr(dm, "features", {}):
            labels = torch.tensor(dm.targets["train"])
            if self.views == 1 and self.augment == "none":
                self.build_cache(dm.features["train"], labels)
            else:
                self.build_cache(self.view_features(dm).mean(dim=0), labels)

    def view_features(self, dm) -> torch.Tensor:
        """Features [views, N, D] of the k-shot images' augmented views (cached per image and view)."""
        split = dm.hparams.train_split
        return augmented_features(
            self.bundle,
            dm.source.dsd[split],
            dm._kshot_split().all_indices,
            split,
            self.views,
            self.augment,
            cache_root_of(dm.cache),
            dm.hparams.feature_batch_size,
            dm.num_workers,
        )

    def build_cache(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Keys and values from the k-shot features and labels (the method's whole 'training')."""
        self.adapter.set_cache(features, labels)
        self.adapter.cache_from = {"views": self.views, "augment": self.augment}
        self._initial_keys = self.adapter.keys.detach().clone()

    def search_on(self, features: torch.Tensor, labels: torch.Tensor, split: str) -> float:
        """Search alpha and beta on ``features`` (recorded in the adapter's params); the accuracy.

        The alpha grid is ``[0, alpha_max]`` in the recipe's units; while its best alpha is the grid's top,
        the top doubles (at most ``WIDEN_AT_MOST`` times, said in the log).
        """
        hp = self.hparams
        top, widened = float(hp.alpha_max), 0
        betas = _grid(hp.beta_max, hp.beta_steps)[1:]
        while True:
            alphas = _grid(top, hp.alpha_steps)
            alpha, beta, acc = self.adapter.search_alpha_beta(features, labels, alphas, betas)
            if alpha < alphas[-1] or widened == WIDEN_AT_MOST:
                break
            widened += 1
            log.info(
                "%s: the best alpha on %s is the top of the grid (%.4g); widening the grid to [0, %.4g]",
                self.method, split, top, 2 * top,
            )  # fmt: skip
            top *= 2
        if alpha == alphas[-1] and alpha > 0:
            log.warning("%s: the best alpha is still the top of the widened grid (%.4g)", self.method, top)
        self.adapter.search = {
            "on": split,
            "size": len(labels),
            "acc": acc,
            "alpha_max": hp.alpha_max,
            "alpha_steps": hp.alpha_steps,
            "alpha_top": top,
            "widened": widened,
            "beta_max": hp.beta_max,
            "beta_steps": hp.beta_steps,
        }
        return acc

    def _searches(self) -> bool:
        dm = self.trainer.datamodule if self._trainer is not None else None
        return bool(self.hparams.search) and getattr(dm, "selection", "val_split") != "last"

    def _val_data(self):
        dm = self.trainer.datamodule if self._trainer is not None else None
        feats, labels = getattr(dm, "features", {}).get("val"), getattr(dm, "targets", {}).get("val")
        if feats is None or not labels:
            return None
        return feats, torch.tensor(labels), getattr(dm, "val_source", "val")

    def on_validation_epoch_start(self) -> None:
        if self.trainer.sanity_checking or not self._searches() or self.train_keys:
            return  # Tip-Adapter-F validates at its fixed training alpha and beta (the paper's order)
        val = self._val_data()
        if val is not None:
            self.search_on(*val)
        self.log("search/alpha", self.adapter.alpha)
        self.log("search/beta", self.adapter.beta)

    # ------------------------------------------------------------------------------- training-free fit
    def training_step(self, batch: dict, batch_idx: int):
        if self.train_keys:
            return super().training_step(batch, batch_idx)
        return None  # nothing to train: the cache was built in setup()

    def configure_optimizers(self):
        if not self.train_keys:
            return None
        return super().configure_optimizers()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self) -> None:
        # Training-free: one validated epoch gives the final adapter; more would repeat it.
        if not self.train_keys and self._validated:
            self.trainer.should_stop = True

    # ------------------------------------------------------------------------------- export
    def final_alpha_beta(self) -> tuple[float, float, dict]:
        """The (alpha, beta, search record) the file gets: the adapter's own, except Tip-Adapter-F's,
        searched once on validation for the keys as they are now (training keeps its fixed values)."""
        head = self.adapter
        if not self.train_keys or self._trainer is None or not self._searches() or self._val_data() is None:
            return head.alpha, head.beta, head.search
        step = int(self.trainer.global_step)
        if self._final is None or self._final[0] != step:
            kept = (head.alpha, head.beta, head.search)
            try:
                self.search_on(*self._val_data())
                self._final = (step, head.alpha, head.beta, head.search)
            finally:
                head.alpha, head.beta, head.search = kept
        return self._final[1:]

    def check_keys_moved(self) -> None:
        """Refuse to export a Tip-Adapter-F whose keys training never changed (nothing was learned)."""
        if not self.train_keys or self._initial_keys is None:
            return
        if torch.equal(self.adapter.keys.detach().cpu(), self._initial_keys.cpu()):
            raise ValueError(
                f"{self.method}: the cache keys did not move in training (alpha {self.adapter.alpha:g}, "
                f"lr {self.hparams.lr:g}), so the adapter is Tip-Adapter's, not a trained one; refusing to "
                "export it: set --model.alpha > 0 and --model.lr > 0, or use tip_adapter"
            )

    def save_adapter(self, path, config: str = "", metrics: dict | None = None):
        self.check_keys_moved()
        head = self.adapter
        kept = (head.alpha, head.beta, head.search)
        head.alpha, head.beta, head.search = self.final_alpha_beta()
        try:
            return super().save_adapter(path, config=config, metrics=metrics)
        finally:
            head.alpha, head.beta, head.search = kept

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        alpha, beta, _ = self.final_alpha_beta()
        checkpoint["tip_adapter"] = {"alpha": alpha, "beta": beta}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        if self.adapter is not None and "adapter.keys" in state:
            self.adapter.set_cache(state["adapter.keys"], state["adapter.values"])  # the shapes to load into
            self.adapter.alpha = float(checkpoint.get("tip_adapter", {}).get("alpha", self.adapter.alpha))
            self.adapter.beta = float(checkpoint.get("tip_adapter", {}).get("beta", self.adapter.beta))


def check_tip_options(views: int, augment: str, alpha: float, beta: float, train_keys: bool) -> None:
    """Refuse, in one line, cache and start settings that cannot be honoured (before any work)."""
    name = "Tip-Adapter-F" if train_keys else "Tip-Adapter"
    if views < 1:
        raise ValueError(
            f"{name} needs views >= 1 (images seen per k-shot image), got {views}: set --model.views"
        )
    check_augment(augment, "--model.augment")
    if views > 1 and augment == "none":
        raise ValueError(
            f"{name}: {views} views without augmentation are {views} copies of one view: set "
            "--model.augment flip_crop or --model.views 1"
        )
    if alpha < 0 or beta <= 0:
        raise ValueError(
            f"{name} needs alpha >= 0 and beta > 0, got alpha={alpha}, beta={beta}: set --model.alpha / --model.beta"
        )
    if train_keys and alpha == 0:
        raise ValueError(
            "Tip-Adapter-F trains its keys through the cache term, which alpha = 0 multiplies by 0 (the keys "
            "would get no gradient): set --model.alpha > 0 (the paper's 1.17)"
        )


class TipAdapterFModule(TipAdapterModule):
    """Tip-Adapter-F: the cache keys are trained (cross-entropy on the k-shot features) at the fixed
    initial alpha and beta, the epoch best on validation at those values is kept, then alpha and beta
    are searched once for it (the paper's order). Same options as :class:`TipAdapterModule`; the paper
    trains with AdamW, lr 1e-3, cosine schedule, 20 epochs.
    """

    method = "tip_adapter_f"
    train_keys = True


# Tip-Adapter-F files are Tip-Adapter files whose keys were trained: one kind, two methods.
