"""Helpers the adapter tests share: a k-shot feature split of Fashion-MNIST and a quiet CPU fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from cascadevlm.clip.adapters import KShotFeatureDataModule


def kshot_features(bundle, data_root, work: Path, **options) -> KShotFeatureDataModule:
    """Fashion-MNIST's k-shot split (seed 1 unless given) as ``bundle``'s features, cached under ``work``."""
    options.setdefault("seed", 1)
    dm = KShotFeatureDataModule(
        "fashion_mnist",
        data_root=str(data_root),
        cache_dir=str(work / "features"),
        splits_dir=str(work / "splits"),
        **options,
    )
    dm.attach_bundle(bundle)
    dm.setup("fit")
    return dm


def fit(module, dm, root, epochs: int, test: bool = False) -> L.Trainer:
    """Fit on the CPU without logger, bars or sanity steps; ``test``: then test the exported checkpoint on
    the data module's test split, as train.py does after fit."""
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    if test and dm.hparams.test_split is not None:
        trainer.test(
            module, datamodule=dm, ckpt_path=trainer.checkpoint_callback.best_model_path, verbose=False
        )
    return trainer
