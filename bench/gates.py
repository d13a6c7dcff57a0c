"""Every gate, calibration and candidate rule for a 10,000-image run, from records, against re-running
the cascade once, measured side by side in one run.

Records: the tiny open_clip ViT on the 10,000 Fashion-MNIST test photos (+ 5,000 validation photos)
with a linear probe as CLIP's head, and a SIMULATED LVLM answer on every image (a pixel softmax
regression's scores over CLIP's top-5; see cascadevlm/testing/routing_records.py).

From records: the whole gates report (8 gates x budgets, oracle, calibration, conformal at 3 alphas,
fusion) plus ``apply_routing`` for every combination of gate (4) x calibration (2) x candidate rule
(top-k, APS, RAPS) x fusion (2) = 48 settings.

Re-running the cascade once: the CLIP stage (Lightning predict through ``run_clip_stage``, image
encoder included, cold feature cache) measured on ``--clip-images`` test images, and the tiny LLaVA
(scoring 5 candidates) measured on ``--lvlm-images``, both extrapolated linearly to 10,000 images
with the LVLM asked about every image (what these records need) and, as the cheapest re-run, about
30% of them.

Each side is the best of ``--repeats`` timings (the machine may be shared).

    python bench/gates.py [--clip-images 1000] [--lvlm-images 32] [--repeats 2] [--data-root data]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402

from cascadevlm.cascade.runner import run_clip_stage  # noqa: E402
from cascadevlm.clip.model import load_clip  # noqa: E402
from cascadevlm.clip.module import ClipClassifier  # noqa: E402
from cascadevlm.data.datamodule import CascadeDataModule  # noqa: E402
from cascadevlm.data.demo import fashion_mnist_dir  # noqa: E402
from cascadevlm.data.loading import IMAGE_COLUMN, decode_image  # noqa: E402
from cascadevlm.flags import one_flag_style  # noqa: E402
from cascadevlm.gating.routing import RoutingOptions, apply_routing  # noqa: E402
from cascadevlm.lvlm.base import LVLMRequest  # noqa: E402
from cascadevlm.lvlm.transformers_backend import TransformersBackend  # noqa: E402
from cascadevlm.records import write_records  # noqa: E402
from cascadevlm.report.gates import write_gates_report  # noqa: E402
from cascadevlm.testing.routing_records import fashion_mnist_routing_records  # noqa: E402
from cascadevlm.zoo.tiny_clip import TINY_CLIP, build_tiny_clip  # noqa: E402
from cascadevlm.zoo.tiny_lvlm import build_tiny_llava  # noqa: E402

N_TEST, N_VAL = 10_000, 5_000


def time_records(tmp: Path, bundle, repeats: int) -> tuple[float, float, int, dict]:
    t = time.perf_counter()
    rs = fashion_mnist_routing_records(bundle, n_val=N_VAL, n_test=N_TEST, n_fit=2000)
    t_build = time.perf_counter() - t
    run = tmp / "run"
    write_records(run / "records.parquet", rs.test)
    write_records(run / "val_records.parquet", rs.val)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        payload, n = _all_settings(run, rs)
        times.append(time.perf_counter() - t)
    return min(times), t_build, n, payload


def _all_settings(run: Path, rs) -> tuple[dict, int]:
    """The gates report (reads the tables) and apply_routing for every setting."""
    payload = write_gates_report(run, topk=5)
    grid = list(
        itertools.product(("entropy", "max_prob", "margin", "learned"), ("none", "temperature"),
                          ("topk", "aps", "raps"), ("none", "logprob"))
    )  # fmt: skip
    for gate, cal, cand, fusion in grid:
        apply_routing(rs.test, rs.val, RoutingOptions(gate=gate, calibration=cal, candidates=cand, fusion=fusion,
                                                      budget=0.3, topk=5))  # fmt: skip
    return payload, len(grid)


def time_clip_stage(tmp: Path, ckpt: Path, data_root: str, n: int, repeats: int) -> float:
    dm = CascadeDataModule("fashion_mnist", data_root=data_root, limit=n, batch_size=128)
    model = ClipClassifier(TINY_CLIP, str(ckpt), class_names=dm.class_names, templates=dm.templates)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    run_clip_stage(trainer, model, dm, tmp / "parts_warm", tmp / "cache_warm")  # warm-up (head, imports)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        recs = run_clip_stage(
            trainer, model, dm, tmp / f"parts{i}", tmp / f"cache{i}"
        )  # cold cache: encoder runs
        times.append(time.perf_counter() - t)
        assert len(recs) == n
    return min(times)


def time_lvlm(tmp: Path, data_root: str, n: int, repeats: int) -> float:
    backend = TransformersBackend(str(build_tiny_llava(tmp / "llava")), device="cpu", batch_size=8)
    dm = CascadeDataModule("fashion_mnist", data_root=data_root, limit=n)
    ds = dm.eval_dataset()
    names = dm.class_names
    reqs = [
        LVLMRequest(
            decode_image(ds[i][IMAGE_COLUMN], f"test row {i}"), [names[(i + j) % 10] for j in range(5)]
        )
        for i in range(n)
    ]
    backend.choose(reqs[:8])  # warm-up (model load)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        backend.choose(reqs)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip-images", type=int, default=1000)
    ap.add_argument("--lvlm-images", type=int, default=32)
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timings of each side")
    args = one_flag_style(ap).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_tiny_clip(tmp / "clip", TINY_CLIP, seed=0)
        bundle = load_clip(TINY_CLIP, str(ckpt))
        fashion_mnist_dir(args.data_root)
        with contextlib.redirect_stdout(io.StringIO()):
            t_records, t_build, n_settings, payload = time_records(tmp, bundle, args.repeats)
            t_clip = time_clip_stage(tmp, ckpt, args.data_root, args.clip_images, args.repeats)
            t_lvlm = time_lvlm(tmp, args.data_root, args.lvlm_images, args.repeats)
    clip_10k = t_clip / args.clip_images * N_TEST
    lvlm_img = t_lvlm / args.lvlm_images
    rerun_all = clip_10k + N_TEST * lvlm_img
    rerun_30 = clip_10k + 0.3 * N_TEST * lvlm_img
    g = payload["gates"]
    print(f"records: {N_TEST} test + {N_VAL} validation images (tiny CLIP + probe on Fashion-MNIST, simulated "
          f"LVLM; built in {t_build:.1f} s, not counted)")  # fmt: skip
    print(f"best of {args.repeats} timings each")
    print(f"from records: gates report (8 gates + oracle x budgets, calibration, conformal x 3 alphas, fusion) + "
          f"{n_settings} apply_routing settings: {t_records:.2f} s")  # fmt: skip
    print(f"CLIP stage (tiny ViT, CPU, cold feature cache): {t_clip:.2f} s for {args.clip_images} images -> "
          f"{clip_10k:.1f} s for {N_TEST} (extrapolated)")  # fmt: skip
    print(f"tiny LLaVA scoring 5 candidates (CPU): {1000 * lvlm_img:.1f} ms/image over {args.lvlm_images} images "
          f"-> {N_TEST * lvlm_img:.1f} s for {N_TEST} (extrapolated)")  # fmt: skip
    print(f"re-running the cascade once: {rerun_all:.1f} s (LVLM on every image, as these records need); "
          f"{rerun_30:.1f} s (LVLM on 30%)")  # fmt: skip
    print(f"ratio re-run once / all {n_settings} settings + report from records: {rerun_all / t_records:.1f}x "
          f"(LVLM on all), {rerun_30 / t_records:.1f}x (LVLM on 30%)")  # fmt: skip
    per = t_records / (n_settings + 1)
    print(f"per setting from records: {per:.2f} s; ratio re-run once / one setting: {rerun_all / per:.0f}x "
          f"(LVLM on all), {rerun_30 / per:.0f}x (LVLM on 30%)")  # fmt: skip
    w = g["winner"]
    print(f"(on these simulated records, at 30%: gate chosen on {w['chosen_on']} {w['gate']} {100 * w['acc1']:.2f}% vs entropy "
          f"{100 * w['entropy_acc1']:.2f}%, oracle {100 * w['oracle_acc1']:.2f}%)")  # fmt: skip
    print(
        "models are tiny and on CPU: a real CLIP + 7B LVLM makes a re-run far slower, so the ratio is a floor"
    )


if __name__ == "__main__":
    main()
