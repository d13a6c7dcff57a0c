"""Benchmark registry: class names, prompt templates and LVLM wording for each dataset we know.

Entries are plain data (:class:`BenchmarkSpec`) listed explicitly below; adding a benchmark is adding
one entry to a list, not an import side effect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The generic template ensemble used when a dataset has no templates of its own.
GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a low resolution photo of a {}.",
)


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the framework knows about one benchmark."""

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...] = GENERIC_TEMPLATES
    noun: str = "object"  # what one class is, for LVLM prompts: "aircraft variant", "flower species"
    hub_name: str | None = None  # a Hugging Face hub dataset with the same classes, for users online
    raw_layout: str = ""  # the expected layout of the official raw download (for `prepare`)
    source: str = ""  # where the official archive comes from
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def question(self) -> str:
        """Dataset-aware question for the LVLM stage."""
        return f"Which of these {self.noun}s is shown in the image?"


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
)


def _all_benchmarks() -> dict[str, BenchmarkSpec]:
    from cascadevlm.data.benchmarks import FINE_GRAINED

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


def validate_class_names(class_names: list[str] | tuple[str, ...], where: str = "dataset") -> list[str]:
    """Reject an empty class list and duplicate names (case-insensitive), naming the duplicates."""
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError(f"{where} has an empty class list; at least one class name is needed")
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
