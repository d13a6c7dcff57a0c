"""Zero-shot and k-shot settings: k in {0, 1, 2, 4, 8, 16} x seeds, one k-shot split per (k, seed) shared
by the CLIP adapter and the LVLM's in-context examples, then a mean +/- std table.

    python -m cascadevlm.cascade.settings --config configs/experiments/demo_settings.yaml [--dry_run true]
    python -m cascadevlm.cascade.settings --evaluate configs/experiments/vitl14_qwen2vl.yaml \
        --adapter configs/method/linear_probe.yaml --data configs/data/fgvc_aircraft.yaml --out runs/settings/aircraft

Each step runs the installed entry points (``python -m cascadevlm.cli train fit ...`` and
``python -m cascadevlm.cli evaluate ...``, the same as the ``cascadevlm-train`` / ``cascadevlm-evaluate``
scripts) as its own process, so DDP trainer flags work and no repository checkout is needed; finished
steps are skipped on a rerun (a resumable sweep).
Paths in the experiment file are relative to the working directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from cascadevlm.errors import one_line_errors, parser_kwargs
from cascadevlm.logs import add_console_arguments, setup_logging, verbosity_of
from cascadevlm.report.tables import write_results_tables

# The installed entry points, run with this interpreter (never the repository's scripts by path).
EVALUATE_CMD = [sys.executable, "-m", "cascadevlm.cli", "evaluate"]
TRAIN_CMD = [sys.executable, "-m", "cascadevlm.cli", "train"]


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
    add_console_arguments(p)  # --verbose also gives each step's process --verbose (in its log file)
    return p


def plan(cfg) -> list[dict]:
    """The steps of the sweep: per (k, seed), an optional adapter training and one evaluation."""
    out = Path(cfg.out)
    splits = str(out / "splits")
    steps = []
    for k in cfg.shots:
        for seed in cfg.seeds if k > 0 else cfg.seeds[:1]:  # zero-shot has nothing to draw
            name = f"k{k}_s{seed}" if k > 0 else "k0"
            data = ["--data", cfg.data] if cfg.data else []
            ev = [*EVALUATE_CMD, "--config", cfg.evaluate, *data, *cfg.evaluate_overrides,
                  "--data.shots", str(k), "--data.seed", str(seed), "--data.splits_dir", splits,
                  "--output_dir", str(out / "eval"), "--run_name", name]  # fmt: skip
            adapter = None
            train = None
            if k > 0:
                ev += ["--cascade.incontext_shots", str(cfg.incontext_shots)]
                if cfg.adapter:
                    train_root = out / "train" / name
                    train = [*TRAIN_CMD, "fit", *adapter_configs(cfg.adapter), *data,
                             *cfg.train_overrides, "--data.init_args.shots", str(k), "--data.init_args.seed",
                             str(seed), "--data.init_args.splits_dir", splits,
                             "--trainer.default_root_dir", str(train_root)]  # fmt: skip
                    adapter = train_root
            steps.append({"k": k, "seed": seed, "name": name, "train": train, "adapter_root": adapter,
                          "evaluate": ev, "run_dir": out / "eval" / name})  # fmt: skip
    return steps


def adapter_configs(adapter: str | list[str]) -> list[str]:
    """``--config`` for each of the adapter's train.py config files, in order."""
    files = [adapter] if isinstance(adapter, str) else list(adapter)
    return [arg for path in files for arg in ("--config", path)]


def _adapter_file(root: Path) -> Path | None:
    found = sorted(root.glob("**/adapter.safetensors"))
    return found[-1] if found else None


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ python " + " ".join(cmd[1:]), flush=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"step failed (exit {proc.returncode}); log {log}:\n{tail}")


def run(cfg) -> list[Path]:
    """Run (or, with dry_run, print) every step; returns the evaluation run directories."""
    done = []
    for step in plan(cfg):
        run_dir: Path = step["run_dir"]
        if step["train"] is not None:
            adapter = _adapter_file(step["adapter_root"])
            if adapter is None:
                if cfg.dry_run:
                    print("$ python " + " ".join(step["train"][1:]))
                    adapter = step["adapter_root"] / "<experiment>/<version>/adapter.safetensors"
                else:
                    _run(step["train"], Path(cfg.out) / "logs" / f"train_{step['name']}.log")
                    adapter = _adapter_file(step["adapter_root"])
                    if adapter is None:
                        raise RuntimeError(f"training {step['name']} wrote no adapter.safetensors")
            step["evaluate"] += ["--model.adapter", str(adapter)]
        if (run_dir / "metrics.json").exists():
            print(f"{step['name']}: done before ({run_dir})")
        elif cfg.dry_run:
            print("$ python " + " ".join(step["evaluate"][1:]))
            continue
        else:
            _run(step["evaluate"], Path(cfg.out) / "logs" / f"evaluate_{step['name']}.log")
        done.append(run_dir)
    return done


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    setup_logging(verbosity_of(cfg.verbose, cfg.quiet))
    if cfg.verbose:
        cfg.evaluate_overrides = [*cfg.evaluate_overrides, "--verbose"]
    dirs = run(cfg)
    if cfg.dry_run or not dirs:
        return
    paths = write_results_tables(dirs, cfg.out)
    print(paths["markdown"].read_text())
    summary = {str(d): json.loads((d / "metrics.json").read_text())["methods"] for d in dirs}
    (Path(cfg.out) / "runs.json").write_text(json.dumps(summary, indent=1))
    print(f"tables: {paths['markdown']}, {paths['csv']}")


if __name__ == "__main__":
    main()
