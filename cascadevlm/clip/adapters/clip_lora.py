"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024): low-rank adapters on the attention of both CLIP encoders.

The paper's recipe (``paper``, the default) puts a separate LoRA (its own ``A`` and ``B``) on the query,
key and value projections of every attention layer, scaled ``alpha / sqrt(r)`` (peft's rsLoRA), and trains
500 x k iterations on augmented k-shot images with one template. open_clip's ``nn.MultiheadAttention``
computes q, k and v with one fused ``in_proj_weight``, and peft's LoRA of that module shares one ``A``
across the three (a joint update of rank r, not 3r): so each attention layer being adapted is replaced
by :class:`SplitQKVAttention` (the same weights as separate ``q_proj``, ``k_proj``, ``v_proj`` and
``out_proj`` linears, the same outputs), and peft's LoRA goes on the chosen linears (``lora_params``:
``qkv``, ``v``, ``qkvo`` ...). Recipe ``peft_mha`` is the project's earlier variant: peft's LoRA of the
whole ``nn.MultiheadAttention`` (shared ``A``, ``out_proj`` too), ``alpha / r``. The ``qkv``/``proj``
linears of timm / Hugging Face attention are adapted as they are (a fused ``qkv`` linear shares ``A``).
``B`` starts at zero, so the adapted model is the zero-shot model, weight for weight, until the first step.

Unlike the other adapters the image encoder changes, so training reads images (:class:`KShotImageDataModule`),
not cached features. The file holds the LoRA tensors alone; loading merges them into the CLIP weights
(:func:`merge_clip_lora`) and the class head is the zero-shot head of the merged text encoder with the
training templates. Merged weights give other image features, so the merge is recorded in the bundle's
feature identity (the adapter's content hash) and never shares feature-cache entries with plain CLIP.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from cascadevlm.clip.adapters.augment import AugmentedImages, augment_transform, check_augment
from cascadevlm.clip.adapters.base import (
    AdapterMismatchError,
    read_adapter,
    register_adapter_kind,
)
from cascadevlm.clip.adapters.coop import PromptHead
from cascadevlm.clip.adapters.datamodule import KShotFeatureDataModule
from cascadevlm.clip.adapters.module import AdapterModule
from cascadevlm.clip.adapters.recipes import check_recipe, make_optimizer, method_name, warmup_cosine
from cascadevlm.clip.model import encode_images, file_sha256
from cascadevlm.clip.zero_shot import clip_logits, zero_shot_head
from cascadevlm.data.loading import ImageClassificationDataset

log = logging.getLogger(__name__)
KIND = "clip_lora"
ENCODERS = ("both", "vision", "text")
PAPER_TEMPLATE = "a photo of a {}."  # CLIP-LoRA trains and evaluates with one template
# recipe -> (lora_params, rsLoRA scaling, one template, iterations per shot, final learning rate)
LORA_RECIPES = {"paper": ("qkv", True, True, 500, 1e-6), "peft_mha": ("mha", False, False, 0, 0.0)}
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
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


class SplitQKVAttention(torch.nn.Module):
    """An ``nn.MultiheadAttention`` (same embedding size for q, k, v) with q, k, v and out as four
    ``nn.Linear`` s, so each projection can carry its own LoRA; the same outputs as the module it copies.

    Called as open_clip calls its attention: ``(query, key, value, need_weights=False, attn_mask=...)``,
    returning ``(output, None)``.
    """

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim:
            raise ValueError(
                "SplitQKVAttention needs an nn.MultiheadAttention with kdim == vdim == embed_dim"
            )
        dim, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.num_heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        weight = mha.in_proj_weight.detach()
        factory = {"device": weight.device, "dtype": weight.dtype}
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            linear = torch.nn.Linear(dim, dim, bias=bias, **factory)
            with torch.no_grad():
                linear.weight.copy_(weight[i * dim : (i + 1) * dim])
                if bias:
                    linear.bias.copy_(mha.in_proj_bias.detach()[i * dim : (i + 1) * dim])
            setattr(self, name, linear.requires_grad_(False))
        self.out_proj = torch.nn.Linear(dim, dim, bias=mha.out_proj.bias is not None, **factory)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.out_proj.requires_grad_(False)
        self.train(mha.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise NotImplementedError("SplitQKVAttention does not return attention weights")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        b, n, dim = query.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, x.shape[1], heads, dim // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        mask = _additive_mask(attn_mask, key_padding_mask, b, heads, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )  # fmt: skip
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def to_multihead(self) -> torch.nn.MultiheadAttention:
        """The fused ``nn.MultiheadAttention`` of the (possibly merged) linears."""
        dim = self.q_proj.in_features
        bias = self.q_proj.bias is not None
        w = self.q_proj.weight
        mha = torch.nn.MultiheadAttention(
            dim, self.num_heads, dropout=self.dropout, bias=bias, batch_first=self.batch_first,
            device=w.device, dtype=w.dtype,
        )  # fmt: skip
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            if bias:
                mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
            mha.out_proj.load_state_dict(self.out_proj.state_dict())
        # the module's mode too: nn.MultiheadAttention takes another (fast) path in eval mode
        return mha.requires_grad_(False).train(self.training)


def _additive_mask(attn_mask, key_padding_mask, b: int, heads: int, dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (bool: True = masked out; or additive floats) as one additive mask
    broadcastable to [B, heads, L, S] for ``scaled_dot_product_attention``."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # [B * heads, L, S]
            mask = mask.reshape(b, heads, *mask.shape[1:])
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).reshape(b, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    return mask


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def split_attention(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Replace the ``nn.MultiheadAttention`` s named ``names`` by :class:`SplitQKVAttention` (in place);
    the names actually split (those with one embedding size for q, k and v)."""
    done = []
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, torch.nn.MultiheadAttention) and mod._qkv_same_embed_dim:
            _set_submodule(model, name, SplitQKVAttention(mod))
            done.append(name)
        elif isinstance(mod, SplitQKVAttention):
            done.append(name)
    return done


def fuse_attention(model: torch.nn.Module) -> None:
    """Turn every :class:`SplitQKVAttention` of ``model`` back into an ``nn.MultiheadAttention`` (in place)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SplitQKVAttention):
            _set_submodule(model, name, mod.to_multihead())


def check_lora_params(lora_params: str) -> None:
    """``mha`` (peft's LoRA of the whole nn.MultiheadAttention) or a non-empty subset of ``qkvo``."""
    ok = lora_params == "mha" or (
        bool(lora_params)
        and set(lora_params) <= set(PROJECTIONS)
        and len(set(lora_params)) == len(lora_params)
    )
    if not ok:
        raise ValueError(
            f"clip_lora lora_params must be letters of 'qkvo' (query, key, value, out; e.g. qkv, v, qkvo) "
            f"or 'mha', got {lora_params!r}; set --model.lora_params"
        )


def peft_targets(attention: list[str], lora_params: str, model: torch.nn.Module) -> list[str]:
    """The module names peft wraps: the attention layers themselves (``mha``), or the chosen projections
    of each split attention layer (fused linears of other towers stay whole)."""
    if lora_params == "mha":
        return attention
    out = []
    for name in attention:
        if isinstance(model.get_submodule(name), SplitQKVAttention):
            out.extend(f"{name}.{PROJECTIONS[p]}" for p in lora_params)
        else:
            out.append(name)
    return sorted(out)


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


MAX_RANK = 1024  # above any attention width LoRA is applied to; a larger rank is a typo
MAX_ALPHA = 1024.0


def check_lora_options(rank: int, alpha: float, dropout: float) -> None:
    """Refuse, in one line, LoRA settings that cannot train (before any model is touched)."""
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"clip_lora rank must be in [1, {MAX_RANK}], got {rank}; set --model.rank")
    if not 0 < alpha <= MAX_ALPHA:
        raise ValueError(f"clip_lora alpha must be in (0, {MAX_ALPHA:g}], got {alpha}; set --model.alpha")
    if not 0 <= dropout < 1:
        raise ValueError(f"clip_lora dropout must be in [0, 1), got {dropout}; set --model.dropout")


def _lora_config(rank: int, alpha: float, dropout: float, targets: list[str], rslora: bool = False):
    from peft import LoraConfig

    check_lora_options(rank, alpha, dropout)
    # init_lora_weights=True: A Kaiming-uniform, B zero -> the adapted model starts as the zero-shot one
    # one regex of the exact names: peft matches a list by name suffix, and classic CLIP's text
    # "transformer.resblocks.0.attn" is a suffix of the image tower's "visual.transformer.resblocks.0.attn"
    pattern = "(?:" + "|".join(re.escape(t) for t in targets) + ")"
    # use_rslora: the update is scaled alpha / sqrt(r) (the official CLIP-LoRA code's), else alpha / r
    return LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=pattern,
        use_rslora=bool(rslora),
    )


def inject_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    lora_params: str = "mha",
    rslora: bool = False,
):
    """Wrap ``model``'s attention layers ``targets`` in place with peft LoRA layers (``lora_params``:
    ``mha``, the whole layer; else its split projections); returns peft's ``LoraModel``."""
    from peft.tuners.lora import LoraModel

    check_lora_params(lora_params)
    if lora_params != "mha":
        split_attention(model, targets)
    wrapped = peft_targets(targets, lora_params, model)
    return LoraModel(model, _lora_config(rank, alpha, dropout, wrapped, rslora), "default")


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
        lora_params: ``qkv`` (a LoRA each on query, key, value), ``v``, ``qkvo`` ... or ``mha``.
        rslora: scale the update ``alpha / sqrt(rank)`` (else ``alpha / rank``).
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
        lora_params: str = "qkv",
        rslora: bool = True,
    ) -> None:
        super().__init__()
        self.targets = lora_targets(model, encoders)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # holds model as .model
            self.lora = inject_lora(model, rank, alpha, dropout, self.targets, lora_params, rslora)
        self.rank, self.alpha, self.dropout, self.encoders = int(rank), float(alpha), float(dropout), encoders
        self.lora_params, self.rslora = lora_params, bool(rslora)
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
            "lora_params": self.lora_params,
            "rslora": self.rslora,
            "templates": self.templates,
            "class_batch_size": self.class_batch_size,
        }


# ----------------------------------------------------------------------------------------- loading
def adapter_weights_tag(path: str | Path) -> str:
    """How a merged adapter shows in the bundle's feature identity: its kind and content hash."""
    return f"{KIND}:sha256:{file_sha256(path)}"


def merge_clip_lora(bundle, path: str | Path, mix: float = 1.0) -> bool:
    """Merge the CLIP-LoRA adapter at ``path`` into ``bundle.model`` (once); False for other kinds.

    ``mix`` is WiSE-FT's interpolation in weight space: ``W + mix * s B A`` (``s`` = alpha / sqrt(r) or
    alpha / r; 1: the adapter, 0: zero-shot CLIP's weights exactly). Split attention layers are fused
    back into ``nn.MultiheadAttention`` after the merge, so the model keeps its own structure. Checks the adapter was made for this model and weights first;
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
        lora = inject_lora(
            model,
            params["rank"],
            params["alpha"],
            0.0,
            params["targets"],
            params.get("lora_params", "mha"),  # files before the split q/k/v LoRA
            bool(params.get("rslora", False)),
        )
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
    lora.merge_and_unload()  # the model's own layers again, with W + s B A in place
    fuse_attention(model)
    model.requires_grad_(False)
    bundle.weight_adapters = (*merged, tag)
    return True


def load_clip_lora_head(f) -> PromptHead:
    """The inference head of a CLIP-LoRA file: merge it into ``f.bundle`` (if not yet), then the zero-shot
    head of the merged text encoder with the training templates (called by :func:`load_adapter`).

    The head comes from the head cache in ``f.head_cache_dir`` when it holds it: the merge put the
    adapter's content hash (and a mix other than 1) into the bundle's weights identity, which is part of
    the head's key, so another adapter, or the plain CLIP, never shares the entry."""
    merge_clip_lora(f.bundle, f.path)
    model = f.bundle.model
    head = zero_shot_head(
        f.bundle,
        f.class_names,
        f.params["templates"],
        f.head_cache_dir,
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

    Args (besides :class:`KShotFeatureDataModule`'s):
        augment: the training images' augmentation: ``flip_crop_wide`` (the official code's random resized
            crop, scale 0.08-1, and horizontal flip; a fresh draw every time an image is read),
            ``flip_crop`` (scale 0.5-1) or ``none``.
            Validation and test images are never augmented.
    """

    gives = "images"

    def __init__(self, *args, augment: str = "flip_crop_wide", **kwargs) -> None:
        check_augment(augment, "--data.augment")
        super().__init__(*args, **kwargs)
        self.augment = augment
        self.images: dict[str, ImageClassificationDataset] = {}  # ``features`` stays empty: none cached

    def _compute(self) -> None:
        bundle = self._get_bundle()
        for key, ds in self.split_datasets().items():
            if key == "train" and self.augment != "none":
                self.images[key] = AugmentedImages(
                    ds, augment_transform(bundle.preprocess, self.augment), key
                )
            else:
                self.images[key] = ImageClassificationDataset(ds, bundle.preprocess, key)
            self.targets[key] = [int(x) for x in ds["label"]]

    def prepare_data(self) -> None:  # nothing to cache
        pass

    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and not getattr(module, "reads_images", False):
            raise ValueError(
                f"{getattr(module, 'method', type(module).__name__)} trains on cached image features and cannot "
                f"use images or their augmentation (--data.augment {self.augment}); only clip_lora reads images: "
                "use --data cascadevlm.clip.adapters.KShotFeatureDataModule"
            )
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

    Args (besides :class:`AdapterModule`'s; the defaults are the paper's and configs/method/clip_lora.yaml's):
        recipe: ``paper`` or ``peft_mha`` (the project's earlier variant); it sets the four options below
            that are left None.
        rank, alpha: LoRA's rank and scaling (the update is ``alpha / sqrt(rank) * B A``, or with
            ``rslora`` false ``alpha / rank * B A``).
        dropout: LoRA dropout on the layer inputs during training.
        encoders: ``both`` (CLIP-LoRA), ``vision`` or ``text``.
        lora_params: which projections of each attention layer get their own LoRA (``qkv``, ``v``,
            ``qkvo``, ...) or ``mha`` (peft's LoRA of the whole layer: one ``A`` shared by q, k and v).
        rslora: the ``alpha / sqrt(rank)`` scaling.
        iterations_per_shot: train ``iterations_per_shot x k`` optimiser steps (the paper's 500), whatever
            the trainer's ``max_epochs``; 0: the trainer's epochs.
        min_lr: the cosine schedule's final learning rate (the paper's 1e-6).
        init_seed: seed of the ``A`` initialisation (``B`` starts at zero).

    Without ``templates`` the paper's recipe uses one template (``a photo of a {}.``), ``peft_mha`` the
    dataset's.
    """

    method = KIND
    reads_images = True  # KShotImageDataModule serves only modules that read images

    def __init__(
        self,
        model_name: str = "cascadevlm-tiny-vit",
        pretrained: str | None = None,
        clip_precision: str = "fp32",
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        recipe: str = "paper",
        rank: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.25,
        encoders: str = "both",
        lora_params: str | None = None,
        rslora: bool | None = None,
        iterations_per_shot: int | None = None,
        min_lr: float | None = None,
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
        check_recipe(KIND, recipe)
        check_lora_options(rank, alpha, dropout)
        r_params, r_rslora, self.one_template, r_iters, r_min_lr = LORA_RECIPES[recipe]
        self.lora_params = r_params if lora_params is None else lora_params
        self.rslora = r_rslora if rslora is None else bool(rslora)
        self.iterations_per_shot = r_iters if iterations_per_shot is None else int(iterations_per_shot)
        self.min_lr = r_min_lr if min_lr is None else float(min_lr)
        check_lora_params(self.lora_params)
        if self.iterations_per_shot < 0:
            raise ValueError(
                f"clip_lora iterations_per_shot must be >= 0 (0: the trainer's epochs), got "
                f"{self.iterations_per_shot}; set --model.iterations_per_shot"
            )
        if not 0 <= self.min_lr <= lr:
            raise ValueError(
                f"clip_lora min_lr must be in [0, lr={lr:g}], got {self.min_lr}; set --model.min_lr"
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
        self.method = method_name(KIND, recipe)
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
        if self.templates is None and self.one_template:
            self.templates = [PAPER_TEMPLATE]
        super().setup(stage)
        if stage in (None, "fit") and self._trainer is not None and self.iterations_per_shot:
            self._set_iterations(dm)

    def _set_iterations(self, dm) -> None:
        """The paper's length: ``iterations_per_shot x k`` optimiser steps, however many epochs that is."""
        shots = getattr(dm, "shots", None)
        if shots is None:
            raise ValueError(
                "clip_lora iterations_per_shot needs the data module's shots: set --model.iterations_per_shot 0"
            )
        steps = self.iterations_per_shot * int(shots)
        loop = self.trainer.fit_loop
        loop.epoch_loop.max_steps = steps
        loop.max_epochs = -1  # the steps decide (max_epochs -1: no epoch limit)
        log.info("clip_lora: training %d steps (%d x %d shots)", steps, self.iterations_per_shot, shots)

    def configure_optimizers(self):
        """AdamW (or SGD), then a cosine from ``lr`` to ``min_lr`` over the run (the paper's schedule)."""
        hp = self.hparams
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        opt = make_optimizer(params, hp.optimizer, hp.lr, hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        sched = warmup_cosine(opt, total, hp.warmup_steps, None, self.min_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def build_adapter(self) -> torch.nn.Module:
        hp = self.hparams
        return ClipLora(
            self.bundle.model,
            self.bundle.tokenizer,
            self.class_names,
            self.templates or [PAPER_TEMPLATE],
            rank=hp.rank,
            alpha=hp.alpha,
            dropout=hp.dropout,
            encoders=hp.encoders,
            class_batch_size=hp.class_batch_size,
            seed=hp.init_seed,
            lora_params=self.lora_params,
            rslora=self.rslora,
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
