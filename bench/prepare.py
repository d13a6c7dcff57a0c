"""Preparation throughput: images/s with 2 worker processes against 1, and peak memory; and from
webdataset shards (``prepare --wds``) against the raw layout, as a ratio.

    .venv/bin/python bench/prepare.py [--images 3000] [--size 320] [--repeats 2] [--wds-only]

Writes a Food-101-layout tree of real photos (random crops, JPEG, a quarter of them grayscale, which
prepare converts and re-encodes), then prepares it with --workers 1 and --workers 2, alternating, each
run in its own process: peak memory is that process's own resident high-water mark, and the peak
proportional set size of it and its workers together (sampled every 20 ms). Throughput counts only the prepare() call, not interpreter start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _proc_kib(pid: int, field: str, table: str = "status") -> int:
    """One ``field`` (kB) of /proc/PID/status or smaps_rollup; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/{table}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class _PeakSampler(threading.Thread):
    """Every 20 ms: proportional set size (PSS) of this process plus its workers; shared pages counted once."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kib, self.stop = 0, threading.Event()

    def run(self):
        me = os.getpid()
        while not self.stop.wait(0.02):
            total = sum(_proc_kib(p, "Pss", "smaps_rollup") for p in [me, *_children(me)])
            self.peak_kib = max(self.peak_kib, total)


def _run_one(raw: str, out: str, workers: int, wds: str | None = None) -> None:
    from cascadevlm.data.prepare import PrepareOptions, prepare, prepare_wds

    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    if wds:
        card = prepare_wds("food101", wds, out, PrepareOptions(workers=workers), log=lambda m: None)
    else:
        card = prepare("food101", raw, out, PrepareOptions(workers=workers), log=lambda m: None)
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    images = sum(s["images"] for s in card["splits"].values())
    # VmHWM: this process's own peak resident set (reset at exec, so not the parent's).
    result = {
        "images": images,
        "seconds": seconds,
        "main_peak_mib": _proc_kib(os.getpid(), "VmHWM") / 1024,
        "total_peak_mib": sampler.peak_kib / 1024,
    }
    print(json.dumps(result))


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def cpu_scaling_ceiling() -> float:
    """How much faster 2 processes run a pure-Python loop than 1 here: the best ratio to expect."""
    from multiprocessing import get_context

    seconds = {}
    for workers in (1, 2):
        with get_context().Pool(workers) as pool:
            t0 = time.perf_counter()
            pool.map(_burn, [300_000] * 24, chunksize=1)
            seconds[workers] = time.perf_counter() - t0
    return seconds[1] / seconds[2]


def write_shards(expected: dict, class_names, root: Path, per_shard: int = 500) -> Path:
    """The same images as a CLIP_benchmark mirror: <split>/<n>.tar of <key>.jpg + <key>.cls."""
    import io
    import tarfile

    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"{n}\n" for n in class_names))
    (root / "zeroshot_classification_templates.txt").write_text("a photo of {}, a type of food.\n")
    for split, rows in expected.items():
        (root / split).mkdir()
        for s, start in enumerate(range(0, len(rows), per_shard)):
            with tarfile.open(root / split / f"{s}.tar", "w") as tar:
                for k, (path, label) in enumerate(rows[start : start + per_shard]):
                    for name, data in (
                        (f"s{start + k:07d}.cls", str(label).encode()),
                        (f"s{start + k:07d}.jpg", Path(path).read_bytes()),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return root


def _measure(raw: Path, out: Path, workers: int, wds: Path | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--run-one", str(raw), str(out), str(workers)]
    cmd += ["--wds", str(wds)] if wds else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=320, help="longest side of the generated photos")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--wds-only", action="store_true", help="only the shards-vs-raw comparison (1 worker)")
    p.add_argument("--run-one", nargs=3, metavar=("RAW", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    p.add_argument("--wds", help=argparse.SUPPRESS)
    from cascadevlm.flags import one_flag_style

    args = one_flag_style(p).parse_args()
    if args.run_one:
        _run_one(args.run_one[0], args.run_one[1], int(args.run_one[2]), args.wds)
        return

    from cascadevlm.testing.raw_trees import write_raw_tree

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        n_test = args.images // 4
        per = 101
        plan = {
            "train": [i % per for i in range(args.images - n_test)],
            "test": [i % per for i in range(n_test)],
        }
        t0 = time.perf_counter()
        tree = write_raw_tree("food101", work / "raw", plan=plan, size=args.size, vary=True)
        size_mib = sum(f.stat().st_size for f in (work / "raw").rglob("*.jpg")) / 2**20
        print(
            f"generated {args.images} JPEGs ({size_mib:.0f} MiB, longest side {args.size}px) in "
            f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs"
        )
        from cascadevlm.data.registry import get_benchmark

        shards = write_shards(
            {s: [(Path(tree.raw) / p, c) for p, c in rows] for s, rows in tree.expected.items()},
            get_benchmark("food101").class_names,
            work / "wds_food101",
        )
        by_source: dict[str, list[dict]] = {"raw": [], "wds": []}
        for _ in range(args.repeats):
            by_source["raw"].append(_measure(tree.raw, work / "out_raw", 1))
            by_source["wds"].append(_measure(tree.raw, work / "out_wds", 1, shards))
        fastest = {k: min(r, key=lambda m: m["seconds"]) for k, r in by_source.items()}
        for k, label in (("raw", "raw layout (image files)"), ("wds", "webdataset shards (--wds)")):
            m = fastest[k]
            rates = ", ".join(f"{r['images'] / r['seconds']:.0f}" for r in by_source[k])
            print(
                f"{label:27s}: {m['images'] / m['seconds']:7.1f} images/s, 1 worker (best of {args.repeats}: {rates}); "
                f"main process peak {m['main_peak_mib']:.0f} MiB RSS"
            )
        print(
            f"throughput ratio shards / raw layout: {fastest['raw']['seconds'] / fastest['wds']['seconds']:.2f}x"
        )
        if args.wds_only:
            return
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for workers in (1, 2):
                runs[workers].append(_measure(tree.raw, work / f"out{workers}", workers))
        best = {w: min(r, key=lambda m: m["seconds"]) for w, r in runs.items()}
        for w in (1, 2):
            m = best[w]
            rates = ", ".join(f"{r['images'] / r['seconds']:.0f}" for r in runs[w])
            print(
                f"workers={w}: {m['images'] / m['seconds']:7.1f} images/s (best of {args.repeats}: {rates}); "
                f"peak memory: main process {m['main_peak_mib']:.0f} MiB RSS, main + workers {m['total_peak_mib']:.0f} MiB PSS"
            )
        ratio = best[1]["seconds"] / best[2]["seconds"]
        print(f"throughput ratio 2 workers / 1 worker: {ratio:.2f}x")
        print(
            f"for reference, this machine's 2-process speed-up on a pure-Python loop: {cpu_scaling_ceiling():.2f}x "
            f"(load average {os.getloadavg()[0]:.1f}; other processes share the CPUs)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
