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
``dataset``, ``kshot_fingerprint`` and ``selection`` (the model-selection protocol: ``val``,
``val_split`` or ``last``) (empty strings when unknown). :func:`adapter_info` reads them.

Adapter kinds form a registry: each method module calls :func:`register_adapter_kind` with its kind (the
``kind`` metadata string), its method name, how to build its inference head from a file's contents
(:class:`AdapterFile`) and any extra fit checks; :func:`load_adapter` dispatches through it. A new method
adds its module to :data:`ADAPTER_MODULES` so files of its kind load without importing it first.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cascadevlm.records import atomic_path

if TYPE_CHECKING:
    from cascadevlm.clip.adapters.coop import PromptLearner
    from cascadevlm.clip.adapters.linear_probe import LinearProbe

FORMAT = "cascadevlm.clip_adapter"
FORMAT_VERSION = "1"
CTX_PLACEHOLDER = "X"  # stands for one context token while tokenising prompts (as in CoOp)


class AdapterMismatchError(ValueError):
    """An adapter file does not fit the CLIP model or class list it is loaded for."""


@dataclass(frozen=True)
class AdapterFile:
    """What a method's loader gets: the file's tensors and decoded metadata, and what it is loaded for."""

    path: Path
    tensors: dict[str, torch.Tensor]
    params: dict
    logit_scale: float
    bundle: Any  # ClipBundle
    class_names: list[str]
    meta: dict[str, str]
    head_cache_dir: Path | None = None  # where a kind that encodes class names caches its head (--cache_dir)


@dataclass(frozen=True)
class AdapterKind:
    """One registered adapter kind.

    Attributes:
        kind: the ``kind`` metadata string of its files.
        method: the method name recorded when a file does not name one (``linear_probe``, ``coop`` ...).
        load: ``load(AdapterFile) -> module`` giving ``forward(image_features [N, D]) -> logits [N, C]``.
        check: extra fit checks, ``check(tensors, meta, bundle) -> list of problems`` (one line each).
        feature_dim: the image-feature dimension the file's tensors expect (None: not checkable).
    """

    kind: str
    method: str
    load: Callable[[AdapterFile], torch.nn.Module]
    check: Callable[[dict[str, torch.Tensor], dict[str, str], Any], list[str]] | None = None
    feature_dim: Callable[[dict[str, torch.Tensor]], int] | None = None


# kind -> AdapterKind; filled by the method modules when imported (see ADAPTER_MODULES)
ADAPTER_KINDS: dict[str, AdapterKind] = {}
# kind -> method name, kept in step with ADAPTER_KINDS (old readers look methods up here)
METHOD_OF_KIND: dict[str, str] = {}
# the modules that register kinds; imported on first use so a file of any kind loads from base alone
ADAPTER_MODULES: list[str] = [
    "cascadevlm.clip.adapters.linear_probe",
    "cascadevlm.clip.adapters.coop",
    "cascadevlm.clip.adapters.tip_adapter",
    "cascadevlm.clip.adapters.clip_adapter",
    "cascadevlm.clip.adapters.clip_lora",
]


def register_adapter_kind(
    kind: str,
    method: str,
    load: Callable[[AdapterFile], torch.nn.Module],
    check: Callable[[dict[str, torch.Tensor], dict[str, str], Any], list[str]] | None = None,
    feature_dim: Callable[[dict[str, torch.Tensor]], int] | None = None,
) -> AdapterKind:
    """Register (or re-register, on module reload) an adapter kind; returns its entry."""
    entry = AdapterKind(kind, method, load, check, feature_dim)
    ADAPTER_KINDS[kind] = entry
    METHOD_OF_KIND[kind] = method
    return entry


def _ensure_registered() -> None:
    for name in ADAPTER_MODULES:
        importlib.import_module(name)


def adapter_kinds() -> tuple[str, ...]:
    """Every registered adapter kind."""
    _ensure_registered()
    return tuple(ADAPTER_KINDS)


def adapter_kind(kind: str) -> AdapterKind:
    """The registry entry of ``kind`` (ValueError naming the known kinds when unknown)."""
    _ensure_registered()
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; known: {tuple(ADAPTER_KINDS)}")
    return ADAPTER_KINDS[kind]


def class_names_sha256(class_names: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(class_names)).encode()).hexdigest()


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
    selection: str | None = None,
) -> Path:
    """Write the adapter's own tensors and its metadata to ``path`` (atomically).

    ``method``, ``shots``, ``seed``, ``dataset`` describe the training run (what :func:`adapter_info`
    gives evaluation to name runs by); ``method`` defaults to the adapter kind's method; ``selection`` is
    the model-selection protocol (``val``, ``val_split`` or ``last``, see :class:`KShotFeatureDataModule`).
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
        "method": method or adapter_kind(adapter.kind).method,
        "shots": "" if shots is None else str(int(shots)),
        "seed": "" if seed is None else str(int(seed)),
        "dataset": dataset or "",
        "kshot_fingerprint": kshot_fingerprint or "",
        "selection": selection or "",
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapter.adapter_tensors().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a file of this writer's own: two runs exporting at once never collide
        save_file(tensors, str(tmp), metadata=meta)
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
    kinds = adapter_kinds()
    if meta.get("kind") not in kinds:
        raise ValueError(f"adapter {str(path)!r} has unknown kind {meta.get('kind')!r}; known: {kinds}")
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
    entry = adapter_kind(meta["kind"])
    saved_dim = int(meta.get("embed_dim", -1))
    tensor_dim = int(entry.feature_dim(tensors)) if entry.feature_dim is not None else None
    if saved_dim != bundle.embed_dim or (tensor_dim is not None and tensor_dim != bundle.embed_dim):
        problems.append(
            f"embed_dim: adapter {tensor_dim if tensor_dim is not None else saved_dim}, loaded CLIP {bundle.embed_dim}"
        )
    if entry.check is not None:
        problems.extend(entry.check(tensors, meta, bundle))
    saved_names = json.loads(meta.get("class_names", "[]"))
    if saved_names != list(class_names):
        problems.append(f"class list: {_class_list_difference(saved_names, list(class_names))}")
    if problems:
        raise AdapterMismatchError(
            f"adapter {str(path)!r} ({meta['kind']}) does not fit: " + "; ".join(problems)
        )


def load_adapter(
    path: str | Path, bundle, class_names: Sequence[str], head_cache_dir: str | Path | None = None
) -> torch.nn.Module:
    """Load a trained adapter as a module ``forward(image_features [N, D]) -> logits [N, C]``.

    Args:
        path: the ``.safetensors`` file written by training.
        bundle: the loaded CLIP (:class:`ClipBundle`); its model name, weights id and dimension must
            be those the adapter was trained with.
        class_names: the classes in class-id order; must equal the adapter's list.
        head_cache_dir: the feature cache directory; CLIP-LoRA's head (the merged text encoder's zero-shot
            head) is cached there (None: built on every load).

    Each kind builds its own head through the registry (a prompt-tuned adapter runs the text encoder
    once here and becomes a fixed linear head).
    """
    tensors, meta = read_adapter(path)
    check_adapter_fits(path, meta, tensors, bundle, class_names)
    entry = adapter_kind(meta["kind"])
    file = AdapterFile(
        path=Path(path),
        tensors=tensors,
        params=json.loads(meta.get("params") or "{}"),
        logit_scale=float(meta["logit_scale"]),
        bundle=bundle,
        class_names=list(class_names),
        meta=meta,
        head_cache_dir=Path(head_cache_dir) if head_cache_dir is not None else None,
    )
    return entry.load(file)


class WiseHead(torch.nn.Module):
    """WiSE-FT-style interpolation at evaluation: ``mix * adapter(f) + (1 - mix) * zero_shot(f)``.

    Mixing logits is mixing weights where the head is linear (the linear probe, prompt heads: both terms
    are ``s * f @ W.T`` of the same features), and works for every kind. ``mix = 1`` is the adapter
    alone, ``mix = 0`` zero-shot CLIP exactly.
    """

    def __init__(
        self, adapter: torch.nn.Module, zero_shot_head: torch.Tensor, logit_scale: float, mix: float
    ):
        super().__init__()
        check_adapter_mix(mix)
        self.adapter = adapter
        self.register_buffer("zero_shot_head", zero_shot_head.detach().float().clone())
        self.logit_scale = float(logit_scale)
        self.mix = float(mix)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        from cascadevlm.clip.zero_shot import clip_logits

        zs = clip_logits(image_features, self.zero_shot_head, self.logit_scale)
        return (1.0 - self.mix) * zs + self.mix * self.adapter(image_features).float()


def check_adapter_mix(mix: float, adapter: str | None = "given") -> None:
    """Refuse, in one line, a mixing weight outside [0, 1] or one set without an adapter."""
    if not isinstance(mix, (int, float)) or not 0.0 <= float(mix) <= 1.0:
        raise ValueError(
            f"model.adapter_mix must be in [0, 1] (1: the adapter alone, 0: zero-shot CLIP), got {mix!r}: "
            "set --model.adapter_mix"
        )
    if not adapter and float(mix) != 1.0:
        raise ValueError(
            f"model.adapter_mix={mix:g} mixes an adapter with zero-shot CLIP, but no adapter is set: "
            "set --model.adapter or leave --model.adapter_mix at 1"
        )


def adapter_metadata(path: str | Path) -> dict:
    """The metadata of an adapter file, JSON fields decoded (for reports and ``evaluate.py``)."""
    _, meta = read_adapter(path)
    out = dict(meta)
    for key in ("class_names", "params", "metrics"):
        out[key] = json.loads(meta.get(key) or "null")
    return out


def adapter_info(path: str | Path) -> dict:
    """What an adapter file was made by and for: ``method``, ``kind``, ``shots``, ``seed``, ``dataset``,
    ``model_name``, ``weights_id``, ``pretrained``, ``class_names_sha256``, ``num_classes``,
    ``kshot_fingerprint``, ``selection`` (None when the file does not record it).

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
        "method": meta.get("method") or metrics.get("method") or adapter_kind(meta["kind"]).method,
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
        "selection": meta.get("selection") or None,
    }
