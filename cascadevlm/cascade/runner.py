"""Running the CLIP stage over a split with a Lightning Trainer (1..N devices), records gathered once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch

from cascadevlm.cascade.writer import RecordPartsWriter
from cascadevlm.clip.features import FeatureCache, feature_key, split_feature_key
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.records import PredictionRecord, atomic_write_text

CLIP_SECONDS_FILE = "clip_seconds.json"


def predict_with_writer(trainer: L.Trainer, module: L.LightningModule, loader, writer) -> None:
    """``trainer.predict`` with a prediction writer attached for this call only."""
    trainer.callbacks.append(writer)
    try:
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)


def run_clip_stage(
    trainer: L.Trainer,
    model: ClipClassifier,
    dm: CascadeDataModule,
    parts_dir: str | Path,
    cache_dir: str | Path,
) -> list[PredictionRecord] | None:
    """CLIP records for every image of ``dm``'s eval split; None on ranks other than 0.

    Image features come from the cache when the key matches (the image encoder is skipped);
    otherwise they are computed and rank 0 writes them to the cache once all ranks are done. The
    zero-shot head is cached in the same directory (:func:`cascadevlm.clip.zero_shot.zero_shot_head`).

    Each image's wall seconds (:func:`read_clip_seconds`) are written to ``<parts_dir>/clip_seconds.json``:
    measured when the features are computed (and kept with them in the cache), read from the cache
    when they are served from it (the cost of computing them; NaN when that cache file kept none).
    """
    dm.transform = model.preprocess
    # the zero-shot head beside the image features: built once per model, names and templates, then read
    # back (rank 0 first, so other ranks read what it stored instead of encoding the same text)
    model.head_cache_dir = str(cache_dir)
    if trainer.is_global_zero:
        model.ensure_head()
    trainer.strategy.barrier()
    model.ensure_head()
    streaming = getattr(dm, "streaming", False)  # a stream has no length until it is read
    ds = dm.eval_dataset()
    cache = FeatureCache(cache_dir)
    key = stage_cache_key(model, dm) if getattr(dm, "use_feature_cache", True) else None
    feats = cache.load(key) if key else None
    loader = dm.feature_dataloader(feats) if feats is not None else dm.image_dataloader()
    writer = RecordPartsWriter(parts_dir)
    predict_with_writer(trainer, model, loader, writer)
    trainer.strategy.barrier()
    twin = model.zero_shot_twin()  # an adapter merged into the weights: zero-shot is the base weights'
    base = run_clip_stage(trainer, twin, dm, Path(parts_dir) / "zero_shot", cache_dir) if twin else None
    dm.transform = model.preprocess
    if not trainer.is_global_zero:
        return None
    records = writer.merged_records(trainer.world_size)
    for rec, zs in zip(records, base or [], strict=bool(base)):
        rec.clip_zero_shot_pred = zs.clip_pred
    n = len(records) if streaming else len(ds)
    if [r.index for r in records] != list(range(n)):
        raise RuntimeError(f"CLIP stage produced records for rows {_span(records)} of {n} images")
    measured = writer.merged_seconds(trainer.world_size)
    seconds = [measured.get(r.index, math.nan) for r in records]
    if feats is not None:  # the cost of computing the cached features, when the cache kept it
        kept = cache.load_seconds(key)
        seconds = kept.tolist() if kept is not None and len(kept) == n else [math.nan] * n
    if feats is None and key:
        merged = writer.merged_features(trainer.world_size, n)
        if merged is not None:
            # the weights as in the key: a merged CLIP-LoRA shows as "<weights>+clip_lora:sha256:..."
            weights = model.bundle.feature_identity()["weights"]
            meta = {"model": model.bundle.model_name, "weights": weights, "split": dm.split}
            cache.save(key, merged, meta, torch.tensor(seconds, dtype=torch.float64))
    atomic_write_text(Path(parts_dir) / CLIP_SECONDS_FILE, json.dumps(seconds))
    return records


def read_clip_seconds(parts_dir: str | Path, n: int) -> list[float]:
    """The CLIP stage's wall seconds per image (row order) of the run whose CLIP parts are in
    ``parts_dir``; NaN (unknown) for each image when they were not written."""
    path = Path(parts_dir) / CLIP_SECONDS_FILE
    if not path.exists():
        return [math.nan] * n
    values = [math.nan if v is None else float(v) for v in json.loads(path.read_text())]
    return values if len(values) == n else [math.nan] * n


def _span(records: list[PredictionRecord]) -> str:
    return f"{records[0].index}..{records[-1].index} ({len(records)} rows)" if records else "none"


def stage_cache_key(model: ClipClassifier, dm: CascadeDataModule) -> str:
    """The feature-cache key of ``dm``'s evaluated split under ``model``."""
    if getattr(dm, "streaming", False):  # rows: the stream's source and limit, in its fingerprint
        return feature_key(model.bundle.feature_identity(), dm.eval_fingerprint(), f"{dm.name}/{dm.split}", 0)
    return split_feature_key(model.bundle, dm.eval_dataset(), f"{dm.name}/{dm.split}")


def feature_cache_hit(model: ClipClassifier, dm: CascadeDataModule, cache_dir: str | Path) -> bool:
    if not getattr(dm, "use_feature_cache", True):
        return False
    return FeatureCache(cache_dir).path(stage_cache_key(model, dm)).exists()
