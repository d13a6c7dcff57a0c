"""Many classes: evaluate.py and its CLIP stage at 10 to 10,000 synthetic class names, measured side by
side in one run.

Data: the first ``--images`` Fashion-MNIST test photos (and as many validation photos), relabelled into
a dataset with N species-like class names (cascadevlm/testing/classes.py: multi-token names, 30 per
genus). Model: the demo CLIP (cascadevlm/zoo/checkpoints/clip.safetensors, cascadevlm-tiny-vit).

Per class count N:

- head build: the zero-shot head encoded (N x ``--templates`` prompts), then read back from the cache;
- evaluate.py, first run (empty cache: head and image features computed) and rerun (both cached), in
  this process (``run_evaluate``: interpreter start-up, ~10 s, left out: the same for every N);
- the same evaluate.py first run and rerun as a user runs them, issue 27's measure: the wall time of a
  ``python evaluate.py ...`` process with the same command line (the relabelled dataset on disk carries
  the class list, which evaluate.py links into the model; no LVLM configured: CLIP stage only;
  ``--quiet``), start-up included, with its own cache (first run empty, reruns with head and features
  cached). On by default, as the issue states its 1.2x target in this
  measure; ``--no-process`` leaves it out (it adds one start-up, ~11 s, per class count and round:
  about 4 min at the defaults);
- CLIP stage per image, head excluded: the Lightning predict loop (``run_clip_stage``) with the image
  encoder (fresh feature cache) and with cached features;
- peak RSS of this process after N's set-up (sizes set up in increasing order: each covers N and below).

The repeated timings (the reruns in this process and as a process, the CLIP stage) run side by side:
``--repeats`` rounds, each timing every N in turn, so a busy spell of a shared machine lands on all sizes
alike. Each is printed as the median and the range over the rounds (the noise); a ratio is the median
of the per-round ratios, with its range.

Targets (issue 27): a 10,000-class rerun within 1.2x of a 10-class rerun (checked in both measures: the
process's wall time, as the issue measured, and in this process, start-up left out, the stricter one);
per-image CLIP-stage cost at 10,000 classes within 1.5x of 10 classes (head excluded).

    python bench/classes.py [--classes 10 100 1000 10000] [--images 256] [--templates 1] [--repeats 5]
                            [--no-process]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import lightning as L  # noqa: E402

from cascadevlm.cascade.runner import run_clip_stage  # noqa: E402
from cascadevlm.cli import run_evaluate  # noqa: E402
from cascadevlm.clip.module import ClipClassifier  # noqa: E402
from cascadevlm.clip.zero_shot import zero_shot_head  # noqa: E402
from cascadevlm.data.datamodule import CascadeDataModule  # noqa: E402
from cascadevlm.data.demo import fashion_mnist_dir  # noqa: E402
from cascadevlm.data.spec import GENERIC_TEMPLATES  # noqa: E402
from cascadevlm.flags import one_flag_style  # noqa: E402
from cascadevlm.testing.classes import relabelled_dataset, synthetic_class_names  # noqa: E402
from cascadevlm.zoo.tiny_clip import TINY_CLIP  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "cascadevlm" / "zoo" / "checkpoints" / "clip.safetensors"


def timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # evaluate.py's summary tables
        fn(*args, **kwargs)
    return time.perf_counter() - t


def process_seconds(args: list[str], log: Path) -> float:
    """The wall time (s) of ``python evaluate.py args`` as a user runs it (this interpreter, from the
    repository root, this environment), start-up included; its output goes to ``log``.

    No peak RSS: Linux keeps a child's high-water mark across exec, so its ``ru_maxrss`` starts at this
    process's size when it forked (a 500 MB parent's ``python -c pass`` child reports 511 MB): it would
    report this bench's peak, not evaluate.py's.
    """
    with open(log, "w") as out:
        t = time.perf_counter()
        code = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT).returncode  # fmt: skip
        seconds = time.perf_counter() - t
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"evaluate.py exited with {code}: {tail[0]} (full log: {log})")
    return seconds


def evaluate_args(ds: Path, templates: list[str], work: Path, cache: Path, name: str) -> list[str]:
    return [
        "--model.model_name", TINY_CLIP, "--model.pretrained", str(DEMO_CLIP), "--data.dataset", str(ds),
        "--data.templates", json.dumps(templates), "--data.batch_size", "64", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--output_dir", str(work / "runs"), "--cache_dir", str(cache),
        "--run_name", name, "--quiet",
    ]  # fmt: skip


def stage_seconds(model: ClipClassifier, dm: CascadeDataModule, work: Path, cache: Path) -> float:
    """The CLIP stage's predict loop over ``dm`` (the head already built)."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    return timed(run_clip_stage, trainer, model, dm, work / "parts", cache)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def setup(n: int, source: datasets.DatasetDict, args, tmp: Path) -> dict:
    """Class count ``n``: its dataset, evaluate.py's first run (nothing cached), the head built into an
    empty cache and read back, and a module holding the head for the CLIP-stage timings."""
    names = synthetic_class_names(n)
    templates = list(GENERIC_TEMPLATES[: args.templates])
    ds = relabelled_dataset(source, names, tmp / f"ds{n}", rows=args.images)
    row: dict = {"classes": n, "ds": ds, "templates": templates, "rerun": [], "fresh": [], "cached": []}
    row["first"] = timed(run_evaluate, evaluate_args(ds, templates, tmp, tmp / f"cache{n}", f"first{n}"))
    if args.process:  # its own cache, empty: the process computes the head and the image features
        pargs = evaluate_args(ds, templates, tmp, tmp / f"pcache{n}", f"pfirst{n}")
        row["p_first"], row["p_rerun"] = process_seconds(pargs, tmp / f"pfirst{n}.log"), []
    model = ClipClassifier(TINY_CLIP, str(DEMO_CLIP), class_names=names, templates=templates)
    heads = tmp / f"heads{n}"
    row["head_build"] = timed(zero_shot_head, model.bundle, names, templates, heads)
    row["head_cached"] = min(timed(zero_shot_head, model.bundle, names, templates, heads) for _ in range(3))
    model.head_cache_dir = str(heads)
    model.ensure_head()
    row["model"], row["dm"] = model, CascadeDataModule(str(ds), batch_size=64)
    row["peak_rss_mib"] = peak_rss_mib()
    return row


def one_round(row: dict, r: int, args, tmp: Path) -> None:
    """One repeat for one class count: an evaluate.py rerun (head and features cached) in this process
    and as its own process, then the CLIP stage with the image encoder (a fresh feature cache) and with
    those features cached."""
    n, ds = row["classes"], row["ds"]
    row["rerun"].append(
        timed(run_evaluate, evaluate_args(ds, row["templates"], tmp, tmp / f"cache{n}", f"re{n}"))
    )
    if args.process:
        pargs = evaluate_args(ds, row["templates"], tmp, tmp / f"pcache{n}", f"pre{n}")
        row["p_rerun"].append(process_seconds(pargs, tmp / f"pre{n}_{r}.log"))
    model, dm, feats = row["model"], row["dm"], tmp / f"feat{n}_{r}"
    row["fresh"].append(1000 * stage_seconds(model, dm, tmp / f"s{n}_{r}", feats) / args.images)
    row["cached"].append(1000 * stage_seconds(model, dm, tmp / f"c{n}_{r}", feats) / args.images)


def spread(values: list[float], fmt: str) -> str:
    """The median, and the range over the repeats (the noise) in brackets."""
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def ratio_line(what: str, hi: dict, lo: dict, key: str, target: float | None) -> str:
    """``hi`` / ``lo`` per round (measured side by side), as the median ratio and its range over rounds."""
    per_round = [a / b for a, b in zip(hi[key], lo[key], strict=True)]
    med = statistics.median(per_round)
    verdict = "" if target is None else (f" (target <= {target}x: {'holds' if med <= target else 'MISSED'})")
    return (
        f"{what} {hi['classes']:,} / {lo['classes']:,} classes = {med:.2f}x "
        f"[{min(per_round):.2f}-{max(per_round):.2f} over {len(per_round)} rounds]{verdict}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument(
        "--templates", type=int, default=1, help=f"first N of the {len(GENERIC_TEMPLATES)} generic"
    )
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the timings that are repeated")
    ap.add_argument("--data-root", default="data")
    ap.add_argument(
        "--no-process",
        dest="process",
        action="store_false",
        help="leave out the evaluate.py process timings (issue 27's measure; ~10 s start-up each)",
    )
    args = one_flag_style(ap).parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}; set --repeats")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    source = datasets.load_from_disk(str(fashion_mnist_dir(args.data_root)))
    source = datasets.DatasetDict({"test": source["test"], "val": source["val"]})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = relabelled_dataset(source, synthetic_class_names(10), tmp / "warm", rows=args.images)
        timed(
            run_evaluate, evaluate_args(warm, ["a photo of a {}."], tmp, tmp / "warm_cache", "warm")
        )  # imports
        rows = [setup(n, source, args, tmp) for n in sorted(args.classes)]
        for r in range(args.repeats):  # side by side: each round times every class count in turn
            for row in rows:
                one_round(row, r, args, tmp)
    print(f"demo CLIP ({TINY_CLIP}), {args.images} Fashion-MNIST test images, {args.templates} template(s), "
          f"CPU threads {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; repeated timings: median "
          f"[min-max] of {args.repeats} rounds, every class count timed in each round")  # fmt: skip
    print(
        "| classes | head build (s) | head from cache (s) | evaluate first run (s) | evaluate rerun (s) "
        "| CLIP stage, encoder (ms/img) | CLIP stage, cached features (ms/img) | peak RSS (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['classes']:,} | {r['head_build']:.2f} | {r['head_cached']:.3f} | {r['first']:.2f} "
            f"| {spread(r['rerun'], '.2f')} | {spread(r['fresh'], '.2f')} | {spread(r['cached'], '.3f')} "
            f"| {r['peak_rss_mib']:.0f} |"
        )
    if args.process:
        print("evaluate.py as a process (`python evaluate.py ...`, start-up included; issue 27's measure):")
        print("| classes | process first run (s) | process rerun (s) |")
        print("|---:|---:|---:|")
        for r in rows:
            print(f"| {r['classes']:,} | {r['p_first']:.2f} | {spread(r['p_rerun'], '.2f')} |")
    keys = ("rerun", "p_rerun", "fresh", "cached") if args.process else ("rerun", "fresh", "cached")
    label = {
        "rerun": "rerun s",
        "p_rerun": "process rerun s",
        "fresh": "encoder ms/img",
        "cached": "cached ms/img",
    }
    for r in rows:  # every round's value, in round order (which sizes a busy spell hit)
        print(
            f"rounds {r['classes']:,}: "
            + ", ".join(f"{label[k]} {[round(v, 3) for v in r[k]]}" for k in keys)
        )
    lo, hi = rows[0], rows[-1]
    if args.process:
        print(ratio_line("rerun as a process (issue 27's measure)", hi, lo, "p_rerun", 1.2))
    print(ratio_line("rerun in this process (start-up left out)", hi, lo, "rerun", 1.2))
    print(ratio_line("CLIP stage per image (encoder)", hi, lo, "fresh", 1.5))
    print(ratio_line("CLIP stage per image (cached features)", hi, lo, "cached", None))
    print(
        f"head build {hi['classes']:,} / {lo['classes']:,} = {hi['head_build'] / lo['head_build']:.0f}x; "
        f"first run / rerun at {hi['classes']:,} = {hi['first'] / statistics.median(hi['rerun']):.1f}x"
    )
    if args.process:
        startup = [
            p - i for p, i in zip(hi["p_rerun"] + lo["p_rerun"], hi["rerun"] + lo["rerun"], strict=True)
        ]
        print(
            f"process rerun - in-process rerun (start-up and imports), {lo['classes']:,} and "
            f"{hi['classes']:,} classes: {spread(startup, '.2f')} s"
        )


if __name__ == "__main__":
    main()
