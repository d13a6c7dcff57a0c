"""Streaming evaluation (``--data.streaming true``, straight from webdataset shards) against evaluation of
the same images prepared to disk (``prepare --wds``), as images/s ratios measured side by side.

    .venv/bin/python bench/streaming.py [--images 1000] [--size 320] [--repeats 2] [--workers 0]

Writes a CLIP_benchmark-style mirror of real photos (random crops, JPEG, ``--size`` longest side, shards
of 250), prepares it once, then alternates the two routes ``--repeats`` times:

- loader: the CLIP stage's data loader alone (read, decode, CLIP preprocessing), batches of 64;
- evaluate: ``evaluate.py`` end to end with the tiny offline CLIP (model load included in both), each run
  with an empty feature cache (the prepared route writes its cache as it does by default; the stream
  does not cache).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ["cat", "coffee", "rocket", "astronaut", "horse"]
PHOTOS = ["chelsea", "coffee", "rocket", "astronaut", "horse"]


def write_mirror(root: Path, n: int, size: int, per_shard: int = 250) -> Path:
    from cascadevlm.testing.images import sample_photos

    photos = [sample_photos()[p].convert("RGB") for p in PHOTOS]
    rng = random.Random(0)
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {}.\n")
    tar = None
    for i in range(n):
        if i % per_shard == 0:
            tar and tar.close()
            tar = tarfile.open(root / "test" / f"{i // per_shard}.tar", "w")
        label = i % len(CLASSES)
        img = photos[label]
        w, h = img.size
        f = rng.uniform(0.5, 0.9)
        x, y = rng.randint(0, int(w * (1 - f))), rng.randint(0, int(h * (1 - f)))
        crop = img.crop((x, y, x + int(w * f), y + int(h * f)))
        crop.thumbnail((size, size))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        for ext, data in (("cls", str(label).encode()), ("jpg", buf.getvalue())):
            info = tarfile.TarInfo(f"s{i:07d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar.close()
    return root


def loader_rate(dataset: Path, streaming: bool, transform, workers: int) -> tuple[float, int]:
    from cascadevlm.data.datamodule import CascadeDataModule

    start = time.perf_counter()
    dm = CascadeDataModule(str(dataset), streaming=streaming, batch_size=64, num_workers=workers)
    dm.transform = transform
    n = sum(len(b["index"]) for b in dm.image_dataloader())
    return n / (time.perf_counter() - start), n


def evaluate_rate(dataset: Path, streaming: bool, clip: Path, out: Path, workers: int, n: int) -> float:
    from cascadevlm.cli import run_evaluate as main

    args = ["--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(clip),
            "--data.dataset", str(dataset), "--data.batch_size", "64", "--data.num_workers", str(workers),
            "--data.streaming", str(streaming).lower(), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--output_dir", str(out / "runs"),
            "--cache_dir", str(out / "cache"), "--run_name", "r"]  # fmt: skip
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the run's summary table
        metrics = main(args)
    assert metrics["metrics"]["n"] == n, metrics["metrics"]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=320, help="longest side of the generated photos")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="data.num_workers of both routes")
    a = p.parse_args()

    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from cascadevlm.clip.model import load_clip
    from cascadevlm.data.prepare import prepare_wds
    from cascadevlm.zoo.tiny_clip import TINY_CLIP, build_tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mirror = write_mirror(tmp / "mirror" / "bench_set", a.images, a.size)
        prepare_wds(None, mirror, tmp / "prepared" / "bench_set", log=lambda m: None)
        clip = build_tiny_clip(tmp / "clip", TINY_CLIP, seed=0)
        transform = load_clip(TINY_CLIP, str(clip)).preprocess
        rates: dict[str, dict[str, list[float]]] = {"loader": {}, "evaluate": {}}
        for r in range(a.repeats):
            for name, dataset, streaming in (("prepared", tmp / "prepared" / "bench_set", False),
                                             ("streaming", mirror, True)):  # fmt: skip
                rate, n = loader_rate(dataset, streaming, transform, a.workers)
                rates["loader"].setdefault(name, []).append(rate)
                out = tmp / f"eval_{name}_{r}"
                rates["evaluate"].setdefault(name, []).append(
                    evaluate_rate(dataset, streaming, clip, out, a.workers, n)
                )
        print(f"\n{a.images} images, longest side {a.size}, data.num_workers {a.workers}, "
              f"{a.repeats} alternating repeats (best of each), {os.cpu_count()} CPUs")  # fmt: skip
        print(f"{'route':10s} {'prepared img/s':>15s} {'streaming img/s':>16s} {'streaming/prepared':>19s}")
        for route, by in rates.items():
            prep, stream = max(by["prepared"]), max(by["streaming"])
            print(f"{route:10s} {prep:15.1f} {stream:16.1f} {stream / prep:18.2f}x")


if __name__ == "__main__":
    main()
