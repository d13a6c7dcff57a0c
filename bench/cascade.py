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
import gc
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

from cascadevlm.cli import run_evaluate as evaluate  # noqa: E402
from cascadevlm.flags import one_flag_style  # noqa: E402
from cascadevlm.gating.gate import tau_for_budget  # noqa: E402
from cascadevlm.records import read_records  # noqa: E402
from cascadevlm.report.analysis import sweep  # noqa: E402
from cascadevlm.zoo.tiny_clip import build_tiny_clip  # noqa: E402
from cascadevlm.zoo.tiny_lvlm import build_tiny_llava  # noqa: E402


def run(
    tmp: Path, name: str, ckpt: Path, llava: Path, n: int, data_root: str, *extra: str, device="cpu"
) -> float:
    args = [
        "--model.model_name", "cascadevlm-small-vit", "--model.pretrained", str(ckpt),
        "--data.dataset", "fashion_mnist", "--data.data_root", data_root, "--data.limit", str(n),
        "--data.batch_size", "64", "--trainer.accelerator", device, "--trainer.enable_progress_bar", "false",
        "--lvlm.class_path", "cascadevlm.lvlm.transformers_backend.TransformersBackend",
        "--lvlm.init_args.model", str(llava), "--lvlm.init_args.device", "cuda" if device == "gpu" else device, "--lvlm.init_args.batch_size", "8",
        "--cascade.lvlm_on", "deferred", "--output_dir", str(tmp / "runs"),
        "--cache_dir", str(tmp / "cache" / name), "--run_name", name, *extra,
    ]  # fmt: skip
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate(args)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data-root", default="data")
    args = one_flag_style(ap).parse_args()
    sys.argv = sys.argv[:1]  # evaluate() gets its own argument list
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_tiny_clip(tmp / "clip", "cascadevlm-small-vit")
        llava = build_tiny_llava(tmp / "llava")
        r = lambda name, *extra: run(tmp, name, ckpt, llava, n, args.data_root, *extra)  # noqa: E731
        r("warmup", "--cascade.tau", ".inf")
        r("warmup_all", "--cascade.tau=-.inf")
        entropies = [x.entropy for x in read_records(tmp / "runs" / "warmup_all" / "records.parquet")]
        configs = {"clip": ("--cascade.tau", ".inf"), "all": ("--cascade.tau=-.inf",)}
        deferred = {"clip": 0, "all": n}
        for budget in (0.1, 0.3, 0.6):
            tau = tau_for_budget(entropies, budget)
            configs[f"budget {budget}"] = ("--cascade.tau", repr(tau))
            deferred[f"budget {budget}"] = sum(e > tau for e in entropies)
        # interleaved rounds, median of `repeats` per configuration (each run computes its features afresh)
        times: dict[str, list[float]] = {k: [] for k in configs}
        names = list(configs)
        for rnd in range(args.repeats):
            k = rnd % len(names)
            for name in names[k:] + names[:k]:  # rotate the order so no setting always runs first
                gc.collect()
                times[name].append(r(f"{name.replace(' ', '')}_{rnd}", *configs[name]))
        med = {k: statistics.median(v) for k, v in times.items()}
        t_clip, t_all = med["clip"], med["all"]
        per_image = (t_all - t_clip) / n
        print(f"{n} Fashion-MNIST test images; CLIP cascadevlm-small-vit (112px), LVLM tiny LLaVA scoring, CPU; "
              f"median of {args.repeats} interleaved runs each")  # fmt: skip
        print(f"cost(CLIP) = {t_clip:.2f} s (tau=+inf run); cost(LVLM per image) = {1000 * per_image:.1f} ms "
              f"(from the tau=-inf run: {t_all:.2f} s)")  # fmt: skip
        print(f"{'setting':>11} {'deferred':>8} {'measured s':>10} {'predicted s':>11} {'ratio':>6}")
        for name in configs:
            if name.startswith("budget"):
                predicted = t_clip + deferred[name] * per_image
                print(f"{name:>11} {deferred[name]:>8d} {med[name]:>10.2f} {predicted:>11.2f} "
                      f"{med[name] / predicted:>6.3f}")  # fmt: skip

        records = read_records(tmp / "runs" / "warmup_all" / "records.parquet")
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
            run(tmp, "gpu_warmup", ckpt, llava, n, args.data_root, "--cascade.tau", ".inf", device="gpu")
            t_gpu = run(tmp, "gpu", ckpt, llava, n, args.data_root, "--cascade.tau", ".inf", device="gpu")
            print(f"GPU ({torch.cuda.get_device_name()}): CLIP stage end to end {n / t_gpu:.1f} images/s")
        else:
            print("no GPU on this machine: GPU images/s of the CLIP stage not measured")


if __name__ == "__main__":
    main()
