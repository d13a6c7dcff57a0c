"""A study: a grid of cascade runs (datasets x CLIP models x adapter methods x k x seeds x budgets or
gates x LVLMs) in one process, then one results table and its figures.

    python -m cascadevlm.study configs/studies/demo.yaml [--dry_run true] [--processes per_step]

Every cell is one ``evaluate.py`` run (and, at k > 0 with a method, one ``train.py fit`` of its adapter,
shared by the cells that differ only in budget, gate or LVLM), run in this process: Lightning and the
libraries are imported once, image features come from the feature cache and LVLM answers from the answer
store (both under the evaluate config's ``cache_dir``). A cell is finished when its run directory holds a
``metrics.json`` of the same configuration; a rerun skips it, so a killed study resumes. The study file
is checked before any cell runs: an unknown key, an empty grid or a cell whose command line is refused
stops it in one line. ``--processes per_step`` runs each step as its own process instead (DDP trainer
flags need it: Lightning's launcher restarts the command line). See docs/studies.md.
Paths in the study file are relative to the working directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cascadevlm.errors import one_line, one_line_errors, project_error
from cascadevlm.records import claimed as claimed_file

# The installed entry points, run with this interpreter (never the repository's scripts by path).
EVALUATE_CMD = [sys.executable, "-m", "cascadevlm.cli", "evaluate"]
TRAIN_CMD = [sys.executable, "-m", "cascadevlm.cli", "train"]
CLI_PREFIX = 3  # EVALUATE_CMD[:3]: what an in-process step leaves out of its command

#: Grid axes, outermost first; each is a list in the study file (absent: not varied).
GRID_AXES = ("datasets", "clip", "methods", "shots", "seeds", "budgets", "gates", "lvlms")
#: Top-level keys of a study file.
STUDY_KEYS = (
    "name",
    "evaluate",
    "out",
    "grid",
    "adapter",
    "incontext_shots",
    "evaluate_overrides",
    "train_overrides",
    "processes",
)
CLIP_KEYS = ("model_name", "pretrained", "label")
# The study draws one bar over cells; a cell's own (Lightning's) would be a second live display.
NO_CELL_BARS = ["--trainer.enable_progress_bar", "false"]
PROCESSES = ("one", "per_step")


@dataclass
class Study:
    """A parsed, checked study file."""

    name: str
    evaluate: list[str]
    out: Path
    grid: dict[str, list]
    adapter: list[str] | None = None  # one method at k > 0, not a grid axis (no part of the cell names)
    incontext_shots: int = 1
    evaluate_overrides: list[str] = field(default_factory=list)
    train_overrides: list[str] = field(default_factory=list)
    processes: str = "one"


def _as_files(value: Any, what: str) -> list[str]:
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{what}: expected a config file or a list of them, got {value!r}")
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{what}: no file {f} (paths are relative to the working directory)")
    return files


def _check_axis(axis: str, values: list) -> list:
    """An axis's values, checked; ``methods`` becomes ``[(name, [files]), ...]``."""
    where = f"grid.{axis}"
    if axis == "methods":
        if not isinstance(values, dict) or not values:
            raise ValueError(f"empty grid: {where} must map a method name to its train.py config file(s)")
        return [(str(name), _as_files(files, f"{where}.{name}")) for name, files in values.items()]
    if not isinstance(values, list) or not values:
        raise ValueError(f"empty grid: {where} is {values!r}; give a non-empty list or leave the axis out")
    if axis in ("shots", "seeds") and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where}: expected integers, got {values!r}")
    if axis == "shots" and min(values) < 0:
        raise ValueError(f"{where}: k must be >= 0, got {values!r}")
    if axis == "budgets" and not all(isinstance(v, int | float) and 0 < v <= 1 for v in values):
        raise ValueError(f"{where}: a budget is a fraction of images in (0, 1], got {values!r}")
    if axis == "lvlms":
        _as_files(values, where)
    if axis == "datasets":
        for v in values:
            if not isinstance(v, str) or not v:
                raise ValueError(f"{where}: expected dataset names or configs/data/*.yaml files, got {v!r}")
            if v.endswith((".yaml", ".yml")):
                _as_files(v, where)
    if axis == "clip":
        for v in values:
            unknown = sorted(set(v) - set(CLIP_KEYS)) if isinstance(v, dict) else ["(not a mapping)"]
            if unknown or not v.get("model_name"):
                raise ValueError(
                    f"{where}: each entry is a mapping of {', '.join(CLIP_KEYS)} (model_name required), "
                    f"got {v!r}"
                )
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise ValueError(f"{where}: a value is listed twice in {values!r}")
    return values


def load_study(path: str | Path) -> Study:
    """Read and check a study file (every refusal is one line naming the key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study file {path}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a study file is a mapping of {', '.join(STUDY_KEYS)}")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; known: {', '.join(STUDY_KEYS)}")
    if "evaluate" not in raw:
        raise ValueError(f"{path}: 'evaluate' (the evaluate.py config of every cell) is required")
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"empty grid: {path} has no axes under 'grid' (known: {', '.join(GRID_AXES)})")
    unknown = sorted(set(grid) - set(GRID_AXES))
    if unknown:
        raise ValueError(f"{path}: unknown key 'grid.{unknown[0]}'; known axes: {', '.join(GRID_AXES)}")
    checked = {axis: _check_axis(axis, grid[axis]) for axis in GRID_AXES if axis in grid}
    if "methods" in checked and not any(k > 0 for k in checked.get("shots", [])):
        raise ValueError(f"{path}: grid.methods trains adapters on k-shot splits; add a k > 0 to grid.shots")
    if raw.get("adapter") is not None and "methods" in checked:
        raise ValueError(f"{path}: give either 'adapter' (one method) or grid.methods (an axis), not both")
    processes = raw.get("processes", "one")
    if processes not in PROCESSES:
        raise ValueError(f"{path}: processes must be one of {', '.join(PROCESSES)}, got {processes!r}")
    for key in ("evaluate_overrides", "train_overrides"):
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise ValueError(f"{path}: {key} is a list of command-line arguments (strings), got {value!r}")
    name = str(raw.get("name") or path.stem)
    return Study(
        name=name,
        evaluate=_as_files(raw["evaluate"], "evaluate"),
        out=Path(raw.get("out") or f"runs/studies/{name}"),
        grid=checked,
        adapter=None if raw.get("adapter") is None else _as_files(raw["adapter"], "adapter"),
        incontext_shots=int(raw.get("incontext_shots", 1)),
        evaluate_overrides=list(raw.get("evaluate_overrides", [])),
        train_overrides=list(raw.get("train_overrides", [])),
        processes=processes,
    )


def _label(axis: str, value: Any) -> str:
    """A value's part of a cell name."""
    if axis == "datasets":
        return Path(value).stem
    if axis == "clip":
        return value.get("label") or "-".join(
            [value["model_name"], *([Path(str(value["pretrained"])).stem] if value.get("pretrained") else [])]
        )
    if axis == "methods":
        return value[0]
    if axis == "lvlms":
        return Path(value).stem
    return {"budgets": "b", "gates": "g"}[axis] + str(value)


def _data_args(dataset: str | None, train: bool) -> list[str]:
    if dataset is None:
        return []
    if dataset.endswith((".yaml", ".yml")):
        return ["--data", dataset]
    return ["--data.init_args.dataset" if train else "--data.dataset", dataset]


def _clip_args(clip: dict | None, train: bool) -> list[str]:
    prefix = "--model.init_args." if train else "--model."
    return [a for k in ("model_name", "pretrained") if clip and k in clip for a in (prefix + k, str(clip[k]))]


def adapter_configs(adapter: str | list[str]) -> list[str]:
    """``--config`` for each of the adapter's train.py config files, in order."""
    files = [adapter] if isinstance(adapter, str) else list(adapter)
    return [arg for path in files for arg in ("--config", path)]


def plan(study: Study) -> list[dict]:
    """The cells of the grid, in order: each with its evaluate command, its adapter training (or None),
    its name and run directory. Zero-shot (k = 0) has no split to draw and no adapter: one cell per
    setting of the other axes, whatever the seeds and methods."""
    g, out = study.grid, study.out
    splits = str(out / "splits")
    shots = g.get("shots", [0])
    seeds = g.get("seeds", [1])
    methods = g.get("methods") or ([("", study.adapter)] if study.adapter else [None])
    cells = []
    for ds in g.get("datasets", [None]):
        for clip in g.get("clip", [None]):
            for lvlm in g.get("lvlms", [None]):
                for budget in g.get("budgets", [None]):
                    for gate in g.get("gates", [None]):
                        for k in shots:
                            for method in methods if k > 0 else [None]:
                                for seed in seeds if k > 0 else seeds[:1]:
                                    cells.append(
                                        _cell(study, splits, ds, clip, lvlm, budget, gate, k, method, seed)
                                    )
    return cells


def _cell(study: Study, splits: str, ds, clip, lvlm, budget, gate, k: int, method, seed: int) -> dict:
    given = {"datasets": ds, "clip": clip, "methods": method, "lvlms": lvlm, "budgets": budget, "gates": gate}
    if method is not None and not method[0]:  # the study's one unnamed adapter: no part of the names
        given["methods"] = None
    parts = [_label(a, v) for a, v in given.items() if v is not None]
    setting = f"k{k}_s{seed}" if k > 0 else "k0"
    name = "_".join([*parts, setting])
    out = study.out
    ev = [*EVALUATE_CMD, *(a for f in study.evaluate for a in ("--config", f)), *_data_args(ds, False),
          *_clip_args(clip, False), *(["--lvlm", lvlm] if lvlm else []),
          *NO_CELL_BARS, *study.evaluate_overrides,
          *(["--cascade.budget", str(budget)] if budget is not None else []),
          *(["--cascade.gate", str(gate)] if gate is not None else []),
          "--data.shots", str(k), "--data.seed", str(seed), "--data.splits_dir", splits,
          "--output_dir", str(out / "eval"), "--run_name", name]  # fmt: skip
    train = adapter_root = None
    if k > 0:
        ev += ["--cascade.incontext_shots", str(study.incontext_shots)]
        if method is not None:
            # one adapter per (dataset, CLIP, method, k, seed): budgets, gates and LVLMs share it
            train_name = "_".join(
                [_label(a, given[a]) for a in ("datasets", "clip", "methods") if given[a]] + [setting]
            )
            adapter_root = out / "train" / train_name
            train = [*TRAIN_CMD, "fit", *adapter_configs(method[1]), *_data_args(ds, True), *_clip_args(clip, True),
                     *NO_CELL_BARS, *study.train_overrides, "--data.init_args.shots", str(k), "--data.init_args.seed", str(seed),
                     "--data.init_args.splits_dir", splits, "--trainer.default_root_dir", str(adapter_root)]  # fmt: skip
    return {"k": k, "seed": seed, "name": name, "train": train, "adapter_root": adapter_root,
            "evaluate": ev, "run_dir": out / "eval" / name}  # fmt: skip


def adapter_file(root: Path) -> Path | None:
    """The adapter a training step wrote under ``root`` (None before it ran)."""
    found = sorted(root.glob("**/adapter.safetensors"))
    return found[-1] if found else None


def evaluate_args(cell: dict, adapter: Path | None) -> list[str]:
    """The cell's evaluate.py arguments (after ``python -m cascadevlm.cli evaluate``)."""
    return cell["evaluate"][CLI_PREFIX + 1 :] + (["--model.adapter", str(adapter)] if adapter else [])


def is_finished(cell: dict, config: dict) -> bool:
    """The cell's run directory holds a ``metrics.json`` of this very configuration."""
    path = cell["run_dir"] / "metrics.json"
    try:
        return json.loads(path.read_text()).get("config") == config
    except (OSError, json.JSONDecodeError):  # absent, or cut off by a kill: not finished
        return False


def run_subprocess(cmd: list[str], log: Path) -> None:
    """One step as its own process, its output in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ python " + " ".join(cmd[1:]), flush=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"step failed (exit {proc.returncode}); log {log}:\n{tail}")


def run_in_process(cmd: list[str], name: str) -> None:
    """One step in this process (the entry points' own one-line errors stop the study, naming the cell)."""
    from cascadevlm.cli import main as cli_main

    try:
        cli_main(cmd[CLI_PREFIX:])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise ValueError(
                f"cell {name} failed (exit {exc.code}, its error above); a rerun skips finished cells"
            ) from None


def check_cells(cells: list[dict]) -> list[dict]:
    """Every cell's evaluate command line parsed (nothing built) before any cell runs: a refused one stops
    the study in one line. Returns each cell's configuration (with its adapter when trained before)."""
    from cascadevlm.cli import evaluate_config

    configs = []
    for cell in cells:
        trained = adapter_file(cell["adapter_root"]) if cell["train"] else None
        try:
            configs.append(evaluate_config(evaluate_args(cell, trained)))
        except Exception as exc:  # a parse refusal, or a class's own refusal inside jsonargparse's wrapper
            raise ValueError(f"cell {cell['name']} cannot run: {one_line(project_error(exc))}") from None
    return configs


def run_cells(cells: list[dict], out: Path, processes: str = "one", dry_run: bool = False) -> list[Path]:
    """Run (or, with dry_run, print) every cell not finished before; returns the run directories.
    In one process, every cell is checked first and a progress bar counts cells."""
    if dry_run:
        trained = set()  # an adapter shared by several cells is trained once
        for cell in cells:
            root = cell["adapter_root"]
            if cell["train"] is not None and root not in trained and adapter_file(root) is None:
                trained.add(root)
                print("$ python " + " ".join(cell["train"][1:]))
            print("$ python " + " ".join(cell["evaluate"][1:]))
        return []
    one = processes == "one"
    configs = check_cells(cells) if one else [None] * len(cells)
    from rich.progress import Progress

    done = []
    with Progress(disable=not one) as bar:
        task = bar.add_task("study cells", total=len(cells))
        for cell, config in zip(cells, configs, strict=True):
            _run_cell(cell, config, out, one)
            done.append(cell["run_dir"])
            bar.advance(task)
    return done


def _wait_for_claim(fh, what: str) -> None:
    """Block until the study holding ``fh``'s claim lets go of it (it finished that step, or ended)."""
    print(f"{what}: another study is running it; waiting for it", flush=True)
    fcntl.flock(fh, fcntl.LOCK_EX)


@contextlib.contextmanager
def claimed(out: Path, step: str) -> Iterator[None]:
    """This study runs ``step`` (``train_<name>`` or ``eval_<name>``) of ``out`` alone: two studies over
    one output folder at once (two shells, two jobs) never run one cell in one run directory together; the
    second waits, then finds the step done and skips it. The claim is an flock on
    ``<out>/.claims/<step>.lock`` (records.claimed), released when the step ends or its process dies
    (kill -9 included), so a killed study's rerun is never locked out. Studies on different cells run side
    by side."""
    with claimed_file(out / ".claims" / f"{step}.lock", lambda fh: _wait_for_claim(fh, step)):
        yield


def _run_cell(cell: dict, config: dict | None, out: Path, one: bool) -> None:
    name = cell["name"]
    adapter = None
    if cell["train"] is not None:
        with claimed(out, f"train_{cell['adapter_root'].name}"):  # looked at and trained under the claim
            adapter = adapter_file(cell["adapter_root"])
            if adapter is None:
                if one:
                    run_in_process(cell["train"], name)
                else:
                    run_subprocess(cell["train"], out / "logs" / f"train_{name}.log")
                adapter = adapter_file(cell["adapter_root"])
                if adapter is None:
                    raise RuntimeError(f"training {name} wrote no adapter.safetensors")
                if one:  # the adapter path is part of the configuration now
                    config = check_cells([cell])[0]
    with claimed(out, f"eval_{name}"):  # the look at metrics.json and the run, under one claim
        if one and is_finished(cell, config) or not one and (cell["run_dir"] / "metrics.json").exists():
            print(f"{name}: done before ({cell['run_dir']})", flush=True)
            return
        cmd = [*cell["evaluate"], *(["--model.adapter", str(adapter)] if adapter else [])]
        if one:
            run_in_process(cmd, name)
        else:
            run_subprocess(cmd, out / "logs" / f"evaluate_{name}.log")


def finish(run_dirs: list[Path], out: Path) -> dict[str, Path]:
    """The study's results table (Markdown, CSV, JSON) and its figures, from the cells' run directories."""
    from cascadevlm.report.tables import write_results_tables

    paths = write_results_tables(run_dirs, out)
    print(paths["markdown"].read_text())
    summary = {str(d): json.loads((d / "metrics.json").read_text())["methods"] for d in run_dirs}
    (out / "runs.json").write_text(json.dumps(summary, indent=1))
    figures = ", ".join(str(paths[k]) for k in ("plot", "sent_plot") if k in paths)
    print(f"tables: {paths['markdown']}, {paths['csv']}" + (f"; figures: {figures}" if figures else ""))
    return paths


def run_study(study: Study, dry_run: bool = False, verbose: bool = False) -> dict[str, Path] | None:
    """Check, run and tabulate a study; returns the table's and figures' paths (None on a dry run)."""
    cells = plan(study)
    if verbose:
        for cell in cells:
            cell["evaluate"].append("--verbose")
    dirs = run_cells(cells, study.out, study.processes, dry_run)
    return None if dry_run or not dirs else finish(dirs, study.out)


@one_line_errors
def main(argv: list[str] | None = None) -> dict[str, Path] | None:
    from jsonargparse import ArgumentParser

    from cascadevlm.errors import parser_kwargs
    from cascadevlm.logs import add_console_arguments, setup_logging, verbosity_of

    p = ArgumentParser(
        prog="python -m cascadevlm.study", description=__doc__.split("\n\n")[0], **parser_kwargs()
    )
    p.add_argument("study", type=str, help="the study file (configs/studies/<name>.yaml)")
    p.add_argument("--dry_run", type=bool, default=False, help="print the commands only")
    p.add_argument(
        "--processes", type=str | None, default=None, help="one (default) or per_step: overrides the file"
    )
    add_console_arguments(p)
    cfg = p.parse_args(argv)
    setup_logging(verbosity_of(cfg.verbose, cfg.quiet))
    study = load_study(cfg.study)
    if cfg.processes is not None:
        if cfg.processes not in PROCESSES:
            raise ValueError(f"--processes must be one of {', '.join(PROCESSES)}, got {cfg.processes!r}")
        study.processes = cfg.processes
    return run_study(study, cfg.dry_run, bool(cfg.verbose))


if __name__ == "__main__":
    main()
