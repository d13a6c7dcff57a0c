"""Turn an official benchmark download into a Hugging Face dataset on disk (train / val / test).

    python -m cascadevlm.data.prepare NAME --raw DIR --out DIR [--split-file split_zhou_X.json]
    python -m cascadevlm.data.prepare [NAME] --wds DIR_OR_HUB_ID --out DIR [--wds-templates]
    cascadevlm-prepare NAME --raw DIR --out DIR

Labels are the registry's class names in registry order (``ClassLabel``). Splits are the official
ones; where the official release has no val split, a seeded class-stratified fraction of train
becomes val. A CoOp-style split file (``{"train"|"val"|"test": [[path, label, classname], ...]}``)
replaces the official splits exactly. Every image is decoded once (in ``--workers`` processes):
unreadable ones stop the run with their list, or are left out with ``--skip-bad``. The same image
(identical stored bytes) in two splits stops the run naming both rows, unless ``--allow-overlap``. The output
directory also holds ``card.md`` and ``card.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from cascadevlm.data.images import ImageLoadError, encode_rgb
from cascadevlm.data.raw_formats import (
    FORMATS,
    ClassIndex,
    Item,
    Listing,
    PrepareError,
    RawFormat,
    ReadOptions,
)
from cascadevlm.data.registry import BenchmarkSpec, get_benchmark
from cascadevlm.errors import one_line_errors

SPLITS = ("train", "val", "test")
_MAX_LISTED_BAD = 50

__all__ = ["BadImagesError", "PrepareError", "carve_val", "main", "prepare", "prepare_wds", "read_split_file"]


class BadImagesError(PrepareError):
    """Some listed images are missing or unreadable; ``bad`` holds (path, reason) for each."""

    def __init__(self, bad: list[tuple[str, str]], good: int, listing_file: Path | None = None):
        self.bad, self.good = bad, good
        lines = [f"  {path}: {reason}" for path, reason in bad[:_MAX_LISTED_BAD]]
        if len(bad) > _MAX_LISTED_BAD:
            more = f"  ... and {len(bad) - _MAX_LISTED_BAD} more"
            lines.append(more + (f" (all listed in {listing_file})" if listing_file else ""))
        super().__init__(
            f"{len(bad)} of {len(bad) + good} listed images could not be read ({good} good); fix or remove "
            "them, or pass --skip-bad to leave them out:\n" + "\n".join(lines)
        )


@dataclass(frozen=True)
class PrepareOptions:
    split_file: Path | None = None
    workers: int = 1
    skip_bad: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    fold: int = 1
    overwrite: bool = False
    allow_overlap: bool = False


# --- locating the download ------------------------------------------------------------------------


def _looks_like(raw: Path, exclude: str) -> list[str]:
    return [name for name, fmt in FORMATS.items() if name != exclude and fmt.find_root(raw) is not None]


def locate(fmt: RawFormat, raw: Path, annotations: bool = True) -> Path:
    """The dataset root inside ``raw``; a wrong or incomplete download fails naming the missing file."""
    if not raw.is_dir():
        raise PrepareError(f"raw directory {raw} does not exist or is not a directory")
    root = fmt.find_root(raw)
    if root is None and not annotations:
        root = fmt.find_image_root(raw)
    if root is not None:
        return root
    # Name the first missing marker under the most complete candidate root.
    candidates = [raw / sub if sub else raw for sub in fmt.roots]
    best = max(candidates, key=lambda r: sum((r / m).exists() for m in fmt.markers))
    missing = next(best / m for m in fmt.markers if not (best / m).exists())
    where = ", ".join(repr(s or ".") for s in fmt.roots)
    msg = (
        f"{raw} does not look like the {fmt.name} download: {missing} not found "
        f"(the dataset root may be any of {where} inside it)"
    )
    others = _looks_like(raw, fmt.name)
    if others:
        msg += f"; it looks like the {others[0]} download instead"
    raise PrepareError(msg)


# --- split files and val ----------------------------------------------------------------------------


def read_split_file(path: Path, fmt: RawFormat, root: Path, spec: BenchmarkSpec) -> Listing:
    """A CoOp-style split file, honoured exactly: the same images in the same splits and order.

    Its labels are mapped to registry labels through its class names (CoOp orders and spells classes
    its own way); a label used for two different classes is an error.
    """
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrepareError(f"split file {path} not found") from None
    except json.JSONDecodeError as err:
        raise PrepareError(f"split file {path} is not valid JSON ({err})") from None
    if not isinstance(payload, dict) or not {"train", "test"} <= set(payload):
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise PrepareError(f"split file {path}: expected keys 'train', 'val', 'test'; got {keys}")
    index = ClassIndex(spec)
    bases = [root / d if d else root for d in fmt.image_dirs]
    label_to_class: dict[int, tuple[int, str]] = {}
    splits: dict[str, list[Item]] = {}
    for split in SPLITS:
        if split not in payload:
            continue
        items = []
        for i, entry in enumerate(payload[split]):
            where = f"split file {path}, {split}[{i}]"
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise PrepareError(f"{where}: expected [path, label, classname], got {entry!r}")
            rel, label, classname = entry
            target = index.lookup(str(classname), where)
            seen = label_to_class.setdefault(int(label), (target, str(classname)))
            if seen[0] != target:
                raise PrepareError(f"{where}: label {label} is {classname!r} here but {seen[1]!r} before")
            file = next((b / rel for b in bases if (b / rel).is_file()), bases[0] / rel)
            items.append((file, target))
        splits[split] = items
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return Listing(splits, f"split file {Path(path).name} (sha256 {digest}...)")


def carve_val(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Move a seeded, class-stratified ``fraction`` of ``items`` to val; both keep the listing order.

    Each class with at least two images gives round(n * fraction) of them, at least one and never all.
    """
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(items):
        by_class.setdefault(label, []).append(i)
    rng = np.random.default_rng(seed)
    to_val: set[int] = set()
    for label in sorted(by_class):
        rows = by_class[label]
        n_val = min(max(round(len(rows) * fraction), 1), len(rows) - 1) if fraction > 0 else 0
        to_val.update(rows[j] for j in rng.permutation(len(rows))[:n_val])
    train = [it for i, it in enumerate(items) if i not in to_val]
    val = [it for i, it in enumerate(items) if i in to_val]
    return train, val


# --- decoding and writing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    """A contiguous run of one split's images, decoded and written to one Arrow file by one worker."""

    split: str
    file: str
    rows: list[tuple[str, int, str]]  # (image path, label, path relative to the raw dir)
    class_names: tuple[str, ...]


def _write_shard(shard: _Shard) -> tuple[list[tuple[str, str]], Counter, list[tuple[str, str]]]:
    """Worker: decode each image once, write the good ones.

    Returns (bad (path, reason) pairs, formats, (sha256 of the stored bytes, relative path) per row).
    """
    from datasets.arrow_writer import ArrowWriter

    bad: list[tuple[str, str]] = []
    formats: Counter = Counter()
    digests: list[tuple[str, str]] = []
    writer = ArrowWriter(features=_features(shard.class_names), path=shard.file, writer_batch_size=128)
    try:
        for path, label, rel in shard.rows:
            try:
                data, fmt = encode_rgb(path)
            except ImageLoadError as err:
                bad.append((path, err.reason))
                continue
            except Exception as err:  # e.g. PIL's DecompressionBombError: report it by file, keep going
                bad.append((path, f"{type(err).__name__}: {err}"))
                continue
            formats[fmt] += 1
            digests.append((hashlib.sha256(data).hexdigest(), rel))
            writer.write({"image": {"bytes": data, "path": None}, "label": label, "path": rel})
        writer.finalize()
    finally:
        writer.close()
    return bad, formats, digests


def _relative(path: Path, raw: Path) -> str:
    try:
        return path.relative_to(raw).as_posix()
    except ValueError:
        return path.as_posix()


def _features(class_names: tuple[str, ...]):
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(class_names)),
            "path": datasets.Value("string"),
        }
    )


def _shards(listing: Listing, spec: BenchmarkSpec, raw: Path, tmp: Path, workers: int) -> list[_Shard]:
    total = sum(len(v) for v in listing.splits.values())
    # Several shards per worker balance the load; a few hundred images each keep the overhead small.
    size = max(64, min(1000, -(-total // (workers * 4))))
    shards = []
    for split in SPLITS:
        rows = [(str(f), label, _relative(f, raw)) for f, label in listing.splits.get(split, [])]
        for k, start in enumerate(range(0, max(len(rows), 1), size)):  # an empty split gets one empty shard
            file = str(tmp / f"{split}-{k:05d}.arrow")
            shards.append(_Shard(split, file, rows[start : start + size], spec.class_names))
    return shards


def _write_splits(
    listing: Listing, spec: BenchmarkSpec, raw: Path, tmp: Path, options: PrepareOptions, log: Callable
) -> tuple[dict[str, list[str]], list[tuple[str, str]], Counter, dict[str, list[tuple[str, str]]]]:
    """Decode every image once (in ``options.workers`` processes); Arrow shard files per split, in order.

    Also returns, per split, (content hash, relative path) of every stored image, in row order.
    """
    shards = _shards(listing, spec, raw, tmp, options.workers)
    total = sum(len(s.rows) for s in shards)
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    bad: list[tuple[str, str]] = []
    formats: Counter = Counter()
    digests: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    done, next_report = 0, max(1000, total // 10)
    pool = get_context().Pool(options.workers) if options.workers > 1 else None
    try:
        results = pool.imap(_write_shard, shards) if pool else map(_write_shard, shards)
        for shard, (shard_bad, shard_formats, shard_digests) in zip(shards, results, strict=True):
            files[shard.split].append(shard.file)
            digests[shard.split] += shard_digests
            bad += shard_bad
            formats += shard_formats
            done += len(shard.rows)
            if done >= next_report and done < total:
                log(f"  {done}/{total} images checked, {len(bad)} bad")
                next_report += max(1000, total // 10)
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return files, bad, formats, digests


def cross_split_duplicates(
    digests: dict[str, list[tuple[str, str]]],
) -> list[tuple[str, int, str, str, int, str]]:
    """Images stored in two splits with identical bytes: (split, row, path, other split, row, path).

    Duplicates within one split are left alone (some official releases have them); only an image in
    two splits leaks test data into training or validation.
    """
    first: dict[str, tuple[str, int, str]] = {}
    pairs = []
    for split in SPLITS:
        for row, (digest, rel) in enumerate(digests.get(split, [])):
            seen = first.setdefault(digest, (split, row, rel))
            if seen[0] != split:
                pairs.append((*seen, split, row, rel))
    return pairs


# --- the card ---------------------------------------------------------------------------------------


def _card(spec, raw, root, listing, labels_per_split, skipped, formats, options, seconds) -> dict:
    splits = {}
    for split, labels in labels_per_split.items():
        counts = np.bincount(np.asarray(labels, dtype=int), minlength=spec.num_classes)
        present = counts[counts > 0]
        splits[split] = {
            "images": int(counts.sum()),
            "classes_present": int(len(present)),
            "images_per_class_min": int(present.min()) if len(present) else 0,
            "images_per_class_max": int(present.max()) if len(present) else 0,
        }
    return {
        "dataset": spec.name,
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "noun": spec.noun,
        "splits": splits,
        "split_source": listing.note,
        "source": {
            "raw_dir": str(raw.resolve()),
            "dataset_root": str(root.resolve()),
            "official_download": spec.source,
            "split_file": str(Path(options.split_file).resolve()) if options.split_file else None,
        },
        "skipped_images": [{"path": p, "reason": r} for p, r in skipped],
        "stored_formats": dict(formats),
        "options": {
            "val_fraction": options.val_fraction,
            "seed": options.seed,
            "fold": options.fold,
            "workers": options.workers,
        },
        "prepared_in_seconds": round(seconds, 1),
        "prepared_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _card_markdown(card: dict) -> str:
    rows = "\n".join(
        f"| {s} | {c['images']} | {c['classes_present']} | {c['images_per_class_min']} | "
        f"{c['images_per_class_max']} |"
        for s, c in card["splits"].items()
    )
    skipped = card["skipped_images"]
    return f"""# {card["dataset"]}

{card["num_classes"]} classes ({card["noun"]}), labels in registry order: {", ".join(card["class_names"][:5])}, ...

| split | images | classes | images/class min | images/class max |
|---|---|---|---|---|
{rows}

- Splits: {card["split_source"]}
- Prepared from: `{card["source"]["raw_dir"]}` (dataset root `{card["source"]["dataset_root"]}`)
- Official download: {card["source"]["official_download"]}
- Skipped unreadable images: {len(skipped)}
- Prepared at {card["prepared_at"]} in {card["prepared_in_seconds"]} s by `cascadevlm.data.prepare`
"""


# --- the entry points -------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise PrepareError(
                f"output {out} already exists and is not empty; pass --overwrite to replace it"
            )
        if out.is_dir() and not (out / "dataset_dict.json").exists():
            raise PrepareError(
                f"refusing to overwrite {out}: it is not a prepared dataset (no dataset_dict.json)"
            )


def prepare(
    name: str, raw: str | Path, out: str | Path, options: PrepareOptions | None = None, log: Callable = print
) -> dict:
    """Prepare benchmark ``name`` from the official download in ``raw`` into ``out``; returns the card."""

    options = options or PrepareOptions()
    started = time.perf_counter()
    raw, out = Path(raw), Path(out)
    try:
        spec = get_benchmark(name)
    except KeyError as err:
        raise PrepareError(err.args[0]) from None
    if spec.name not in FORMATS:
        raise PrepareError(f"{spec.name} has no raw-format reader; preparable: {', '.join(sorted(FORMATS))}")
    fmt = FORMATS[spec.name]
    _check_out(out, options.overwrite)
    root = locate(fmt, raw, annotations=options.split_file is None)
    if options.split_file is not None:
        listing = read_split_file(Path(options.split_file), fmt, root, spec)
    else:
        listing = fmt.read(root, spec, ReadOptions(seed=options.seed, fold=options.fold))
    return _build(spec, listing, raw, root, out, options, log, started)


def _build(spec, listing, raw, root, out, options, log, started, source: dict | None = None) -> dict:
    """Carve val where missing, decode and write every split, and the card; shared by both routes."""
    import datasets

    if "val" not in listing.splits:
        train, val = carve_val(listing.splits["train"], options.val_fraction, options.seed)
        listing = Listing(
            {"train": train, "val": val, "test": listing.splits["test"]},
            f"{listing.note}; val: {options.val_fraction:.0%} of each class of train, seed {options.seed}",
        )
    total = sum(len(v) for v in listing.splits.values())
    log(f"{spec.name}: {total} images listed ({listing.note}); decoding with {options.workers} worker(s)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files, bad, formats, digests = _write_splits(listing, spec, raw, tmp, options, log)
        overlap = cross_split_duplicates(digests)
        if overlap and not options.allow_overlap:
            a_split, a_row, a_path, b_split, b_row, b_path = overlap[0]
            more = f" (and {len(overlap) - 1} more)" if len(overlap) > 1 else ""
            raise PrepareError(
                f"the same image is in {a_split} and {b_split}: {a_split} row {a_row} ({a_path}) and {b_split} "
                f"row {b_row} ({b_path}) have identical bytes{more}; remove the duplicates, or pass "
                "--allow-overlap to keep them"
            )
        if overlap:
            log(f"kept {len(overlap)} image(s) that are in two splits (--allow-overlap)")
        good = total - len(bad)
        if bad and not options.skip_bad:
            listing_file = None
            if len(bad) > _MAX_LISTED_BAD:
                listing_file = out.parent / f"{out.name}.bad-images.txt"
                listing_file.write_text("".join(f"{p}\t{r}\n" for p, r in bad))
            raise BadImagesError(bad, good, listing_file)
        if bad:
            log(f"skipped {len(bad)} unreadable image(s) of {total} (--skip-bad); {good} kept")
        dd = datasets.DatasetDict(
            {
                s: datasets.concatenate_datasets([datasets.Dataset.from_file(f, split=s) for f in files[s]])
                for s in SPLITS
            }
        )
        labels = {s: dd[s]["label"] for s in SPLITS}
        # a split without images (a mirror with test shards only) is left out: saved empty, it cannot be loaded
        dd = datasets.DatasetDict({s: d for s, d in dd.items() if len(d)})
        if out.exists():
            shutil.rmtree(out)
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # we report progress ourselves; the copy is quick
        try:
            dd.save_to_disk(str(out))
        finally:
            if bars:
                datasets.enable_progress_bars()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    card = _card(spec, raw, root, listing, labels, bad, formats, options, time.perf_counter() - started)
    if source:
        card["source"] = source
        card["templates"] = list(spec.templates)
    card["images_in_two_splits"] = [
        {"split": a, "row": ra, "path": pa, "other_split": b, "other_row": rb, "other_path": pb}
        for a, ra, pa, b, rb, pb in overlap
    ]
    (out / "card.json").write_text(json.dumps(card, indent=1))
    (out / "card.md").write_text(_card_markdown(card))
    summary = ", ".join(f"{s} {c['images']}" for s, c in card["splits"].items())
    log(f"wrote {out}: {summary} images, {spec.num_classes} classes")
    return card


def prepare_wds(
    name: str | None,
    wds: str | Path,
    out: str | Path,
    options: PrepareOptions | None = None,
    log: Callable = print,
    keep_templates: bool = False,
) -> dict:
    """Prepare a CLIP_benchmark-style webdataset mirror (a folder or hub id) into ``out``; returns the card.

    With ``name`` the registry's classes are checked against the mirror's ``classnames.txt`` (and its
    templates kept with ``keep_templates``); without, the mirror's own names and templates are used.
    Images are unpacked to a scratch folder and go through the same decoding and writing as ``--raw``.
    """
    from dataclasses import replace

    from cascadevlm.data.registry import GENERIC_TEMPLATES
    from cascadevlm.data.wds import check_class_names, read_mirror, read_shard, resolve_mirror

    options = options or PrepareOptions()
    if options.split_file is not None:
        raise PrepareError("--split-file applies to --raw downloads, not to --wds mirrors")
    started = time.perf_counter()
    out = Path(out)
    _check_out(out, options.overwrite)
    root = resolve_mirror(wds)
    mirror = read_mirror(root)
    if name:
        try:
            spec = get_benchmark(name)
        except KeyError as err:
            raise PrepareError(err.args[0]) from None
        check_class_names(spec.class_names, mirror.class_names, spec.name)
        if keep_templates and mirror.templates:
            spec = replace(spec, templates=mirror.templates)
    else:
        spec = BenchmarkSpec(
            name=root.name.removeprefix("wds_"),
            class_names=mirror.class_names,
            templates=mirror.templates or GENERIC_TEMPLATES,
            source=str(wds),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.wds.", dir=out.parent))
    try:
        splits: dict[str, list[Item]] = {"train": []}
        for split, shard_files in mirror.shards.items():
            items = []
            for shard in shard_files:  # one shard in memory at a time
                for sample in read_shard(shard, len(mirror.class_names)):
                    file = scratch / split / f"{sample.key}.{sample.ext}"
                    file.parent.mkdir(parents=True, exist_ok=True)
                    file.write_bytes(sample.data)
                    items.append((file, sample.label))
            splits[split] = items
        counts = ", ".join(f"{s} {len(v)}" for s, v in splits.items() if s in mirror.shards)
        listing = Listing(splits, f"webdataset mirror {root.name} ({counts})")
        source = {
            "raw_dir": str(root.resolve()),
            "dataset_root": str(root.resolve()),
            "official_download": spec.source,
            "split_file": None,
            "webdataset": str(wds),
        }
        return _build(spec, listing, scratch, scratch, out, options, log, started, source)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Parser(argparse.ArgumentParser):
    """Usage errors raise (the entry point prints them as one ``error:`` line, exit 2) instead of
    printing the usage block."""

    def error(self, message: str):
        raise argparse.ArgumentError(None, message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cascadevlm-prepare",
        description="Prepare a benchmark from its official download as a Hugging Face dataset on disk.",
    )
    p.add_argument("name", nargs="?", help=f"benchmark: {', '.join(sorted(FORMATS))}")
    p.add_argument("--raw", type=Path, help="the extracted official download")
    p.add_argument(
        "--wds", help="a CLIP_benchmark webdataset mirror instead of --raw: a local folder or a hub id"
    )
    p.add_argument(
        "--wds-templates", action="store_true", help="keep the mirror's zero-shot templates (with NAME)"
    )
    p.add_argument("--out", type=Path, help="output directory (DatasetDict.save_to_disk layout + card)")
    p.add_argument(
        "--split-file", type=Path, help="CoOp-style split_*.json to use instead of the official splits"
    )
    p.add_argument("--workers", type=int, default=1, help="processes decoding images (default 1)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images instead of stopping")
    p.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of train moved to val when there is none"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the carved val split and EuroSAT's split")
    p.add_argument("--fold", type=int, default=1, help="DTD fold 1..10")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset at --out")
    p.add_argument(
        "--allow-overlap", action="store_true", help="keep images that are in two splits (refused by default)"
    )
    p.add_argument("--list", action="store_true", help="list the benchmarks with their expected raw layout")
    from cascadevlm.logs import add_console_arguments

    add_console_arguments(p)  # --verbose / --quiet
    from cascadevlm.flags import one_flag_style

    return one_flag_style(p)  # --skip_bad as in train.py / evaluate.py; --skip-bad still works


# by its package name: run as ``python -m`` the module is ``__main__``, outside the project's console
LOGGER = "cascadevlm.data.prepare"


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    """The command line; errors print as one ``error:`` line with exit status 2 (see errors.py)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from cascadevlm.logs import get_logger, setup_logging, verbosity_of

    if args.verbose and args.quiet:
        parser.error("give --verbose or --quiet, not both")
    setup_logging(verbosity_of(args.verbose, args.quiet))
    if args.list:
        for name in sorted(FORMATS):
            spec = get_benchmark(name)
            print(f"{name} ({spec.num_classes} classes): {spec.raw_layout}\n    from {spec.source}")
        return 0
    if args.wds is not None and args.raw is not None:
        parser.error("give either --raw or --wds, not both")
    if args.wds is None and (not args.name or args.raw is None or args.out is None):
        parser.error("NAME, --raw and --out are required (or --wds DIR_OR_HUB_ID --out DIR, or --list)")
    if args.wds is not None and args.out is None:
        parser.error("--wds needs --out")
    if args.wds_templates and args.wds is None:
        parser.error("--wds-templates applies only with --wds")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    options = PrepareOptions(
        split_file=args.split_file,
        workers=max(1, args.workers),
        skip_bad=args.skip_bad,
        val_fraction=args.val_fraction,
        seed=args.seed,
        fold=args.fold,
        overwrite=args.overwrite,
        allow_overlap=args.allow_overlap,
    )
    log = get_logger(LOGGER).info
    if args.wds is not None:
        prepare_wds(args.name, args.wds, args.out, options, log, keep_templates=args.wds_templates)
    else:
        prepare(args.name, args.raw, args.out, options, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
