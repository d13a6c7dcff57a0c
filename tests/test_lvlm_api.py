"""OpenAI-compatible API backend against a chat-completions server on loopback
(cascadevlm/lvlm/api_backend.py, cascadevlm/lvlm/cache.py)."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import pickle
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from lvlm_fixtures import photos  # noqa: F401
from PIL import Image

from cascadevlm.lvlm.api_backend import API_ERROR, APIFatalError, OpenAIBackend, retry_after_seconds
from cascadevlm.lvlm.base import Exemplar, LVLMRequest
from cascadevlm.lvlm.prompts import PromptConfig

KEY_ENV = "CASCADEVLM_TEST_API_KEY"
SECRET = "sk-test-5f1d2c9e-never-write-me"


class ChatServer:
    """Speaks ``POST /v1/chat/completions`` on 127.0.0.1 only.

    ``script`` lists what to do with the first requests ("429", "500", "401", "403", "404",
    "sleep:<seconds>", "hold" (answered only when the server closes), "empty" (no choices),
    "429s:<seconds>" / "429date:<seconds>" (Retry-After as seconds / as an HTTP date that many seconds
    ahead), "ok"); later requests are answered with ``answer`` (text, or a function of the request body).
    ``logprobs``, a function of the request body, gives the choice's ``logprobs`` object (None: the field
    is left out). With ``hold_until_inflight`` n, requests after the first (the backend's probe, sent
    alone) are held until n are in flight together (or 30 s passed), so a client that keeps n requests
    open reaches max_inflight n however late its threads are scheduled. It serves at most
    ``max_requests`` and shuts itself down after ``lifetime_s`` seconds.
    """

    def __init__(
        self,
        script=(),
        answer="The answer is (B).",
        delay_s=0.0,
        max_requests=40,
        lifetime_s=30.0,
        logprobs=None,
        hold_until_inflight=None,
    ):
        self.script = list(script)
        self.hold_until_inflight = hold_until_inflight
        self.closing = threading.Event()
        self.answer = answer
        self.logprobs = logprobs
        self.delay_s = delay_s
        self.max_requests = max_requests
        self.requests: list[dict] = []
        self.inflight = self.max_inflight = self.holding = 0
        self.lock = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "t": time.monotonic(),
                        }
                    )
                    action = server.script[n] if n < len(server.script) else "ok"
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                    if server.hold_until_inflight and n > 0:  # the first: the client's probe, sent alone
                        server.lock.notify_all()
                        reached = lambda: server.max_inflight >= server.hold_until_inflight  # noqa: E731
                        server.lock.wait_for(reached, timeout=30.0)
                try:
                    if n >= server.max_requests:
                        return self._send(
                            503, {"error": {"message": "request budget of the test server spent"}}
                        )
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": f"no route {self.path}"}})
                    if action == "429":
                        return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
                    if action == "500":
                        return self._send(500, {"error": {"message": "server error"}})
                    if action in FATAL:
                        return self._send(int(action), {"error": {"message": FATAL[action]}})
                    if action.startswith("429s:"):
                        return self._send(
                            429, {"error": {"message": "slow down"}}, {"Retry-After": action[5:]}
                        )
                    if action.startswith("429date:"):
                        server.retry_at = time.time() + float(action[8:])
                        when = formatdate(server.retry_at, usegmt=True)  # whole seconds: the fraction is cut
                        return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": when})
                    if action == "empty":
                        return self._send(200, {**_completion(body["model"], ""), "choices": []})
                    if action.startswith("sleep:"):
                        time.sleep(float(action.split(":")[1]))
                    if action == "hold":
                        with server.lock:
                            server.holding += 1
                        server.closing.wait(60.0)
                        with server.lock:
                            server.holding -= 1
                    time.sleep(server.delay_s)
                    text = server.answer(body) if callable(server.answer) else server.answer
                    logprobs = server.logprobs(body) if server.logprobs else None
                    self._send(200, _completion(body["model"], text, logprobs))
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass
                finally:
                    with server.lock:
                        server.inflight -= 1

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.timer = threading.Timer(lifetime_s, self.httpd.shutdown)
        self.timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


FATAL = {"401": "Incorrect API key provided", "403": "not allowed", "404": "The model does not exist"}


def _completion(model: str, text: str, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _backend(server: ChatServer, tmp_path, **kw) -> OpenAIBackend:
    args = dict(
        model="gpt-test-vision",
        base_url=server.url,
        api_key_env=KEY_ENV,
        cache_path=str(tmp_path / "cache.sqlite"),
        backoff_s=0.01,
        timeout_s=5.0,
        image_max_side=64,
    )
    args.update(kw)
    return OpenAIBackend(**args)


def _requests(photos, n=3):  # noqa: F811
    names = ["cat", "horse", "rocket", "flower", "coffee", "camera"]
    return [
        LVLMRequest(
            image=photos[names[i]], candidates=[names[i], names[(i + 1) % 6], names[(i + 2) % 6]], fallback=0
        )
        for i in range(n)
    ]


def test_normal_answer_and_wire_format(photos, tmp_path):  # noqa: F811
    reqs = _requests(photos)
    reqs[2].examples = [Exemplar(photos["coins"], reqs[2].candidates[2])]
    with ChatServer() as server:
        backend = _backend(server, tmp_path, prompt=PromptConfig(noun="animal"))
        answers = backend.choose(reqs)
    assert [a.choice for a in answers] == [1, 1, 1]
    assert all(a.raw == "The answer is (B)." and a.fallback is None and a.scores is None for a in answers)
    assert backend.calls == 3 and len(server.requests) == 3
    seen = next(r for r in server.requests if len(r["body"]["messages"]) > 1)  # arrival order varies
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {SECRET}"
    body = seen["body"]
    assert body["model"] == "gpt-test-vision" and body["temperature"] == 0.0 and body["max_tokens"] == 32
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"]  # the in-context example, then the query
    assert body["messages"][1]["content"] == "C"
    url = body["messages"][2]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert max(img.size) == 64  # downscaled before upload
    assert "Which of these animals is shown in the image?" in body["messages"][2]["content"][1]["text"]


@pytest.mark.parametrize("failure", ["429", "500", "hold"])
def test_retries_then_succeeds(photos, tmp_path, failure):  # noqa: F811
    with ChatServer(script=[failure]) as server:
        backend = _backend(server, tmp_path, timeout_s=0.5, max_retries=3)
        t0 = time.perf_counter()
        (answer,) = backend.choose(_requests(photos, 1))
        elapsed = time.perf_counter() - t0
        held = server.holding  # the held attempt is answered only when the server closes
    assert answer.choice == 1 and answer.fallback is None
    assert len(server.requests) == 2  # the failure, then the success
    assert backend.calls == 1 and backend.attempts == 2
    if failure == "hold":  # gave up on the slow attempt at the timeout, not when it was answered
        assert elapsed >= 0.5 and held == 1


def test_out_of_retries_falls_back_and_is_not_cached(photos, tmp_path, caplog):  # noqa: F811
    with ChatServer(script=["500", "500", "500"]) as server:
        backend = _backend(server, tmp_path, max_retries=2)
        with caplog.at_level(logging.WARNING):
            (answer,) = backend.choose(_requests(photos, 1))
        assert (answer.choice, answer.fallback) == (0, API_ERROR) and API_ERROR == "api_error"
        assert len(server.requests) == 3 and len(backend.cache) == 0  # the failure was not cached
        (again,) = backend.choose(_requests(photos, 1))  # failures are not cached: a rerun retries
        assert again.choice == 1 and len(server.requests) == 4
    assert SECRET not in caplog.text


def test_cache_serves_second_run_with_zero_requests(photos, tmp_path):  # noqa: F811
    reqs = _requests(photos, 4)
    reqs.append(LVLMRequest(image=photos["cat"].copy(), candidates=list(reqs[0].candidates)))  # same content
    with ChatServer() as server:
        first = _backend(server, tmp_path)
        a1 = first.choose(reqs)
        assert len(server.requests) == 4 and first.calls == 4  # the duplicate image shared one call
        resumed = _backend(server, tmp_path)  # a new process, same cache file
        a2 = resumed.choose(reqs)
        assert len(server.requests) == 4 and resumed.calls == 0 and resumed.cache_hits == 4
        assert [(a.choice, a.raw) for a in a2] == [(a.choice, a.raw) for a in a1]
        changed = LVLMRequest(image=photos["cat"], candidates=["cat", "rocket", "horse"])
        resumed.choose([changed])  # different candidates: a different question, one new call
        assert len(server.requests) == 5 and resumed.calls == 1


def test_unparseable_answer_falls_back_and_is_counted(photos, tmp_path):  # noqa: F811
    with ChatServer(answer="I cannot tell from this picture.") as server:
        backend = _backend(server, tmp_path)
        answers = backend.choose(_requests(photos, 2))
    assert [(a.choice, a.fallback) for a in answers] == [(0, "unparseable")] * 2
    assert answers[0].raw == "I cannot tell from this picture."


def test_bounded_concurrency(photos, tmp_path):  # noqa: F811
    with ChatServer(delay_s=0.15, hold_until_inflight=2) as server:
        backend = _backend(server, tmp_path, max_concurrency=2, cache_path=None)
        backend.choose(_requests(photos, 6))
    assert len(server.requests) == 6 and server.max_inflight == 2


def test_missing_key_names_the_variable(photos, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv(KEY_ENV)
    backend = OpenAIBackend(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV, cache_path=None)
    with pytest.raises(RuntimeError, match=KEY_ENV):
        backend.choose(_requests(photos, 1))


def test_api_key_never_written(photos, tmp_path, caplog):  # noqa: F811
    from jsonargparse import ArgumentParser

    from cascadevlm.lvlm.base import LVLMBackend
    from cascadevlm.records import PredictionRecord, write_records

    parser = ArgumentParser()
    parser.add_subclass_arguments(LVLMBackend, "backend")
    with ChatServer() as server, caplog.at_level(logging.DEBUG):
        cfg = parser.parse_object(
            {
                "backend": {
                    "class_path": "cascadevlm.lvlm.api_backend.OpenAIBackend",
                    "init_args": {
                        "model": "gpt-test-vision",
                        "base_url": server.url,
                        "api_key_env": KEY_ENV,
                        "cache_path": str(tmp_path / "cache.sqlite"),
                    },
                }
            }
        )
        backend = parser.instantiate_classes(cfg).backend
        answers = backend.choose(_requests(photos))
        assert server.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    (tmp_path / "config.yaml").write_text(parser.dump(cfg))
    (tmp_path / "backend.pkl").write_bytes(pickle.dumps(backend))
    (tmp_path / "repr.txt").write_text(repr(backend.__dict__))
    (tmp_path / "log.txt").write_text(caplog.text)
    records = [
        PredictionRecord(
            0, 0, [0, 1], [0.6, 0.4], 0.7, 0, True, a.choice, a.raw, a.scores, a.choice, a.fallback
        )
        for a in answers
    ]
    write_records(tmp_path / "records.jsonl", records)
    write_records(tmp_path / "records.parquet", records)
    backend.cache.close()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"cache.sqlite", "config.yaml", "backend.pkl", "records.parquet"}
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert KEY_ENV in (tmp_path / "config.yaml").read_text()  # the variable's name is all a config holds


# ------------------------------------------------------------------ errors that must stop the run (issue 9)
FATAL_MESSAGES = {
    "401": "HTTP 401 Unauthorized from {url} (model 'gpt-test-vision'): the API key was refused; set the "
    "environment variable CASCADEVLM_TEST_API_KEY to a valid key (lvlm.init_args.api_key_env names it) "
    "(server: Incorrect API key provided)",
    "403": "HTTP 403 Forbidden from {url} (model 'gpt-test-vision'): the key in CASCADEVLM_TEST_API_KEY may "
    "not use this model; use another key or another lvlm.init_args.model (server: not allowed)",
    "404": "HTTP 404 Not Found from {url} (model 'gpt-test-vision'): no such model or endpoint; check "
    "lvlm.init_args.model and lvlm.init_args.base_url (it should end in /v1) (server: The model does not exist)",
}


@pytest.mark.parametrize("status", sorted(FATAL_MESSAGES))
def test_auth_and_missing_model_stop_at_the_first_request(photos, tmp_path, status):  # noqa: F811
    with ChatServer(script=[status] * 10) as server:
        backend = _backend(server, tmp_path, max_concurrency=4)
        with pytest.raises(APIFatalError) as err:
            backend.choose(_requests(photos, 5))
        assert len(server.requests) == 1  # one request, not one per image, and no retry
    assert str(err.value) == FATAL_MESSAGES[status].format(url=server.url)
    assert "\n" not in str(err.value) and SECRET not in str(err.value)
    assert len(backend.cache) == 0


def test_fatal_error_in_the_pool_starts_no_more_requests(photos, tmp_path):  # noqa: F811
    # the key is revoked after the first answer: the requests already in flight end, nothing more starts
    with ChatServer(script=["ok"] + ["401"] * 40, delay_s=0.05) as server:
        backend = _backend(server, tmp_path, max_concurrency=2, cache_path=None)
        backend.choose(_requests(photos, 1))
        with pytest.raises(APIFatalError, match="HTTP 401"):
            backend.choose(_requests(photos, 6)[1:] * 4)  # 5 distinct questions, 20 images
        time.sleep(0.2)
        assert len(server.requests) <= 1 + 2  # the first answer, then at most the pool's width


def test_empty_choices_are_named_not_an_index_error(photos, tmp_path, caplog):  # noqa: F811
    with ChatServer(script=["empty"]) as server, caplog.at_level(logging.ERROR):
        backend = _backend(server, tmp_path)
        (answer,) = backend.choose(_requests(photos, 1))
    assert (answer.choice, answer.raw, answer.fallback) == (0, "", API_ERROR)
    assert len(backend.cache) == 0 and "IndexError" not in caplog.text
    assert (
        f"EmptyChoicesError: {server.url} answered model 'gpt-test-vision' with no choices; the server sent: {{"
        in (caplog.text)
    )
    assert '"choices":[]' in caplog.text


def test_retry_after_parsing_with_a_fixed_clock():
    now = 1_445_412_475.0  # 2015-10-21 07:27:55 UTC
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=now) == 5.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, now=now) == 0.0  # past
    assert retry_after_seconds({"retry-after": "7"}, now=now) == 7.0
    assert retry_after_seconds({"retry-after": "1.5"}) == 1.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


@pytest.mark.parametrize("action", ["429s:7", "429date:8"])
def test_retry_after_from_the_server_is_honoured(photos, tmp_path, action):  # noqa: F811
    with ChatServer(script=[action]) as server:
        backend = _backend(server, tmp_path, backoff_s=0.01, backoff_max_s=60)
        waits: list[float] = []
        backend._sleep = waits.append  # observe the wait without waiting
        start = time.time()
        (answer,) = backend.choose(_requests(photos, 1))
        end = time.time()
    assert answer.fallback is None and len(server.requests) == 2
    low, high = 7.0, 7.7
    if action.startswith("429date:"):  # the date's whole second less the client's clock, whenever it looked
        date = math.floor(server.retry_at)
        low, high = date - end, (date - start) * 1.1
    assert len(waits) == 1 and low <= waits[0] <= high, waits  # (jitter adds up to 10%)
    assert backend.retries == 1


def test_retry_after_is_capped_by_backoff_max(photos, tmp_path):  # noqa: F811
    with ChatServer(script=["429date:3600"]) as server:
        backend = _backend(server, tmp_path, backoff_max_s=2.0)
        waits: list[float] = []
        backend._sleep = waits.append
        backend.choose(_requests(photos, 1))
    assert len(waits) == 1 and 2.0 <= waits[0] <= 2.2


def test_connection_settings_are_init_arguments_and_answer_settings_are_not_among_them():
    import inspect

    params = set(inspect.signature(OpenAIBackend.__init__).parameters)
    assert set(OpenAIBackend.CONNECTION_FIELDS) <= params
    answer_changing = {"model", "prompt", "mode", "top_logprobs", "guided_choice", "max_tokens", "temperature",
                       "image_format", "image_max_side", "max_pixels", "extra_body"}  # fmt: skip
    assert answer_changing <= params and not answer_changing & set(OpenAIBackend.CONNECTION_FIELDS)
    assert {"base_url", "timeout_s", "max_retries", "max_concurrency", "cache_path", "api_key_env",
            "requests_per_minute"} <= set(OpenAIBackend.CONNECTION_FIELDS)  # fmt: skip


def test_answer_fingerprint_ignores_connection_settings():
    from cascadevlm.lvlm.base import LVLMBackend

    if not hasattr(LVLMBackend, "answer_fingerprint"):  # added by the resume-fingerprint work (issue 9)
        pytest.skip("LVLMBackend.answer_fingerprint not available")
    base = dict(model="m", cache_path=None)
    first = OpenAIBackend(
        **base, base_url="http://a:8000/v1", timeout_s=5, max_concurrency=2
    ).answer_fingerprint()
    moved = OpenAIBackend(
        **base, base_url="http://b:9000/v1", timeout_s=50, max_concurrency=64, max_retries=1,
        requests_per_minute=100, stage_batch_size=8, api_key_env="OTHER_API_KEY", progress=False,
    ).answer_fingerprint()  # fmt: skip
    assert first == moved
    for change in ({"mode": "score"}, {"max_pixels": 4096}, {"temperature": 0.5}, {"model": "m2"}):
        assert OpenAIBackend(**{**base, **change}).answer_fingerprint() != first, change


def test_unreachable_server_stops_at_the_first_request(photos, tmp_path):  # noqa: F811
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAIBackend(model="m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV,
                            cache_path=None, max_retries=1, backoff_s=0.01)  # fmt: skip
    with pytest.raises(APIFatalError) as err:
        backend.choose(_requests(photos, 3))
    assert str(err.value) == (
        f"cannot reach http://127.0.0.1:{port}/v1 (model 'm') after 2 attempts: APIConnectionError: "
        "Connection error.; is the server running? check lvlm.init_args.base_url"
    )
    assert backend.attempts == 2 and backend.calls == 1


@pytest.mark.parametrize("settle_delay_s", [0.0, 0.2])
def test_a_server_that_goes_away_stops_the_run(photos, tmp_path, monkeypatch, settle_delay_s):  # noqa: F811
    """Exactly one answer and three failures reach the server, however late the caller's thread gets to
    count the failures (a busy machine: ``settle_delay_s`` makes it late on purpose)."""
    reqs = [LVLMRequest(image=photos["cat"], candidates=["cat", f"dog {i}"]) for i in range(8)]
    real_settle = OpenAIBackend._settle

    def late_settle(self, *args, **kwargs):
        time.sleep(settle_delay_s)
        return real_settle(self, *args, **kwargs)

    monkeypatch.setattr(OpenAIBackend, "_settle", late_settle)
    with ChatServer(script=["ok"] + ["500"] * 20) as server:
        backend = _backend(server, tmp_path, max_retries=0, max_consecutive_failures=3, max_concurrency=1)
        with pytest.raises(APIFatalError) as err:
            backend.choose(reqs)
        assert len(server.requests) == 4  # one answer, then three failures in a row
    monkeypatch.setattr(OpenAIBackend, "_settle", real_settle)
    assert str(err.value).startswith(
        f"the last 3 requests to {server.url} (model 'gpt-test-vision') all failed, the last with "
        "InternalServerError (HTTP 500): server error; answers received so far are cached"
    )
    assert len(backend.cache) == 1  # the one answer is kept for the rerun
    with ChatServer(script=["500"] * 3) as server:  # below the limit: fallbacks, the run goes on
        backend = _backend(server, tmp_path, max_retries=0, max_consecutive_failures=4, cache_path=None)
        answers = backend.choose(reqs[:3])
    assert [a.fallback for a in answers] == [API_ERROR] * 3
