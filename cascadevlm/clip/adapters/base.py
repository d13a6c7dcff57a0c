"""Few-shot CLIP adapters: a linear probe on image features and CoOp-style prompt tuning.

Both act on frozen, normalised image features [N, D] and give logits [N, C]. They are saved alone (no
CLIP weights) as safetensors with metadata naming the CLIP model, its weights, the class list and the
training config, so :func:`load_adapter` can refuse an adapter made for something else.

File format (``*.safetensors``), tensors:
    linear_probe:  ``weight`` [C, D], ``bias`` [C], ``zero_shot_weight`` [C, D]
    prompt_tuning: ``ctx`` [n, W] (shared) or [C, n, W] (class-specific), W the text width
metadata (strings): ``format`` (``cascadevlm.clip_adapter``), ``format_version``, ``kind``,
``model_name``, ``weights_id``, ``pretrained``, ``embed_dim``, ``num_classes``, ``class_names`` (JSON
list), ``class_names_sha256``, ``logit_scale``, ``params`` (JSON: kind-specific settings such as
``blend`` or ``ctx_init``), ``config`` (the YAML of the run that made it) and ``metrics`` (JSON); and
what the adapter was trained on: ``method`` (``linear_probe``, ``coop``), ``shots`` (k), ``seed``,
``dataset`` and ``kshot_fingerprint`` (empty strings when unknown). :func:`adapter_info` reads them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from cascadevlm.data.registry import validate_class_names

FORMAT = "cascadevlm.clip_adapter"
FORMAT_VERSION = "1"
KINDS = ("linear_probe", "prompt_tuning")
METHOD_OF_KIND = {"linear_probe": "linear_probe", "prompt_tuning": "coop"}
CTX_PLACEHOLDER = "X"  # stands for one context token while tokenising prompts (as in CoOp)


class AdapterMismatchError(ValueError):
    """An adapter file does not fit the CLIP model or class list it is loaded for."""


def class_names_sha256(class_names: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(class_names)).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ linear probe
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


# ------------------------------------------------------------------------------------------ prompt tuning
class FrozenTextEncoder(torch.nn.Module):
    """The text tower of an open_clip ``CLIP`` from token embeddings on: ``encode_text`` minus the lookup.

    Holds references to the model's own (frozen) modules, so nothing is copied.
    """

    def __init__(self, clip_model: torch.nn.Module) -> None:
        super().__init__()
        if not hasattr(clip_model, "token_embedding") or not hasattr(clip_model, "positional_embedding"):
            raise NotImplementedError(
                f"prompt tuning needs an open_clip CLIP with a built-in text transformer; "
                f"{type(clip_model).__name__} (a custom or Hugging Face text tower) is not supported"
            )
        if getattr(clip_model, "text_pool_type", "argmax") not in ("argmax", "eos", "last"):
            raise NotImplementedError(f"text pooling {clip_model.text_pool_type!r} is not supported")
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.pool_type = getattr(clip_model, "text_pool_type", "argmax")
        self.eos_id = getattr(clip_model, "text_eos_id", None)
        self.requires_grad_(False)

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def can_truncate(self) -> bool:
        """With a causal mask and end-token pooling, tokens after the end token never reach the output."""
        return self.attn_mask is not None and self.pool_type in ("argmax", "eos")

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised text features [B, D] of prompt embeddings [B, L, W] (``tokens`` [B, L] for pooling).

        ``L`` may be shorter than the context length when :attr:`can_truncate` (the padding is cut).
        """
        cast_dtype = self.transformer.get_cast_dtype()
        n = embeddings.shape[1]
        x = embeddings.to(cast_dtype) + self.positional_embedding[:n].to(cast_dtype)
        mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
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
    """How many BPE tokens ``phrase`` takes (without start/end tokens)."""
    tokens = tokenizer([phrase])[0]
    return int(tokens.argmax()) - 1  # the end token has the largest id and follows the phrase


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
        with torch.no_grad():
            if self.ctx_init:
                n_ctx = count_phrase_tokens(tokenizer, self.ctx_init)
                if n_ctx < 1:
                    raise ValueError(f"ctx_init {self.ctx_init!r} has no tokens")
                init_tokens = tokenizer([self.ctx_init]).to(device)
                ctx = text_encoder.embed(init_tokens)[0, 1 : 1 + n_ctx].float().cpu()
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
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)  # [SOS]
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx :], persistent=False)  # class, '.', [EOS], pad
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


# ------------------------------------------------------------------------------------------ save / load
def save_adapter(
    path: str | Path,
    adapter: LinearProbe | PromptLearner,
    *,
    model_name: str,
    weights_id: str,
    class_names: Sequence[str],
    logit_scale: float,
    embed_dim: int,
    pretrained: str | None = None,
    config: str = "",
    metrics: dict | None = None,
    method: str | None = None,
    shots: int | None = None,
    seed: int | None = None,
    dataset: str | None = None,
    kshot_fingerprint: str | None = None,
) -> Path:
    """Write the adapter's own tensors and its metadata to ``path`` (atomically).

    ``method``, ``shots``, ``seed``, ``dataset`` describe the training run (what :func:`adapter_info`
    gives evaluation to name runs by); ``method`` defaults to the adapter kind's method.
    """
    class_names = list(class_names)
    if adapter.num_classes != len(class_names):
        raise ValueError(
            f"adapter has {adapter.num_classes} classes but {len(class_names)} class names were given"
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": adapter.kind,
        "model_name": model_name,
        "weights_id": weights_id,
        "pretrained": str(pretrained or ""),
        "embed_dim": str(int(embed_dim)),
        "num_classes": str(len(class_names)),
        "class_names": json.dumps(class_names),
        "class_names_sha256": class_names_sha256(class_names),
        "logit_scale": repr(float(logit_scale)),
        "params": json.dumps(adapter.adapter_params()),
        "config": config,
        "metrics": json.dumps(metrics or {}),
        "method": method or METHOD_OF_KIND[adapter.kind],
        "shots": "" if shots is None else str(int(shots)),
        "seed": "" if seed is None else str(int(seed)),
        "dataset": dataset or "",
        "kshot_fingerprint": kshot_fingerprint or "",
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapter.adapter_tensors().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an adapter file, checking it is one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own error types for a non-safetensors file
        raise ValueError(f"{str(path)!r} is not a safetensors file: {err}") from err
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a cascadevlm CLIP adapter (metadata format={meta.get('format')!r})"
        )
    if meta.get("kind") not in KINDS:
        raise ValueError(f"adapter {str(path)!r} has unknown kind {meta.get('kind')!r}; known: {KINDS}")
    return tensors, meta


def _class_list_difference(saved: list[str], given: list[str]) -> str:
    missing = [c for c in saved if c not in given]
    extra = [c for c in given if c not in saved]
    if not missing and not extra:
        return "the same classes in a different order"
    parts = [f"{len(saved)} classes in the adapter, {len(given)} given"]
    if missing:
        parts.append(f"only in the adapter: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"only in the given list: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    return "; ".join(parts)


def check_adapter_fits(
    path: str | Path, meta: dict[str, str], tensors: dict[str, torch.Tensor], bundle, class_names
):
    """Raise :class:`AdapterMismatchError` listing every way the adapter does not fit bundle + classes."""
    problems = []
    if meta.get("model_name") != bundle.model_name:
        problems.append(f"model_name: adapter {meta.get('model_name')!r}, loaded CLIP {bundle.model_name!r}")
    if meta.get("weights_id") != bundle.weights_id:
        problems.append(f"weights_id: adapter {meta.get('weights_id')!r}, loaded CLIP {bundle.weights_id!r}")
    saved_dim = int(meta.get("embed_dim", -1))
    tensor_dim = None
    if meta["kind"] == "linear_probe":
        tensor_dim = int(tensors["weight"].shape[-1])
    if saved_dim != bundle.embed_dim or (tensor_dim is not None and tensor_dim != bundle.embed_dim):
        problems.append(
            f"embed_dim: adapter {tensor_dim if tensor_dim is not None else saved_dim}, loaded CLIP {bundle.embed_dim}"
        )
    if meta["kind"] == "prompt_tuning":
        width = int(tensors["ctx"].shape[-1])
        clip_width = int(getattr(getattr(bundle.model, "token_embedding", None), "embedding_dim", -1))
        if width != clip_width:
            problems.append(f"text width: adapter context vectors {width}, loaded CLIP {clip_width}")
    saved_names = json.loads(meta.get("class_names", "[]"))
    if saved_names != list(class_names):
        problems.append(f"class list: {_class_list_difference(saved_names, list(class_names))}")
    if problems:
        raise AdapterMismatchError(
            f"adapter {str(path)!r} ({meta['kind']}) does not fit: " + "; ".join(problems)
        )


def load_adapter(path: str | Path, bundle, class_names: Sequence[str]) -> torch.nn.Module:
    """Load a trained adapter as a module ``forward(image_features [N, D]) -> logits [N, C]``.

    Args:
        path: the ``.safetensors`` file written by training.
        bundle: the loaded CLIP (:class:`ClipBundle`); its model name, weights id and dimension must
            be those the adapter was trained with.
        class_names: the classes in class-id order; must equal the adapter's list.

    A prompt-tuned adapter runs the text encoder once here and becomes a fixed linear head.
    """
    tensors, meta = read_adapter(path)
    check_adapter_fits(path, meta, tensors, bundle, class_names)
    params = json.loads(meta.get("params", "{}"))
    logit_scale = float(meta["logit_scale"])
    if meta["kind"] == "linear_probe":
        probe = LinearProbe(tensors["zero_shot_weight"], logit_scale, blend=float(params.get("blend", 0.0)))
        with torch.no_grad():
            probe.weight.copy_(tensors["weight"])
            probe.bias.copy_(tensors["bias"])
        return probe.requires_grad_(False).eval()
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


def adapter_metadata(path: str | Path) -> dict:
    """The metadata of an adapter file, JSON fields decoded (for reports and ``evaluate.py``)."""
    _, meta = read_adapter(path)
    out = dict(meta)
    for key in ("class_names", "params", "metrics"):
        out[key] = json.loads(meta.get(key) or "null")
    return out


def adapter_info(path: str | Path) -> dict:
    """What an adapter file was made by and for: ``method``, ``kind``, ``shots``, ``seed``, ``dataset``,
    ``model_name``, ``weights_id``, ``pretrained``, ``class_names_sha256``, ``num_classes``.

    Evaluation names runs and tables by these (never by ``data.shots`` defaults). ``shots``/``seed`` are
    ints, or None for a file that does not record them (files written before they were stored fall back
    to the training metrics saved beside them).
    """
    _, meta = read_adapter(path)
    metrics = json.loads(meta.get("metrics") or "{}") or {}

    def number(key: str, fallback_key: str) -> int | None:
        raw = meta.get(key, "")
        if raw != "":
            return int(raw)
        value = metrics.get(fallback_key)
        return int(value) if value is not None else None

    return {
        "method": meta.get("method") or metrics.get("method") or METHOD_OF_KIND[meta["kind"]],
        "kind": meta["kind"],
        "shots": number("shots", "shots"),
        "seed": number("seed", "seed"),
        "dataset": meta.get("dataset") or metrics.get("dataset"),
        "model_name": meta.get("model_name"),
        "weights_id": meta.get("weights_id"),
        "pretrained": meta.get("pretrained") or None,
        "class_names_sha256": meta.get("class_names_sha256"),
        "num_classes": int(meta.get("num_classes", 0)),
        "kshot_fingerprint": meta.get("kshot_fingerprint") or None,
    }
