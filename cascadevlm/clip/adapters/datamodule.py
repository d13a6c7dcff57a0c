"""The k-shot train split and the val/test splits of a dataset as cached CLIP image features."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from cascadevlm.clip.features import FeatureCache, image_features
from cascadevlm.clip.model import ClipBundle
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.loading import FeatureDataset

SELECTIONS = ("val_split", "val", "last")
# How a run that chose its epoch (and Tip-Adapter's alpha/beta) on the test split is recorded: the adapter
# file's and metrics.json's ``selection``, the run name (``_seltest_split``) and the k-shot tables say so.
SELECTION_ON_TEST = "test_split"


def check_num_workers(num_workers: int) -> None:
    """Refuse, in one line, a negative worker count (torch's DataLoader raises a traceback later)."""
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(
            f"data.num_workers must be an integer >= 0 (0: load in the main process), got {num_workers!r}; "
            "set --data.num_workers"
        )


def check_selection_split(
    selection: str, val_split: str, test_split: str | None, allow_selection_on_test: bool
) -> None:
    """Refuse choosing the epoch on the test split (``selection=val_split`` with the val split being the
    test split, or a split named ``test``) unless ``allow_selection_on_test`` asks for it."""
    if selection != "val_split" or allow_selection_on_test or val_split not in (test_split, "test"):
        return
    raise ValueError(
        f"data.val_split={val_split!r} is the test split: the best epoch (and Tip-Adapter's alpha/beta) "
        "would be chosen on the images test_acc is measured on; set --data.val_split to a validation "
        "split, or --data.selection val (k images per class from the train split) or last, or "
        f"--data.allow_selection_on_test true to do it knowingly (recorded as selection {SELECTION_ON_TEST})"
    )


class _ValidationSource(CascadeDataModule):
    """The adapters' view of a dataset: its evaluated split is the validation split."""

    split_flag = "--data.val_split"


class KShotFeatureDataModule(L.LightningDataModule):
    """The k-shot train split and the val (and test) splits of a dataset, as cached CLIP image features.

    Batches are ``{"index", "label", "features"}``. The CLIP model comes from the LightningModule being
    trained (its ``bundle``), or from :meth:`attach_bundle` when used without a Trainer.

    Args:
        dataset, benchmark, class_names, templates, splits_dir, data_root, image_column, label_column,
            readable_names: as :class:`CascadeDataModule`.
        shots: k, images per class in the training split; ``seed`` picks the k-shot draw.
        train_split, val_split: where k-shot images and validation images come from.
        test_split: also serve this split (accuracy of the final adapter); None for none.
        val_limit, test_limit: use only the first rows of those splits (CPU demos, smoke runs).
        cache_dir: the feature cache (None: recompute every run).
        batch_size: training batch size (features, so large batches are cheap).
        num_workers: image-decoding workers while computing features.
        eval_batch_size: validation/test batch size.
        feature_batch_size: images per forward when computing features.
        selection: the model-selection protocol (recorded in the adapter file): ``val_split``, the best
            epoch on the dataset's ``val_split``; ``val``, the best epoch on a validation set of the
            k-shot set's size (k images per class) drawn with ``seed`` from ``train_split``, disjoint
            from the k-shot images (CoOp's and Tip-Adapter's protocol; ``val_limit`` does not apply);
            ``last``, the last epoch, nothing chosen on validation data (the val split is still logged).
        allow_selection_on_test: accept ``selection=val_split`` with the test split as ``val_split``
            (refused otherwise: the test accuracy would be inflated); recorded as selection ``test_split``.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        benchmark: str | None = None,
        shots: int = 16,
        seed: int = 1,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = "test",
        val_limit: int | None = None,
        test_limit: int | None = None,
        class_names: list[str] | str | None = None,
        templates: list[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 1024,
        feature_batch_size: int = 128,
        num_workers: int = 0,
        cache_dir: str | None = "artifacts/features",
        splits_dir: str = "artifacts/splits",
        data_root: str = "data",
        image_column: str | None = None,
        label_column: str | None = None,
        readable_names: bool = True,
        selection: str = "val_split",
        allow_selection_on_test: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_num_workers(num_workers)
        for flag, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                           ("feature_batch_size", feature_batch_size)):  # fmt: skip
            if size < 1:
                raise ValueError(f"data.{flag} must be >= 1, got {size}; set --data.{flag}")
        if shots < 1:
            raise ValueError(f"shots must be >= 1 for adapter training, got {shots}")
        if selection not in SELECTIONS:
            raise ValueError(
                f"data.selection must be one of {SELECTIONS}, got {selection!r}; set --data.selection"
            )
        if selection == "val" and val_limit is not None:
            raise ValueError(
                "data.val_limit limits the val split, but selection=val validates on k images per class drawn "
                "from the train split: set --data.val_limit null (or --data.selection val_split)"
            )
        check_selection_split(selection, val_split, test_split, allow_selection_on_test)
        for flag, limit in (("val_limit", val_limit), ("test_limit", test_limit)):
            if limit is not None and limit < 1:
                raise ValueError(
                    f"data.{flag} must be >= 1 (or null for every image), got {limit}; set --data.{flag}"
                )
        self.source = _ValidationSource(
            dataset=dataset,
            benchmark=benchmark,
            split=val_split,
            train_split=train_split,
            val_split=val_split,
            class_names=class_names,
            templates=templates,
            shots=shots,
            seed=seed,
            splits_dir=splits_dir,
            data_root=data_root,
            image_column=image_column,
            label_column=label_column,
            readable_names=readable_names,
        )
        self.source.require_split(train_split, "--data.train_split", " to draw k-shot images from")
        if test_split is not None:
            self.source.require_split(test_split, "--data.test_split (or null for none)")
        self.shots = shots
        self.seed = seed
        self.selection = selection
        self._split = None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = FeatureCache(cache_dir) if cache_dir else None
        self.bundle: ClipBundle | None = None
        self.features: dict[str, torch.Tensor] = {}
        self.targets: dict[str, list[int]] = {}

    # ---------------------------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return self.source.name

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    @property
    def templates(self) -> list[str]:
        return self.source.templates

    @property
    def kshot_fingerprint(self) -> str | None:
        """The identity of the data the k-shot split was drawn from (recorded in the adapter file)."""
        return self._kshot_split().fingerprint

    def _kshot_split(self):
        # read once: every adapter export asks for the fingerprint, and reading the split reads all labels
        if self._split is None:
            self._split = self.source.kshot_split()
        return self._split

    @property
    def recorded_selection(self) -> str:
        """The selection protocol as recorded in the adapter file, metrics.json and the run name:
        ``selection``, or ``test_split`` when the epoch is chosen on the test split (allowed explicitly)."""
        if self.selection == "val_split" and self.hparams.val_split in (self.hparams.test_split, "test"):
            return SELECTION_ON_TEST
        return self.selection

    def run_name(self, method: str, clip: str | None = None) -> tuple[str, str]:
        """(experiment, version) naming a training run: ``<dataset>[_<clip>]_<method>``,
        ``k<shots>_seed<seed>`` (``_sel<selection>`` appended for a selection other than the default
        ``val_split``). ``clip`` names the CLIP model and weights (``ViT-L-14_openai``), so runs of other
        weights never share (and clear) a directory."""
        sel = "" if self.recorded_selection == "val_split" else f"_sel{self.recorded_selection}"
        experiment = "_".join(p for p in (self.name, clip, method) if p)
        return experiment, f"k{self.shots}_seed{self.seed}{sel}"

    @property
    def val_source(self) -> str:
        """Where the validation features come from: the val split's name, or ``kshot_val``."""
        return "kshot_val" if self.selection == "val" else self.hparams.val_split

    def kshot_val_indices(self) -> list[int]:
        """Rows of the train split forming selection=val's validation set: k per class, drawn with the
        seed, none of them a k-shot image (the same rows for every method with this k and seed)."""
        k, train = self.shots, self.hparams.train_split
        # the label column through Arrow: iterating ds["label"] would decode every image
        labels = self.source.dsd[train].with_format("arrow")["label"].to_numpy()
        taken = np.zeros(len(labels), dtype=bool)
        taken[self._kshot_split().all_indices] = True
        digest = sum((i + 1) * ord(ch) for i, ch in enumerate(f"{self.name}|{k}|{self.seed}|val"))
        rng = np.random.default_rng([self.seed, k, digest])
        rows = []
        for c in range(len(self.class_names)):
            free = np.flatnonzero((labels == c) & ~taken)
            if len(free) < k:
                raise ValueError(
                    f"selection=val needs {k} more images of class {c} in {train!r} besides the k-shot ones, "
                    f"it has {len(free)}: use --data.selection val_split or last"
                )
            rows.extend(int(i) for i in rng.choice(free, size=k, replace=False))
        return sorted(rows)

    # ---------------------------------------------------------------------------------- features
    def attach_bundle(self, bundle: ClipBundle) -> None:
        self.bundle = bundle

    def _get_bundle(self) -> ClipBundle:
        if self.bundle is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            bundle = getattr(module, "bundle", None)
            if bundle is None:
                raise RuntimeError(
                    "KShotFeatureDataModule needs a CLIP model for its features: train a module with a "
                    "`bundle` (LinearProbeModule, PromptTuningModule) or call attach_bundle(bundle)"
                )
            self.bundle = bundle
        return self.bundle

    def split_datasets(self) -> dict:
        """The HF datasets behind each stage: ``train`` (the k-shot rows), ``val`` and maybe ``test``."""
        dsd = self.source.dsd
        out = {"train": self.source.dsd[self.hparams.train_split].select(self._kshot_split().all_indices)}
        if self.selection == "val":
            out["val"] = dsd[self.hparams.train_split].select(self.kshot_val_indices())
        for key, split, limit in (
            ("val", self.hparams.val_split, self.hparams.val_limit),
            ("test", self.hparams.test_split, self.hparams.test_limit),
        ):
            if split is None or key in out:
                continue
            ds = dsd[split]
            out[key] = ds.select(range(limit)) if limit is not None and limit < len(ds) else ds
        return out

    def _compute(self) -> None:
        bundle = self._get_bundle()
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        home = next(bundle.model.visual.parameters()).device
        for key, ds in self.split_datasets().items():
            split = {
                "train": f"{self.hparams.train_split}_k{self.shots}_seed{self.seed}",
                "val": f"{self.hparams.train_split}_k{self.shots}_seed{self.seed}_val"
                if self.selection == "val"
                else "val",
            }.get(key, key)
            self.features[key] = image_features(
                bundle, ds, split, self.cache, self.hparams.feature_batch_size, self.num_workers, device
            )
            self.targets[key] = [int(x) for x in ds.with_format("arrow")["label"].to_pylist()]
        bundle.model.to(home)  # the trained module decides where its own parts live

    def prepare_data(self) -> None:
        # One process per node fills the feature cache; setup() on every rank then reads it.
        if self.cache is not None and not self.features:  # features set up already (attach_bundle + setup)
            self._compute()

    def setup(self, stage: str | None = None) -> None:
        if not self.features:
            self._compute()

    def _loader(self, key: str, batch_size: int, shuffle: bool = False) -> torch.utils.data.DataLoader:
        if key not in self.features:
            self.setup()
        ds = FeatureDataset(self.features[key], self.targets[key])
        # Features are in memory: worker processes would only add start-up time.
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0)

    def train_dataloader(self):
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader("val", self.hparams.eval_batch_size)

    def test_dataloader(self):
        if self.hparams.test_split is None:
            raise ValueError("this data module has no test split (test_split=None)")
        return self._loader("test", self.hparams.eval_batch_size)
