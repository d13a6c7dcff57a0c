"""A k x seed grid on the demo models as one study process vs one process per step (issue 21: >= 3x).

The same study file (``configs/demo.yaml`` on ``--limit`` test images, k in ``--shots`` x ``--seeds``, the
LVLM on deferred images) is run twice, each from a fresh ``python -m cascadevlm.study`` process:
``--processes per_step`` (every evaluation its own ``python -m cascadevlm.cli evaluate`` process, as the
settings sweep ran before) and ``--processes one`` (the study). Both read the image features from one
feature cache warmed before either is timed, and each has its own, empty answer store, so neither gets the
other's LVLM answers. Printed: wall time, LVLM calls, the ratio, and whether the two tables are equal.

    python bench/study.py [--limit 100] [--shots 0 1 2] [--seeds 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def study_file(tmp: Path, mode: str, args) -> Path:
    """The bench's study, with its own output folder and answer store (one feature cache for both)."""
    study = {
        "name": f"bench_{mode}",
        "evaluate": str(REPO / "configs" / "demo.yaml"),
        "out": str(tmp / mode),
        "grid": {"shots": args.shots, "seeds": args.seeds},
        "incontext_shots": 0,  # the demo LLaVA answers one-image prompts
        "evaluate_overrides": ["--data.limit", str(args.limit), "--cascade.lvlm_on", "deferred",
                               "--cache_dir", str(tmp / "cache"), "--answer_store", str(tmp / f"answers_{mode}.sqlite")],
    }  # fmt: skip
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def timed(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with log.open("w") as fh:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - t


def lvlm_calls(out: Path) -> int:
    return sum(
        json.loads(p.read_text())["params"]["lvlm_calls"] for p in (out / "eval").glob("*/metrics.json")
    )


def table(out: Path) -> list[dict]:
    """The study's results without the run directories (they name the study's folder)."""
    return [
        {k: v for k, v in r.items() if k != "runs"} for r in json.loads((out / "results.json").read_text())
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=100, help="test images per cell")
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # the image features of the test images and of the budget's val split, once, for both modes
        warm = [sys.executable, "-m", "cascadevlm.cli", "evaluate", "--config", str(REPO / "configs" / "demo.yaml"),
                "--data.limit", str(args.limit), "--cache_dir", str(tmp / "cache"), "--answer_store", "null",
                "--output_dir", str(tmp / "warm"), "--trainer.enable_progress_bar", "false"]  # fmt: skip
        warm_s = timed(warm, tmp / "warm.log")
        rows = []
        for mode in ("per_step", "one"):
            cmd = [
                sys.executable,
                "-m",
                "cascadevlm.study",
                str(study_file(tmp, mode, args)),
                "--processes",
                mode,
            ]
            rows.append((mode, timed(cmd, tmp / f"{mode}.log"), lvlm_calls(tmp / mode)))
        cells = len(list((tmp / "one" / "eval").glob("*/metrics.json")))
        same = table(tmp / "per_step") == table(tmp / "one")
    per_step_s = rows[0][1]
    print(f"study of {cells} cells (k {args.shots} x seeds {args.seeds}) on {args.limit} demo test images, "
          f"CPU, {os.cpu_count()} cores; feature cache warmed first ({warm_s:.1f} s)")  # fmt: skip
    print(f"{'mode':<46} {'wall s':>8} {'LVLM calls':>11} {'x faster':>9}")
    names = {"per_step": "one process per step (settings sweep before)", "one": "one study process"}
    for mode, s, calls in rows:
        print(f"{names[mode]:<46} {s:8.1f} {calls:>11} {per_step_s / s:9.1f}")
    print(f"same table: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
