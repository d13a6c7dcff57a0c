"""Augmented views of k-shot images and their CLIP features, cached by image, view seed and transform.

The papers' augmentation: ``RandomResizedCrop`` to the model's input size, bicubic, with scale (0.5, 1)
(``flip_crop``: Tip-Adapter's cache) or (0.08, 1) (``flip_crop_wide``: CLIP-LoRA's training, the official
code's ``main.py``), then a horizontal flip with probability 0.5, then the model's own tensor conversion
and normalisation. A view is a pure function of (image row,
view seed): its random draw is seeded by both, so the same image under the same view seed is the same
crop in every method, every k and every k-shot seed.

Features of view ``v`` are stored per image row (one file per model, transform, split and view seed, rows
appended as new images are asked for), so 10 views cost one encoder pass each over the images not seen
before, and then serve every method and seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torchvision import transforms as T

from cascadevlm.clip.features import FeatureCache, dataset_fingerprint
from cascadevlm.data.loading import ImageClassificationDataset
from cascadevlm.records import atomic_path

# name -> RandomResizedCrop scale (None: the plain preprocess)
CROP_SCALES: dict[str, tuple[float, float] | None] = {
    "none": None,
    "flip_crop": (0.5, 1.0),  # Tip-Adapter's main.py
    "flip_crop_wide": (0.08, 1.0),  # CLIP-LoRA's main.py
}
AUGMENTATIONS = tuple(CROP_SCALES)


def check_augment(augment: str, flag: str) -> None:
    """Refuse an unknown augmentation name in one line."""
    if augment not in AUGMENTATIONS:
        raise ValueError(
            f"augmentation {augment!r} is unknown; choose one of {list(AUGMENTATIONS)}: set {flag}"
        )


def _input_size(preprocess) -> int:
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.CenterCrop):
            return int(t.size[0])
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Resize):
            size = t.size
            return int(size if isinstance(size, int) else size[0])
    raise ValueError(f"cannot find the input size in the CLIP preprocess {preprocess!r}")


def augment_transform(preprocess, augment: str = "flip_crop"):
    """The training transform: the random crop and flip in place of ``preprocess``'s resize and centre crop.

    ``none`` is ``preprocess`` itself (one plain view).
    """
    check_augment(augment, "the augmentation")
    if augment == "none":
        return preprocess
    rest = [t for t in preprocess.transforms if not isinstance(t, (T.Resize, T.CenterCrop))]
    crop = T.RandomResizedCrop(
        _input_size(preprocess), scale=CROP_SCALES[augment], interpolation=T.InterpolationMode.BICUBIC
    )
    return T.Compose([crop, T.RandomHorizontalFlip(0.5), *rest])


def view_seed(row: int, view: int) -> int:
    """The random seed of image ``row``'s view ``view`` (independent of batch, worker and k-shot draw)."""
    digest = hashlib.sha256(f"{int(row)}|{int(view)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class AugmentedImages(ImageClassificationDataset):
    """:class:`ImageClassificationDataset` under a random transform seeded by (row, ``view``): a fixed
    view per image (cached features), or with ``view=None`` a fresh draw each time (training)."""

    def __init__(self, ds, transform, split: str, indices: list[int] | None = None, view: int | None = None):
        super().__init__(ds, transform, split, indices)
        self.view = view

    def __getitem__(self, i: int) -> dict:
        if self.view is None:
            return super().__getitem__(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.indices[i], self.view))
            return super().__getitem__(i)


class AugmentedFeatureStore:
    """Per-view features of single image rows: ``<root>/<key>.safetensors`` with ``rows`` and ``features``.

    ``key`` hashes the model's feature identity, the transform, the split's fingerprint and the view seed,
    so a row's feature is computed once per (model, transform, image, view).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, bundle, transform, dataset, split: str, view: int) -> str:
        parts = {
            **bundle.feature_identity(),
            "augment": repr(transform),
            "dataset": dataset_fingerprint(dataset),
            "split": split,
            "view": int(view),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def load(self, key: str) -> dict[int, torch.Tensor]:
        path = self.root / f"{key}.safetensors"
        if not path.exists():
            return {}
        data = load_file(str(path))
        return {int(r): f for r, f in zip(data["rows"].tolist(), data["features"], strict=True)}

    def save(self, key: str, rows: dict[int, torch.Tensor]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        order = sorted(rows)
        path = self.root / f"{key}.safetensors"
        tensors = {
            "rows": torch.tensor(order, dtype=torch.long),
            "features": torch.stack([rows[r] for r in order]).float().contiguous(),
        }
        with atomic_path(path) as tmp:  # atomic: a concurrent writer loses at most rows it will recompute
            save_file(tensors, str(tmp))


@torch.no_grad()
def augmented_features(
    bundle,
    dataset,
    rows: Sequence[int],
    split: str,
    views: int = 10,
    augment: str = "flip_crop",
    cache_root: str | Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
) -> torch.Tensor:
    """Normalised features [views, len(rows), D] of ``views`` augmented views of ``dataset``'s ``rows``.

    View ``v`` of row ``r`` is seeded by ``(r, v)``; features come from the store under ``cache_root``
    (per image, so other k-shot draws and methods reuse them) and only missing rows are encoded.
    """
    from cascadevlm.clip.model import encode_images

    if views < 1:
        raise ValueError(f"augmented views must be >= 1, got {views}: set --model.views")
    transform = augment_transform(bundle.preprocess, augment)
    store = AugmentedFeatureStore(cache_root) if cache_root is not None else None
    rows = [int(r) for r in rows]
    out = []
    for view in range(views):
        key = store.key(bundle, transform, dataset, split, view) if store is not None else ""
        have = store.load(key) if store is not None else {}
        missing = sorted(set(rows) - set(have))
        if missing:
            images = AugmentedImages(dataset, transform, split, indices=missing, view=view)
            loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=num_workers)
            for batch in loader:
                feats = encode_images(bundle, batch["pixel_values"]).cpu()
                have.update(zip(batch["index"].tolist(), feats, strict=True))
            if store is not None:
                store.save(key, have)
        out.append(torch.stack([have[r] for r in rows]) if rows else torch.empty(0, bundle.embed_dim))
    return torch.stack(out)


def cache_root_of(cache: FeatureCache | None) -> Path | None:
    """Where augmented views live beside a data module's feature cache (None: not cached)."""
    return None if cache is None else Path(cache.root) / "augmented"
