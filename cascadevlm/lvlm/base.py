"""The one interface every LVLM backend implements: choose among candidates for a batch of images."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Exemplar:
    """An in-context example: an image and its class name."""

    image: Image.Image
    class_name: str


@dataclass
class LVLMRequest:
    """One image and its candidate class names, in CLIP's order (most probable first)."""

    image: Image.Image
    candidates: list[str]
    examples: list[Exemplar] = field(default_factory=list)
    fallback: int = 0  # candidate position to use when the answer cannot be parsed (CLIP's top-1)
    key: str | None = None  # stable id of the image (e.g. content hash), for caches


@dataclass
class LVLMAnswer:
    """The backend's decision for one request."""

    choice: int  # position in request.candidates
    raw: str  # the raw answer text ("" for pure scoring)
    scores: list[float] | None = None  # per-candidate scores (e.g. log-likelihoods) where available
    fallback: str | None = None  # why `choice` is the request's fallback, when it is


class LVLMBackend(abc.ABC):
    """Backends choose one candidate per request. A new model family or API is a new subclass."""

    @abc.abstractmethod
    def choose(self, requests: list[LVLMRequest]) -> list[LVLMAnswer]:
        """Answers in the order of ``requests``."""

    @property
    def calls(self) -> int:
        """How many requests reached the model or API (cache hits excluded)."""
        return getattr(self, "_calls", 0)
