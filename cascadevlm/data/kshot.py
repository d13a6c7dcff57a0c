"""Deterministic k-shot splits keyed by (dataset, k, seed), stored as small JSON files.

A split file lists, per class id, the row indices of the chosen training images, so every method
(CLIP adapters, LVLM in-context examples, LoRA) sees the same images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class KShotSplit:
    dataset: str
    k: int
    seed: int
    indices: dict[int, list[int]]  # class id -> row indices in the source split

    @property
    def all_indices(self) -> list[int]:
        return sorted(i for rows in self.indices.values() for i in rows)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "dataset": self.dataset,
            "k": self.k,
            "seed": self.seed,
            "indices": {str(c): rows for c, rows in sorted(self.indices.items())},
        }
        path.write_text(json.dumps(payload, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> KShotSplit:
        try:
            payload = json.loads(Path(path).read_text())
            return cls(
                dataset=payload["dataset"],
                k=int(payload["k"]),
                seed=int(payload["seed"]),
                indices={int(c): [int(i) for i in rows] for c, rows in payload["indices"].items()},
            )
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"k-shot split file {str(path)!r} is malformed: {err}") from err


def sample_kshot(labels: Sequence[int], k: int, seed: int, dataset: str, num_classes: int) -> KShotSplit:
    """Pick ``k`` rows per class, uniformly without replacement, reproducibly for (dataset, k, seed)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    if counts.min() < k:
        c = int(counts.argmin())
        raise ValueError(
            f"k={k} is larger than the smallest class of {dataset!r}: class {c} has {int(counts[c])} images"
        )
    # Seed from (dataset, k, seed) so different datasets with the same seed get independent draws.
    digest = sum((i + 1) * ord(ch) for i, ch in enumerate(f"{dataset}|{k}|{seed}"))
    rng = np.random.default_rng([seed, k, digest])
    indices = {}
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        indices[c] = sorted(int(i) for i in rng.choice(rows, size=k, replace=False))
    return KShotSplit(dataset=dataset, k=k, seed=seed, indices=indices)


def kshot_split_path(root: str | Path, dataset: str, k: int, seed: int) -> Path:
    return Path(root) / f"{dataset}_k{k}_seed{seed}.json"


def load_or_create_kshot(
    root: str | Path, labels: Sequence[int], k: int, seed: int, dataset: str, num_classes: int
) -> KShotSplit:
    """The cached split for (dataset, k, seed) if one was written, otherwise sample and write it."""
    path = kshot_split_path(root, dataset, k, seed)
    if path.exists():
        return KShotSplit.load(path)
    split = sample_kshot(labels, k, seed, dataset, num_classes)
    split.save(path)
    return split
