"""Few-shot adapter costs, measured side by side in one run.

1. Linear probe: one training epoch from cached image features against one epoch that runs the frozen
   image encoder on the images (the same probe, optimiser and batches otherwise). Target: >= 20x.
2. Prompt tuning: one CoOp step (text encoder forward + backward over every class prompt, then the
   optimiser) against one plain ``encode_text`` of all prompts ("a photo of a {class}.", no grad).
3. Every method: one training epoch from the cached k-shot features (batches of 32, AdamW), as a ratio
   to the linear probe's epoch, and inference (its head on cached features, as ``evaluate.py`` loads
   it) as a ratio to the zero-shot head. Tip-Adapter trains nothing: its "fit" (cache + alpha/beta
   search on a validation set of the k-shot set's size) is timed instead.
4. The papers' recipes (issue 22): building Tip-Adapter's 10-view augmented cache (10 encoder passes
   over randomly cropped and flipped images) vs the one plain view, and reading it back from the
   per-image view store; one CLIP-LoRA epoch (q, k, v LoRA in both encoders, on augmented images,
   forward + backward + AdamW) vs one linear-probe epoch from cached features.

Real photos (the Fashion-MNIST demo data, 16 shots x 10 classes) and real open_clip architectures
with random weights (offline). Usage: ``python bench/adapters.py [--threads N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cascadevlm.clip.adapters import (
    ClipAdapterHead,
    FrozenTextEncoder,
    LinearProbe,
    PromptHead,
    PromptLearner,
    TipAdapterHead,
)
from cascadevlm.clip.adapters.augment import AugmentedImages, augment_transform, augmented_features
from cascadevlm.clip.adapters.clip_lora import ClipLora
from cascadevlm.clip.features import image_features
from cascadevlm.clip.model import encode_images, load_clip
from cascadevlm.clip.zero_shot import build_zero_shot_head, clip_logits
from cascadevlm.data.benchmarks import FINE_GRAINED
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.loading import FeatureDataset, ImageClassificationDataset
from cascadevlm.flags import one_flag_style
from cascadevlm.zoo.tiny_clip import build_tiny_clip

MODELS = ("cascadevlm-tiny-vit", "cascadevlm-small-vit")


def feature_epoch(logits_fn, opt, feats: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
    """One training epoch over cached features in a fixed shuffled order (cross-entropy, ``opt`` steps)."""
    order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        loss = F.cross_entropy(logits_fn(feats[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def timed(fn, repeats: int) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_linear_probe(bundle, ds, class_names, templates, repeats: int, batch_size: int = 32) -> dict:
    labels = [int(x) for x in ds["label"]]
    t0 = time.perf_counter()
    feats = image_features(bundle, ds, "bench", cache=None, batch_size=128)
    extract = time.perf_counter() - t0
    head = build_zero_shot_head(bundle.model, bundle.tokenizer, class_names, templates)
    probe = LinearProbe(head, float(bundle.model.logit_scale.exp()))
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)

    def step(features: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(probe(features), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def epoch_from_features() -> None:
        gen = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(
            FeatureDataset(feats, labels), batch_size, shuffle=True, generator=gen
        )
        for b in loader:
            step(b["features"], b["label"])

    def epoch_from_images() -> None:
        gen = torch.Generator().manual_seed(0)
        data = ImageClassificationDataset(ds, bundle.preprocess, "bench")
        loader = torch.utils.data.DataLoader(data, batch_size, shuffle=True, generator=gen)
        for b in loader:
            with torch.no_grad():
                f = bundle.model.encode_image(b["pixel_values"], normalize=True)
            step(f, b["label"])

    t_img = timed(epoch_from_images, max(1, repeats // 2))
    t_feat = timed(epoch_from_features, repeats)
    return {"images": len(ds), "extract_s": extract, "from_images_s": t_img, "from_features_s": t_feat}


def bench_prompt_tuning(bundle, class_names, repeats: int, batch_size: int = 32) -> dict:
    model, tok = bundle.model, bundle.tokenizer
    learner = PromptLearner(FrozenTextEncoder(model), tok, class_names, ctx_init="a photo of a")
    opt = torch.optim.AdamW([learner.ctx], lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(batch_size, bundle.embed_dim, generator=gen), dim=-1)
    y = torch.randint(0, len(class_names), (batch_size,), generator=gen)
    scale = float(model.logit_scale.exp())
    prompts = tok([f"a photo of a {c}." for c in class_names])

    def coop_step() -> None:
        loss = F.cross_entropy(scale * feats @ learner().T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain_encode_text() -> None:
        with torch.no_grad():
            model.encode_text(prompts, normalize=True)

    return {
        "classes": len(class_names),
        "tokens": int(learner.tokens.shape[1]),
        "context_length": int(prompts.shape[1]),
        "step_s": timed(coop_step, repeats),
        "encode_text_s": timed(plain_encode_text, repeats),
    }


def bench_methods(
    bundle, ds, class_names, templates, repeats: int, batch_size: int = 32, n_infer: int = 4096
):
    """Per method: one epoch from cached features (s) and its head on ``n_infer`` cached features (s)."""
    labels = torch.tensor([int(x) for x in ds.with_format("arrow")["label"].to_pylist()])
    feats = image_features(bundle, ds, "bench", cache=None, batch_size=128)
    head = build_zero_shot_head(bundle.model, bundle.tokenizer, class_names, templates)
    scale = float(bundle.model.logit_scale.exp())
    gen = torch.Generator().manual_seed(0)
    infer = F.normalize(torch.randn(n_infer, feats.shape[1], generator=gen), dim=-1)
    val = F.normalize(feats + 0.05 * torch.randn(feats.shape, generator=gen), dim=-1)  # a same-size val set

    def epoch(module: torch.nn.Module, logits_fn, params) -> float:
        opt = torch.optim.AdamW(params, lr=1e-3)

        return timed(lambda: feature_epoch(logits_fn, opt, feats, labels, batch_size), repeats)

    def inference(fn) -> float:
        def run() -> None:
            with torch.no_grad():
                fn(infer)

        return timed(run, repeats)

    probe = LinearProbe(head, scale)
    learner = PromptLearner(
        FrozenTextEncoder(bundle.model), bundle.tokenizer, class_names, ctx_init="a photo of a"
    )
    tip = TipAdapterHead(head, scale, alpha=1.0, beta=5.0)
    tip.set_cache(feats, labels)
    tip_f = TipAdapterHead(head, scale, alpha=1.0, beta=5.0, train_keys=True)
    tip_f.set_cache(feats, labels)
    torch.manual_seed(0)
    clip_adapter = ClipAdapterHead(head, scale, ratio=0.2, reduction=4)
    with torch.no_grad():
        prompt_head = PromptHead(learner(), scale)  # what a CoOp file loads as

    def tip_fit() -> None:
        cache = TipAdapterHead(head, scale)
        cache.set_cache(feats, labels)
        cache.search_alpha_beta(
            val, labels, [3.0 * i / 30 for i in range(31)], [7.0 * i / 35 for i in range(1, 36)]
        )

    rows = {
        "zero-shot head": (None, inference(lambda f: clip_logits(f, head, scale))),
        "linear_probe": (epoch(probe, probe, list(probe.parameters())), inference(probe)),
        "coop": (
            epoch(learner, lambda f: scale * F.normalize(f, dim=-1) @ learner().T, [learner.ctx]),
            inference(prompt_head),
        ),
        "tip_adapter": (timed(tip_fit, repeats), inference(tip)),
        "tip_adapter_f": (epoch(tip_f, tip_f, [tip_f.keys]), inference(tip_f)),
        "clip_adapter": (
            epoch(
                clip_adapter,
                clip_adapter,
                list(clip_adapter.fc1.parameters()) + list(clip_adapter.fc2.parameters()),
            ),
            inference(clip_adapter),
        ),
    }
    return {"images": len(ds), "cache": tip.cache_size, "n_infer": n_infer, "rows": rows}


def bench_recipes(bundle, ds, class_names, repeats: int, work: Path, batch_size: int = 32) -> dict:
    """Tip-Adapter's 10-view cache vs one view (and re-read from the store); a CLIP-LoRA epoch on augmented
    images vs a linear-probe epoch on cached features. ``bundle`` is wrapped with LoRA: call it last."""
    rows = list(range(len(ds)))
    store = work / "views"

    def views(n: int, root) -> None:
        augmented_features(bundle, ds, rows, "bench", n, "flip_crop", root, batch_size=128)

    t_one = timed(lambda: image_features(bundle, ds, "bench", cache=None, batch_size=128), repeats)
    t_ten = timed(lambda: views(10, None), max(1, repeats // 2))
    views(10, store)  # fill the store once
    t_hit = timed(lambda: views(10, store), repeats)

    labels = torch.tensor([int(x) for x in ds["label"]])
    feats = image_features(bundle, ds, "bench", cache=None, batch_size=128)
    head = build_zero_shot_head(bundle.model, bundle.tokenizer, class_names, ["a photo of a {}."])
    scale = float(bundle.model.logit_scale.exp())
    probe = LinearProbe(head, scale)
    probe_opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)

    def probe_epoch() -> None:
        feature_epoch(probe, probe_opt, feats, labels, batch_size)

    lora = ClipLora(bundle.model, bundle.tokenizer, class_names, ["a photo of a {}."], rank=2, alpha=1.0,
                    dropout=0.25, lora_params="qkv", rslora=True)  # fmt: skip  # the paper's
    lora_opt = torch.optim.AdamW(
        [p for p in lora.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01
    )
    images = AugmentedImages(ds, augment_transform(bundle.preprocess, "flip_crop_wide"), "bench")

    def lora_epoch() -> None:
        loader = torch.utils.data.DataLoader(
            images, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        for b in loader:
            logits = scale * encode_images(bundle, b["pixel_values"]) @ lora.class_embeddings().T
            loss = F.cross_entropy(logits, b["label"])
            lora_opt.zero_grad(set_to_none=True)
            loss.backward()
            lora_opt.step()

    return {
        "one_view_s": t_one,
        "ten_views_s": t_ten,
        "ten_views_cached_s": t_hit,
        "probe_epoch_s": timed(probe_epoch, repeats),
        "lora_epoch_s": timed(lora_epoch, max(1, repeats // 2)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: small models, stable timings)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--data-root", default="data")
    p.add_argument("--work", default="artifacts/bench_adapters")
    p.add_argument("--sections", nargs="+", type=int, default=[1, 2, 3, 4], help="which sections to run")
    args = one_flag_style(p).parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.work)
    dm = CascadeDataModule(
        "fashion_mnist", data_root=args.data_root, shots=args.shots, seed=1, splits_dir=str(work / "splits")
    )
    ds = dm.kshot_dataset()
    cub = next(s for s in FINE_GRAINED if s.name == "cub200")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu, median of {args.repeats} runs"
    )
    print(
        f"data: Fashion-MNIST demo, {args.shots}-shot x {len(dm.class_names)} classes = {len(ds)} real photos\n"
    )

    rows_lp, rows_pt, rows_m, rows_r = [], [], [], []
    for name in MODELS:
        bundle = load_clip(name, str(build_tiny_clip(work / "clip", name)))
        bundle.model.requires_grad_(False)  # frozen, as in training
        size = bundle.model.visual.image_size
        if 1 in args.sections:
            r = bench_linear_probe(bundle, ds, dm.class_names, dm.templates, args.repeats)
            rows_lp.append((f"{name} ({size[0] if isinstance(size, tuple) else size}px)", r))
        for label, names in (("fashion_mnist", dm.class_names), ("cub200", list(cub.class_names))):
            if 2 in args.sections:
                rows_pt.append((name, label, bench_prompt_tuning(bundle, names, args.repeats)))
        if 3 in args.sections:
            rows_m.append((name, bench_methods(bundle, ds, dm.class_names, dm.templates, args.repeats)))
        if 4 in args.sections:  # last: wraps the model with LoRA
            rows_r.append((name, bench_recipes(bundle, ds, dm.class_names, args.repeats, work)))

    if rows_lp:
        print("1. Linear probe: one epoch (forward, backward, AdamW step per batch of 32)")
        print(
            f"{'model':34} {'images':>6} {'from images':>12} {'from features':>14} {'ratio':>8}  (one-off extraction)"
        )
        for label, r in rows_lp:
            ratio = r["from_images_s"] / r["from_features_s"]
            print(
                f"{label:34} {r['images']:>6} {1e3 * r['from_images_s']:>10.1f}ms {1e3 * r['from_features_s']:>12.2f}ms "
                f"{ratio:>7.1f}x  ({1e3 * r['extract_s']:.0f}ms, once per model and split)"
            )
    if rows_pt:
        print(
            "\n2. Prompt tuning: one CoOp step (all class prompts, forward + backward + step) vs one encode_text"
        )
        print(
            f"{'model':22} {'classes':>14} {'tokens':>8} {'CoOp step':>11} {'encode_text':>12} {'ratio':>7}"
        )
        for name, label, r in rows_pt:
            ratio = r["step_s"] / r["encode_text_s"]
            print(
                f"{name:22} {label + ' ' + str(r['classes']):>14} {r['tokens']:>3}/{r['context_length']:<4} "
                f"{1e3 * r['step_s']:>9.2f}ms {1e3 * r['encode_text_s']:>10.2f}ms {ratio:>6.2f}x"
            )
        print(
            "\ntokens: prompt length after cutting the padding past the longest prompt's end token "
            "(exact under the causal mask) / the model's context length, which encode_text always runs."
        )
    for name, r in rows_m:
        print(
            f"\n3. {name}: one epoch from cached features ({r['images']} k-shot features, batches of 32) vs the "
            f"linear probe's; inference on {r['n_infer']} cached features vs the zero-shot head"
        )
        print(f"{'method':16} {'epoch':>11} {'vs probe':>9} {'inference':>11} {'vs zero-shot':>13}")
        lp_epoch = r["rows"]["linear_probe"][0]
        zs_infer = r["rows"]["zero-shot head"][1]
        for method, (train_s, infer_s) in r["rows"].items():
            if train_s is None:
                train = f"{'-':>11} {'-':>9}"
            else:
                note = "*" if method == "tip_adapter" else " "
                train = f"{1e3 * train_s:>9.2f}ms{note}{train_s / lp_epoch:>8.2f}x"
            print(f"{method:16} {train} {1e3 * infer_s:>9.2f}ms {infer_s / zs_infer:>12.2f}x")
        print(
            f"* Tip-Adapter trains nothing: its whole fit (cache of {r['cache']} keys + the 31 x 35 alpha/beta "
            "search on a same-size validation set)"
        )
    print(f"\n4. The papers' recipes on the {len(ds)} k-shot photos")
    print(f"{'model':22} {'1 view':>9} {'10 views':>10} {'ratio':>7} {'10 cached':>10} "
          f"{'probe epoch':>12} {'LoRA epoch':>11} {'ratio':>8}")  # fmt: skip
    for name, r in rows_r:
        print(
            f"{name:22} {1e3 * r['one_view_s']:>7.0f}ms {1e3 * r['ten_views_s']:>8.0f}ms "
            f"{r['ten_views_s'] / r['one_view_s']:>6.1f}x {1e3 * r['ten_views_cached_s']:>8.1f}ms "
            f"{1e3 * r['probe_epoch_s']:>10.2f}ms {1e3 * r['lora_epoch_s']:>9.0f}ms "
            f"{r['lora_epoch_s'] / r['probe_epoch_s']:>7.0f}x"
        )
    print(
        "10 views: Tip-Adapter's augmented cache computed (10 encoder passes); cached: read back from the "
        "per-image view store (what every later method, k and seed pays). LoRA epoch: CLIP-LoRA's paper "
        "recipe (q, k, v LoRA r=2 in both encoders, crop+flip images, AdamW)."
    )


if __name__ == "__main__":
    main()
