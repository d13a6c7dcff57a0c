"""The few-shot methods' paper recipes on the demo: k x seeds, selection=val, test accuracy on 2000 images.

Runs ``python -m cascadevlm.clip.adapters.sweep`` for the feature methods (their method files, the paper
recipes by default, the demo's epochs), then CLIP-LoRA (``configs/method/clip_lora.yaml``, the paper's
recipe except the number of steps: ``--lora_iters`` per shot, 500 in the paper; a CPU cannot run 8000
steps per 16-shot run for 9 runs in an afternoon), all under one ``--out``, and prints the k-shot table.

Usage: ``python bench/methods_sweep.py [--shots 1 4 16] [--seeds 1 2 3] [--lora_iters 50] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cascadevlm.clip.adapters import sweep

REPO = Path(__file__).resolve().parents[1]


def lora_args(k: int, seed: int, args: argparse.Namespace) -> list[str]:
    """``train.py fit`` flags of one CLIP-LoRA run (the demo's data flags as the sweep's)."""
    out = ["fit", "--config", str(REPO / "configs" / "method" / "clip_lora.yaml"), *sweep.DEMO_ARGS]
    out += ["--data.selection", "val", "--data.val_limit", "null", "--data.num_workers", "0"]
    out += ["--data.eval_batch_size", "500", "--model.iterations_per_shot", str(args.lora_iters)]
    out += ["--trainer.check_val_every_n_epoch", str(args.lora_val_every)]
    out += ["--data.data_root", args.data_root, "--trainer.default_root_dir", args.out]
    out += ["--data.splits_dir", str(Path(args.out) / "splits")]
    out += ["--data.shots", str(k), "--data.seed", str(seed), "--seed_everything", str(seed)]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--methods", nargs="*", default=list(sweep.METHODS))
    p.add_argument("--lora_iters", type=int, default=50, help="CLIP-LoRA steps per shot (the paper: 500)")
    p.add_argument("--lora_val_every", type=int, default=5, help="CLIP-LoRA: validate every N epochs")
    p.add_argument("--no_lora", action="store_true")
    p.add_argument("--out", default="runs/methods_sweep")
    p.add_argument("--data_root", default="data")
    args = p.parse_args(argv)
    from cascadevlm.cli import train_main
    from cascadevlm.report.kshot import main as kshot_main

    flags = ["--shots", *map(str, args.shots), "--seeds", *map(str, args.seeds)]
    flags += ["--out", args.out, "--data_root", args.data_root, "--selection", "val"]
    # the sweep's own k-shot split files: the shared artifacts/splits can hold other data's
    flags += ["--train_args", f"--data.splits_dir {Path(args.out) / 'splits'}"]
    if args.methods:
        sweep.main([*flags, "--methods", *args.methods])
    if not args.no_lora:
        for k in args.shots:
            for seed in args.seeds:
                t = time.perf_counter()
                train_main(lora_args(k, seed, args))
                print(f"[sweep] clip_lora k={k} seed={seed}: {time.perf_counter() - t:.1f}s", flush=True)
    kshot_main(["--runs", args.out])


if __name__ == "__main__":
    main()
