"""Serving the cascade over HTTP with LitServe: ``python -m cascadevlm.serve --config <evaluate config> --port N``.

The command line is ``evaluate.py``'s (the same parser: model, adapter, data for the class names and
templates, ``cascade.*`` and ``lvlm`` mean what they mean there) plus the serving options below. The
models are built and checked in the starting process, so a configuration that cannot serve is refused
in one line (exit 2) before anything listens; LitServe's inference worker then receives them.

Per batch of requests (LitServe's dynamic batching): CLIP scores the images with
:meth:`ClipClassifier.predict_step` (the function ``evaluate.py``'s CLIP stage runs per batch), the gate
(:mod:`cascadevlm.gating.gate`) sends images with entropy > tau to the LVLM, which is asked through
:class:`~cascadevlm.cascade.lvlm_stage.LVLMStage` (the answer store first, then ``backend.choose``).
An LVLM that is busy, fails or takes longer than ``--lvlm_timeout`` seconds gives CLIP's answer marked
``fallback: "lvlm_unavailable"``. See docs/serving.md for the API, the budget controller and metrics.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib import request as urlrequest

import litserve as ls
import numpy as np
import torch
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from cascadevlm.cascade.evaluate import CascadeOptions, prepare, routing_options
from cascadevlm.cascade.lvlm_stage import LVLMResult, LVLMStage, open_answer_store
from cascadevlm.cli import EvaluateCLI, build_evaluate_cli
from cascadevlm.clip.module import ClipClassifier
from cascadevlm.data.loading import ImageDecodeError, decode_image
from cascadevlm.errors import one_line_errors
from cascadevlm.gating.gate import defer_mask, tau_for_budget
from cascadevlm.lvlm.base import needs_retry

FALLBACK = "lvlm_unavailable"  # the LVLM gave no answer in time: CLIP's answer, marked
STAGES = ("decode", "clip", "lvlm", "total")  # per-request times (ms) in the answer and the metrics


class ServeConfigError(ValueError):
    """A configuration that cannot be served (printed as one line, exit 2)."""


class BadRequest(ValueError):
    """A request the server refuses with a 4xx (``status``) and a one-line message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------ the gate
class FixedGate:
    """``cascade.tau``: entropy > tau goes to the LVLM (as ``evaluate.py``)."""

    def __init__(self, tau: float) -> None:
        self.tau = float(tau)

    def decide(self, entropy: float) -> tuple[bool, float]:
        return bool(defer_mask([entropy], self.tau)[0]), self.tau


class BudgetGate:
    """``cascade.budget`` online: tau is re-chosen for every request as the threshold that sends at most
    ``budget`` of the last ``window`` entropies, the new request's included
    (:func:`~cascadevlm.gating.gate.tau_for_budget` over the window); the request is sent when its
    entropy is above it. On a stream whose entropies do not drift, the fraction sent stays at the budget
    (floor(budget * n) of every window of n); it never goes above it; ties are kept with CLIP.
    """

    def __init__(self, budget: float, window: int) -> None:
        self.budget = float(budget)
        self.recent: deque[float] = deque(maxlen=window)

    def decide(self, entropy: float) -> tuple[bool, float]:
        self.recent.append(float(entropy))
        tau = tau_for_budget(list(self.recent), self.budget)
        return bool(defer_mask([entropy], tau)[0]), tau


# ------------------------------------------------------------------------------------------ pipeline
@dataclass
class Answer:
    """One image's answer, before JSON."""

    clip_ids: list[int]
    clip_probs: list[float]
    entropy: float
    tau: float
    deferred: bool
    lvlm: LVLMResult | None = None
    fallback: str | None = None
    fallback_reason: str | None = None
    ms: dict = field(default_factory=dict)

    @property
    def class_index(self) -> int:
        if self.lvlm is not None and self.fallback is None:
            return int(self.lvlm.lvlm_choice)
        return int(self.clip_ids[0])


class CascadePipeline:
    """The served cascade, in process: images -> CLIP (one batch) -> gate -> LVLM (the deferred ones).

    Built from a parsed ``evaluate.py`` command line by :meth:`from_cli`; :meth:`answer` is what the
    server runs per batch and what ``bench/serve.py`` calls in-process.
    """

    def __init__(self, model: ClipClassifier, class_names: list[str], opts: CascadeOptions,
                 stage: LVLMStage | None, lvlm_timeout: float, budget_window: int) -> None:  # fmt: skip
        self.model = model
        self.class_names = list(class_names)
        self.opts = opts
        self.stage = stage
        self.lvlm_timeout = lvlm_timeout
        self.gate = (
            BudgetGate(opts.budget, budget_window)
            if opts.budget is not None and stage
            else FixedGate(opts.tau)
        )
        if stage is None:
            self.gate = FixedGate(math.inf)  # no LVLM: CLIP only, as evaluate.py
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None

    @classmethod
    def from_cli(cls, cli: EvaluateCLI) -> CascadePipeline:
        """The pipeline ``cli`` describes, checked as ``evaluate.py`` checks it plus what serving needs."""
        run = prepare(cli)  # evaluate's checks, model.topk >= cascade.topk, the prompt's dataset noun
        opts, dm, model = run.opts, cli.datamodule, cli.model
        check_servable(opts, run.backend is not None)
        if not dm.class_names:
            raise ServeConfigError("no class names to answer with: set --data.dataset or --data.class_names")
        model.head_cache_dir = str(cli.config.cache_dir)
        model.eval()
        model.ensure_head()
        stage = None
        if run.backend is not None:
            store = open_answer_store(cli.config.get("answer_store", "auto"), cli.config.cache_dir)
            stage = LVLMStage(run.backend, dm.class_names, None, store)
        return cls(model, dm.class_names, opts, stage, cli.config.lvlm_timeout, cli.config.budget_window)

    def __getstate__(self) -> dict:
        # the LVLM's worker thread stays in this process (LitServe's worker process starts its own)
        return {**self.__dict__, "_pool": None, "_pending": None}

    def to(self, device: str | torch.device) -> CascadePipeline:
        self.model.to(device)
        self.model.ensure_head()  # the head and an adapter follow the module's device
        return self

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The CLIP model's own preprocessing of one decoded RGB image (as the data module applies it)."""
        return self.model.preprocess(image)

    @torch.inference_mode()
    def clip_batch(self, pixels: torch.Tensor) -> dict:
        """CLIP's top-k and entropy for a batch, through the CLIP module's ``predict_step``."""
        n = len(pixels)
        batch = {"pixel_values": pixels.to(self.model.device), "index": torch.arange(n),
                 "label": torch.full((n,), -1)}  # fmt: skip
        return self.model.predict_step(batch)

    def answer(self, images: list[Image.Image], pixels: torch.Tensor | None = None) -> list[Answer]:
        """The cascade's answers for decoded RGB ``images`` (``pixels``: their preprocessed tensors, when
        already made), in order; the gate sees them in this order."""
        t0 = time.perf_counter()
        if pixels is None:
            pixels = torch.stack([self.preprocess(im) for im in images])
        out = self.clip_batch(pixels)
        clip_ms = 1000 * (time.perf_counter() - t0)
        answers = []
        for i in range(len(images)):
            entropy = float(out["entropy"][i])
            deferred, tau = self.gate.decide(entropy)
            answers.append(Answer([int(c) for c in out["topk_ids"][i]], [float(p) for p in out["topk_probs"][i]],
                                  entropy, tau, deferred, ms={"clip": clip_ms, "lvlm": 0.0}))  # fmt: skip
        sent = [i for i, a in enumerate(answers) if a.deferred]
        if sent:
            self._ask_lvlm([images[i] for i in sent], [answers[i] for i in sent])
        return answers

    def _ask_lvlm(self, images: list[Image.Image], answers: list[Answer]) -> None:
        """The LVLM's choices for the deferred answers (in place), or CLIP's marked ``fallback``: when the
        LVLM is still busy with a call that ran past the timeout, fails, or takes longer than it."""
        rows = [{"index": i, "image": im, "candidate_ids": a.clip_ids[: self.opts.topk], "key": None}
                for i, (im, a) in enumerate(zip(images, answers, strict=True))]  # fmt: skip
        t0 = time.perf_counter()
        results, reason = None, None
        if self._pending is not None and not self._pending.done():
            reason = "busy"  # the call that timed out still holds the LVLM: never queue behind it
        else:
            self._pool = self._pool or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lvlm")
            self._pending = self._pool.submit(self.stage.predict_step, rows)
            try:
                results = self._pending.result(timeout=self.lvlm_timeout)
            except concurrent.futures.TimeoutError:
                reason = "timeout"
            except Exception as err:  # an LVLM that is down: CLIP answers, the server keeps serving
                reason = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        lvlm_ms = 1000 * (time.perf_counter() - t0)
        for i, a in enumerate(answers):
            a.ms["lvlm"] = lvlm_ms
            if results is None:
                a.fallback, a.fallback_reason = FALLBACK, reason
                continue
            a.lvlm = results[i]
            if needs_retry(a.lvlm.fallback):  # a failed API call: CLIP's answer, marked
                a.fallback, a.fallback_reason = FALLBACK, a.lvlm.fallback

    def to_json(self, a: Answer) -> dict:
        """The JSON answer of one image (see docs/serving.md); infinities (tau inf / -inf, a score of -inf)
        as the strings ``"inf"`` / ``"-inf"``: JSON has no number for them."""
        return _json_safe(self._answer_dict(a))

    def _answer_dict(self, a: Answer) -> dict:
        names = self.class_names
        topk = [
            {"label": names[c], "class_index": c, "prob": p}
            for c, p in zip(a.clip_ids, a.clip_probs, strict=True)
        ]
        lvlm = None
        if a.lvlm is not None:
            cands = a.lvlm.candidate_ids
            lvlm = {"label": names[a.lvlm.lvlm_choice], "class_index": a.lvlm.lvlm_choice,
                    "candidates": [names[c] for c in cands], "scores": a.lvlm.scores, "raw": a.lvlm.raw,
                    "fallback": a.lvlm.fallback}  # fmt: skip
        return {
            "label": names[a.class_index],
            "class_index": a.class_index,
            "deferred": a.deferred,
            "entropy": a.entropy,
            "tau": a.tau,
            "clip": {"label": names[a.clip_ids[0]], "class_index": a.clip_ids[0], "topk": topk},
            "lvlm": lvlm,
            "fallback": a.fallback,
            "fallback_reason": a.fallback_reason,
            "timings_ms": {k: round(a.ms.get(k, 0.0), 3) for k in STAGES},
        }


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


SERVED_OPTIONS = (
    "serving runs the paper's cascade: keep --cascade.gate entropy --cascade.calibration none "
    "--cascade.candidates topk --cascade.fusion none --cascade.incontext_shots 0 --cascade.lvlm_on_val false"
)


def check_servable(opts: CascadeOptions, has_lvlm: bool) -> None:
    """Refuse options the server cannot honour per request (they are fitted on a split of records)."""
    if opts.stages is not None or opts.cost_budget is not None:  # several LVLMs: evaluate.py only
        raise ServeConfigError(
            f"cascade.stages / cascade.cost_budget are not served (evaluate.py runs them): {SERVED_OPTIONS}"
        )
    if has_lvlm and (
        not routing_options(opts).is_paper_cascade() or opts.incontext_shots or opts.lvlm_on_val
    ):
        raise ServeConfigError(f"these cascade options are not served: {SERVED_OPTIONS}")


# ------------------------------------------------------------------------------------------ requests
def image_from_base64(data: str, max_pixels: int) -> Image.Image:
    """A request's image (base64 of a PNG or JPEG) as the decoded RGB image the CLIP stage expects; the
    pixel count is checked from the header, before the pixels are decoded."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest('image: not base64; send {"image": "<base64 of a PNG or JPEG>"}') from None
    if not raw:
        raise BadRequest('image: empty; send {"image": "<base64 of a PNG or JPEG>"}')
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest("image: not a PNG or JPEG image") from None
    if width * height > max_pixels:
        raise BadRequest(
            f"image: {width}x{height} pixels is more than --max_pixels {max_pixels}; send a smaller image",
            413,
        )
    try:
        return decode_image({"bytes": raw, "path": None}, "request image")
    except ImageDecodeError as err:
        raise BadRequest(f"image: {err}") from None


class PredictRequest(BaseModel):
    """``POST /predict`` body: ``{"image": "<base64 of a PNG or JPEG>"}``."""

    image: str


class CascadeAPI(ls.LitAPI):
    """The LitAPI serving a :class:`CascadePipeline`: decodes each request alone (a bad one never fails
    its batch) and answers a batch of good ones in one pass."""

    def __init__(
        self, pipeline: CascadePipeline, max_batch_size: int, batch_timeout: float, max_pixels: int
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.pipeline = pipeline
        self.max_pixels = max_pixels

    def setup(self, device) -> None:
        self.pipeline.to(device)

    def decode_request(self, request: PredictRequest):
        t0 = time.perf_counter()
        try:
            image = image_from_base64(request.image, self.max_pixels)
            return image, self.pipeline.preprocess(image), 1000 * (time.perf_counter() - t0)
        except BadRequest as err:
            return err

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, inputs):
        if self.max_batch_size == 1:  # LitServe's unbatched loop: one decoded request, no batch()/unbatch()
            return self.predict_batch([inputs])[0]
        return self.predict_batch(inputs)

    def predict_batch(self, inputs: list) -> list:
        """The answers (or the requests' :class:`BadRequest`) of a batch of decoded requests, in order."""
        good = [i for i, x in enumerate(inputs) if not isinstance(x, BadRequest)]
        out: list = list(inputs)
        if good:
            t0 = time.perf_counter()
            images = [inputs[i][0] for i in good]
            answers = self.pipeline.answer(images, torch.stack([inputs[i][1] for i in good]))
            total = 1000 * (time.perf_counter() - t0)
            for i, a in zip(good, answers, strict=True):
                a.ms["decode"] = inputs[i][2]
                a.ms["total"] = total + inputs[i][2]
                out[i] = a
        return out

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output) -> Response:
        if isinstance(output, BadRequest):
            return JSONResponse({"error": str(output)}, status_code=output.status)
        body = self.pipeline.to_json(output)
        route = "fallback" if output.fallback else ("lvlm" if output.deferred else "clip")
        timing = ", ".join(f"{k};dur={v}" for k, v in body["timings_ms"].items())
        return JSONResponse(body, headers={"Server-Timing": timing, "X-Cascade-Route": route})


# LitServe reads the body's type from this annotation (FastAPI then validates the JSON in the API server);
# under ``from __future__ import annotations`` it would be the string "PredictRequest"
CascadeAPI.decode_request.__annotations__["request"] = PredictRequest


# ------------------------------------------------------------------------------------------ metrics
def _server_timing(value: str) -> dict[str, float]:
    out = {}
    for part in value.split(","):
        name, _, rest = part.strip().partition(";dur=")
        try:
            out[name] = float(rest)
        except ValueError:
            continue
    return out


class ServeMetrics:
    """Counters and recent per-stage latencies of ``POST /predict`` (the API server process keeps them:
    it sees every request, bad ones included)."""

    def __init__(self, window: int = 10_000) -> None:
        self.requests = 0
        self.by_status: dict[str, int] = {}
        self.routes = {"clip": 0, "lvlm": 0, "fallback": 0}
        self.latency: dict[str, deque] = {k: deque(maxlen=window) for k in STAGES}
        self.http_ms: deque = deque(maxlen=window)
        self.by_route: dict[str, deque] = {k: deque(maxlen=window) for k in self.routes}  # HTTP ms

    def observe(self, status: int, headers: dict[str, str], seconds: float) -> None:
        self.requests += 1
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1
        self.http_ms.append(1000 * seconds)
        route = headers.get("x-cascade-route")
        if status == 200 and route in self.routes:
            self.routes[route] += 1
            self.by_route[route].append(1000 * seconds)
            for k, v in _server_timing(headers.get("server-timing", "")).items():
                if k in self.latency and (
                    k != "lvlm" or route != "clip"
                ):  # the LVLM's time where it was asked
                    self.latency[k].append(v)

    def snapshot(self) -> dict:
        answered = sum(self.routes.values())
        sent = self.routes["lvlm"] + self.routes["fallback"]

        def pct(values) -> dict:
            if not values:
                return {"count": 0}
            p = np.percentile(np.asarray(values), [50, 95, 99])
            return {"count": len(values), "p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}

        errors = sum(n for s, n in self.by_status.items() if not s.startswith("2"))
        return {
            "requests": self.requests,
            "answered": answered,
            "errors": errors,
            "status": dict(sorted(self.by_status.items())),
            "sent_to_lvlm": sent,
            "fraction_sent": sent / answered if answered else 0.0,
            "lvlm_fallbacks": self.routes["fallback"],
            "latency_ms": {**{k: pct(v) for k, v in self.latency.items()}, "http": pct(self.http_ms)},
            "http_latency_ms_by_route": {k: pct(v) for k, v in self.by_route.items()},
        }


class MetricsMiddleware:
    """ASGI middleware timing ``POST /predict`` and reading the route and stage times of its answer
    (the ``X-Cascade-Route`` and ``Server-Timing`` headers the worker sets)."""

    def __init__(self, app, metrics: ServeMetrics, path: str = "/predict") -> None:
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        start, seen = time.perf_counter(), {"status": 500, "headers": {}}

        async def send_seen(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                seen["headers"] = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            self.metrics.observe(seen["status"], seen["headers"], time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ errors
def _validation_message(exc, content_type: str) -> tuple[int, str]:
    """One line and a status for a body FastAPI refused (empty, not JSON, not an object with ``image``)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind, loc = first.get("type", ""), [str(x) for x in first.get("loc", ())]
    usage = 'send JSON {"image": "<base64 of a PNG or JPEG>"} with Content-Type: application/json'
    if content_type and not content_type.split(";")[0].strip().endswith("json"):
        return 415, f"content type {content_type!r} is not JSON: {usage}"
    if kind == "json_invalid":
        return (
            400,
            f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}): {usage}",
        )
    if loc == ["body"] and kind == "missing":
        return 400, f"empty body: {usage}"
    where = ".".join(loc[1:]) or "body"
    return 422, f"{where}: {first.get('msg', 'invalid')}: {usage}"


def add_error_handlers(app) -> None:
    """Every error of the app as one line of JSON, ``{"error": "..."}``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def validation(request, exc):
        status, message = _validation_message(exc, request.headers.get("content-type", ""))
        return JSONResponse({"error": message}, status_code=status)

    async def http(request, exc):
        return JSONResponse({"error": str(exc.detail).splitlines()[0]}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http)  # FastAPI's HTTPException is a subclass


# ------------------------------------------------------------------------------------------ server
class ServeCLI(EvaluateCLI):
    """``evaluate.py``'s command line plus the serving options."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--port", type=int, default=8000, help="HTTP port")
        parser.add_argument(
            "--host", type=str, default="127.0.0.1", help="127.0.0.1 (this machine), 0.0.0.0 or ::"
        )
        parser.add_argument(
            "--max_batch_size", type=int, default=16, help="requests per batch (dynamic batching)"
        )
        parser.add_argument("--batch_timeout", type=float, default=0.005,
                            help="seconds a batch waits to fill up")  # fmt: skip
        parser.add_argument("--lvlm_timeout", type=float, default=30.0,
                            help="seconds the LVLM may take per batch; then CLIP's answer, marked")  # fmt: skip
        parser.add_argument("--request_timeout", type=float, default=120.0,
                            help="seconds a request may wait in the queue (then 504)")  # fmt: skip
        parser.add_argument("--budget_window", type=int, default=200,
                            help="recent requests the budget controller keeps (with cascade.budget)")  # fmt: skip
        parser.add_argument(
            "--max_pixels", type=int, default=4096 * 4096, help="largest image, in pixels (413)"
        )
        parser.add_argument(
            "--max_body_mb", type=float, default=64.0, help="largest request body, in MB (413)"
        )


def check_serve_options(cfg) -> None:
    """Refuse serving options out of range, one line each."""
    positive = {"max_batch_size": cfg.max_batch_size, "lvlm_timeout": cfg.lvlm_timeout,
                "request_timeout": cfg.request_timeout, "budget_window": cfg.budget_window,
                "max_pixels": cfg.max_pixels, "max_body_mb": cfg.max_body_mb}  # fmt: skip
    for name, value in positive.items():
        if not value > 0 or (isinstance(value, float) and math.isinf(value)):
            raise ServeConfigError(f"--{name} must be a positive number, got {value}")
    if cfg.batch_timeout < 0:
        raise ServeConfigError(f"--batch_timeout must be >= 0 seconds, got {cfg.batch_timeout}")
    if not 1024 <= cfg.port <= 65535:
        raise ServeConfigError(f"--port must be in 1024..65535, got {cfg.port}")
    if cfg.host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise ServeConfigError(f"--host must be 127.0.0.1, 0.0.0.0 or ::, got {cfg.host!r}")


def build_pipeline(args: list[str] | None = None) -> tuple[CascadePipeline, object]:
    """The checked pipeline and the parsed config of a ``cascadevlm-serve`` command line; a config that
    cannot serve (e.g. an LVLM that does not load) raises :class:`ServeConfigError` in one line."""
    try:
        cli = build_evaluate_cli(args, ServeCLI)
    except Exception as err:
        from cascadevlm.errors import is_user_error, project_error

        if is_user_error(project_error(err)):
            raise
        # a model that does not load raises in the library that loads it: still a refusal, not a bug
        raise ServeConfigError(f"the configuration cannot be served: {type(err).__name__}: {err}") from err
    check_serve_options(cli.config)
    return CascadePipeline.from_cli(cli), cli.config


def make_server(pipeline: CascadePipeline, cfg, metrics: ServeMetrics | None = None):
    """The LitServer of ``pipeline`` with the health, metrics and error handling of docs/serving.md."""
    metrics = metrics or ServeMetrics()
    api = CascadeAPI(pipeline, cfg.max_batch_size, cfg.batch_timeout, cfg.max_pixels)
    accelerator = "cpu" if str(pipeline.model.device) == "cpu" else "auto"
    server = ls.LitServer(
        api, accelerator=accelerator, devices=1, timeout=cfg.request_timeout,
        max_payload_size=int(cfg.max_body_mb * 2**20), middlewares=[(MetricsMiddleware, {"metrics": metrics})],
        model_metadata={"classes": pipeline.class_names},
    )  # fmt: skip

    async def metrics_endpoint():
        return metrics.snapshot()

    server.app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
    add_error_handlers(server.app)
    return server


@one_line_errors
def main(args: list[str] | None = None) -> None:
    """``cascadevlm-serve --config configs/demo.yaml --port 8000 [evaluate.py's options ...]``."""
    pipeline, cfg = build_pipeline(args)
    server = make_server(pipeline, cfg)
    # one API server process: it holds the metrics; the models live in the one inference worker
    server.run(host=cfg.host, port=cfg.port, num_api_servers=1, generate_client_file=False,
               log_level="warning")  # fmt: skip


class ServerProcess:
    """``python -m cascadevlm.serve args --port <free port>`` in a subprocess, up once ``/health`` answers
    200 (for tests and the bench); :meth:`stop` ends it and its LitServe workers."""

    def __init__(self, args: list[str], log: str | os.PathLike, startup_s: float = 600.0, cwd=None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(log)
        with open(self.log, "wb") as out:  # its own session: stop() signals the workers too
            self.proc = subprocess.Popen([sys.executable, "-m", "cascadevlm.serve", *args, "--port", str(port)],
                                         cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + startup_s
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urlrequest.urlopen(self.url + "/health", timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> dict:
        with urlrequest.urlopen(self.url + "/metrics", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


# ------------------------------------------------------------------------------------------ client
def predict(url: str, image: Image.Image | bytes | str, timeout: float = 120.0) -> dict:
    """Ask a running server: ``predict("http://127.0.0.1:8000", "cat.jpg")`` -> its JSON answer.

    ``image``: a PIL image (sent as PNG), the bytes of a PNG/JPEG file, or a path to one. An error
    answer raises :class:`urllib.error.HTTPError` whose body is ``{"error": "..."}``.
    """
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    elif isinstance(image, str):
        with open(image, "rb") as f:
            image = f.read()
    body = json.dumps({"image": base64.b64encode(image).decode()}).encode()
    req = urlrequest.Request(
        url.rstrip("/") + "/predict", data=body, headers={"Content-Type": "application/json"}
    )
    with urlrequest.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


if __name__ == "__main__":
    main()
