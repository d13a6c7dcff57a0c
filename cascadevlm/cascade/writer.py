"""Writes each rank's CLIP-stage outputs to part files as batches finish; rank 0 merges them once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from cascadevlm.records import PredictionRecord, append_jsonl, dedupe_sorted, read_jsonl


def outputs_to_records(out: dict) -> list[PredictionRecord]:
    """Turn one predict_step output (tensors over a batch) into records."""
    recs = []
    for i in range(len(out["index"])):
        ids = out["topk_ids"][i].tolist()
        recs.append(
            PredictionRecord(
                index=int(out["index"][i]),
                label=int(out["label"][i]),
                clip_topk=ids,
                clip_topk_probs=[float(p) for p in out["topk_probs"][i].tolist()],
                entropy=float(out["entropy"][i]),
                clip_pred=ids[0],
                clip_zero_shot_pred=int(out["zero_shot_pred"][i]) if "zero_shot_pred" in out else None,
                clip_logits=out["logits"][i].tolist() if "logits" in out else None,
            )
        )
    return recs


class RecordPartsWriter(BasePredictionWriter):
    """Collects each rank's CLIP-stage records (and freshly computed features) and writes them once per
    rank at epoch end, as ``<parts_dir>/clip.rank<r>.jsonl`` and ``features.rank<r>.pt``, for rank 0 to
    merge after the barrier. The CLIP stage is cheap to redo from the feature cache, so it is not
    resumed batch by batch (the LVLM stage is: see :mod:`cascadevlm.cascade.lvlm_stage`).

    It also measures each image's wall seconds: the time from the previous batch's end (or the start of
    prediction) to this batch's end (loading, preprocessing, encoding, the head), divided by its images.
    """

    def __init__(self, parts_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.parts_dir = Path(parts_dir)
        self._records: list[PredictionRecord] = []
        self._feats: list[torch.Tensor] = []
        self._idx: list[torch.Tensor] = []
        self._seconds: dict[int, float] = {}
        self._last = time.perf_counter()

    def seconds_path(self, rank: int) -> Path:
        return self.parts_dir / f"clip_seconds.rank{rank}.json"

    def record_path(self, rank: int) -> Path:
        return self.parts_dir / f"clip.rank{rank}.jsonl"

    def feature_path(self, rank: int) -> Path:
        return self.parts_dir / f"features.rank{rank}.pt"

    def on_predict_start(self, trainer, pl_module) -> None:
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.record_path(trainer.global_rank).unlink(missing_ok=True)
        self.feature_path(trainer.global_rank).unlink(missing_ok=True)
        self.seconds_path(trainer.global_rank).unlink(missing_ok=True)
        self._records, self._feats, self._idx, self._seconds = [], [], [], {}
        self._last = time.perf_counter()

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        now = time.perf_counter()
        ids = [int(i) for i in prediction["index"]]
        for i in ids:
            self._seconds[i] = (now - self._last) / max(len(ids), 1)
        self._last = now
        self._records.extend(outputs_to_records(prediction))
        if "features" in prediction:
            self._feats.append(prediction["features"])
            self._idx.append(prediction["index"])

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        append_jsonl(self.record_path(trainer.global_rank), self._records)
        if trainer.world_size > 1:
            self.seconds_path(trainer.global_rank).write_text(json.dumps(self._seconds))
        if self._feats and trainer.world_size > 1:  # one process: rank 0 already holds them
            torch.save(
                {"index": torch.cat(self._idx), "features": torch.cat(self._feats)},
                self.feature_path(trainer.global_rank),
            )

    # rank 0, after the barrier -------------------------------------------------------------------
    def merged_records(self, world_size: int) -> list[PredictionRecord]:
        if world_size == 1:
            return dedupe_sorted(self._records)
        recs = []
        for r in range(world_size):
            if self.record_path(r).exists():
                recs.extend(read_jsonl(self.record_path(r)))
        return dedupe_sorted(recs)

    def merged_seconds(self, world_size: int) -> dict[int, float]:
        """Each image's measured wall seconds (rank 0, after the barrier)."""
        if world_size == 1:
            return dict(self._seconds)
        out: dict[int, float] = {}
        for r in range(world_size):
            if self.seconds_path(r).exists():
                out.update({int(k): v for k, v in json.loads(self.seconds_path(r).read_text()).items()})
        return out

    def merged_features(self, world_size: int, num_rows: int) -> torch.Tensor | None:
        if world_size == 1:
            parts = (
                [{"index": torch.cat(self._idx), "features": torch.cat(self._feats)}] if self._feats else []
            )
        else:
            parts = [
                # tensors only: a part file is never trusted to run code (torch < 2.6 unpickles anything)
                torch.load(self.feature_path(r), weights_only=True)
                for r in range(world_size)
                if self.feature_path(r).exists()
            ]
        if not parts:
            return None
        idx = torch.cat([p["index"] for p in parts])
        feats = torch.cat([p["features"] for p in parts])
        out = torch.zeros(num_rows, feats.shape[1])
        seen = torch.zeros(num_rows, dtype=torch.bool)
        out[idx] = feats  # padded duplicates write the same row twice with the same values
        seen[idx] = True
        return out if bool(seen.all()) else None
