"""Real-size models (random weights, cascadevlm/zoo/realsize.py): throughput and memory of both stages.

    python bench/realsize.py --preset cpu     # ViT-B/32 + a layer-reduced Qwen2-VL-2B in fp32, a few minutes, < 6 GB
    python bench/realsize.py --preset gpu     # ViT-B/32, B/16, L/14, L/14-336 + Qwen2-VL-7B, Qwen2.5-VL-7B,
                                              # LLaVA-1.5-7B in bf16

Per CLIP model: the CLIP stage (evaluate.py's Lightning stage on Fashion-MNIST test images, features
written, zero-shot head) against the bare ``encode_image`` forward on the same preprocessed batches and
against the compute roofline (the model's FLOPs per image, counted by torch's FlopCounterMode, at the
matmul rate measured here). Per LVLM: images/s and peak memory of the local backend at several batch
sizes, in score and generate modes; peak memory of scoring against the previous implementation (a copy
of the prompt's cache per candidate, full-prompt logits) on the same batch; on a GPU, the largest batch
that fits (the backend's out-of-memory fallback, probed from a large batch). Peak memory is the device
allocator's peak on a GPU, and the process's resident-set peak (sampled every millisecond) above its
level before the call on a CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cascadevlm.flags import one_flag_style  # noqa: E402
from cascadevlm.lvlm.base import Exemplar, LVLMRequest  # noqa: E402
from cascadevlm.lvlm.prompts import PromptConfig, build_prompt  # noqa: E402
from cascadevlm.lvlm.scoring import _cache_kwarg, forward_inputs, rope_state_module, score_candidates  # noqa: E402
from cascadevlm.lvlm.transformers_backend import TransformersBackend  # noqa: E402
from cascadevlm.testing.images import sample_photos  # noqa: E402
from cascadevlm.zoo.realsize import (  # noqa: E402
    LLAVA_15_7B,
    QWEN2_VL_2B,
    QWEN2_VL_7B,
    QWEN25_VL_7B,
    build_lvlm,
    count_params,
    reduce_layers,
    write_clip_checkpoint,
)

PRESETS = {
    "cpu": {
        "clip": ["ViT-B-32"],
        "clip_images": 64,
        "clip_batch": 32,
        "lvlm": [reduce_layers(QWEN2_VL_2B, 4, 4)],
        "lvlm_images": 4,
        "batches": [1, 4],
        "max_new_tokens": 4,
        "probe_fit": False,
        # a CPU has no fast bf16 matmul (the bf16 run did not finish in 15 minutes on 2 cores)
        "lvlm_dtype": torch.float32,
    },
    "gpu": {
        "clip": ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"],
        "clip_images": 2048,
        "clip_batch": 256,
        "lvlm": [QWEN2_VL_7B, QWEN25_VL_7B, LLAVA_15_7B],
        "lvlm_images": 64,
        "batches": [1, 8, 32],
        "max_new_tokens": 8,
        "probe_fit": True,
        "lvlm_dtype": torch.bfloat16,
    },
}
CLASSES = ["astronaut", "cat", "coffee", "rocket", "camera", "horse", "coins", "galaxy", "china", "flower"]


# ------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak bytes above the level at entry: the CUDA allocator's peak, or the sampled resident set."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss()
            self._top = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._top = max(self._top, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._top, _rss()) - self._base


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul (the roofline's compute rate)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    sec = best_time(lambda: [a @ b for _ in range(reps)], device, 3)
    return 2 * n**3 * reps / sec


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


# ------------------------------------------------------------------------------------------------ CLIP
def clip_flops(model_name: str) -> tuple[float, tuple[int, int]]:
    """FLOPs of ``encode_image`` for one image (meta device: nothing allocated) and the image size."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = open_clip.create_model(model_name, pretrained=None, device="meta")
    size = tuple(model.visual.image_size)
    with FlopCounterMode(display=False) as counter:
        model.encode_image(torch.empty(1, 3, *size, device="meta"))
    return counter.get_total_flops(), size


def bench_clip(name: str, cfg: dict, device: torch.device, tmp: Path, rate: float) -> dict:
    import lightning as L

    from cascadevlm.cascade.runner import run_clip_stage
    from cascadevlm.clip.module import ClipClassifier
    from cascadevlm.data.datamodule import CascadeDataModule
    from cascadevlm.data.loading import ImageClassificationDataset

    flops, _ = clip_flops(name)
    ckpt = write_clip_checkpoint(name, tmp / f"{name}.pt")
    precision = "amp_bf16" if device.type == "cuda" else "fp32"
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    dm = CascadeDataModule(
        "fashion_mnist", limit=cfg["clip_images"], batch_size=cfg["clip_batch"], num_workers=workers
    )
    module = ClipClassifier(
        name, str(ckpt), precision=precision, class_names=dm.class_names, templates=dm.templates
    )
    module.ensure_head()
    bundle = module.bundle
    loader = torch.utils.data.DataLoader(
        ImageClassificationDataset(dm.eval_dataset(), bundle.preprocess, dm.split),
        batch_size=cfg["clip_batch"],
    )
    batches = [b["pixel_values"].to(device) for b in loader]
    n = sum(len(b) for b in batches)
    model = bundle.model.to(device)

    def bare() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"),
        ):
            for x in batches:
                model.encode_image(x)

    t_bare = best_time(bare, device, 3)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    runs = []
    for r in range(3):
        trainer = L.Trainer(
            accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        sync(device)
        t = time.perf_counter()
        run_clip_stage(trainer, module, dm, tmp / f"{name}-run{r}" / "parts", tmp / f"{name}-cache{r}")
        sync(device)
        runs.append(time.perf_counter() - t)
    return {
        "model": name,
        "params": count_params(model),
        "gflops": flops / 1e9,
        "images": n,
        "stage": n / min(runs),
        "bare": n / t_bare,
        "roofline": rate / flops,
    }


# ------------------------------------------------------------------------------------------------ LVLM
def make_requests(n: int, k: int = 5, examples: int = 0) -> list[LVLMRequest]:
    photos = [p.convert("RGB").resize((448, 448)) for p in sample_photos().values()]
    reqs = []
    for i in range(n):
        cands = [CLASSES[(i + j) % len(CLASSES)] for j in range(k)]
        ex = [Exemplar(photos[(i + 1 + e) % len(photos)], cands[e % k]) for e in range(examples)]
        reqs.append(LVLMRequest(image=photos[i % len(photos)], candidates=cands, examples=ex, key=str(i)))
    return reqs


@torch.inference_mode()
def previous_score_candidates(model, inputs, answers, pad_id) -> None:
    """The implementation before the shared cache (for the memory ratio): full-prompt logits, the
    prompt's cache copied once per candidate, all candidates in one forward (scores not needed here)."""
    mask = inputs["attention_mask"]
    rows = [(b, a) for b in range(mask.shape[0]) for a in answers[b]]
    out = model(**forward_inputs(model, inputs), use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    F.log_softmax(out.logits[:, -1].float(), dim=-1)
    owner = torch.tensor([b for b, _ in rows], device=mask.device)
    width = max(len(a) for _, a in rows)
    ans = torch.full((len(rows), width), pad_id, dtype=torch.long, device=mask.device)
    ans_mask = torch.zeros((len(rows), width), dtype=mask.dtype, device=mask.device)
    for i, (_, a) in enumerate(rows):
        ans[i, : len(a)] = torch.tensor(a)
        ans_mask[i, : len(a)] = 1
    cache.reorder_cache(owner)
    pos = mask.long().sum(-1)[owner, None] + torch.arange(width - 1, device=mask.device)
    rope = rope_state_module(model)
    if rope is not None:
        pos = (pos + rope.rope_deltas.to(mask.device)[owner].view(-1, 1)).unsqueeze(0).expand(3, -1, -1)
    out2 = model(
        input_ids=ans[:, :-1],
        attention_mask=torch.cat([mask[owner], ans_mask[:, :-1]], 1),
        position_ids=pos,
        use_cache=True,
        **{_cache_kwarg(model): cache},
    )
    F.log_softmax(out2.logits.float(), dim=-1)


def bench_lvlm(spec, cfg: dict, device: torch.device) -> dict:
    t = time.perf_counter()
    net, processor = build_lvlm(spec, device=device, dtype=cfg["lvlm_dtype"])
    built = time.perf_counter() - t
    reqs = make_requests(cfg["lvlm_images"])
    rows = []
    names = PromptConfig(options="names")
    for mode in ("score", "generate"):
        for bs in cfg["batches"]:
            backend = TransformersBackend.from_model(
                net, processor, model=spec.name, mode=mode, batch_size=bs,
                max_new_tokens=cfg["max_new_tokens"], prompt=names,
            )  # fmt: skip
            backend.choose(reqs[:bs])  # warm-up
            with PeakMemory(device) as mem:
                sync(device)
                t = time.perf_counter()
                backend.choose(reqs)
                sync(device)
                sec = time.perf_counter() - t
            rows.append({"mode": mode, "batch": bs, "ips": len(reqs) / sec, "peak": mem.peak})
    # memory of scoring, now vs before, on one batch: top-5 names, 2 in-context images + the query
    bs = cfg["batches"][-1]
    backend = TransformersBackend.from_model(
        net, processor, model=spec.name, prompt=PromptConfig(options="names")
    )
    batch = make_requests(bs, examples=2)
    prompts = [build_prompt(r, backend.prompt) for r in batch]
    enc = backend.encoder
    inputs = enc.encode(prompts).to(device)
    ids = [[enc.answer_ids(a) for a in p.answers] for p in prompts]
    peaks = {}
    for label, fn in (("now", score_candidates), ("before", previous_score_candidates)):
        try:
            with PeakMemory(device) as mem:
                fn(net, inputs, ids, enc.pad_id)
            peaks[label] = mem.peak
        except torch.OutOfMemoryError:
            peaks[label] = float("nan")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fit = None
    if cfg["probe_fit"]:
        probe = TransformersBackend.from_model(net, processor, model=spec.name, batch_size=256, prompt=names)
        probe.choose(make_requests(256))
        fit = probe.fitted_batch_size
    result = {
        "model": spec.name,
        "params": count_params(net),
        "build_s": built,
        "rows": rows,
        "ratio_batch": bs,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "peak_now": peaks["now"],
        "peak_before": peaks["before"],
        "fit": fit,
        "dtype": str(cfg["lvlm_dtype"]).removeprefix("torch."),
    }
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------- report
def report(
    preset: str, device: torch.device, rate: float, clip_rows: list[dict], lvlm_rows: list[dict]
) -> str:
    import open_clip
    import transformers

    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    else:
        machine = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    lines = [
        f"bench/realsize.py --preset {preset} | {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | {machine}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, open_clip {open_clip.__version__}",
        f"matmul rate measured: {rate / 1e12:.3f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})",
        "",
        "CLIP stage (random weights, Fashion-MNIST test images)",
        "| model | params (M) | GFLOPs/image | images | stage img/s | bare encode_image img/s | roofline img/s "
        "| stage / bare | bare / roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in clip_rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} | {r['gflops']:.1f} | {r['images']} | {r['stage']:.1f} "
            f"| {r['bare']:.1f} | {r['roofline']:.1f} | {r['stage'] / r['bare']:.2f} | {r['bare'] / r['roofline']:.2f} |"
        )
    for r in lvlm_rows:
        lines += [
            "",
            f"LVLM {r['model']}: {r['params'] / 1e9:.3f} B parameters, {r['dtype']}, built in {r['build_s']:.1f} s; "
            "448x448 images, 5 candidates by name",
            "| mode | batch | images/s | peak memory (GiB) |",
            "|---|---|---|---|",
        ]
        lines += [f"| {x['mode']} | {x['batch']} | {x['ips']:.2f} | {gib(x['peak'])} |" for x in r["rows"]]
        ratio = r["peak_before"] / r["peak_now"] if r["peak_now"] else float("nan")
        lines.append(
            f"scoring peak memory, batch {r['ratio_batch']} x 3 images ({r['prompt_tokens']} prompt tokens), "
            f"top-5: now {gib(r['peak_now'])} GiB, previous implementation {gib(r['peak_before'])} GiB "
            f"(previous / now = {ratio:.1f}x)"
        )
        if r["fit"] is not None:
            lines.append(f"largest score-mode batch that fits (probed from 256, halving): {r['fit']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--skip-clip", action="store_true")
    args = one_flag_style(parser).parse_args(argv)
    cfg = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device; use --preset cpu here")
    rate = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    clip_rows, lvlm_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_clip:
            for name in cfg["clip"]:
                clip_rows.append(bench_clip(name, cfg, device, Path(tmp), rate))
                print(f"done {name}", flush=True)
        for spec in cfg["lvlm"]:
            lvlm_rows.append(bench_lvlm(spec, cfg, device))
            print(f"done {spec.name}", flush=True)
    text = report(args.preset, device, rate, clip_rows, lvlm_rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
