"""An offline LVLM backend that sees the image and reads the candidates: it knows each image's true class.

Tests build its answer key from the dataset itself (:func:`write_truth`), so its answers depend on the
pixels it is shown and on the candidate names in the order given: a wrong image, a reordered candidate
list or an answer read back at the wrong position gives a different class than the reference the test
computes. It answers the true class when it is among the candidates, else the first candidate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from cascadevlm.lvlm.base import LVLMAnswer, LVLMBackend, LVLMRequest


def image_digest(image: Image.Image) -> str:
    """A digest of the decoded pixels (RGB), the same for every decode of the same image."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def write_truth(path: str | Path, images: Iterable[tuple[Image.Image, str]]) -> dict[str, str]:
    """Write the answer key ``{image digest: class name}``; an image that occurs under two classes is
    left out (the oracle then answers the first candidate for it). Returns the key."""
    truth: dict[str, str] = {}
    ambiguous: set[str] = set()
    for image, name in images:
        d = image_digest(image)
        if truth.get(d, name) != name:
            ambiguous.add(d)
        truth[d] = name
    truth = {d: n for d, n in truth.items() if d not in ambiguous}
    Path(path).write_text(json.dumps(truth))
    return truth


class OracleLVLM(LVLMBackend):
    """Chooses the candidate named like the image's true class (position 0 when it is not a candidate).

    Args:
        truth: a JSON file ``{image digest: class name}`` written by :func:`write_truth`.
        model: a name (kept in run names and the fingerprint, like a real model id).
        mode: a label only (``score`` or ``generate``), as the real backends have.
    """

    def __init__(self, truth: str, model: str = "oracle-lvlm", mode: str = "score") -> None:
        self.truth = json.loads(Path(truth).read_text())
        self.model = model
        self.mode = mode
        self._calls = 0

    def choose(self, requests: list[LVLMRequest]) -> list[LVLMAnswer]:
        out = []
        for r in requests:
            self._calls += 1
            name = self.truth.get(image_digest(r.image))
            choice = r.candidates.index(name) if name in r.candidates else 0
            out.append(LVLMAnswer(choice=choice, raw=r.candidates[choice]))
        return out
