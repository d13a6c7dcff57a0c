"""`evaluate.py`: LightningCLI over the CLIP stage and the data, then the cascade, records and reports."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from cascadevlm.cascade.runner import feature_cache_hit, run_clip_stage
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.report.metrics import classification_metrics
from cascadevlm.report.summary import run_name, short_weights, write_run_outputs

EVAL_TRAINER_DEFAULTS = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "accelerator": "auto",
    "devices": 1,
}

RANDOM_WEIGHTS_NOTE = (
    "The CLIP weights are random (a tiny offline model of a real architecture): accuracy here is not "
    "meaningful. Use a pretrained model (e.g. --model.model_name ViT-L-14 --model.pretrained openai) for real numbers."
)


class EvaluateCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str, default="runs", help="parent of the run directory")
        parser.add_argument("--run_name", type=str | None, default=None, help="default: from the parameters")
        parser.add_argument("--cache_dir", type=str, default="artifacts/cache", help="feature cache")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.templates", "model.templates", apply_on="instantiate")


def uses_random_weights(model: ClipClassifier) -> bool:
    return not model.hparams.pretrained or model.hparams.model_name.startswith("cascadevlm-")


def evaluate(cli: EvaluateCLI) -> dict | None:
    """Run the evaluation described by a parsed CLI; returns the metrics on rank 0."""
    cfg, model, dm, trainer = cli.config, cli.model, cli.datamodule, cli.trainer
    hp = model.hparams
    name = cfg.run_name or run_name(
        dm.name,
        hp.model_name,
        short_weights(hp.pretrained),
        dm.split,
        f"k{dm.shots}",
        f"s{dm.seed}" if dm.shots else None,
        Path(hp.adapter).stem if hp.adapter else None,
        f"n{dm.limit}" if dm.limit else None,
    )
    run_dir = Path(cfg.output_dir) / name
    notes = [RANDOM_WEIGHTS_NOTE] if uses_random_weights(model) else []
    if trainer.is_global_zero:
        for n in notes:
            print(f"NOTE: {n}", file=sys.stderr)
        hit = feature_cache_hit(model, dm, cfg.cache_dir)
        print(f"image features: {'cached (image encoder skipped)' if hit else 'computing'}", file=sys.stderr)
    records = run_clip_stage(trainer, model, dm, run_dir / "parts", cfg.cache_dir)
    if records is None:
        return None
    metrics = classification_metrics(records, len(dm.class_names))
    params = {
        "dataset": dm.name,
        "split": dm.split,
        "images": len(records),
        "classes": len(dm.class_names),
        "clip_model": hp.model_name,
        "clip_pretrained": hp.pretrained,
        "adapter": hp.adapter,
        "shots": dm.shots,
        "seed": dm.seed,
        "devices": trainer.world_size,
    }
    paths = write_run_outputs(run_dir, records, metrics, params, notes)
    print(f"wrote {paths['records']}, {paths['metrics']}, {paths['summary']}", file=sys.stderr)
    print(paths["summary"].read_text())
    return metrics


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
