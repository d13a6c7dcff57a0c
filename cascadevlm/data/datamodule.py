"""The LightningDataModule every entry point uses: one dataset, its class names, templates, k-shot split."""

from __future__ import annotations

from pathlib import Path

import datasets
import lightning as L
import torch

from cascadevlm.data.kshot import KShotSplit, dataset_kshot_split
from cascadevlm.data.loading import (
    LABEL_COLUMN,
    FeatureDataset,
    ImageClassificationDataset,
    dataset_class_names,
    load_dataset_dict,
)
from cascadevlm.data.registry import (
    GENERIC_TEMPLATES,
    BenchmarkSpec,
    get_benchmark,
    match_class_names,
    validate_class_names,
)


class CascadeDataModule(L.LightningDataModule):
    """A classification dataset from a directory (image folder or ``save_to_disk``) or the hub.

    Args:
        dataset: a directory, a hub name, or ``fashion_mnist`` (the offline demo data, built on first use).
        benchmark: registry entry for class names and templates (default: ``dataset`` when registered).
        split: the split evaluated (``test``); ``train_split`` and ``val_split`` serve k-shot training.
        class_names: the class names by label id (otherwise: a dataset named like a registered
            benchmark gets the registry's names matched to its own ClassLabel names by name, in its
            label order, and is refused when they differ; else the dataset's own names).
        templates: override the prompt templates (otherwise registry, then the generic ensemble).
        limit: evaluate only the first ``limit`` rows of ``split`` (smoke runs, demos).
        shots: k for the k-shot split of ``train_split`` (0 = zero-shot); ``seed`` picks the draw.
        splits_dir: where k-shot split files are written and read.
        data_root: where the demo dataset is built.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        benchmark: str | None = None,
        split: str = "test",
        train_split: str = "train",
        val_split: str = "val",
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        limit: int | None = None,
        shots: int = 0,
        seed: int = 1,
        splits_dir: str = "artifacts/splits",
        data_root: str = "data",
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.split = split
        self.train_split = train_split
        self.val_split = val_split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.limit = limit
        self.shots = shots
        self.seed = seed
        self.splits_dir = splits_dir
        self.data_root = data_root
        self.transform = None  # set by the CLIP stage: its own preprocessing
        self.dsd = self._load()
        if split not in self.dsd:
            raise ValueError(f"dataset {dataset!r} has no split {split!r}; it has {list(self.dsd)}")
        self.benchmark = benchmark
        self.spec = self._spec(benchmark)
        own = dataset_class_names(self.dsd[split])
        if class_names:
            names = list(class_names)  # the user's names, by label id
        elif self.spec is not None and own is not None:
            names = match_class_names(self.spec, own, dataset)  # by name, in the dataset's label order
        elif self.spec is not None:
            names = list(self.spec.class_names)  # integer labels: the registry's ids
        else:
            names = own
        if names is None:
            raise ValueError(f"dataset {dataset!r} has no ClassLabel feature; give data.class_names")
        self.class_names = validate_class_names(names, f"dataset {self.name!r}")
        self.templates = list(templates or (self.spec.templates if self.spec else GENERIC_TEMPLATES))
        self._check_labels()

    # ----------------------------------------------------------------------------------------- loading
    def _load(self) -> datasets.DatasetDict:
        if self.dataset == "fashion_mnist":
            from cascadevlm.data.demo import fashion_mnist_dir

            return load_dataset_dict(str(fashion_mnist_dir(self.data_root)))
        return load_dataset_dict(self.dataset)

    def _spec(self, benchmark: str | None) -> BenchmarkSpec | None:
        if benchmark is not None:
            return get_benchmark(benchmark)  # an explicit unknown name is an error
        try:
            return get_benchmark(Path(self.dataset).name)
        except KeyError:
            return None

    def _check_labels(self) -> None:
        feat = self.dsd[self.split].features.get(LABEL_COLUMN)
        n = len(feat.names) if isinstance(feat, datasets.ClassLabel) else None
        if n is not None and n != len(self.class_names):
            raise ValueError(
                f"dataset {self.name!r} has {n} classes in its label feature but {len(self.class_names)} class names"
            )

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else Path(self.dataset.rstrip("/")).name.replace("/", "_")

    @property
    def noun(self) -> str:
        return self.spec.noun if self.spec else "object"

    # ------------------------------------------------------------------------------------------ splits
    def eval_dataset(self) -> datasets.Dataset:
        ds = self.dsd[self.split]
        if self.limit is not None and self.limit < len(ds):
            ds = ds.select(range(self.limit))
        return ds

    def labels(self, split: str | None = None) -> list[int]:
        ds = self.eval_dataset() if split is None else self.dsd[split]
        return [int(x) for x in ds[LABEL_COLUMN]]

    def kshot_split(self, shots: int | None = None, seed: int | None = None) -> KShotSplit:
        """The (dataset, k, seed) k-shot split of the train split, written once and reused."""
        k = self.shots if shots is None else shots
        s = self.seed if seed is None else seed
        if self.train_split not in self.dsd:
            raise ValueError(
                f"dataset {self.name!r} has no split {self.train_split!r} to draw k-shot images from"
            )
        return dataset_kshot_split(
            self.splits_dir,
            self.dataset,
            self.dsd[self.train_split],
            k,
            s,
            len(self.class_names),
            self.benchmark,
        )

    def kshot_dataset(self, shots: int | None = None, seed: int | None = None) -> datasets.Dataset:
        return self.dsd[self.train_split].select(self.kshot_split(shots, seed).all_indices)

    # ------------------------------------------------------------------------------------- dataloaders
    def image_dataloader(self, indices: list[int] | None = None) -> torch.utils.data.DataLoader:
        if self.transform is None:
            raise RuntimeError(
                "no image transform set: the CLIP stage sets data.transform to its preprocessing"
            )
        ds = ImageClassificationDataset(self.eval_dataset(), self.transform, self.split, indices)
        return self._loader(ds)

    def feature_dataloader(self, features: torch.Tensor, indices: list[int] | None = None):
        # Cached features are small rows: large batches keep the per-batch overhead negligible.
        return self._loader(FeatureDataset(features, self.labels(), indices), max(self.batch_size, 1024))

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.image_dataloader()

    test_dataloader = predict_dataloader

    def _loader(self, ds, batch_size: int | None = None) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ds,
            batch_size=batch_size or self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
