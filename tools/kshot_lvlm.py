"""The LVLM side of k-shot on the offline demo (issue 26; docs/demo.md "LVLM side of k-shot").

On the first ``--limit`` Fashion-MNIST test images, with the demo CLIP and tau from the 30% budget on val
(configs/demo.yaml), the demo LLaVA in names mode on the deferred images:

- zero-shot (one run: the deferred images and their candidates are the same in every setting);
- in-context examples, k per candidate from the (k, seed) k-shot split of the train split
  (``--data.shots k --data.seed s --cascade.incontext_shots k``), capped at what the model's 512-token
  window holds (``--cap`` examples; about 64 tokens per image turn);
- a k-shot LoRA (configs/lvlm/lora_demo_llava.yaml, then configs/lvlm/demo_llava_lora_score.yaml).

Every run asks the LVLM itself (``--answer_store null``) and writes its own run directory under
``<out>/eval``; a run with a metrics.json is skipped on a rerun. Then one table (mean ± sample std over
seeds) is printed and written to ``<out>/kshot_lvlm.{md,json}``::

    python tools/kshot_lvlm.py                    # 1000 test images, seeds 1 2 3, about 5 min here
    python tools/kshot_lvlm.py --limit 200 --seeds 1 --incontext 1 --lora 4 --held_out 0 0   # a quick look

The LoRA adapters are then scored on the deferred images of test rows ``--held_out`` (default 1000-4999,
which the table does not use) against the zero-shot LVLM, with the images each wins and loses
(``<out>/held_out_<start>_<stop>.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TURN_TOKENS = 65  # one image turn of the demo prompt (16 image tokens + text), measured: 11 -> 709
WINDOW = 512  # the demo LLaVA's max_position_embeddings
# in-context examples that fit the window, with the query turn
MAX_CAP = (WINDOW - 10) // IMAGE_TURN_TOKENS - 1


def cli(args: list[str]) -> None:
    from cascadevlm.cli import main

    try:
        main(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"step failed (exit {exc.code}): {' '.join(args)}") from None


def evaluate(out: Path, name: str, limit: int, extra: list[str]) -> Path:
    name = f"{name}_n{limit}" if limit else name  # a run of another size is another run, never reused
    run = out / "eval" / name
    if not (run / "metrics.json").exists():
        cli(["evaluate", "--config", "configs/demo.yaml", "--data.limit", str(limit),
             "--cascade.lvlm_on", "deferred", "--answer_store", "null", "--output_dir", str(out / "eval"),
             "--run_name", name, "--trainer.enable_progress_bar", "false",
             "--data.splits_dir", str(out / "splits"), *extra])  # fmt: skip
    return run


def lora_dir(out: Path, k: int, seed: int, max_epochs: int) -> Path:
    """The adapter's run directory (epochs in the path: another recipe is another adapter)."""
    return out / "train" / f"e{max_epochs}" / "fashion_mnist_lvlm_lora" / f"k{k}_seed{seed}"


def train_lora(out: Path, k: int, seed: int, records: Path, max_epochs: int) -> Path:
    run = lora_dir(out, k, seed, max_epochs)
    adapter = run / "lora_adapter"
    if not (adapter / "adapter_model.safetensors").exists():
        cli(["train", "fit", "--config", "configs/lvlm/lora_demo_llava.yaml", "--seed_everything", str(seed),
             "--data.init_args.shots", str(k), "--data.init_args.seed", str(seed),
             "--data.init_args.splits_dir", str(out / "splits"), "--data.init_args.records_path", str(records),
             "--trainer.max_epochs", str(max_epochs), "--trainer.default_root_dir", str(run.parents[1]),
             "--trainer.enable_progress_bar", "false"])  # fmt: skip
    return adapter


def deferred_numbers(run: Path) -> dict:
    """LVLM accuracy on the deferred images, cascade accuracy, calls, from the run's records alone."""
    r = pd.read_parquet(run / "records.parquet")
    d = r[r["deferred"]]
    return {
        "indices": d["index"].tolist(),
        "lvlm_hits": (d["lvlm_choice"] == d["label"]).astype(int).tolist(),
        "lvlm_acc": float((d["lvlm_choice"] == d["label"]).mean()),
        "clip_acc_deferred": float((d["clip_pred"] == d["label"]).mean()),
        "cascade_acc": float((r["final"] == r["label"]).mean()),
        "clip_acc": float((r["clip_pred"] == r["label"]).mean()),
        "deferred": len(d),
        "images": len(r),
        "lvlm_calls": json.loads((run / "metrics.json").read_text())["cost"]["calls"][-1],
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=1000, help="first N test images")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--incontext", type=int, nargs="*", default=[1, 2, 4], help="k per candidate")
    p.add_argument("--lora", type=int, nargs="*", default=[4, 16], help="k of the LoRA's k-shot split")
    p.add_argument("--cap", type=int, default=MAX_CAP,
                   help="in-context examples per prompt at most (default: what the 512-token window holds)")  # fmt: skip
    p.add_argument("--lora_epochs", type=int, default=4)
    p.add_argument("--out", default="runs/kshot_lvlm")
    p.add_argument("--held_out", type=int, nargs=2, default=[1000, 5000], metavar=("START", "STOP"),
                   help="also score the LoRA adapters on the deferred test rows [START, STOP) (0 0: skip)")  # fmt: skip
    a = p.parse_args(argv)
    for flag, value in (("--limit", a.limit), ("--cap", a.cap), ("--lora_epochs", a.lora_epochs),
                        *(("--incontext", k) for k in a.incontext), *(("--lora", k) for k in a.lora)):  # fmt: skip
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if a.cap > MAX_CAP:
        p.error(f"--cap {a.cap}: at most {MAX_CAP} in-context examples fit the model's {WINDOW}-token window")
    if a.held_out != [0, 0] and not 0 <= a.held_out[0] < a.held_out[1]:
        p.error(f"--held_out START STOP must have 0 <= START < STOP (0 0: skip), got {a.held_out}")
    out = Path(a.out)
    topk = 5
    rows: list[dict] = []
    zs = deferred_numbers(evaluate(out, "zero_shot", a.limit, []))
    rows.append({"setting": "zero-shot", "k": 0, "seeds": {0: zs}})
    for k in a.incontext:
        n_ex = min(k * topk, a.cap)
        per = {}
        for s in a.seeds:
            run = evaluate(out, f"incontext_k{k}_x{n_ex}_s{s}", a.limit,
                           ["--data.shots", str(k), "--data.seed", str(s), "--cascade.incontext_shots", str(k),
                            "--cascade.max_examples", str(n_ex), "--lvlm.init_args.prompt.max_images", str(n_ex + 1)])  # fmt: skip
            per[s] = deferred_numbers(run)
        rows.append({"setting": f"in-context, {n_ex} examples/prompt", "k": k, "seeds": per})
    if a.lora:
        records = evaluate(out, "train_clip", 0, ["--data.split", "train", "--data.limit", "null", "--lvlm", "null",
                                                  "--cascade.budget", "null", "--cascade.tau", "inf"]) / "records.parquet"  # fmt: skip
    for k in a.lora:
        per = {}
        for s in a.seeds:
            adapter = train_lora(out, k, s, records, a.lora_epochs)
            run = evaluate(out, f"lora_k{k}_e{a.lora_epochs}_s{s}", a.limit,
                           ["--lvlm", "configs/lvlm/demo_llava_lora_score.yaml",
                            "--lvlm.init_args.lora_path", str(adapter)])  # fmt: skip
            per[s] = deferred_numbers(run)
        rows.append({"setting": "LoRA", "k": k, "seeds": per})

    lines = [
        f"first {zs['images']} test images; {zs['deferred']} deferred (tau from the 30% budget on val); "
        f"CLIP on them {100 * zs['clip_acc_deferred']:.1f}%, CLIP alone {100 * zs['clip_acc']:.1f}%",
        "",
        "| setting | k | LVLM on deferred | gain over zero-shot (per seed) | cascade |",
        "|---|---:|---:|---|---:|",
    ]
    summary = []
    for row in rows:
        per = row["seeds"]
        for v in per.values():  # the same deferred images in every setting
            assert v["indices"] == zs["indices"], f"{row['setting']} k={row['k']}: other deferred images"
        acc = [100 * v["lvlm_acc"] for v in per.values()]
        gain = [100 * (v["lvlm_acc"] - zs["lvlm_acc"]) for v in per.values()]
        casc = [100 * v["cascade_acc"] for v in per.values()]
        (am, asd), (gm, gsd), (cm, csd) = mean_std(acc), mean_std(gain), mean_std(casc)
        pm = "" if len(per) == 1 and row["k"] == 0 else " ± "
        fmt = (lambda m, sd: f"{m:.1f}") if not pm else (lambda m, sd: f"{m:.1f} ± {sd:.1f}")
        per_seed = ", ".join(f"{g:+.1f}" for g in gain)
        lines.append(
            f"| {row['setting']} | {row['k']} | {fmt(am, asd)} | {fmt(gm, gsd)} ({per_seed}) | {fmt(cm, csd)} |"
        )
        summary.append({"setting": row["setting"], "k": row["k"], "lvlm_acc": acc, "gain": gain, "cascade": casc,
                        "calls": [v["lvlm_calls"] for v in per.values()], "seeds": list(per)})  # fmt: skip
    text = "\n".join(lines)
    print(text)
    (out / "kshot_lvlm.md").write_text(text + "\n")
    (out / "kshot_lvlm.json").write_text(json.dumps({"deferred": zs["deferred"], "images": zs["images"],
                                                     "clip_acc_deferred": zs["clip_acc_deferred"],
                                                     "rows": summary}, indent=1))  # fmt: skip
    ho = None
    if a.lora and a.held_out[1] > a.held_out[0]:
        ho = held_out(out, a.held_out[0], a.held_out[1], a.lora, a.seeds, a.lora_epochs)
    return {"zero_shot": zs, "rows": summary, "held_out": ho}


def held_out(out: Path, start: int, stop: int, lora: list[int], seeds: list[int], epochs: int = 4) -> dict:
    """The trained LoRA adapters against the zero-shot LVLM on the deferred test rows [start, stop), which
    the table never used: the same CLIP stage and tau (configs/demo.yaml), the backend asked directly."""
    import yaml

    from cascadevlm.data.loading import decode_image, load_dataset_dict
    from cascadevlm.lvlm.base import LVLMRequest
    from cascadevlm.lvlm.prompts import PromptConfig
    from cascadevlm.lvlm.transformers_backend import TransformersBackend
    from cascadevlm.records import read_records

    run = evaluate(out, "held_out", stop, ["--lvlm", "null", "--cascade.budget", "null"])
    tau = json.loads(next((out / "eval").glob("zero_shot_n*/gate.json")).read_text())[
        "tau"
    ]  # on val, any size
    sent = [r for r in read_records(run / "records.parquet") if r.entropy > tau and start <= r.index < stop]
    test = load_dataset_dict("data/fashion_mnist")["test"]
    names = json.loads((run / "metrics.json").read_text())["class_names"]
    reqs = [LVLMRequest(image=decode_image(test[r.index]["image"], f"test row {r.index}"),
                        candidates=[names[c] for c in r.clip_topk[:5]], key=str(r.index)) for r in sent]  # fmt: skip
    cfg = yaml.safe_load(Path("configs/lvlm/demo_llava_lora_score.yaml").read_text())["init_args"]

    def hits(lora_path: str | None) -> np.ndarray:
        b = TransformersBackend(model=cfg["model"], mode="score", device="cpu", batch_size=64,
                                prompt=PromptConfig(**cfg["prompt"]), lora_path=lora_path)  # fmt: skip
        answers = b.load().choose(reqs)
        return np.array(
            [r.clip_topk[a.choice] == r.label for a, r in zip(answers, sent, strict=True)], dtype=bool
        )

    zero = hits(None)
    res = {"rows": [start, stop], "deferred": len(sent), "tau": tau,
           "clip": float(np.mean([r.clip_pred == r.label for r in sent])), "zero_shot": float(zero.mean()), "lora": {}}  # fmt: skip
    for k in lora:
        for s in seeds:
            h = hits(str(lora_dir(out, k, s, epochs) / "lora_adapter"))
            res["lora"][f"k{k}_s{s}"] = {"acc": float(h.mean()), "gain": float(h.mean() - zero.mean()),
                                         "won": int((h & ~zero).sum()), "lost": int((~h & zero).sum())}  # fmt: skip
            print(f"held-out {start}-{stop}: LoRA k={k} seed {s}: {100 * h.mean():.1f}% vs zero-shot "
                  f"{100 * zero.mean():.1f}% ({len(sent)} deferred; {res['lora'][f'k{k}_s{s}']})")  # fmt: skip
    (out / f"held_out_{start}_{stop}.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    main()
