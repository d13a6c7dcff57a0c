"""An offline LVLM backend for tests of the cascade's bookkeeping (resume, counting, options).

It answers instantly and deterministically (a hash of the image key picks the candidate), records every
request it receives in :attr:`FakeLVLM.log`, and answers with the API backend's ``api_error`` fallback
for the image keys in :attr:`FakeLVLM.fail_keys` (a failed call). Its answers mean nothing.
"""

from __future__ import annotations

import zlib

from cascadevlm.lvlm.base import LVLMAnswer, LVLMBackend, LVLMRequest


class FakeLVLM(LVLMBackend):
    """Picks candidate ``crc32(key) % len(candidates)``; ``base_url``/``timeout_s`` change nothing.

    Args:
        model: a name (kept in run names and the fingerprint, like a real model id).
        mode: a label only (``score`` or ``generate``), as the real backends have.
        salt: changes every answer (a stand-in for a setting that changes answers).
        base_url, timeout_s: connection settings: accepted and ignored.
    """

    CONNECTION_FIELDS = ("base_url", "timeout_s")
    log: list[LVLMRequest] = []  # every request received, across instances (tests clear it)
    fail_keys: set[str] = set()  # image keys answered with the ``api_error`` fallback

    def __init__(
        self,
        model: str = "fake-lvlm",
        mode: str = "score",
        salt: int = 0,
        base_url: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.model = model
        self.mode = mode
        self.salt = salt
        self._calls = 0

    def choose(self, requests: list[LVLMRequest]) -> list[LVLMAnswer]:
        out = []
        for r in requests:
            FakeLVLM.log.append(r)
            self._calls += 1
            if r.key in FakeLVLM.fail_keys:
                out.append(LVLMAnswer(choice=r.fallback, raw="", fallback="api_error"))
                continue
            choice = zlib.crc32(f"{self.salt}/{r.key}".encode()) % len(r.candidates)
            out.append(LVLMAnswer(choice=choice, raw=r.candidates[choice]))
        return out
