"""CLIP-stage throughput: evaluate.py's Lightning stage vs a plain loop; cached vs fresh re-evaluation.

Same model, data and batch size for each side, measured in one run. Prints images/s and ratios.
Targets: stage / plain >= 0.95; cached / fresh >= 10x.

    python bench/clip_throughput.py [--model cascadevlm-small-vit] [--images 2000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from cascadevlm.cascade.runner import run_clip_stage  # noqa: E402
from cascadevlm.clip.module import ClipClassifier  # noqa: E402
from cascadevlm.clip.zero_shot import build_zero_shot_head  # noqa: E402
from cascadevlm.data.datamodule import CascadeDataModule  # noqa: E402
from cascadevlm.data.loading import ImageClassificationDataset  # noqa: E402
from cascadevlm.flags import one_flag_style  # noqa: E402
from cascadevlm.zoo.tiny_clip import build_tiny_clip  # noqa: E402


def plain_loop(model: ClipClassifier, dm: CascadeDataModule, batch_size: int) -> float:
    """DataLoader -> encode_image -> matmul with the head -> top-k; returns seconds."""
    b = model.bundle
    head = build_zero_shot_head(b.model, b.tokenizer, dm.class_names, dm.templates)
    loader = torch.utils.data.DataLoader(
        ImageClassificationDataset(dm.eval_dataset(), b.preprocess, dm.split), batch_size=batch_size
    )
    t = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            f = b.model.encode_image(batch["pixel_values"], normalize=True)
            torch.softmax(b.model.logit_scale.exp() * f @ head.T, -1).topk(5, -1)
    return time.perf_counter() - t


def stage(model: ClipClassifier, dm: CascadeDataModule, work: Path, cache: Path) -> float:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    model.ensure_head()
    t = time.perf_counter()
    run_clip_stage(trainer, model, dm, work / "parts", cache)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cascadevlm-small-vit")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data-root", default="data")
    args = one_flag_style(ap).parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_tiny_clip(tmp / "ckpt", args.model)
        dm = CascadeDataModule(
            "fashion_mnist", data_root=args.data_root, limit=args.images, batch_size=args.batch_size
        )
        model = ClipClassifier(args.model, str(ckpt), class_names=dm.class_names, templates=dm.templates)
        plain_loop(model, dm, args.batch_size)  # warm-up (allocator, thread pools)
        n = len(dm.eval_dataset())
        # alternate the two sides, 5 rounds each (best of 5: this shared VM swings +-25% run to run),
        # each stage run with a fresh (empty) cache
        t_plain, t_stage = [], []
        for r in range(5):
            t_plain.append(plain_loop(model, dm, args.batch_size))
            t_stage.append(stage(model, dm, tmp / f"run{r}", tmp / f"cache{r}"))
        t_cached = min(stage(model, dm, tmp / f"cached{r}", tmp / "cache0") for r in range(3))
        plain_ips, stage_ips, cached_ips = n / min(t_plain), n / min(t_stage), n / t_cached
        print(f"model {args.model}, {n} Fashion-MNIST test images, batch {args.batch_size}, CPU threads "
              f"{torch.get_num_threads()}")  # fmt: skip
        print(f"plain loop (DataLoader -> encode_image -> matmul): {plain_ips:8.1f} images/s")
        print(f"evaluate.py CLIP stage (fresh features):          {stage_ips:8.1f} images/s")
        print(f"evaluate.py CLIP stage (cached features):         {cached_ips:8.1f} images/s")
        print(f"ratio stage/plain = {stage_ips / plain_ips:.3f} (target >= 0.95)")
        print(f"ratio cached/fresh = {cached_ips / stage_ips:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
