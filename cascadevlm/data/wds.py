"""CLIP_benchmark-style webdataset mirrors (``clip-benchmark/wds_*`` on the hub, or a local copy).

A mirror holds tar shards per split (``<split>/*.tar`` or ``<split>-*.tar`` / ``<split>.tar``) whose
samples are an image (``jpg``/``png``/``webp``/...) and a class index (``cls``), grouped by key the
webdataset way (the member name up to the first dot of its basename), plus ``classnames.txt`` and
``zeroshot_classification_templates.txt``. Shards are read with the stdlib :mod:`tarfile`.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from cascadevlm.data.raw_formats import PrepareError
from cascadevlm.data.registry import normalise_templates, validate_class_names

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
# Split names as mirrors spell them -> ours.
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

__all__ = [
    "Mirror",
    "WdsSample",
    "check_class_names",
    "normalise_name",
    "read_mirror",
    "read_shard",
    "resolve_mirror",
]


@dataclass(frozen=True)
class WdsSample:
    key: str  # "<shard name>/<sample key>", unique within the mirror
    ext: str
    data: bytes
    label: int


@dataclass(frozen=True)
class Mirror:
    root: Path
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    shards: dict[str, list[Path]]  # split -> its tar shards, in order; read one at a time with read_shard


def resolve_mirror(source: str | Path) -> Path:
    """A local mirror folder as is; otherwise a hub dataset id, downloaded with ``snapshot_download``."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or str(source).startswith((".", "/")) or str(source).count("/") != 1:
        raise PrepareError(
            f"--wds {source}: not a folder of webdataset shards nor a hub id like clip-benchmark/wds_cars"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(source), repo_type="dataset"))
    except Exception as err:  # offline, unknown id, ...: one line naming the cause
        raise PrepareError(
            f"--wds {source}: could not download the hub dataset ({type(err).__name__}: {err})"
        ) from None


def _read_lines(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _check_nshards(folder: Path, files: list[Path]) -> None:
    """A split folder's ``nshards.txt`` (CLIP_benchmark writes one) must match the shards present: a
    missing shard would silently prepare fewer images."""
    count_file = folder / "nshards.txt"
    if not count_file.is_file():
        return
    text = count_file.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise PrepareError(f"{count_file} should hold the number of shards, got {text[:20]!r}")
    expected = int(text)
    if len(files) != expected:
        present = {f.name for f in files}
        missing = [f"{i}.tar" for i in range(expected) if f"{i}.tar" not in present]
        which = f" (missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})" if missing else ""
        raise PrepareError(
            f"{folder}: nshards.txt says {expected} shards but {len(files)} are there{which}; "
            "download the missing shards again"
        )


def _shard_files(root: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for alias, split in SPLIT_ALIASES.items():
        files = sorted((root / alias).glob("*.tar")) if (root / alias).is_dir() else []
        _check_nshards(root / alias, files)
        files += sorted(root.glob(f"{alias}-*.tar")) + sorted(root.glob(f"{alias}.tar"))
        if files:
            found.setdefault(split, []).extend(files)
    return found


def _ends_cleanly(file: Path, offset: int) -> bool:
    """The archive has its end-of-archive (zero) block where :mod:`tarfile` stopped reading: tarfile
    ends a truncated archive silently when the cut falls on a header boundary."""
    with open(file, "rb") as fh:
        fh.seek(offset)
        block = fh.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def read_shard(file: Path, num_classes: int) -> list[WdsSample]:
    """Samples of one shard in stored order; a sample without an image or ``cls`` is an error."""
    parts: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(file) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key = f"{dirname}/{stem}" if dirname else stem
                parts.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
            complete = _ends_cleanly(file, tar.offset)
    except tarfile.TarError as err:
        raise PrepareError(f"{file} is truncated or corrupt ({err}); download the shard again") from None
    if not complete:
        raise PrepareError(
            f"{file} is truncated (it ends before the tar end-of-archive block); download the shard again"
        )
    if not parts:
        raise PrepareError(f"{file} is an empty tar shard (no samples); download the shard again")
    samples = []
    for key, fields in parts.items():
        ext = next((e for e in IMAGE_EXTS if e in fields), None)
        if ext is None or "cls" not in fields:
            missing = "an image (" + "/".join(IMAGE_EXTS[:4]) + ")" if ext is None else "cls"
            raise PrepareError(f"{file}: sample {key!r} has no {missing}; fields: {sorted(fields)}")
        try:
            label = int(fields["cls"].decode().strip())
        except ValueError:
            raise PrepareError(
                f"{file}: sample {key!r} has cls {fields['cls'][:20]!r}, not an integer"
            ) from None
        if not 0 <= label < num_classes:
            raise PrepareError(
                f"{file}: sample {key!r} has cls {label}, outside 0..{num_classes - 1} (classnames.txt)"
            )
        samples.append(WdsSample(f"{file.stem}/{key}", ext, fields[ext], label))
    return samples


def read_mirror(root: Path) -> Mirror:
    """Class names, templates and every split's shards of the mirror in ``root`` (shards not read yet)."""
    names_file = root / "classnames.txt"
    if not names_file.is_file():
        raise PrepareError(f"{root} is not a CLIP_benchmark webdataset mirror: classnames.txt not found")
    class_names = _read_lines(names_file)
    validate_class_names(class_names, f"class-names file {names_file}")  # empty or duplicated: refused
    templates_file = root / "zeroshot_classification_templates.txt"
    lines = _read_lines(templates_file) if templates_file.is_file() else ()
    templates = tuple(normalise_templates(lines, str(templates_file))) if lines else ()  # "{c}" -> "{}"
    files = _shard_files(root)
    if "test" not in files:
        raise PrepareError(f"{root}: no test shards (expected test/*.tar or test-*.tar)")
    return Mirror(root, class_names, templates, files)


def normalise_name(name: str) -> str:
    """Spelling-insensitive form: case, underscores and hyphens do not matter."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", name)).strip().casefold()


def check_class_names(registry: tuple[str, ...], mirror: tuple[str, ...], dataset: str) -> None:
    """Refuse a mirror whose classes differ from the registry's in count, order or spelling.

    Names equal after :func:`normalise_name` count as equal. The error has a table of the differing ones.
    """
    if len(registry) != len(mirror):
        detail = f"{len(mirror)} classes in classnames.txt but {len(registry)} in the registry"
    else:
        detail = None
    pairs = list(zip(registry, mirror, strict=False))
    differ = [(i, r, m) for i, (r, m) in enumerate(pairs) if normalise_name(r) != normalise_name(m)]
    if detail is None and not differ:
        return
    if detail is None:
        detail = f"{len(differ)} of {len(registry)} class names differ"
    table = ["  id | registry | classnames.txt"] + [f"  {i} | {r} | {m}" for i, r, m in differ[:50]]
    if len(differ) > 50:
        table.append(f"  ... and {len(differ) - 50} more")
    raise PrepareError(
        f"the mirror's classnames.txt does not match the registry's {dataset} classes ({detail}); prepare it "
        "without NAME to use the mirror's own names:\n" + "\n".join(table)
    )
