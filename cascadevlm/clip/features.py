"""On-disk cache of image features, keyed by everything that determines them.

Key parts: CLIP architecture, its model config, weights (tag or content hash of the checkpoint file or
weights directory), precision, the preprocessing transform, dataset fingerprint, split and number of
rows. Any change gives a new key, so stale features are never served.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cascadevlm.records import atomic_path, atomic_write_text


def feature_key(model: dict, dataset_fingerprint: str, split: str, num_rows: int) -> str:
    """A short stable hash of the parts that determine a split's image features.

    ``model`` is :meth:`ClipBundle.feature_identity` (architecture, config, weights, precision, preprocess).
    """
    parts = {**model, "dataset": dataset_fingerprint, "split": split, "rows": int(num_rows)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def dataset_fingerprint(dataset) -> str:
    """The Hugging Face dataset's own fingerprint (changes whenever its content or transforms change)."""
    fp = getattr(dataset, "_fingerprint", None)
    if not fp:
        raise ValueError("dataset has no fingerprint; pass a datasets.Dataset")
    return str(fp)


class FeatureCache:
    """Features [N, D] in row order, stored as ``<root>/<key>.safetensors`` plus a JSON of the key parts."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.exists():
            return None
        return load_file(str(path))["features"]

    def load_seconds(self, key: str) -> torch.Tensor | None:
        """Wall seconds per row measured when the features were computed; None when not kept (files
        written before they were)."""
        path = self.path(key)
        if not path.exists():
            return None
        return load_file(str(path)).get("seconds")

    def save(
        self, key: str, features: torch.Tensor, meta: dict | None = None, seconds: torch.Tensor | None = None
    ) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tensors = {"features": features.detach().float().cpu().contiguous()}
        if seconds is not None:  # what computing them cost, so a cached rerun reports it
            tensors["seconds"] = seconds.detach().double().cpu().contiguous()
        # atomic, under a name of this writer's own: ranks of several machines may fill one cache entry
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        if meta is not None:
            atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1, default=str))
        return path


def split_feature_key(bundle, dataset, split: str) -> str:
    """The cache key of ``dataset``'s image features under ``bundle`` (a :class:`ClipBundle`)."""
    return feature_key(bundle.feature_identity(), dataset_fingerprint(dataset), split, len(dataset))


@torch.no_grad()
def image_features(
    bundle,
    dataset,
    split: str,
    cache: FeatureCache | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Normalised image features [N, D] of every row of ``dataset``, from the cache when it has them.

    A plain loop for small splits (k-shot train/val sets of the adapters); evaluation of large splits
    goes through the Lightning module, which can use several devices and fills the same cache.
    """
    from cascadevlm.clip.model import encode_images
    from cascadevlm.data.loading import ImageClassificationDataset

    key = split_feature_key(bundle, dataset, split)
    if cache is not None and (hit := cache.load(key)) is not None:
        return hit
    loader = torch.utils.data.DataLoader(
        ImageClassificationDataset(dataset, bundle.preprocess, split),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    bundle.model.to(device)
    feats = [encode_images(bundle, b["pixel_values"]).cpu() for b in loader]
    out = torch.cat(feats) if feats else torch.empty(0, bundle.embed_dim)
    if cache is not None:
        cache.save(key, out, {**bundle.feature_identity(), "split": split})
    return out
