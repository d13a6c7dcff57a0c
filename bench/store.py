"""The demo rerun with another budget, measured side by side in one run (issue 21: 0 LVLM calls, >= 20x).

1. ``configs/demo.yaml`` (the small CLIP and LLaVA trained here) on ``--limit`` test images with a fresh
   feature cache and answer store: the first run (every image asked, ``lvlm_on: all``).
2. The same with ``--cascade.budget 0.1``: a new run directory; features from the cache, every answer
   from the store. Timed in this process (the interpreter and its imports are paid once, as in a study),
   and also as a fresh ``python evaluate.py`` process (start-up included, as a user's rerun).
3. ``python -m cascadevlm.rethreshold`` of the first run's records: no model at all.

    python bench/store.py [--limit 500]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def demo_args(tmp: Path, limit: int, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), "--data.limit", str(limit),
            "--output_dir", str(tmp / "runs"), "--cache_dir", str(tmp / "cache"),
            "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


def timed_in_process(args: list[str]) -> tuple[float, dict]:
    from cascadevlm.cli import run_evaluate

    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        payload = run_evaluate(args)
    return time.perf_counter() - t, payload


def timed_process(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=500, help="test images (the demo's own is 2000)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        first_s, first = timed_in_process(demo_args(tmp, args.limit))
        again_s, again = timed_in_process(demo_args(tmp, args.limit, "--cascade.budget", "0.1"))
        proc_s = timed_process(
            [sys.executable, "evaluate.py", *demo_args(tmp, args.limit, "--cascade.budget", "0.2")]
        )
        proc_calls = next(json.loads(p.read_text())["params"]["lvlm_calls"]
                          for p in (tmp / "runs").glob("*budget0.2-*/metrics.json"))  # fmt: skip
        source = next(p.parent for p in (tmp / "runs").glob("*budget0.3-*/metrics.json"))
        rethreshold_s = timed_process([sys.executable, "-m", "cascadevlm.rethreshold", str(source), "--budget",
                                       "0.05", "--out", str(tmp / "rethreshold")])  # fmt: skip
        store_mb = sum(p.stat().st_size for p in (tmp / "cache").glob("answers.sqlite*")) / 2**20  # + WAL
    calls = (first["params"]["lvlm_calls"], again["params"]["lvlm_calls"])
    rows = [
        ("first run (budget 0.3, every image asked)", first_s, calls[0]),
        ("rerun, budget 0.1, same process", again_s, calls[1]),
        ("rerun, budget 0.2, new evaluate.py process", proc_s, proc_calls),
        ("rethreshold --budget 0.05 (records only)", rethreshold_s, 0),
    ]
    print(f"demo on {args.limit} test images (configs/demo.yaml), CPU, {os.cpu_count()} cores")
    print(f"{'step':<46} {'wall s':>8} {'LVLM calls':>11} {'x faster':>9}")
    for name, s, c in rows:
        print(f"{name:<46} {s:8.1f} {'' if c is None else c:>11} {first_s / s:9.1f}")
    print(f"answer store: {store_mb:.2f} MiB for {calls[0]} answers")
    print(json.dumps({"first_s": first_s, "rerun_s": again_s, "rerun_process_s": proc_s,
                      "rethreshold_s": rethreshold_s, "calls": calls}))  # fmt: skip


if __name__ == "__main__":
    main()
