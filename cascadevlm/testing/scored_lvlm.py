"""An offline LVLM backend with candidate scores, for tests of several LVLM stages (``cascade.stages``).

Its scores are a deterministic hash of (salt, image key, candidate name) scaled by ``sharpness``, so
its gate (margin, entropy) varies from image to image; the answer is the best-scored candidate. With
``truth`` (an answer key of :func:`cascadevlm.testing.oracle_lvlm.write_truth`) the true class gets
``skill`` added to its score: a stronger model is a larger ``skill``. ``seconds_per_image`` sleeps to
make it cost something measurable. Every request is logged in :attr:`ScoredLVLM.log` by model name.

The environment variable ``CASCADEVLM_TEST_EXIT`` = ``<model>:<n>`` makes the backend of that model
name end the process with ``os._exit(137)`` (as ``kill -9`` would: nothing flushed, no handler runs)
when its (n+1)-th batch starts: a crash in the middle of a stage, for the resume tests.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

from cascadevlm.lvlm.base import LVLMAnswer, LVLMBackend, LVLMRequest
from cascadevlm.testing.oracle_lvlm import image_digest

EXIT_ENV = "CASCADEVLM_TEST_EXIT"


class ScoredLVLM(LVLMBackend):
    """Scores each candidate; chooses the best.

    Args:
        model: a name (kept in run names and the fingerprint, like a real model id).
        mode: ``score`` (scores returned) or ``generate`` (no scores, as a generating backend).
        salt: changes every score.
        sharpness: scale of the hashed scores (larger: more confident answers).
        truth: optional answer key ``{image digest: class name}`` (JSON file).
        skill: added to the true class's score when ``truth`` is given.
        seconds_per_image: wall time spent per request (a connection-like setting: answers unchanged).
    """

    CONNECTION_FIELDS = ("seconds_per_image",)
    log: dict[str, list[str]] = {}  # model name -> request keys received, across instances

    def __init__(
        self,
        model: str = "scored-lvlm",
        mode: str = "score",
        salt: int = 0,
        sharpness: float = 3.0,
        truth: str | None = None,
        skill: float = 0.0,
        seconds_per_image: float = 0.0,
    ) -> None:
        self.model = model
        self.mode = mode
        self.salt = salt
        self.sharpness = sharpness
        self.truth = json.loads(Path(truth).read_text()) if truth else {}
        self.skill = skill
        self.seconds_per_image = seconds_per_image
        self._calls = 0
        self._batches = 0

    def _maybe_exit(self) -> None:
        spec = os.environ.get(EXIT_ENV, "")
        name, _, n = spec.rpartition(":")
        if name == self.model and n.isdigit() and self._batches >= int(n):
            os._exit(137)

    def choose(self, requests: list[LVLMRequest]) -> list[LVLMAnswer]:
        self._maybe_exit()
        self._batches += 1
        out = []
        for r in requests:
            ScoredLVLM.log.setdefault(self.model, []).append(r.key)
            self._calls += 1
            if self.seconds_per_image:
                time.sleep(self.seconds_per_image)
            true = self.truth.get(image_digest(r.image)) if self.truth else None
            scores = []
            for name in r.candidates:
                h = zlib.crc32(f"{self.salt}/{r.key}/{name}".encode()) / 2**32
                scores.append(self.sharpness * h + (self.skill if name == true else 0.0))
            best = max(range(len(scores)), key=lambda c: (scores[c], -c))
            out.append(
                LVLMAnswer(
                    choice=best, raw=r.candidates[best], scores=None if self.mode == "generate" else scores
                )
            )
        return out
