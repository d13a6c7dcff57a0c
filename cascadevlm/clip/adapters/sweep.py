"""Method x k x seeds sweep of the few-shot adapters in one process, then the mean +/- std table.

Each (method, k, seed) is one ordinary ``train.py fit`` (the same LightningCLI, config files and run
directories; in one process so the CLIP model and feature cache are loaded once per run, not per
Python start-up), then :mod:`cascadevlm.report.kshot` tabulates every ``metrics.json`` under ``--out``
(method, k and seed as each run recorded them). The offline demo (the demo's trained CLIP on
Fashion-MNIST)::

    python -m cascadevlm.clip.adapters.sweep --shots 1 4 16 --seeds 1 2 3 --out runs/adapter_sweep

Other models or datasets: ``--train_args`` is appended to every run's command line (later flags win),
e.g. ``--train_args "--data configs/data/flowers102.yaml --model.model_name ViT-L-14 ..."``.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
METHODS = ("linear_probe", "coop", "clip_adapter", "tip_adapter", "tip_adapter_f")
# the demo's epochs per method (the method files hold the full-size schedules)
DEMO_EPOCHS = {"linear_probe": 30, "coop": 30, "clip_adapter": 30, "tip_adapter": 1, "tip_adapter_f": 20}
DEMO_ARGS = [
    "--data", str(REPO / "configs" / "data" / "fashion_mnist.yaml"),
    "--model.model_name", "cascadevlm-tiny-vit",
    "--model.pretrained", str(REPO / "cascadevlm" / "zoo" / "checkpoints" / "clip.safetensors"),
    "--data.num_workers", "0",
    "--data.test_limit", "2000",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
# as configs/experiments/demo_linear_probe.yaml and demo_coop.yaml
DEMO_METHOD_ARGS = {
    "linear_probe": ["--model.lr", "0.01"],
    "clip_adapter": ["--model.lr", "0.01"],
    "coop": ["--model.optimizer", "adamw", "--model.warmup_steps", "0"],
}


def run_args(method: str, k: int, seed: int, args: argparse.Namespace) -> list[str]:
    """The ``train.py fit`` command line of one (method, k, seed) run."""
    out = ["fit", "--config", str(REPO / "configs" / "method" / f"{method}.yaml"), *DEMO_ARGS]
    out += DEMO_METHOD_ARGS.get(method, [])
    out += ["--trainer.max_epochs", str(DEMO_EPOCHS[method]), "--data.selection", args.selection]
    if args.selection == "val":
        out += ["--data.val_limit", "null"]  # selection=val draws its own k-shot-sized validation set
    out += ["--data.data_root", args.data_root, "--trainer.default_root_dir", args.out]
    out += ["--data.shots", str(k), "--data.seed", str(seed), "--seed_everything", str(seed)]
    return out + shlex.split(args.train_args)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--selection", default="val", choices=("val", "val_split", "last"))
    p.add_argument("--out", default="runs/adapter_sweep")
    p.add_argument("--data_root", default="data")
    p.add_argument("--train_args", default="", help="flags appended to every run (quoted, one string)")
    args = p.parse_args(argv)
    from cascadevlm.cli import train_main
    from cascadevlm.report.kshot import main as kshot_main

    t0 = time.perf_counter()
    for method in args.methods:
        for k in args.shots:
            for seed in args.seeds:
                t = time.perf_counter()
                train_main(run_args(method, k, seed, args))
                print(f"[sweep] {method} k={k} seed={seed}: {time.perf_counter() - t:.1f}s", flush=True)
    print(
        f"[sweep] {len(args.methods) * len(args.shots) * len(args.seeds)} runs in {time.perf_counter() - t0:.0f}s"
    )
    return kshot_main(["--runs", args.out])


if __name__ == "__main__":
    main()
