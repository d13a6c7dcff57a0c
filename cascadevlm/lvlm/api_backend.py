"""Hosted LVLMs behind an OpenAI-compatible chat-completions API (GPT-4V/4o, Gemini, vLLM, ...).

Images travel as base64 data URLs; calls run with bounded concurrency and are retried with exponential
backoff on 429, 5xx, timeouts and connection errors. Every answer is written to a SQLite cache as soon
as it arrives, keyed by model, image content, candidates, prompt and generation parameters, so a rerun
or a resumed run never pays twice. The API key is read from an environment variable when a client is
made and is never stored in the backend's attributes, configs, logs, records or the cache.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Literal

from PIL import Image

from cascadevlm.lvlm.base import LVLMAnswer, LVLMBackend, LVLMRequest
from cascadevlm.lvlm.cache import AnswerCache, cache_key, image_digest
from cascadevlm.lvlm.parsing import UNPARSEABLE, parse_answer
from cascadevlm.lvlm.prompts import Prompt, PromptConfig, build_prompt

log = logging.getLogger(__name__)

API_ERROR = "api_error"


def image_data_url(
    image: Image.Image, fmt: str = "JPEG", max_side: int | None = None, quality: int = 90
) -> str:
    """An image as a ``data:image/...;base64,...`` URL, optionally downscaled to ``max_side`` pixels."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    fmt = fmt.upper()
    image.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    mime = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}.get(fmt, fmt.lower())
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def to_openai_messages(prompt: Prompt, image_urls: list[str]) -> list[dict]:
    """Chat-completions messages: image placeholders become ``image_url`` parts, in order."""
    urls = iter(image_urls)
    out = []
    for m in prompt.messages:
        parts = []
        for part in m["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": next(urls)}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        if m["role"] != "user" and all(p["type"] == "text" for p in parts):
            out.append({"role": m["role"], "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": m["role"], "content": parts})
    return out


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _retriable(err: Exception) -> bool:
    import openai

    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
    return False


class OpenAIBackend(LVLMBackend):
    """Choose among candidates with an OpenAI-compatible chat-completions endpoint (generate + parse).

    Args:
        model: the model name the endpoint expects (e.g. ``gpt-4o``, ``gemini-2.0-flash``).
        base_url: the endpoint (``https://api.openai.com/v1`` when None; Gemini's OpenAI-compatible
            URL, a vLLM server, ...).
        api_key_env: the environment variable holding the key; None for servers without keys.
        prompt: prompt wording and options (see :class:`PromptConfig`).
        cache_path: SQLite answer cache; None disables caching.
        max_concurrency: requests in flight at once.
        max_retries: retries per request on 429, 5xx, timeouts and connection errors.
        timeout_s: per-attempt timeout.
        backoff_s / backoff_max_s: first retry delay, doubled each retry up to the maximum (a server's
            ``Retry-After`` is honoured up to the maximum).
        max_tokens / max_tokens_param: answer length cap and the name the endpoint uses for it
            (``max_tokens``, or ``max_completion_tokens`` for newer OpenAI models).
        temperature: sampling temperature (0 for reproducible answers).
        image_format / image_max_side: how images are encoded before upload.
        extra_body: provider-specific request fields.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        prompt: PromptConfig | None = None,
        cache_path: str | None = "artifacts/lvlm_api_cache.sqlite",
        max_concurrency: int = 4,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_tokens: int = 32,
        max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        temperature: float = 0.0,
        image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG",
        image_max_side: int | None = 1024,
        extra_body: dict | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.prompt = prompt or PromptConfig()
        self.cache_path = cache_path
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_tokens = max_tokens
        self.max_tokens_param = max_tokens_param
        self.temperature = temperature
        self.image_format = image_format
        self.image_max_side = image_max_side
        self.extra_body = extra_body
        self._client = None
        self._cache: AnswerCache | None = None
        self._calls = 0
        self.cache_hits = 0
        self.attempts = 0  # HTTP attempts, retries included
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None  # rebuilt from the environment where it is needed
        state["_cache"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ plumbing
    @property
    def client(self):
        if self._client is None:
            import openai

            env = self.api_key_env
            if env is not None and not os.environ.get(env):
                raise RuntimeError(
                    f"environment variable {env!r} (the API key for {self.model!r}) is not set"
                )
            # A callable: the key is read from the environment per request and kept nowhere else.
            key = (lambda: os.environ[env]) if env is not None else "EMPTY"
            self._client = openai.OpenAI(
                api_key=key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0
            )
        return self._client

    @property
    def cache(self) -> AnswerCache | None:
        if self._cache is None and self.cache_path:
            self._cache = AnswerCache(self.cache_path)
        return self._cache

    def _params(self) -> dict:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "image_format": self.image_format,
            "image_max_side": self.image_max_side,
            "extra_body": self.extra_body,
        }

    def request_key(self, request: LVLMRequest, prompt: Prompt) -> str:
        """Cache key: model, image content hashes, candidates, the prompt text and parameters."""
        texts = [
            [p.get("text", "<image>") for p in m["content"]]
            if isinstance(m["content"], list)
            else m["content"]
            for m in prompt.messages
        ]
        return cache_key(
            {
                "model": self.model,
                "images": [image_digest(im) for im in prompt.images],
                "candidates": list(request.candidates),
                "order": prompt.order,
                "messages": [[m["role"], t] for m, t in zip(prompt.messages, texts, strict=True)],
                "params": self._params(),
            }
        )

    def _call(self, messages: list[dict]) -> str:
        """One chat completion with retries; the answer text."""
        kwargs = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            self.max_tokens_param: self.max_tokens,
        }
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.attempts += 1
            try:
                response = self.client.chat.completions.create(**kwargs)
                return response.choices[0].message.content or ""
            except Exception as err:
                if attempt == self.max_retries or not _retriable(err):
                    raise
                delay = min(self.backoff_max_s, self.backoff_s * 2**attempt)
                hint = _retry_after(err)
                if hint is not None:
                    delay = min(self.backoff_max_s, max(delay, hint))
                delay *= 1.0 + 0.1 * random.random()  # jitter: concurrent retries do not collide
                log.warning("%s: %s; retry %d in %.2fs", self.model, type(err).__name__, attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _answer(self, request: LVLMRequest, prompt: Prompt, raw: str) -> LVLMAnswer:
        shown = parse_answer(raw, prompt.options, prompt.style)
        if shown is None:
            return LVLMAnswer(choice=request.fallback, raw=raw, fallback=UNPARSEABLE)
        return LVLMAnswer(choice=prompt.candidate_of(shown), raw=raw)

    # ------------------------------------------------------------------------------------------ choosing
    def choose(self, requests: list[LVLMRequest]) -> list[LVLMAnswer]:
        prompts = [build_prompt(r, self.prompt) for r in requests]
        keys = [self.request_key(r, p) for r, p in zip(requests, prompts, strict=True)]
        raws: dict[str, str] = {}
        todo: dict[str, int] = {}  # key -> first request needing it (duplicates share one call)
        for i, key in enumerate(keys):
            if key in raws or key in todo:
                continue
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                raws[key] = hit
                self.cache_hits += 1
            else:
                todo[key] = i
        errors: dict[str, str] = {}
        if todo:
            self.client  # noqa: B018 - fail here, not in a worker, when the key is missing
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(todo))) as pool:
                futures = {}
                for key, i in todo.items():
                    urls = [
                        image_data_url(im, self.image_format, self.image_max_side) for im in prompts[i].images
                    ]
                    futures[pool.submit(self._call, to_openai_messages(prompts[i], urls))] = key
                    self._calls += 1
                for fut in as_completed(futures):
                    key = futures[fut]
                    try:
                        raws[key] = fut.result()
                    except Exception as err:  # out of retries, or a 4xx: keep going, do not cache
                        errors[key] = f"{API_ERROR}: {type(err).__name__}"
                        log.error("%s: request failed after retries: %s", self.model, type(err).__name__)
                        continue
                    if self.cache is not None:
                        self.cache.put(key, self.model, raws[key])
        out = []
        for r, p, key in zip(requests, prompts, keys, strict=True):
            if key in errors:
                out.append(LVLMAnswer(choice=r.fallback, raw="", fallback=errors[key]))
            else:
                out.append(self._answer(r, p, raws[key]))
        return out
