"""The one interface every LVLM backend implements: choose among candidates for a batch of images."""

from __future__ import annotations

import abc
import dataclasses
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# ``LVLMAnswer.fallback`` values that mean "no answer was obtained" (the API backend's ``API_ERROR``):
# such answers are stored (the run can finish with CLIP's top-1) but a rerun asks those images again.
RETRY_FALLBACKS = ("api_error",)


def needs_retry(fallback: str | None) -> bool:
    """Whether an answer with this fallback is a failed call that a rerun should ask again."""
    return bool(fallback) and fallback.startswith(RETRY_FALLBACKS)


# Field metadata of a setting added after runs were made: left out of the answer fingerprint while it
# has its default (which answers the way runs made before it did), so those runs keep their identity
# (run name, resume, answer store); in it as soon as it is set.
NEW_SETTING = {"fingerprint": "when_set"}


def _plain(value):
    """A JSON-able form of an init argument (dataclasses as dicts, paths as strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not (f.metadata.get("fingerprint") == "when_set" and getattr(value, f.name) == f.default)
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


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
    prompt_tokens: int | None = None  # API backends: the response's usage (None where not reported)
    completion_tokens: int | None = None


class LVLMBackend(abc.ABC):
    """Backends choose one candidate per request. A new model family or API is a new subclass."""

    # Init arguments that change how answers are fetched, never which answer (hosts, timeouts, pools,
    # caches): left out of :meth:`answer_fingerprint`, so a run moved to another port still resumes.
    CONNECTION_FIELDS: tuple[str, ...] = ()

    def __new__(cls, *args, **kwargs):
        # Record the init arguments (defaults filled in) for answer_fingerprint, whatever the subclass.
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
            bound.apply_defaults()
            self._init_config = {k: v for k, v in list(bound.arguments.items())[1:]}
        except TypeError:  # __init__ will raise the same error with its own message
            self._init_config = {}
        return self

    def answer_fingerprint(self) -> dict:
        """What decides this backend's answers (for the resume fingerprint): its init arguments
        minus :attr:`CONNECTION_FIELDS`. Override when answers depend on something else too."""
        config = getattr(self, "_init_config", {})
        return {
            "backend": f"{type(self).__module__}.{type(self).__qualname__}",
            **{k: _plain(v) for k, v in sorted(config.items()) if k not in self.CONNECTION_FIELDS},
        }

    @abc.abstractmethod
    def choose(self, requests: list[LVLMRequest]) -> list[LVLMAnswer]:
        """Answers in the order of ``requests``."""

    @property
    def calls(self) -> int:
        """How many requests reached the model or API (cache hits excluded)."""
        return getattr(self, "_calls", 0)
