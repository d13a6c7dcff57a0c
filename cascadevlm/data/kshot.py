"""Deterministic k-shot splits keyed by (dataset, k, seed), stored as small JSON files.

A split file lists, per class id, the row indices of the chosen training images, so every method
(CLIP adapters, LVLM in-context examples, LoRA) sees the same images: every consumer gets its split
from :func:`dataset_kshot_split`, which names the file by :func:`kshot_dataset_name` (the registry
name, whatever the directory is called) and refuses a file drawn from other data (its fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascadevlm.records import atomic_path


@dataclass(frozen=True)
class KShotSplit:
    dataset: str
    k: int
    seed: int
    indices: dict[int, list[int]]  # class id -> row indices in the source split
    fingerprint: str | None = None  # the source split's identity (see kshot_fingerprint); None: unknown

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
            "fingerprint": self.fingerprint,
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
                fingerprint=payload.get("fingerprint"),
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
    root: str | Path,
    labels: Sequence[int],
    k: int,
    seed: int,
    dataset: str,
    num_classes: int,
    fingerprint: str | None = None,
) -> KShotSplit:
    """The cached split for (dataset, k, seed) if one was written, otherwise sample and write it.

    With a ``fingerprint``, a cached file drawn from other data (another fingerprint, or an older file
    whose rows do not have the labels it lists) is refused.
    """
    path = kshot_split_path(root, dataset, k, seed)
    if path.exists():
        split = KShotSplit.load(path)
        if fingerprint is not None:
            _check_not_stale(path, split, labels, fingerprint)
        return split
    split = sample_kshot(labels, k, seed, dataset, num_classes)
    if fingerprint is not None:
        split = KShotSplit(split.dataset, split.k, split.seed, split.indices, fingerprint)
    with atomic_path(path) as tmp:  # atomic: ranks and concurrent runs never read half a file
        split.save(tmp)
    return split


def _check_not_stale(path: Path, split: KShotSplit, labels: Sequence[int], fingerprint: str) -> None:
    fix = "delete it to draw the split again, or use --data.splits_dir for another split directory"
    if split.fingerprint is not None and split.fingerprint != fingerprint:
        raise ValueError(
            f"k-shot split file {str(path)!r} was drawn from other data (fingerprint {split.fingerprint} "
            f"!= {fingerprint} of this dataset's training split); {fix}"
        )
    # A file from before fingerprints: accept it only if every row it lists exists and has its class.
    bad = [i for c, rows in split.indices.items() for i in rows if i >= len(labels) or int(labels[i]) != c]
    if bad:
        raise ValueError(
            f"k-shot split file {str(path)!r} was drawn from other data ({len(bad)} of its rows are missing "
            f"or of another class in this dataset's training split); {fix}"
        )


def kshot_fingerprint(train_dataset, labels: Sequence[int]) -> str:
    """The identity of the split k-shot rows are drawn from: its HF fingerprint and a hash of its labels."""
    digest = hashlib.sha256(json.dumps([int(x) for x in labels]).encode()).hexdigest()[:16]
    hf = getattr(train_dataset, "_fingerprint", None) or "none"
    return f"hf:{hf};labels:{digest};rows:{len(labels)}"


def kshot_dataset_name(dataset: str, train_dataset=None, benchmark: str | None = None) -> str:
    """The dataset name k-shot split files are keyed by, the same for every consumer.

    The registry name when the benchmark is named (``benchmark``), when the directory is named like one,
    or when the dataset's own class names are exactly a registered benchmark's; otherwise the
    directory's (or hub name's) last part.
    """
    from cascadevlm.data.registry import benchmark_names, get_benchmark, match_class_names

    if benchmark:
        return get_benchmark(benchmark).name
    base = Path(dataset.rstrip("/")).name
    try:
        return get_benchmark(base).name
    except KeyError:
        pass
    feat = getattr(train_dataset, "features", {}).get("label") if train_dataset is not None else None
    own = getattr(feat, "names", None)
    if own:
        for name in benchmark_names():
            spec = get_benchmark(name)
            if spec.num_classes != len(own):
                continue
            try:
                match_class_names(spec, list(own), dataset)
                return spec.name
            except ValueError:
                continue
    return base.replace("/", "_")


def dataset_kshot_split(
    splits_dir: str | Path,
    dataset: str,
    train_dataset,
    k: int,
    seed: int,
    num_classes: int,
    benchmark: str | None = None,
) -> KShotSplit:
    """The (dataset, k, seed) split of ``train_dataset`` (a HF dataset with a ``label`` column).

    The one entry point for the CLIP adapters, in-context examples and LoRA: the same file name
    (:func:`kshot_dataset_name`), the same draw, and a stale file (same name, other data) refused.
    """
    # the column alone, through Arrow: indexing a column of a HF dataset with an image column decodes
    # every image (seconds on a benchmark's train split)
    column = train_dataset.with_format("arrow")["label"] if hasattr(train_dataset, "with_format") else None
    labels = column.to_pylist() if column is not None else [int(x) for x in train_dataset["label"]]
    name = kshot_dataset_name(dataset, train_dataset, benchmark)
    return load_or_create_kshot(
        splits_dir, labels, k, seed, name, num_classes, kshot_fingerprint(train_dataset, labels)
    )
