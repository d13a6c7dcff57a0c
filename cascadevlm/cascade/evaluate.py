"""`evaluate.py`: CLIP stage -> entropy gate -> LVLM stage on deferred images -> records, metrics, reports.

LightningCLI parses the config (``--config``, dotted overrides) and builds the CLIP module, the data
module, the trainer and, when ``lvlm`` is given, the LVLM backend. Both stages run through the same
Trainer, so 1..N devices (DDP) work for each; rank 0 merges the records once.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lightning.pytorch.cli import LightningCLI

from cascadevlm.cascade.gate import defer_mask, tau_for_budget
from cascadevlm.cascade.lvlm_stage import LVLMStage, check_stage_fingerprint, read_answers, run_lvlm_stage
from cascadevlm.cascade.runner import feature_cache_hit, run_clip_stage
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.lvlm.base import LVLMBackend
from cascadevlm.records import PredictionRecord, read_records, write_records
from cascadevlm.report.analysis import deferred_analysis, sweep
from cascadevlm.report.metrics import accuracy, classification_metrics
from cascadevlm.report.plots import save_sweep_plots
from cascadevlm.report.summary import run_name, short_weights, summary_markdown, write_run_outputs

EVAL_TRAINER_DEFAULTS = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "accelerator": "auto",
    "devices": 1,
}

RANDOM_WEIGHTS_NOTE = {
    "CLIP": "The CLIP weights are random (a tiny offline model of a real architecture): accuracy here is not "
    "meaningful. For real numbers use pretrained weights, e.g. --model.model_name ViT-L-14 --model.pretrained openai.",
    "LVLM": "The LVLM weights are random (a tiny offline model of a real architecture): its answers are not "
    "meaningful. For real numbers use a pretrained LVLM, e.g. --lvlm configs/lvlm/qwen2vl_7b_score.yaml.",
}


@dataclass
class CascadeOptions:
    """The gate and the LVLM stage.

    Args:
        tau: entropy threshold (nats): images with entropy > tau go to the LVLM. inf = CLIP only.
        budget: instead of tau, send at most this fraction of images to the LVLM; tau is chosen on
            ``budget_split`` (the validation split) and then applied to the evaluated split.
        budget_split: the split tau is chosen on.
        topk: candidates shown to the LVLM (CLIP's top-k, most probable first).
        lvlm_on: ``all`` also asks the LVLM about confident images, so the whole accuracy-vs-calls curve
            and both baselines (CLIP only, LVLM on everything) come out of one run; ``deferred`` asks only
            about deferred images (cheapest; the sweep then covers tau >= the gate's tau).
        incontext_shots: in-context examples per candidate class from the k-shot split (``data.shots``).
        max_examples: cap on in-context examples per prompt.
        lvlm_batch_size: images per LVLM batch.
        sweep_points: thresholds in the sweep.
    """

    tau: float = math.inf
    budget: float | None = None
    budget_split: str = "val"
    topk: int = 5
    lvlm_on: Literal["deferred", "all"] = "all"
    incontext_shots: int = 0
    max_examples: int = 4
    lvlm_batch_size: int = 8
    sweep_points: int = 100


class EvaluateCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str, default="runs", help="parent of the run directory")
        parser.add_argument("--run_name", type=str | None, default=None, help="default: from the parameters")
        parser.add_argument("--cache_dir", type=str, default="artifacts/cache", help="feature cache")
        parser.add_class_arguments(CascadeOptions, "cascade")
        parser.add_subclass_arguments(LVLMBackend, "lvlm", required=False, default=None)
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.templates", "model.templates", apply_on="instantiate")


def uses_random_weights(model: ClipClassifier) -> bool:
    return not model.hparams.pretrained or model.hparams.model_name.startswith("cascadevlm-")


def _lvlm_description(cfg) -> dict | None:
    lv = cfg.get("lvlm")
    if not lv:
        return None
    lv = lv.as_dict() if hasattr(lv, "as_dict") else lv
    return json.loads(json.dumps(lv, default=str))


def _lvlm_is_tiny(desc: dict | None) -> bool:
    return bool(desc) and "tiny" in json.dumps(desc)


def default_run_name(dm: CascadeDataModule, model: ClipClassifier, lvlm_desc: dict | None) -> str:
    hp = model.hparams
    lvlm = None
    if lvlm_desc:
        init = lvlm_desc.get("init_args", {})
        lvlm = Path(str(init.get("model", lvlm_desc.get("class_path", "lvlm")))).name
    return run_name(
        dm.name,
        hp.model_name,
        short_weights(hp.pretrained),
        dm.split,
        f"k{dm.shots}",
        f"s{dm.seed}" if dm.shots else None,
        Path(hp.adapter).stem if hp.adapter else None,
        lvlm,
        f"n{dm.limit}" if dm.limit else None,
    )


def _with_split(dm: CascadeDataModule, split: str) -> CascadeDataModule:
    other = copy.copy(dm)
    other.split, other.limit = split, None
    if split not in dm.dsd:
        raise ValueError(
            f"dataset {dm.name!r} has no split {split!r} to choose tau on; it has {list(dm.dsd)}"
        )
    return other


def combine(
    clip_records: list[PredictionRecord], answers: dict, tau: float, topk: int
) -> list[PredictionRecord]:
    """Final records: the LVLM's answer where the gate deferred, CLIP's top-1 elsewhere.

    Answers for confident images (``lvlm_on: all``) are kept in the record for sweeps but not used.
    """
    out = []
    deferred = defer_mask([r.entropy for r in clip_records], tau)
    for rec, d in zip(clip_records, deferred, strict=True):
        r = copy.copy(rec)
        r.deferred = bool(d)
        a = answers.get(r.index)
        if a is not None:
            if a.candidate_ids != r.clip_topk[:topk]:
                raise RuntimeError(f"stored LVLM answer for image {r.index} was given other candidates")
            r.lvlm_choice, r.lvlm_raw, r.lvlm_scores, r.fallback = a.lvlm_choice, a.raw, a.scores, a.fallback
        elif d:
            raise RuntimeError(f"image {r.index} was deferred but has no LVLM answer")
        r.final = r.lvlm_choice if d else r.clip_pred
        out.append(r)
    return out


def evaluate(cli: EvaluateCLI) -> dict | None:
    """Run the evaluation described by a parsed CLI; returns metrics.json's content on rank 0."""
    cfg, model, dm, trainer = cli.config, cli.model, cli.datamodule, cli.trainer
    backend: LVLMBackend | None = cli.config_init.get("lvlm")
    opts = CascadeOptions(**dict(cfg.cascade))
    lvlm_desc = _lvlm_description(cfg)
    hp = model.hparams
    run_dir = Path(cfg.output_dir) / (cfg.run_name or default_run_name(dm, model, lvlm_desc))
    notes = []
    if uses_random_weights(model):
        notes.append(RANDOM_WEIGHTS_NOTE["CLIP"])
    if _lvlm_is_tiny(lvlm_desc):
        notes.append(RANDOM_WEIGHTS_NOTE["LVLM"])
    rank0 = trainer.is_global_zero
    if rank0:
        for n in notes:
            print(f"NOTE: {n}", file=sys.stderr)
        hit = feature_cache_hit(model, dm, cfg.cache_dir)
        print(f"image features: {'cached (image encoder skipped)' if hit else 'computing'}", file=sys.stderr)

    # 1. CLIP stage (and the budget split when tau comes from a budget)
    clip_records = run_clip_stage(trainer, model, dm, run_dir / "parts", cfg.cache_dir)
    tau, gate = opts.tau, {"tau": opts.tau, "source": "config"}
    if backend is None:
        tau, gate = math.inf, {"tau": math.inf, "source": "no LVLM configured: CLIP only"}
    elif opts.budget is not None:
        val_dm = _with_split(dm, opts.budget_split)
        val_records = run_clip_stage(trainer, model, val_dm, run_dir / "parts" / "budget", cfg.cache_dir)
        if rank0:
            tau = tau_for_budget([r.entropy for r in val_records], opts.budget)
            frac = float(defer_mask([r.entropy for r in val_records], tau).mean())
            gate = {
                "tau": tau,
                "source": f"budget {opts.budget} on {opts.budget_split}",
                "budget_split_deferral": frac,
            }
    if rank0:
        write_records(run_dir / "clip_records.parquet", clip_records)
        (run_dir / "gate.json").write_text(json.dumps(gate, default=str))
    trainer.strategy.barrier()
    clip_records = read_records(run_dir / "clip_records.parquet")
    gate = json.loads((run_dir / "gate.json").read_text())
    tau = float(gate["tau"])

    # 2. LVLM stage on the images without an answer yet (resumable)
    answers: dict = {}
    if backend is not None:
        parts = run_dir / "parts"
        fingerprint = {
            "lvlm": lvlm_desc,
            "clip": [hp.model_name, model.bundle.weights_id, hp.adapter],
            "data": [dm.name, dm.split, dm.limit, dm.shots, dm.seed],
            "cascade": [opts.topk, opts.incontext_shots, opts.max_examples],
        }
        if rank0:
            check_stage_fingerprint(parts, fingerprint)
        trainer.strategy.barrier()
        answers = read_answers(parts)
        wanted = clip_records if opts.lvlm_on == "all" else [
            r for r, d in zip(clip_records, defer_mask([r.entropy for r in clip_records], tau), strict=True) if d
        ]  # fmt: skip
        todo = [r for r in wanted if r.index not in answers]
        if rank0:
            print(f"LVLM stage: {len(wanted)} images, {len(wanted) - len(todo)} answered before, {len(todo)} to ask",
                  file=sys.stderr)  # fmt: skip
        exemplars = None
        if opts.incontext_shots > 0:
            from cascadevlm.lvlm.incontext import ExemplarPool

            if dm.shots < 1:
                raise ValueError("cascade.incontext_shots needs a k-shot split: set data.shots >= 1")
            exemplars = ExemplarPool(
                dm.dsd[dm.train_split], dm.kshot_split(), dm.class_names,
                shots_per_class=min(opts.incontext_shots, dm.shots), max_examples=opts.max_examples,
            )  # fmt: skip
        prompt = getattr(backend, "prompt", None)
        if prompt is not None and prompt.dataset is None and prompt.noun == "object":
            prompt.noun = dm.noun  # dataset-aware wording ("aircraft variant") unless the config set one
        stage = LVLMStage(backend, dm.class_names, exemplars)
        run_lvlm_stage(
            trainer,
            stage,
            dm.eval_dataset(),
            todo,
            opts.topk,
            dm.split,
            parts,
            opts.lvlm_batch_size,
            dm.num_workers,
        )
        trainer.strategy.barrier()
        answers = read_answers(parts)
    if not rank0:
        return None

    # 3. Final records and everything computed from them
    records = combine(clip_records, answers, tau, opts.topk)
    num_classes = len(dm.class_names)
    metrics = classification_metrics(records, num_classes)
    labelled = [r for r in records if r.label >= 0]  # images of unknown class count in no accuracy
    labels = [r.label for r in labelled]
    methods = {
        "clip": {"acc1": metrics.get("clip_acc1", float("nan")), "deferral": 0.0},
        "cascade": {"acc1": metrics.get("acc1", float("nan")), "deferral": float(sum(r.deferred for r in records)) / max(len(records), 1), "tau": tau},
    }  # fmt: skip
    if hp.adapter:  # the adapter's accuracy is "clip"; zero-shot CLIP beside it
        zs = [r.clip_zero_shot_pred for r in labelled]
        methods["clip_zero_shot"] = {"acc1": accuracy(zs, labels, num_classes), "deferral": 0.0}
    if backend is not None and all(r.lvlm_choice is not None for r in records):
        methods["lvlm_all"] = {
            "acc1": accuracy([r.lvlm_choice for r in labelled], labels, num_classes),
            "deferral": 1.0,
        }
    if backend is None:
        methods.pop("cascade")
    sweep_rows = sweep(records, num_classes) if backend is not None else []
    params = {
        "dataset": dm.name,
        "split": dm.split,
        "images": len(records),
        "classes": num_classes,
        "clip_model": hp.model_name,
        "clip_pretrained": hp.pretrained,
        "adapter": hp.adapter,
        "shots": dm.shots,
        "seed": dm.seed,
        "lvlm": (lvlm_desc or {}).get("class_path"),
        "lvlm_model": ((lvlm_desc or {}).get("init_args") or {}).get("model"),
        "tau": tau,
        "gate": gate["source"],
        "lvlm_on": opts.lvlm_on if backend is not None else None,
        "incontext_shots": opts.incontext_shots,
        "lvlm_calls": getattr(backend, "calls", 0) if backend is not None else 0,
        "devices": trainer.world_size,
    }
    payload = {
        "params": params,
        "metrics": metrics,
        "methods": methods,
        "gate": gate,
        "config": _config_dict(cfg),
    }
    if backend is not None:
        payload["deferred"] = deferred_analysis(records, num_classes)
    paths = write_run_outputs(run_dir, records, payload, notes, sweep_rows)
    if sweep_rows:
        op = {"tau": tau, "deferral": methods["cascade"]["deferral"], "acc1": methods["cascade"]["acc1"]}
        save_sweep_plots(sweep_rows, run_dir / "plots", run_dir.name, op)
        from cascadevlm.report.tensorboard import write_tensorboard

        md = summary_markdown(run_dir.name, payload, notes, sweep_rows)
        write_tensorboard(run_dir / "tensorboard", sweep_rows, metrics, md, run_dir.name)
    print(f"wrote {run_dir}/: records.parquet, metrics.json, summary.md"
          + (", sweep.csv, plots/, tensorboard/" if sweep_rows else ""), file=sys.stderr)  # fmt: skip
    print(paths["summary"].read_text())
    return json.loads(paths["metrics"].read_text())


def _config_dict(cfg) -> dict:
    """The parsed config as plain data (for metrics.json); secrets never live in it (API keys come
    from environment variables read by the backend)."""
    d = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg)
    d.pop("config", None)
    return json.loads(json.dumps(d, default=str))


def main(args: list[str] | None = None) -> dict | None:
    cli = EvaluateCLI(
        ClipClassifier,
        CascadeDataModule,
        run=False,
        args=args,
        trainer_defaults=EVAL_TRAINER_DEFAULTS,
        save_config_callback=None,
        seed_everything_default=0,
    )
    return evaluate(cli)


__all__ = ["CascadeOptions", "EvaluateCLI", "combine", "evaluate", "main"]
