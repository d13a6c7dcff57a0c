"""The LightningDataModule every entry point uses: one dataset, its class names, templates, k-shot split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import lightning as L
import pyarrow.compute as pc
import torch

from cascadevlm.data.kshot import KShotSplit, dataset_kshot_split
from cascadevlm.data.loading import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    FeatureDataset,
    ImageClassificationDataset,
    ImageDecodeError,
    dataset_class_names,
    decode_image,
    is_saved_dataset,
    load_dataset_dict,
)
from cascadevlm.data.names import readable_class_names
from cascadevlm.data.registry import (
    GENERIC_TEMPLATES,
    BenchmarkSpec,
    get_benchmark,
    match_class_names,
    normalise_templates,
    validate_class_names,
)
from cascadevlm.data.wds import Mirror, check_class_names, read_mirror
from cascadevlm.logs import get_logger

log = get_logger(__name__)


def read_class_names(class_names: list[str] | str | None) -> list[str] | None:
    """``--data.class_names`` as a list, or a file with one name a line (blank lines ignored)."""
    if not isinstance(class_names, str):
        return class_names
    path = Path(class_names).expanduser()
    if not path.is_file():
        raise ValueError(
            f"--data.class_names {class_names!r}: give a list of names or a file with one name a line"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    # an empty file would silently fall back to the dataset's own names
    return validate_class_names(names, f"class-names file {str(path)!r} (--data.class_names)")


class CascadeDataModule(L.LightningDataModule):
    """A classification dataset from a directory (image folder or ``save_to_disk``) or the hub.

    Args:
        dataset: a directory, a hub name, or ``fashion_mnist`` (the offline demo data, built on first use).
        benchmark: registry entry for class names and templates (default: ``dataset`` when registered).
        split: the split evaluated (``test``); ``train_split`` and ``val_split`` serve k-shot training.
        class_names: the class names by label id (otherwise: a dataset named like a registered
            benchmark gets the registry's names matched to its own ClassLabel names by name, in its
            label order, and is refused when they differ; else the dataset's own names). A string is a
            file with one name a line (for an integer label column, say).
        templates: override the prompt templates (otherwise registry, then the generic ensemble).
        limit: evaluate only the first ``limit`` rows of ``split`` (smoke runs, demos); >= 1 or None.
        skip_bad: leave undecodable images of the evaluated split out (their count is reported). Costs
            one extra decode pass over the evaluated rows, done once, before the CLIP stage.
        shots: k for the k-shot split of ``train_split`` (0 = zero-shot); ``seed`` picks the draw.
        splits_dir: where k-shot split files are written and read.
        data_root: where the demo dataset is built.
        image_column, label_column: the dataset's image and label columns when not ``image`` / ``label``
            (otherwise its only Image / ClassLabel column; two of a kind must be named).
        streaming: read the evaluated split as a stream (webdataset mirror shards, a hub dataset, an
            image folder, a ``save_to_disk`` folder) instead of materialising it: the same records, each
            image decoded once over all ranks; no skip_bad, no k-shot split (see docs/datasets.md).
        cache_features: keep the evaluated split's image features in the feature cache; None = yes,
            except when streaming (a stream is evaluated once; caching needs a pass to read labels).
        readable_names: class names taken from an image folder's folder names are written readably in
            prompts (``001.Black_footed_Albatross`` -> ``Black footed Albatross``, see
            :mod:`cascadevlm.data.names`); the dataset keeps the folder names (``source_class_names``).
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        benchmark: str | None = None,
        split: str = "test",
        train_split: str = "train",
        val_split: str = "val",
        class_names: list[str] | str | None = None,
        templates: list[str] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        limit: int | None = None,
        shots: int = 0,
        seed: int = 1,
        splits_dir: str = "artifacts/splits",
        data_root: str = "data",
        skip_bad: bool = False,
        image_column: str | None = None,
        label_column: str | None = None,
        streaming: bool = False,
        cache_features: bool | None = None,
        readable_names: bool = True,
    ) -> None:
        super().__init__()
        self.image_column, self.label_column = image_column, label_column
        self.streaming, self.cache_features, self.readable_names = streaming, cache_features, readable_names
        if streaming and skip_bad:
            raise ValueError(
                "data.skip_bad decodes the split before evaluating it, which a stream cannot: "
                "set --data.skip_bad false, or --data.streaming false"
            )
        if streaming and shots:
            raise ValueError(
                "data.shots draws a k-shot split from a materialised train split, not a stream: "
                "set --data.shots 0, or --data.streaming false"
            )
        class_names = read_class_names(class_names)
        if limit is not None and limit < 1:
            raise ValueError(
                f"data.limit must be >= 1 (or null for every image), got {limit}; set --data.limit"
            )
        self.skip_bad = skip_bad
        self.skipped_rows: dict[
            str, list[int]
        ] = {}  # split -> rows of its evaluated set left out by skip_bad
        self._decodable: dict[str, datasets.Dataset] = {}
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
        self.mirror: Mirror | None = self._mirror()
        self.dsd = self._load()
        self.split = split = self._only_split(split)
        self.require_split(split, self.split_flag)
        self.benchmark = benchmark
        self.spec = self._spec(benchmark)
        own = list(self.mirror.class_names) if self.mirror else dataset_class_names(self.dsd[split])
        # an image folder's class names are its folder names: readable in prompts unless told otherwise
        folders = readable_names and not class_names and self.spec is None and self._is_image_folder()
        if class_names:
            names = list(class_names)  # the user's names, by label id
        elif self.spec is not None and self.mirror is not None:
            check_class_names(self.spec.class_names, self.mirror.class_names, self.spec.name)
            names = list(self.spec.class_names)  # as prepare --wds NAME: the registry's, checked in order
        elif self.spec is not None and own is not None:
            names = match_class_names(self.spec, own, dataset)  # by name, in the dataset's label order
        elif self.spec is not None:
            names = list(self.spec.class_names)  # integer labels: the registry's ids
        else:
            names = own
        if names is None:
            raise ValueError(f"dataset {dataset!r} has no ClassLabel feature; give data.class_names")
        self.source_class_names = validate_class_names(names, f"dataset {self.name!r}")
        self.class_names = readable_class_names(names, f"dataset {self.name!r}") if folders else list(names)
        if len(self.class_names) < 2:  # a one-class "classifier" fails later, deep inside a stage
            raise ValueError(
                f"dataset {self.name!r} has one class ({self.class_names[0]!r}); classification needs at least two "
                "(--data.dataset, --data.class_names)"
            )
        mirror_templates = list(self.mirror.templates) if self.mirror and self.spec is None else None
        # checked here, before any stage runs; "{c}" (CLIP_benchmark's spelling) becomes "{}"
        self.templates = normalise_templates(
            templates
            or mirror_templates
            or self._card_templates()
            or (self.spec.templates if self.spec else GENERIC_TEMPLATES),
            "--data.templates" if templates else f"the templates of dataset {self.name!r}",
        )
        if not streaming:  # a stream's labels are checked as its rows are read
            self._check_labels()

    @property
    def prompt_names_changed(self) -> bool:
        """The prompts' class names differ from the dataset's own (readable folder names)."""
        return self.class_names != self.source_class_names

    @property
    def use_feature_cache(self) -> bool:
        return (not self.streaming) if self.cache_features is None else bool(self.cache_features)

    # ----------------------------------------------------------------------------------------- loading
    def _source(self) -> str:
        if self.dataset == "fashion_mnist":
            from cascadevlm.data.demo import fashion_mnist_dir

            return str(fashion_mnist_dir(self.data_root))
        return self.dataset

    def _mirror(self) -> Mirror | None:
        """The CLIP_benchmark webdataset mirror ``dataset`` is (a folder with classnames.txt), or None."""
        path = Path(self.dataset).expanduser()
        if not (path / "classnames.txt").is_file() or is_saved_dataset(path):
            return None
        if not self.streaming:
            raise ValueError(
                f"dataset {self.dataset!r} is a webdataset mirror: stream it with --data.streaming true, or "
                f"prepare it first (python -m cascadevlm.data.prepare --wds {self.dataset} --out DIR)"
            )
        return read_mirror(path)

    def _only_split(self, split: str) -> str:
        """``split``, or the only split of a flat image folder (``<root>/<class>/<image>``, loaded as
        ``train``), said in one line: such a folder has no ``test`` split to default to."""
        if split in self.dsd or len(self.dsd) != 1 or not self._is_image_folder():
            return split
        only = next(iter(self.dsd))
        if (Path(self.dataset).expanduser() / only).is_dir():
            return split  # a folder with split folders (train/ only): the flag is needed
        log.info(
            "dataset %r is an image folder without split folders: evaluating its only split, %r (--data.split)",
            self.dataset, only,
        )  # fmt: skip
        return only

    def _is_image_folder(self) -> bool:
        path = Path(self.dataset).expanduser()
        return self.mirror is None and path.is_dir() and not is_saved_dataset(path)

    def _load(self) -> datasets.DatasetDict | datasets.IterableDatasetDict:
        if self.streaming:
            from cascadevlm.data.streaming import load_stream_dict

            shards = self.mirror.shards if self.mirror else None
            return load_stream_dict(self._source(), self.image_column, self.label_column, shards)
        return load_dataset_dict(self._source(), self.image_column, self.label_column)

    def _card_templates(self) -> list[str] | None:
        """Templates a prepared dataset carries in its card (a webdataset mirror's, see ``prepare --wds``)."""
        card = Path(self.dataset).expanduser() / "card.json"
        if self.dataset == "fashion_mnist" or not card.is_file():
            return None
        try:
            return json.loads(card.read_text()).get("templates") or None
        except (OSError, ValueError):
            return None

    def _spec(self, benchmark: str | None) -> BenchmarkSpec | None:
        if benchmark is not None:
            return get_benchmark(benchmark)  # an explicit unknown name is an error
        try:
            return get_benchmark(Path(self.dataset).name)
        except KeyError:
            return None

    split_flag = "--data.split"  # the option that names ``split`` (a subclass serving another split says so)

    def require_split(self, split: str, flag: str, purpose: str = "") -> None:
        """Refuse, in one line naming ``flag``, a split the dataset does not have."""
        if split not in self.dsd:
            raise ValueError(
                f"dataset {self.dataset!r} has no split {split!r}{purpose}; it has {list(self.dsd)}: set {flag}"
            )

    def _check_labels(self) -> None:
        """Label feature and label values agree with the class list (one cheap pass over the label column)."""
        ds = self.dsd[self.split]
        feat = ds.features.get(LABEL_COLUMN)
        n = len(feat.names) if isinstance(feat, datasets.ClassLabel) else None
        if n is not None and n != len(self.class_names):
            raise ValueError(
                f"dataset {self.name!r} has {n} classes in its label feature but {len(self.class_names)} class names"
            )
        if len(ds) == 0:
            raise ValueError(
                f"dataset {self.dataset!r} split {self.split!r} has no images; set {self.split_flag}"
            )
        bounds = pc.min_max(ds.data.column(LABEL_COLUMN))
        low, high, n = bounds["min"].as_py(), bounds["max"].as_py(), len(self.class_names)
        if low < -1 or high >= n:
            raise ValueError(
                f"dataset {self.name!r} split {self.split!r} has labels from {low} to {high} but {n} class names "
                f"(ids 0..{n - 1}; -1 marks an unknown label): give one name per label id with --data.class_names"
            )

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else Path(self.dataset.rstrip("/")).name.replace("/", "_")

    @property
    def noun(self) -> str:
        return self.spec.noun if self.spec else "object"

    # ------------------------------------------------------------------------------------------ splits
    def eval_dataset(self) -> datasets.Dataset | datasets.IterableDataset:
        ds = self.dsd[self.split]
        if self.streaming:
            return ds if self.limit is None else ds.take(self.limit)
        if self.limit is not None and self.limit < len(ds):
            ds = ds.select(range(self.limit))
        if self.skip_bad:
            ds = self._without_undecodable(ds)
        return ds

    def _without_undecodable(self, ds: datasets.Dataset) -> datasets.Dataset:
        """``ds`` less the rows whose image cannot be decoded (one decode pass, once per dataset)."""
        key = f"{ds._fingerprint}/{len(ds)}"
        if key not in self._decodable:
            bad = []
            for row, value in enumerate(ds[IMAGE_COLUMN]):
                try:
                    decode_image(value, f"{self.split} row {row}")
                except ImageDecodeError:
                    bad.append(row)
            self.skipped_rows[self.split] = bad
            if bad:
                print(
                    f"data.skip_bad: left out {len(bad)} undecodable image(s) of {len(ds)} in split "
                    f"{self.split!r} (rows {bad[:10]}{' ...' if len(bad) > 10 else ''})",
                    file=sys.stderr,
                )
            bad_set = set(bad)
            self._decodable[key] = ds.select([i for i in range(len(ds)) if i not in bad_set]) if bad else ds
        return self._decodable[key]

    def eval_fingerprint(self) -> str:
        """What the evaluated rows are: the dataset's fingerprint, or a stream's source files / revision."""
        if not self.streaming:
            return str(self.eval_dataset()._fingerprint)
        from cascadevlm.data.streaming import stream_fingerprint

        columns = {"image_column": self.image_column, "label_column": self.label_column}
        return stream_fingerprint(self._source(), self.split, self.limit, columns)

    def labels(self, split: str | None = None) -> list[int]:
        ds = self.eval_dataset() if split is None else self.dsd[split]
        if self.streaming:
            from cascadevlm.data.streaming import stream_labels

            return stream_labels(ds)
        return ds.with_format("arrow")[LABEL_COLUMN].to_pylist()  # ints, without formatting each row

    def kshot_split(self, shots: int | None = None, seed: int | None = None) -> KShotSplit:
        """The (dataset, k, seed) k-shot split of the train split, written once and reused."""
        k = self.shots if shots is None else shots
        s = self.seed if seed is None else seed
        self.require_split(self.train_split, "--data.train_split", " to draw k-shot images from")
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
        if self.streaming:
            from cascadevlm.data.streaming import StreamedImages

            if indices is not None:
                raise ValueError("a streamed split is evaluated whole: no row indices")
            stream = StreamedImages(self.eval_dataset(), self.transform, self.split, len(self.class_names))
            return self._loader(stream)
        hint = "" if self.skip_bad else "; pass --data.skip_bad true to leave undecodable images out"
        ds = ImageClassificationDataset(self.eval_dataset(), self.transform, self.split, indices, hint)
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
            # a stream is read once per loader: persistent workers would only hold memory
            persistent_workers=self.num_workers > 0 and not self.streaming,
        )
