"""LVLM stage speed: candidate scoring vs generate-then-parse, batched vs one-by-one, preprocessing in
DataLoader workers vs in the main process, and scoring vs a bare forward of the same prompts.

    python bench/lvlm.py                       # tiny random-weight Qwen2-VL, built offline, CPU
    python bench/lvlm.py --arch llava
    python bench/lvlm.py --model Qwen/Qwen2-VL-2B-Instruct --device cuda --dtype bfloat16

Same model, same images, same candidates for every mode; each mode is warmed up once, then timed over
``--repeats`` runs (the best is kept). Tiny random models never stop early, so generation always runs
``--max-new-tokens`` steps: a fair upper bound for short answers.

Targets (issue 12): end to end with ``--workers`` DataLoader workers doing the preprocessing
(``backend.prepare`` as ``collate_fn``) >= 0.8x of the model alone on the same batches preprocessed
beforehand; scoring <= 1.1x of one bare forward (one prefill, last-position logits) of the same prompts.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.lvlm.prompts import PromptConfig, build_prompt
from cascadevlm.lvlm.scoring import forward_inputs, score_candidates
from cascadevlm.lvlm.transformers_backend import TransformersBackend
from cascadevlm.testing.images import sample_photos
from cascadevlm.zoo.tiny_lvlm import BUILDERS

CLASSES = [
    "astronaut",
    "cat",
    "coffee",
    "rocket",
    "camera",
    "horse",
    "coins",
    "galaxy",
    "china",
    "flower",
    "portrait",
]


def make_requests(n: int, k: int) -> list[LVLMRequest]:
    photos = [p.convert("RGB") for p in sample_photos().values()]
    reqs = []
    for i in range(n):
        cands = [CLASSES[(i + j) % len(CLASSES)] for j in range(k)]
        reqs.append(LVLMRequest(image=photos[i % len(photos)], candidates=cands, key=str(i)))
    return reqs


def timed(backend: TransformersBackend, reqs: list[LVLMRequest], repeats: int) -> float:
    """Best wall time (seconds) of ``backend.choose(reqs)`` over ``repeats`` runs, after a warm-up."""
    backend.choose(reqs[: backend.batch_size])
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend.choose(reqs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def timed_model_only(backend: TransformersBackend, reqs: list[LVLMRequest], repeats: int) -> float:
    """Best wall time of the model calls alone: prompts are rendered and images preprocessed beforehand."""
    enc, net = backend.encoder, backend.net
    device = backend.torch_device
    work = []
    for start in range(0, len(reqs), backend.batch_size):
        prompts = [build_prompt(r, backend.prompt) for r in reqs[start : start + backend.batch_size]]
        ids = [[enc.answer_ids(a) for a in p.answers] for p in prompts]
        work.append((enc.encode(prompts, device), ids))

    def run(items) -> None:
        for inputs, ids in items:
            if backend.mode == "score":
                score_candidates(net, inputs, ids, enc.pad_id)
            else:
                with torch.inference_mode():
                    net.generate(
                        **inputs,
                        max_new_tokens=backend.max_new_tokens,
                        do_sample=False,
                        pad_token_id=enc.pad_id,
                    )

    run(work[:1])
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(work)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def timed_workers(backend: TransformersBackend, reqs: list[LVLMRequest], workers: int, repeats: int) -> float:
    """Best wall time of choose() fed by a DataLoader whose workers render and preprocess the batches."""

    def run() -> None:
        loader = torch.utils.data.DataLoader(
            reqs,
            batch_size=backend.batch_size,
            collate_fn=backend.prepare,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
        )
        for batch in loader:
            backend.choose(batch)

    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def timed_bare_forward(
    backend: TransformersBackend, reqs: list[LVLMRequest], repeats: int
) -> tuple[float, float]:
    """Best wall times of (one bare prefill forward, scoring) over the same preprocessed batches."""
    enc, net, device = backend.encoder, backend.net, backend.torch_device
    work = []
    for start in range(0, len(reqs), backend.batch_size):
        prompts = [build_prompt(r, backend.prompt) for r in reqs[start : start + backend.batch_size]]
        work.append((enc.encode(prompts, device), [[enc.answer_ids(a) for a in p.answers] for p in prompts]))

    def bare() -> None:
        with torch.inference_mode():
            for inputs, _ in work:
                net(**forward_inputs(net, inputs), use_cache=True, logits_to_keep=1)

    def score() -> None:
        for inputs, ids in work:
            score_candidates(net, inputs, ids, enc.pad_id)

    out = []
    for fn in (bare, score):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out.append(best)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model dir or hub id (default: a tiny random model built offline)")
    parser.add_argument("--arch", choices=sorted(BUILDERS), default="qwen2vl", help="tiny model to build")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the preprocessing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(BUILDERS[args.arch](f"{tmp}/{args.arch}"))
        reqs = make_requests(args.images, args.candidates)
        common = dict(device=args.device, dtype=args.dtype, prompt=PromptConfig(options="letters"))
        modes, model_only, workers = {}, {}, {}
        for mode in ("score", "generate"):
            for bs in (args.batch_size, 1):
                backend = TransformersBackend(
                    model, mode=mode, batch_size=bs, max_new_tokens=args.max_new_tokens, **common
                ).load()
                modes[(mode, bs)] = timed(backend, reqs, args.repeats)
                model_only[(mode, bs)] = timed_model_only(backend, reqs, args.repeats)
                if bs == args.batch_size:
                    workers[mode] = timed_workers(backend, reqs, args.workers, args.repeats)
                    if mode == "score":
                        bare, scored = timed_bare_forward(backend, reqs, args.repeats)

    name = args.model or f"tiny {args.arch} (random weights)"
    dev = args.device if args.device != "cpu" else f"cpu, {torch.get_num_threads()} threads"
    print(f"model: {name}; device: {dev}; {args.images} images x {args.candidates} candidates")
    print(f"generation: {args.max_new_tokens} new tokens; best of {args.repeats} runs\n")
    print("end to end: choose() = prompt rendering + image preprocessing + model + parsing")
    report(modes, args.images, args.batch_size)
    print("\nmodel only: the same batches, rendered and preprocessed beforehand")
    report(model_only, args.images, args.batch_size)
    b = args.batch_size
    print(f"\npreprocessing in {args.workers} DataLoader workers (collate_fn=backend.prepare), batch {b}")
    for mode, sec in workers.items():
        main_proc, alone = modes[(mode, b)], model_only[(mode, b)]
        print(
            f"  {mode:<10} end to end {args.images / sec:8.1f} images/s; in the main process "
            f"{args.images / main_proc:8.1f}; model only {args.images / alone:8.1f}; "
            f"end to end / model only = {alone / sec:.2f} (target >= 0.8)"
        )
    print(f"\nscoring vs one bare forward of the same prompts (prefill, last-position logits), batch {b}")
    print(
        f"  bare forward {1000 * bare / args.images:.2f} ms / image; scoring {1000 * scored / args.images:.2f}"
        f" ms / image; scoring / bare = {scored / bare:.2f} (target <= 1.1)"
    )


def report(times: dict, images: int, b: int) -> None:
    print(f"  {'mode':<10}{'batch':>7}{'ms / image':>13}{'images / s':>13}")
    for (mode, bs), sec in times.items():
        print(f"  {mode:<10}{bs:>7}{1000 * sec / images:>13.2f}{images / sec:>13.1f}")
    ratios = [
        (f"scoring vs generate-then-parse, batch {b}", times[("generate", b)] / times[("score", b)]),
        ("scoring vs generate-then-parse, batch 1", times[("generate", 1)] / times[("score", 1)]),
        (f"scoring, batch {b} vs one-by-one", times[("score", 1)] / times[("score", b)]),
        (f"generate, batch {b} vs one-by-one", times[("generate", 1)] / times[("generate", b)]),
    ]
    for label, ratio in ratios:
        print(f"  {label:<42}{ratio:>6.2f}x faster")


if __name__ == "__main__":
    main()
