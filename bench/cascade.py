"""Cascade cost model and sweep speed, measured side by side in one run.

1. End-to-end wall time of the cascade at several tau against the prediction
   cost(CLIP stage) + deferred x cost(LVLM per image), both measured here (target: within 10%).
2. A 100-point tau sweep computed from records against re-running the cascade for each tau.
3. On a machine with a GPU: images/s of the CLIP stage there.

    python bench/cascade.py [--images 300] [--data-root data]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from cascadevlm.cascade.evaluate import main as evaluate  # noqa: E402
from cascadevlm.cascade.gate import tau_for_budget  # noqa: E402
from cascadevlm.records import read_records  # noqa: E402
from cascadevlm.report.analysis import sweep  # noqa: E402
from cascadevlm.testing.tiny_clip import build_tiny_clip  # noqa: E402
from cascadevlm.testing.tiny_lvlm import build_tiny_llava  # noqa: E402


def run(
    tmp: Path, name: str, ckpt: Path, llava: Path, n: int, data_root: str, *extra: str, device="cpu"
) -> float:
    args = [
        "--model.model_name", "cascadevlm-small-vit", "--model.pretrained", str(ckpt),
        "--data.dataset", "fashion_mnist", "--data.data_root", data_root, "--data.limit", str(n),
        "--data.batch_size", "64", "--trainer.accelerator", device, "--trainer.enable_progress_bar", "false",
        "--lvlm.class_path", "cascadevlm.lvlm.transformers_backend.TransformersBackend",
        "--lvlm.init_args.model", str(llava), "--lvlm.init_args.device", device, "--lvlm.init_args.batch_size", "8",
        "--cascade.lvlm_on", "deferred", "--output_dir", str(tmp / "runs"),
        "--cache_dir", str(tmp / "cache" / name), "--run_name", name, *extra,
    ]  # fmt: skip
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate(args)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--data-root", default="data")
    args = ap.parse_args()
    sys.argv = sys.argv[:1]  # evaluate() gets its own argument list
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_tiny_clip(tmp / "clip", "cascadevlm-small-vit")
        llava = build_tiny_llava(tmp / "llava")
        r = lambda name, *extra: run(tmp, name, ckpt, llava, n, args.data_root, *extra)  # noqa: E731
        r("warmup", "--cascade.tau", ".inf")
        t_clip = statistics.median(r(f"clip{i}", "--cascade.tau", ".inf") for i in range(2))
        t_all = r("all", "--cascade.tau=-.inf")
        per_image = (t_all - t_clip) / n
        entropies = [x.entropy for x in read_records(tmp / "runs" / "all" / "records.parquet")]
        print(
            f"{n} Fashion-MNIST test images; CLIP cascadevlm-small-vit (112px), LVLM tiny LLaVA scoring, CPU"
        )
        print(f"cost(CLIP stage) = {t_clip:.2f} s; cost(LVLM per image) = {1000 * per_image:.1f} ms "
              f"(from the tau=-inf run: {t_all:.2f} s)")  # fmt: skip
        print(f"{'budget':>7} {'tau':>9} {'deferred':>8} {'measured s':>10} {'predicted s':>11} {'ratio':>6}")
        for budget in (0.1, 0.3, 0.6):
            tau = tau_for_budget(entropies, budget)
            deferred = sum(e > tau for e in entropies)
            measured = r(f"b{budget}", "--cascade.tau", repr(tau))
            predicted = t_clip + deferred * per_image
            print(f"{budget:>7.1f} {tau:>9.4g} {deferred:>8d} {measured:>10.2f} {predicted:>11.2f} "
                  f"{measured / predicted:>6.3f}")  # fmt: skip

        records = read_records(tmp / "runs" / "all" / "records.parquet")
        t = time.perf_counter()
        for _ in range(5):
            rows = sweep(records, 10)
        t_sweep = (time.perf_counter() - t) / 5
        t_rerun = statistics.median(
            r(f"rerun{i}", "--cascade.tau", repr(rows[len(rows) * (i + 1) // 4]["tau"])) for i in range(3)
        )
        print(f"100-point sweep from records: {1000 * t_sweep:.1f} ms for {len(rows)} taus; re-running the cascade: "
              f"{t_rerun:.2f} s per tau (median of 3), {100 * t_rerun:.0f} s for 100 taus (extrapolated); "
              f"ratio {100 * t_rerun / t_sweep:.0f}x")  # fmt: skip

        if torch.cuda.is_available():
            t_gpu = run(tmp, "gpu", ckpt, llava, n, args.data_root, "--cascade.tau", ".inf", device="gpu")
            print(f"GPU ({torch.cuda.get_device_name()}): CLIP stage end to end {n / t_gpu:.1f} images/s")
        else:
            print("no GPU on this machine: GPU images/s of the CLIP stage not measured")


if __name__ == "__main__":
    main()
