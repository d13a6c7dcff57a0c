"""Benchmark registry: class names, prompt templates and LVLM wording for each dataset we know.

Entries are plain data (:class:`BenchmarkSpec`) listed explicitly below; adding a benchmark is adding
one entry to a list, not an import side effect.
"""

from __future__ import annotations

from cascadevlm.data.benchmarks import FINE_GRAINED
from cascadevlm.data.spec import GENERIC_TEMPLATES, BenchmarkSpec

__all__ = [
    "FASHION_MNIST",
    "GENERIC_TEMPLATES",
    "BenchmarkSpec",
    "benchmark_names",
    "get_benchmark",
    "match_class_names",
    "validate_class_names",
]

FASHION_MNIST = BenchmarkSpec(
    name="fashion_mnist",
    class_names=(
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ),  # fmt: skip
    templates=(
        "a photo of a {}.",
        "a photo of a {}, a type of clothing.",
        "a black and white photo of a {}.",
        "a low resolution photo of a {}.",
        "a product photo of a {}.",
    ),
    noun="clothing item",
    hub_name="zalando-datasets/fashion_mnist",
    raw_layout="train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz (IDX files)",
    source="Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or the hub",
    # The hub copy's ClassLabel spelling, so its labels are matched to these names by name.
    extra={
        "raw_names": (
            "T - shirt / top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        )  # fmt: skip
    },
)


def _all_benchmarks() -> dict[str, BenchmarkSpec]:
    specs = [FASHION_MNIST, *FINE_GRAINED]
    return {s.name: s for s in specs}


def benchmark_names() -> list[str]:
    return sorted(_all_benchmarks())


def get_benchmark(name: str) -> BenchmarkSpec:
    """The registry entry for ``name``; a clear error lists the known names."""
    table = _all_benchmarks()
    key = name.lower().replace("-", "_")
    if key not in table:
        raise KeyError(f"unknown dataset {name!r}; known benchmarks: {', '.join(sorted(table))}")
    return table[key]


def _short(names: list[str], n: int = 5) -> str:
    return repr(names[:n])[:-1] + (", ...]" if len(names) > n else "]")


def match_class_names(spec: BenchmarkSpec, names: list[str], dataset: str) -> list[str]:
    """The registry's spelling of a dataset's own class names, in the dataset's label order.

    Names are matched by name (case, spaces, underscores, hyphens and the official spellings in
    ``extra["raw_names"]`` do not matter), never by position, so a dataset whose classes are ordered
    differently from the registry still gives every label its right name. A dataset whose classes are
    not exactly the benchmark's (other names, class ids as names, a subset) is refused.
    """
    from cascadevlm.data.raw_formats._common import ClassIndex

    index = ClassIndex(spec)
    ids = [index.find(n) for n in names]
    unmatched = [n for n, i in zip(names, ids, strict=True) if i is None]
    found = {i for i in ids if i is not None}
    absent = [c for i, c in enumerate(spec.class_names) if i not in found]
    twice = [n for n, i in zip(names, ids, strict=True) if i is not None and ids.count(i) > 1]
    if unmatched or absent or twice:
        diff = []
        if unmatched:
            diff.append(f"{len(unmatched)} not in the registry: {_short(unmatched)}")
        if absent:
            diff.append(f"{len(absent)} registry classes absent: {_short(absent)}")
        if twice:
            diff.append(f"matched twice: {_short(twice)}")
        raise ValueError(
            f"dataset {dataset!r} has class names that differ from benchmark {spec.name!r}'s "
            f"({len(names)} vs {spec.num_classes}; {'; '.join(diff)}); pass --data.class_names with its own "
            "names in label order, or --data.benchmark for the benchmark it is"
        )
    return [spec.class_names[i] for i in ids]


def validate_class_names(class_names: list[str] | tuple[str, ...], where: str = "dataset") -> list[str]:
    """Reject an empty class list and duplicate names (case-insensitive), naming the duplicates."""
    names = list(map(str, class_names))
    if not names:
        raise ValueError(f"{where} has an empty class list; at least one class name is needed")
    keys = [n.strip().lower() for n in names]
    if all(keys) and len(set(keys)) == len(keys):
        return names  # the usual case, in one pass (the checks below name what is wrong)
    empty = [i for i, n in enumerate(names) if not n.strip()]
    if empty:  # a blank name gives a prompt without its class ("a photo of a .")
        raise ValueError(f"{where} has empty class names (class ids {empty[:10]}); give every class a name")
    seen: dict[str, str] = {}
    dups = []
    for n in names:
        k = n.strip().lower()
        if k in seen:
            dups.append(n)
        seen.setdefault(k, n)
    if dups:
        raise ValueError(f"{where} has duplicate class names: {sorted(set(dups))}")
    return names


def _fills(template: str) -> bool:
    """``template`` has one ``{}`` and formats with a class name (no other placeholder or stray brace)."""
    try:
        return "{}" in template and template.format("x") != template
    except (IndexError, KeyError, ValueError):
        return False


def normalise_templates(templates: list[str] | tuple[str, ...], where: str) -> list[str]:
    """Prompt templates with ``{}`` for the class name: CLIP_benchmark's ``{c}`` spelling ("a photo of a
    {c}.") becomes ``{}``. A template that cannot take the class name is refused, naming ``where`` (the
    flag or file it came from), so no stage runs with it."""
    out = [str(t).replace("{c}", "{}") for t in templates]
    bad = [str(t) for t, n in zip(templates, out, strict=True) if not _fills(n)]
    if bad:
        raise ValueError(
            f"prompt templates must contain '{{}}' or '{{c}}' where the class name goes, once; {where} has {bad}"
        )
    return out
