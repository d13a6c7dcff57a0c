"""LVLMs behind an OpenAI-compatible chat-completions API: hosted (GPT-4o, Gemini) or served (vLLM, SGLang).

Two answer modes, as for the local backend:

* ``generate``: the model writes an answer and the parser maps it to an option; with ``guided_choice``
  a serving engine constrains the answer to the options' texts.
* ``score``: lettered options, one request per image with ``max_tokens: 1, logprobs: true,
  top_logprobs: N``; each candidate's score is the log-probability that the first answer token is its
  letter (tokens normalised: surrounding spaces, brackets and dots stripped, upper-cased; the variants
  of one letter, e.g. ``"B"`` and ``" B"``, are summed in probability). A letter absent from the
  ``top_logprobs`` scores ``-inf`` (its log-probability is below the N-th, unknown). The choice is the
  argmax (ties: the candidate CLIP ranked higher). No candidate letter at all among the generated
  token and its ``top_logprobs``: CLIP's top-1 with ``fallback="unparseable"`` and no scores.

Images travel as base64 data URLs, capped by ``image_max_side`` and ``max_pixels`` before encoding.
Requests run on one persistent thread pool that keeps ``max_concurrency`` requests in flight over a
whole stage batch (``stage_batch_size`` images: the LVLM stage hands this backend large batches), with
an optional ``requests_per_minute`` limit. 429, 5xx, timeouts and connection errors are retried with
exponential backoff; ``Retry-After`` (seconds or an HTTP date) is honoured. 401, 403 and 404 stop the
run at the first request (the first request of a backend runs alone, so a bad key costs one request),
and so do a server that cannot be reached at all and ``max_consecutive_failures`` failures in a row.
Any other failure gives CLIP's top-1 with ``fallback == API_ERROR`` exactly and is never cached, so a
rerun asks again. Every answer is written to a SQLite cache as soon as it arrives, keyed by model,
image content, candidates, prompt and the parameters that change an answer. The API key is read from
an environment variable per request and never stored in the backend, configs, logs, records or cache.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import timezone
from email.utils import parsedate_to_datetime
from itertools import islice
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from PIL import Image

from cascadevlm.lvlm.base import LVLMAnswer, LVLMBackend, LVLMRequest
from cascadevlm.lvlm.cache import AnswerCache, cache_key, image_digest
from cascadevlm.lvlm.parsing import UNPARSEABLE, parse_answer
from cascadevlm.lvlm.prompts import LETTERS, Prompt, PromptConfig, answer_tokens, build_prompt

log = logging.getLogger(__name__)

# ``LVLMAnswer.fallback`` of an answer the API could not give (out of retries, another 4xx, no choices):
# exactly this string. Such answers are not cached; a rerun asks them again.
API_ERROR = "api_error"
OPENAI_URL = "https://api.openai.com/v1"


def _count(usage, name: str) -> int | None:
    """An integer field of an OpenAI ``usage`` object (or dict), None when absent."""
    value = usage.get(name) if isinstance(usage, dict) else getattr(usage, name, None)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class APIFatalError(RuntimeError):
    """An API error no retry and no other image can fix (bad key, no such model, no log-probabilities):
    the run stops at once with this one-line message."""


def limit_pixels(
    image: Image.Image, max_side: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """``image`` shrunk (aspect kept, bicubic) so its longer side is <= ``max_side`` and its area is
    <= ``max_pixels``; the same object when it already fits."""
    w, h = image.size
    scale = 1.0
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
    if max_pixels and w * h * scale * scale > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
    if scale >= 1.0:
        return image
    size = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def image_data_url(
    image: Image.Image,
    fmt: str = "JPEG",
    max_side: int | None = None,
    quality: int = 90,
    max_pixels: int | None = None,
) -> str:
    """An image as a ``data:image/...;base64,...`` URL, first shrunk to ``max_side`` / ``max_pixels``."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    image = limit_pixels(image, max_side, max_pixels)
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


def retry_after_seconds(headers, now: float | None = None) -> float | None:
    """The wait a response asks for: ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP date
    (RFC 9110; a date in the past means 0). None when absent or unreadable."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse naive; HTTP dates are always UTC
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _retriable(err: Exception) -> bool:
    import openai

    if isinstance(err, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
    return False


def normalize_letter_token(token: str) -> str:
    """``" B"``, ``"b"``, ``"(B"``, ``"B."`` -> ``"B"``: the form a first answer token is compared in."""
    return token.strip().strip("()[]*.:\"'`").strip().upper()


def letter_scores(tokens: list[tuple[str, float]], num_options: int) -> list[float]:
    """Per displayed option ``d``, the log-probability that the first token is letter ``LETTERS[d]``:
    log-sum-exp over the distinct tokens that normalise to it; ``-inf`` when none does."""
    seen: dict[str, float] = {}
    for tok, lp in tokens:
        seen.setdefault(tok, float(lp))  # the same token listed twice (generated + top) counts once
    out = [-math.inf] * num_options
    for tok, lp in seen.items():
        norm = normalize_letter_token(tok)
        if len(norm) == 1 and norm in LETTERS[:num_options]:
            d = LETTERS.index(norm)
            out[d] = lp if out[d] == -math.inf else max(out[d], lp) + math.log1p(math.exp(-abs(out[d] - lp)))
    return out


class RateLimiter:
    """At most ``per_minute`` starts a minute, evenly spaced (no bursts); shared by all threads."""

    def __init__(self, per_minute: float, clock=time.monotonic, sleep=time.sleep) -> None:
        self.interval = 60.0 / per_minute
        self.clock, self.sleep = clock, sleep
        self._next = -math.inf
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


class _Progress:
    """A tqdm bar for one stage: images/s and time left from tqdm, cache hits, retries and errors."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        # disable=None: shown on a terminal only, so logs and CI output stay clean
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=None if enabled else True, leave=True)
        self.t0 = time.perf_counter()
        self.n = 0  # counted here: a disabled bar counts nothing

    def update(self, n: int, backend: OpenAIBackend) -> None:
        if n:
            self.n += n
            self.bar.update(n)
            self.bar.set_postfix(
                hits=backend.cache_hits, retries=backend.retries, errors=backend.errors, refresh=False
            )

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.t0


class OpenAIBackend(LVLMBackend):
    """Choose among candidates with an OpenAI-compatible chat-completions endpoint.

    Args:
        model: the model name the endpoint expects (``gpt-4o``, ``Qwen/Qwen2.5-VL-7B-Instruct``, ...).
        base_url: the endpoint (``https://api.openai.com/v1`` when None; Gemini's OpenAI-compatible
            URL, ``http://host:8000/v1`` for vLLM / SGLang, ...).
        api_key_env: the environment variable holding the key; None for servers without keys.
        prompt: prompt wording and options (see :class:`PromptConfig`).
        mode: ``generate`` (answer text, parsed) or ``score`` (the answer letter's log-probabilities;
            needs ``prompt.options: letters`` and a server that returns ``logprobs``).
        top_logprobs: how many alternatives of the first token the server returns in score mode
            (OpenAI allows up to 20; vLLM up to its ``--max-logprobs``, 20 by default).
        guided_choice: generate mode only: constrain the answer to the options' answer texts:
            ``structured_outputs`` (vLLM >= 0.10.2, the only form from 0.12: ``{"structured_outputs":
            {"choice": [...]}}``), ``guided_choice`` (older vLLM: ``{"guided_choice": [...]}``),
            ``regex`` (SGLang: ``{"regex": "(A|B|...)"}``); ``true`` means ``structured_outputs``.
        cache_path: SQLite answer cache; None disables caching.
        max_concurrency: requests in flight at once (per process / rank).
        stage_batch_size: images the LVLM stage hands this backend at once (the pool stays full
            within a batch; answers are written to the run's part file after each batch).
        requests_per_minute: optional limit on request starts (retries included), for hosted APIs.
        max_retries: retries per request on 429, 5xx, timeouts and connection errors.
        max_consecutive_failures: stop the run when this many requests in a row failed after their
            retries (a server that went away), rather than give every remaining image CLIP's answer;
            0 never stops. A first request that cannot reach the server at all always stops the run.
        timeout_s: per-attempt timeout.
        backoff_s / backoff_max_s: first retry delay, doubled each retry up to the maximum (a server's
            ``Retry-After`` is honoured up to the maximum).
        max_tokens / max_tokens_param: answer length cap (generate mode; score mode sends 1; unset: 32,
            or 512 with ``prompt.reasoning``) and the
            name the endpoint uses for it (``max_tokens``, or ``max_completion_tokens``).
        temperature: sampling temperature (0 for reproducible answers).
        image_format / image_max_side / max_pixels: how images are encoded: longer side and area caps
            applied (aspect kept) before encoding.
        extra_body: provider-specific request fields.
        progress: show a progress bar (on a terminal) with images/s, cache hits, retries and time left.
    """

    # Settings that change how answers are fetched, never which answer: left out of the resume
    # fingerprint, so moving a run to another host, port or pool size resumes it.
    CONNECTION_FIELDS = (
        "base_url",
        "api_key_env",
        "cache_path",
        "max_concurrency",
        "stage_batch_size",
        "requests_per_minute",
        "max_retries",
        "max_consecutive_failures",
        "timeout_s",
        "backoff_s",
        "backoff_max_s",
        "max_tokens_param",
        "progress",
    )

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        prompt: PromptConfig | None = None,
        mode: Literal["generate", "score"] = "generate",
        top_logprobs: int = 20,
        guided_choice: bool | Literal["structured_outputs", "guided_choice", "regex"] = False,
        cache_path: str | None = "artifacts/lvlm_api_cache.sqlite",
        max_concurrency: int = 16,
        stage_batch_size: int = 256,
        requests_per_minute: float | None = None,
        max_retries: int = 5,
        max_consecutive_failures: int = 32,
        timeout_s: float = 60.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_tokens: int | None = None,
        max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        temperature: float = 0.0,
        image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG",
        image_max_side: int | None = 1024,
        max_pixels: int | None = None,
        extra_body: dict | None = None,
        progress: bool = True,
    ) -> None:
        self.prompt = prompt or PromptConfig()
        for name, value in (("max_concurrency", max_concurrency), ("stage_batch_size", stage_batch_size),
                            ("top_logprobs", top_logprobs)):  # fmt: skip
            if value < 1:
                raise ValueError(f"lvlm.init_args.{name} must be >= 1, got {value}")
        if max_consecutive_failures < 0:
            raise ValueError(
                f"lvlm.init_args.max_consecutive_failures must be >= 0, got {max_consecutive_failures}"
            )
        if requests_per_minute is not None and not requests_per_minute > 0:
            raise ValueError(
                f"lvlm.init_args.requests_per_minute must be > 0 or null, got {requests_per_minute}"
            )
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"lvlm.init_args.max_pixels must be >= 1 or null, got {max_pixels}")
        if mode not in ("generate", "score"):
            raise ValueError(f"lvlm.init_args.mode must be generate or score, got {mode!r}")
        guided = "structured_outputs" if guided_choice is True else (guided_choice or None)
        if guided not in (None, "structured_outputs", "guided_choice", "regex"):
            raise ValueError(
                "lvlm.init_args.guided_choice must be false, true, structured_outputs, guided_choice or "
                f"regex, got {guided_choice!r}"
            )
        if mode == "score" and self.prompt.options != "letters":
            raise ValueError(
                "lvlm.init_args.mode score reads the log-probabilities of the answer letter and needs "
                f"lettered options: set lvlm.init_args.prompt.options letters (got {self.prompt.options!r}) "
                "or lvlm.init_args.mode generate"
            )
        if mode == "score" and guided:
            raise ValueError(
                "lvlm.init_args.guided_choice constrains generated answers (mode generate); score mode "
                "already reads every letter's log-probability: set guided_choice false"
            )
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.mode = mode
        self.top_logprobs = top_logprobs
        self.guided_choice = guided_choice
        self._guided = guided
        self.cache_path = cache_path
        self.max_concurrency = max_concurrency
        self.stage_batch_size = stage_batch_size
        self.requests_per_minute = requests_per_minute
        self.max_retries = max_retries
        self.max_consecutive_failures = max_consecutive_failures
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_tokens = answer_tokens(self.prompt, mode, max_tokens, "lvlm.init_args.max_tokens", 32)
        self._init_config["max_tokens"] = self.max_tokens  # the length used, in the fingerprint
        self.max_tokens_param = max_tokens_param
        self.temperature = temperature
        self.image_format = image_format
        self.image_max_side = image_max_side
        self.max_pixels = max_pixels
        self.extra_body = extra_body
        self.progress = progress
        self._calls = 0
        self.cache_hits = 0
        self.attempts = 0  # HTTP attempts, retries included
        self.retries = 0
        self.errors = 0  # requests answered with the API_ERROR fallback
        self._init_runtime()

    def _init_runtime(self) -> None:
        """What is rebuilt in each process: client, cache connection, pool, locks, limiter."""
        self._client = None
        self._cache: AnswerCache | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._probed = False  # the first request of a backend runs alone (a bad key costs one)
        self._consecutive_failures = 0
        self._sleep = time.sleep  # tests replace it to observe waits without waiting
        self._limiter = RateLimiter(self.requests_per_minute) if self.requests_per_minute else None
        self._progress: _Progress | None = None
        # token usage of the requests fetched in the current ``choose`` (key -> (prompt, completion))
        self._usage: dict[str, tuple[int | None, int | None]] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in (
            "_client",
            "_cache",
            "_pool",
            "_lock",
            "_sleep",
            "_limiter",
            "_progress",
            "_probed",
            "_consecutive_failures",
            "_usage",
        ):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # ------------------------------------------------------------------------------------------ plumbing
    @property
    def url(self) -> str:
        """The endpoint as shown in messages (credentials in the URL, if any, left out)."""
        parts = urlsplit(self.base_url or OPENAI_URL)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")

    @property
    def client(self):
        if self._client is None:
            import openai

            env = self.api_key_env
            if env is not None and not os.environ.get(env):
                raise APIFatalError(
                    f"environment variable {env} (the API key for {self.model!r} at {self.url}) is not set: "
                    f"export {env}=..., or set lvlm.init_args.api_key_env (null for a server without keys)"
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

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="lvlm-api")
        return self._pool

    def _params(self) -> dict:
        """Everything besides model, images and prompt that changes an answer (part of the cache key)."""
        params = {
            "max_tokens": 1 if self.mode == "score" else self.max_tokens,
            "temperature": self.temperature,
            "image_format": self.image_format,
            "image_max_side": self.image_max_side,
            "extra_body": self.extra_body,
        }
        # Added only when used, so caches written before these options existed stay valid.
        if self.mode == "score":
            params.update(mode="score", top_logprobs=self.top_logprobs)
        if self._guided:
            params["guided_choice"] = self._guided
        if self.max_pixels:
            params["max_pixels"] = self.max_pixels
        return params

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

    def _request_kwargs(self, prompt: Prompt) -> dict:
        """The request's JSON body (OpenAI chat-completions fields plus ``extra_body``'s)."""
        urls = [
            image_data_url(im, self.image_format, self.image_max_side, max_pixels=self.max_pixels)
            for im in prompt.images
        ]
        kwargs = {
            "model": self.model,
            "messages": to_openai_messages(prompt, urls),
            "temperature": self.temperature,
            self.max_tokens_param: 1 if self.mode == "score" else self.max_tokens,
        }
        if self.mode == "score":
            kwargs.update(logprobs=True, top_logprobs=self.top_logprobs)
        extra = dict(self.extra_body or {})
        if self._guided == "structured_outputs":
            extra["structured_outputs"] = {"choice": list(prompt.answers)}
        elif self._guided == "guided_choice":
            extra["guided_choice"] = list(prompt.answers)
        elif self._guided == "regex":
            import re

            extra["regex"] = "(" + "|".join(re.escape(a) for a in prompt.answers) + ")"
        kwargs.update(extra)  # provider fields go into the JSON body as they are (what extra_body does)
        return kwargs

    def _fatal(self, err: Exception) -> APIFatalError | None:
        """The one-line error for a status no retry can fix (401, 403, 404), else None."""
        status = getattr(err, "status_code", None)
        said = _server_message(err)
        where = f"{self.url} (model {self.model!r})"
        env = self.api_key_env
        if status == 401:
            fix = (
                f"set the environment variable {env} to a valid key (lvlm.init_args.api_key_env names it)"
                if env
                else "the server wants a key: set lvlm.init_args.api_key_env to the variable holding it"
            )
            return APIFatalError(
                f"HTTP 401 Unauthorized from {where}: the API key was refused; {fix} (server: {said})"
            )
        if status == 403:
            return APIFatalError(
                f"HTTP 403 Forbidden from {where}: the key in {env} may not use this model; use another key "
                f"or another lvlm.init_args.model (server: {said})"
            )
        if status == 404:
            return APIFatalError(
                f"HTTP 404 Not Found from {where}: no such model or endpoint; check lvlm.init_args.model and "
                f"lvlm.init_args.base_url (it should end in /v1) (server: {said})"
            )
        return None

    def _send(self, kwargs: dict):
        """One chat completion with retries; the response object."""
        for attempt in range(self.max_retries + 1):
            if self._limiter is not None:
                self._limiter.acquire()
            with self._lock:
                self.attempts += 1
            try:
                # The client's documented escape hatch for a raw body: the same request, errors and
                # response type as chat.completions.create, without its per-call walk over the typed
                # parameters (about 40% of the client's CPU time per request, see bench/api.py).
                return self.client.post("/chat/completions", body=kwargs, cast_to=_chat_completion_type())
            except Exception as err:
                fatal = self._fatal(err)
                if fatal is not None:
                    raise fatal from None
                if attempt == self.max_retries or not _retriable(err):
                    raise
                delay = min(self.backoff_max_s, self.backoff_s * 2**attempt)
                hint = retry_after_seconds(getattr(getattr(err, "response", None), "headers", None))
                if hint is not None:
                    delay = min(self.backoff_max_s, max(delay, hint))
                delay *= 1.0 + 0.1 * random.random()  # jitter: concurrent retries do not collide
                with self._lock:
                    self.retries += 1
                log.warning("%s: %s; retry %d in %.2fs", self.model, _describe(err), attempt + 1, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _payload(self, response) -> str:
        """What the cache keeps of a response: the answer text, or (score mode) the first token's
        log-probabilities as JSON ``{"token", "logprob", "top_logprobs": [[token, logprob], ...]}``."""
        choices = getattr(response, "choices", None)
        if not choices:
            sent = response.model_dump_json() if hasattr(response, "model_dump_json") else repr(response)
            raise EmptyChoicesError(
                f"{self.url} answered model {self.model!r} with no choices; the server sent: {sent[:300]}"
            )
        choice = choices[0]
        if self.mode == "generate":
            return choice.message.content or ""
        content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
        if not content:
            raise APIFatalError(
                f"{self.url} (model {self.model!r}) returned no log-probabilities, which "
                "lvlm.init_args.mode score needs: set lvlm.init_args.mode generate, or serve the model "
                "with an engine that returns logprobs (vLLM, SGLang)"
            )
        first = content[0]
        top = [[t.token, float(t.logprob)] for t in (first.top_logprobs or [])]
        return json.dumps({"token": first.token, "logprob": float(first.logprob), "top_logprobs": top})

    def _fetch(self, key: str, prompt: Prompt, halt: threading.Event | None = None) -> str:
        """Encode, ask, keep: runs in a pool thread; the payload is cached as soon as it arrives.
        ``halt`` set (a fatal error elsewhere in the batch): send nothing more."""
        if halt is not None and halt.is_set():
            raise _Halted
        try:
            response = self._send(self._request_kwargs(prompt))
            payload = self._payload(response)
        except APIFatalError:
            if halt is not None:
                halt.set()  # before this thread takes its next task
            raise
        if self.cache is not None:
            self.cache.put(key, self.model, payload)
        usage = getattr(response, "usage", None)  # token counts, where the server reports them
        if usage is not None:
            self._usage[key] = (_count(usage, "prompt_tokens"), _count(usage, "completion_tokens"))
        return payload

    def _answer(self, request: LVLMRequest, prompt: Prompt, payload: str) -> LVLMAnswer:
        if self.mode == "generate":
            shown = parse_answer(payload, prompt.options, prompt.style)
            if shown is None:
                return LVLMAnswer(choice=request.fallback, raw=payload, fallback=UNPARSEABLE)
            return LVLMAnswer(choice=prompt.candidate_of(shown), raw=payload)
        data = json.loads(payload)
        tokens = [(data["token"], data["logprob"]), *((t, lp) for t, lp in data["top_logprobs"])]
        by_display = letter_scores(tokens, len(prompt.options))
        scores = [by_display[prompt.display_of(c)] for c in range(len(request.candidates))]
        if all(s == -math.inf for s in scores):
            return LVLMAnswer(choice=request.fallback, raw=data["token"], fallback=UNPARSEABLE)
        best = max(range(len(scores)), key=lambda c: (scores[c], -c))  # ties: CLIP's higher-ranked
        return LVLMAnswer(choice=best, raw=data["token"], scores=scores)

    # ------------------------------------------------------------------------------------------ stages
    def begin_stage(self, total: int, rank: int = 0) -> None:
        """Called by the LVLM stage before its first batch: opens the progress display."""
        self.end_stage()
        self._progress = _Progress(
            total, f"LVLM {self.model}" + (f" rank {rank}" if rank else ""), self.progress
        )
        self._stage_start = (self._calls, self.cache_hits, self.retries, self.errors)

    def end_stage(self) -> None:
        """Called by the LVLM stage after its last batch: closes the display and logs a summary."""
        if self._progress is None:
            return
        n = self._progress.n
        seconds = self._progress.close()
        self._progress = None
        calls, hits, retries, errors = (
            now - before
            for now, before in zip(
                (self._calls, self.cache_hits, self.retries, self.errors), self._stage_start, strict=True
            )
        )
        summary = (
            f"{self.model}: {n} images in {seconds:.1f}s ({n / max(seconds, 1e-9):.1f} images/s): {calls} "
            f"requests, {hits} cache hits, {retries} retries, {errors} API errors"
        )
        log.info(f"LVLM stage: {summary}")  # also where the bar is hidden (not a terminal)

    # ------------------------------------------------------------------------------------------ choosing
    def choose(self, requests: list[LVLMRequest]) -> list[LVLMAnswer]:
        prompts = [build_prompt(r, self.prompt) for r in requests]
        keys = [self.request_key(r, p) for r, p in zip(requests, prompts, strict=True)]
        payloads: dict[str, str] = {}
        todo: dict[str, int] = {}  # key -> first request needing it (duplicates share one call)
        for i, key in enumerate(keys):
            if key in payloads or key in todo:
                continue
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                payloads[key] = hit
                self.cache_hits += 1
            else:
                todo[key] = i
        counts = Counter(keys)
        waiting = {k: counts[k] for k in todo}  # images each call answers
        self._tick(len(keys) - sum(waiting.values()))
        errors: set[str] = set()
        if todo:
            self.client  # noqa: B018 - fail here, not in a worker, when the key is missing
            items = list(todo.items())
            if not self._probed:  # alone, so a bad key or model stops the run after one request
                key, i = items.pop(0)
                self._calls += 1
                self._settle(
                    key, lambda key=key, i=i: self._fetch(key, prompts[i]), payloads, errors, probe=True
                )
                self._probed = True
                self._tick(waiting[key])
            futures: dict[Future, str] = {}
            halt = threading.Event()
            queue = iter(items)

            def submit(n: int) -> None:
                for key, i in islice(queue, n):
                    futures[self.pool.submit(self._fetch, key, prompts[i], halt)] = key
                    self._calls += 1

            # A request is submitted only once an earlier one is settled, max_concurrency in flight: a
            # stop (max_consecutive_failures) is decided before the next request leaves, whatever the
            # threads' scheduling, and leaves at most max_concurrency - 1 requests in flight.
            submit(self.max_concurrency)
            try:
                while futures:
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for fut in done:
                        key = futures.pop(fut)
                        self._settle(key, fut.result, payloads, errors)
                        self._tick(waiting[key])
                    submit(len(done))
            except BaseException:  # a fatal API error or Ctrl-C: start nothing more
                for fut in futures:
                    fut.cancel()
                raise
        out = []
        usage = self._usage
        for r, p, key in zip(requests, prompts, keys, strict=True):
            if key in errors:
                out.append(LVLMAnswer(choice=r.fallback, raw="", fallback=API_ERROR))
            else:
                out.append(self._answer(r, p, payloads[key]))
                # tokens of the call that answered it (a cache hit or a duplicate's shared call: unknown)
                out[-1].prompt_tokens, out[-1].completion_tokens = usage.pop(key, (None, None))
        usage.clear()
        return out

    def _settle(self, key: str, result, payloads: dict, errors: set, probe: bool = False) -> None:
        """Store one request's payload, or note its (non-fatal) failure: logged, never cached.

        Stops the run instead when the server cannot be reached at all (the first request of a
        backend), or when ``max_consecutive_failures`` requests in a row failed (a server that went
        away): answers already received are cached, so the rerun pays for none of them again."""
        import openai

        try:
            payloads[key] = result()
            self._consecutive_failures = 0
        except APIFatalError:
            raise
        except _Halted:  # not sent: the fatal error that stopped it is raised from its own future
            errors.add(key)
        except Exception as err:  # out of retries, another 4xx, no choices: CLIP's top-1 for this image
            if probe and isinstance(err, openai.APIConnectionError):
                raise APIFatalError(
                    f"cannot reach {self.url} (model {self.model!r}) after {self.max_retries + 1} attempts: "
                    f"{_describe(err)}; is the server running? check lvlm.init_args.base_url"
                ) from None
            errors.add(key)
            self.errors += 1
            self._consecutive_failures += 1
            log.error("%s: request failed, CLIP's top-1 used (fallback %r): %s", self.model, API_ERROR,
                      _describe(err))  # fmt: skip
            limit = self.max_consecutive_failures
            if limit and self._consecutive_failures >= limit:
                raise APIFatalError(
                    f"the last {self._consecutive_failures} requests to {self.url} (model {self.model!r}) "
                    f"all failed, the last with {_describe(err)}; answers received so far are cached: "
                    "rerun the same command once the server answers again "
                    "(lvlm.init_args.max_consecutive_failures sets this limit, 0 turns it off)"
                ) from None

    def _tick(self, n: int) -> None:
        if self._progress is not None:
            self._progress.update(n, self)


def _chat_completion_type():
    from openai.types.chat import ChatCompletion

    return ChatCompletion


class _Halted(Exception):
    """A request not sent because another one of its batch failed fatally."""


class EmptyChoicesError(RuntimeError):
    """A response without choices (reported by name, the image gets the API-error fallback)."""


def _server_message(err: Exception) -> str:
    """The error message a server sent (OpenAI format ``{"error": {"message": ...}}``), in one line."""
    body = getattr(err, "body", None)
    text = body.get("message") if isinstance(body, dict) else None
    return " ".join(str(text or getattr(err, "message", None) or err).split())[:200]


def _describe(err: Exception) -> str:
    """``InternalServerError (HTTP 500): message`` in one line, for logs."""
    status = getattr(err, "status_code", None)
    return f"{type(err).__name__}" + (f" (HTTP {status})" if status else "") + f": {_server_message(err)}"
