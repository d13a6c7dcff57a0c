"""What a benchmark is (:class:`BenchmarkSpec`) and the generic CLIP templates.

The lowest module of the data layer: the registry, the fine-grained entries and the raw-format readers
all build on it, and it imports none of them.
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
