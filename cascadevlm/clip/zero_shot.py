"""The math of the CLIP stage: zero-shot head (and its on-disk cache), logits, probabilities, entropy, top-k."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from cascadevlm.data.registry import normalise_templates, validate_class_names
from cascadevlm.logs import get_logger, verbosity
from cascadevlm.records import atomic_path

log = get_logger(__name__)

# Bump when the way a head is computed from (model, names, templates) changes: old entries then miss.
HEAD_FORMAT = 1
HEAD_DIR = "zero_shot_heads"  # a folder of the image-feature cache directory (``--cache_dir``)
HEAD_PREFIX = "zero-shot-head-"


def validate_templates(templates: Sequence[str]) -> list[str]:
    templates = [str(t) for t in templates]
    if not templates:
        raise ValueError("the prompt template list is empty; give at least one, e.g. 'a photo of a {}.'")
    return normalise_templates(templates, "--data.templates")  # CLIP_benchmark's "{c}" becomes "{}"


@torch.no_grad()
def build_zero_shot_head(
    model: torch.nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    class_batch_size: int = 32,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Class embeddings [C, D]: per class, the normalised mean of its normalised template embeddings.

    Args:
        model: an open_clip model (``encode_text``).
        tokenizer: its tokenizer.
        class_names: one name per class, in class-id order.
        templates: format strings with ``{}`` for the class name (the template ensemble).
        class_batch_size: classes encoded per forward (x len(templates) prompts).
        device: where the text encoder runs.
        on_batch: called with the number of classes of each batch once it is encoded (a progress bar).
    """
    class_names = validate_class_names(class_names, "the class list")
    templates = validate_templates(templates)
    rows = []
    for start in range(0, len(class_names), class_batch_size):
        batch = class_names[start : start + class_batch_size]
        texts = [t.format(c) for c in batch for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device), normalize=True)
        emb = emb.reshape(len(batch), len(templates), -1).mean(dim=1)
        rows.append(F.normalize(emb, dim=-1))
        if on_batch is not None:
            on_batch(len(batch))
    return torch.cat(rows).float()


def text_identity(bundle) -> dict:
    """What about a :class:`~cascadevlm.clip.model.ClipBundle` changes its text embeddings: architecture,
    model config, weights (merged CLIP-LoRA adapters included) and precision (not the image transform)."""
    ident = bundle.feature_identity()
    return {k: ident[k] for k in ("model", "model_config", "weights", "precision")}


def head_key_parts(bundle, class_names: Sequence[str], templates: Sequence[str]) -> dict:
    """Everything a zero-shot head depends on: the model's text identity, the names and the templates
    (in order: the class ids follow the names; the template order changes the float sums)."""
    return {"format": HEAD_FORMAT, **text_identity(bundle), "class_names": list(class_names),
            "templates": list(templates)}  # fmt: skip


def head_key(parts: dict) -> str:
    """A short stable hash of :func:`head_key_parts` (the cache file's name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def differing_parts(stored, parts: dict) -> str:
    """Which key parts of a cached head differ from the ones asked for, in a few words each (lists of
    10,000 names say where they first differ, not what they hold)."""
    if not isinstance(stored, dict):
        return "no key parts (not a head this project wrote)"

    def short(x) -> str:
        r = repr(x)
        return r if len(r) <= 60 else r[:57] + "..."

    out = []
    for k in [*parts, *(k for k in stored if k not in parts)]:
        a, b = stored.get(k), parts.get(k)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            where = (
                f"{short(a[i])} where {short(b[i])} was asked" if i < min(len(a), len(b)) else "one list ends"
            )
            out.append(f"{k} ({len(a)} stored, {len(b)} asked; at {i}: {where})")
        else:
            out.append(f"{k} ({short(a)} stored, {short(b)} asked)")
    return "; ".join(out)


class HeadCache:
    """Zero-shot heads [C, D] as ``<root>/zero-shot-head-<key>.safetensors``, the key's parts in the file's
    metadata. A file whose parts differ from the ones asked for (a copied or hand-placed file, a hash
    collision), that cannot be read (truncated) or whose tensor does not fit is a miss: the head is
    recomputed and the file replaced, with one warning naming what was wrong (for other parts: which
    parts, e.g. the templates or the model's weights), never trusted and never a stop."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, parts: dict) -> Path:
        return self.root / f"{HEAD_PREFIX}{head_key(parts)}.safetensors"

    def load(self, parts: dict) -> torch.Tensor | None:
        path = self.path(parts)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                stored = json.loads((fh.metadata() or {}).get("key_parts", "null"))
            head = load_file(str(path))["head"]
        except (SafetensorError, OSError, ValueError, KeyError) as err:  # truncated, not safetensors, ...
            log.warning(f"zero-shot head cache {path} is unreadable ({type(err).__name__}): recomputing it")
            return None
        if stored != parts:
            log.warning(
                f"zero-shot head cache {path} does not hold this head, other {differing_parts(stored, parts)} "
                "(a copied or hand-placed file, or a hash collision): recomputing it"
            )
            return None
        if head.ndim != 2 or head.shape[0] != len(parts["class_names"]) or not torch.isfinite(head).all():
            log.warning(f"zero-shot head cache {path} holds a {list(head.shape)} tensor: recomputing it")
            return None
        return head

    def save(self, parts: dict, head: torch.Tensor) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(parts)
        meta = {"key_parts": json.dumps(parts, sort_keys=True)}
        with atomic_path(path) as tmp:  # a crash never leaves half a head; concurrent writers never collide
            save_file({"head": head.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
        return path


def _head_progress(total: int, description: str):
    """A Rich bar (the project's progress stack) on stderr for a head build; None under ``--quiet``."""
    if verbosity() == "quiet":
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
               TextColumn("classes"), TimeElapsedColumn())  # fmt: skip
    bar = Progress(*columns, console=Console(stderr=True), transient=True)
    bar.add_task(description, total=total)
    return bar


def zero_shot_head(
    bundle,
    class_names: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | Path | None = None,
    class_batch_size: int = 64,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The zero-shot head [C, D] of ``bundle`` (a ``ClipBundle``), from ``cache_dir`` when it holds the
    head of exactly this model, these names and these templates; otherwise built (in class batches, with
    a progress bar) and stored there. Equal (``torch.equal``) to :func:`build_zero_shot_head`'s.

    Args:
        bundle: the CLIP model with its tokenizer and identity (``feature_identity``).
        class_names, templates: as for :func:`build_zero_shot_head` (validated first, also on a hit).
        cache_dir: the feature cache directory (``--cache_dir``): heads go to its ``zero_shot_heads/``;
            None: always built, never stored.
        class_batch_size: classes per text-encoder forward.
        device: where the text encoder runs (default: where the model is); the head is returned there.
    """
    class_names = validate_class_names(class_names, "the class list")
    templates = validate_templates(templates)
    model = bundle.model
    device = device if device is not None else next(model.parameters()).device
    cache = HeadCache(Path(cache_dir) / HEAD_DIR) if cache_dir is not None else None
    parts = head_key_parts(bundle, class_names, templates) if cache is not None else None
    if cache is not None and (hit := cache.load(parts)) is not None:
        log.debug(f"zero-shot head: {len(class_names)} classes from {cache.path(parts)}")
        return hit.to(device)
    started = time.perf_counter()
    bar = _head_progress(len(class_names), f"zero-shot head ({len(templates)} templates)")
    step = (lambda n: bar.advance(bar.task_ids[0], n)) if bar is not None else None
    if bar is not None:
        bar.start()
    try:
        head = build_zero_shot_head(
            model, bundle.tokenizer, class_names, templates, class_batch_size, device, step
        )
    finally:
        if bar is not None:
            bar.stop()
    where = ""
    if cache is not None:
        where = f", stored in {cache.save(parts, head)}"
    log.info(f"zero-shot head: {len(class_names)} classes x {len(templates)} templates encoded in "
             f"{time.perf_counter() - started:.1f} s{where}")  # fmt: skip
    return head


def clip_logits(
    image_features: torch.Tensor, head: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Scaled cosine similarities [N, C] of normalised image features [N, D] with a head [C, D]."""
    feats = F.normalize(image_features.float(), dim=-1)
    return float(logit_scale) * feats @ head.float().T


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row, computed stably in log space."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def topk_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (probabilities, class ids) of softmax(logits), most probable first; k is capped at C.

    Only the k chosen logits are exponentiated (against the row's log-sum-exp): no [N, C] softmax."""
    z = logits.float()
    top, ids = z.topk(min(k, z.shape[-1]), dim=-1)
    return (top - torch.logsumexp(z, dim=-1, keepdim=True)).exp(), ids


def topk_probs_and_entropy(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`topk_probs` and :func:`entropy_from_logits` from one log-softmax of the logits (the CLIP
    stage's per-batch outputs: one [N, C] pass less than calling both)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return top.exp(), ids, -(logp.exp() * logp).sum(dim=-1)
