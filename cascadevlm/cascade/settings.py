"""Zero-shot and k-shot settings: k in {0, 1, 2, 4, 8, 16} x seeds, one k-shot split per (k, seed) shared
by the CLIP adapter and the LVLM's in-context examples, then a mean +/- std table.

    python -m cascadevlm.cascade.settings --config configs/experiments/demo_settings.yaml [--dry_run true]
    python -m cascadevlm.cascade.settings --evaluate configs/experiments/vitl14_qwen2vl.yaml \
        --adapter configs/method/linear_probe.yaml --data configs/data/fgvc_aircraft.yaml --out runs/settings/aircraft

A case of the study (:mod:`cascadevlm.study`: a k x seed grid with one adapter method): every step runs
the installed entry points (``python -m cascadevlm.cli train fit ...`` and ``python -m cascadevlm.cli
evaluate ...``, the same as the ``cascadevlm-train`` / ``cascadevlm-evaluate`` scripts) in this process
(``--processes per_step``: each as its own process, as DDP trainer flags need); finished steps (the same
configuration's ``metrics.json``) are skipped on a rerun (a resumable sweep).
Paths in the experiment file are relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from cascadevlm.errors import one_line_errors, parser_kwargs
from cascadevlm.logs import add_console_arguments, setup_logging, verbosity_of
from cascadevlm.study import EVALUATE_CMD, PROCESSES, TRAIN_CMD, Study, adapter_configs, run_study
from cascadevlm.study import plan as study_plan

__all__ = ["EVALUATE_CMD", "TRAIN_CMD", "adapter_configs", "build_parser", "main", "plan", "study_of"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m cascadevlm.cascade.settings", description=__doc__.split("\n\n")[0], **parser_kwargs()
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--evaluate", type=str, required=True, help="evaluate.py config of the cascade")
    p.add_argument(
        "--adapter",
        type=str | list[str] | None,
        default=None,
        help="train.py config of the CLIP adapter, or a list composed in order (later files override "
        "earlier ones), e.g. [configs/method/coop.yaml, configs/experiments/demo_coop.yaml]",
    )
    p.add_argument(
        "--data",
        type=str | None,
        default=None,
        help="a dataset config (configs/data/<dataset>.yaml) given as --data to both train.py and evaluate.py",
    )
    p.add_argument("--shots", type=list[int], default=[0, 1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=list[int], default=[1, 2, 3])
    p.add_argument(
        "--incontext_shots", type=int, default=1, help="LVLM examples per candidate class at k > 0"
    )
    p.add_argument("--out", type=str, default="runs/settings")
    p.add_argument("--evaluate_overrides", type=list[str], default=[])
    p.add_argument("--train_overrides", type=list[str], default=[])
    p.add_argument("--dry_run", type=bool, default=False, help="print the commands only")
    p.add_argument(
        "--processes",
        type=str,
        default="one",
        help="one: every step in this process; per_step: each step its own process (DDP trainer flags)",
    )
    add_console_arguments(p)  # --verbose also gives each step's process --verbose (in its log file)
    return p


def study_of(cfg) -> Study:
    """The sweep as a study: a k x seed grid, ``--adapter`` its one method, ``--data`` given to both
    train.py and evaluate.py before their overrides."""
    if cfg.processes not in PROCESSES:
        raise ValueError(f"--processes must be one of {', '.join(PROCESSES)}, got {cfg.processes!r}")
    data = ["--data", cfg.data] if cfg.data else []
    return Study(
        name=Path(cfg.out).name,
        evaluate=[cfg.evaluate],
        out=Path(cfg.out),
        grid={"shots": list(cfg.shots), "seeds": list(cfg.seeds)},
        adapter=[cfg.adapter] if isinstance(cfg.adapter, str) else cfg.adapter,
        incontext_shots=cfg.incontext_shots,
        evaluate_overrides=[*data, *cfg.evaluate_overrides],
        train_overrides=[*data, *cfg.train_overrides],
        processes=cfg.processes,
    )


def plan(cfg) -> list[dict]:
    """The steps of the sweep: per (k, seed), an optional adapter training and one evaluation."""
    return study_plan(study_of(cfg))


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    setup_logging(verbosity_of(cfg.verbose, cfg.quiet))
    run_study(study_of(cfg), cfg.dry_run, bool(cfg.verbose))


if __name__ == "__main__":
    main()
