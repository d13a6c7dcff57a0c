"""OpenAI-compatible API backend against a chat-completions server on loopback
(cascadevlm/lvlm/api_backend.py, cascadevlm/lvlm/cache.py)."""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from lvlm_fixtures import photos  # noqa: F401
from PIL import Image

from cascadevlm.lvlm.api_backend import OpenAIBackend
from cascadevlm.lvlm.base import Exemplar, LVLMRequest
from cascadevlm.lvlm.prompts import PromptConfig

KEY_ENV = "CASCADEVLM_TEST_API_KEY"
SECRET = "sk-test-5f1d2c9e-never-write-me"


class ChatServer:
    """Speaks ``POST /v1/chat/completions`` on 127.0.0.1 only.

    ``script`` lists what to do with the first requests ("429", "500", "sleep:<seconds>", "ok"); later
    requests are answered with ``answer``. It serves at most ``max_requests`` and shuts itself down
    after ``lifetime_s`` seconds.
    """

    def __init__(self, script=(), answer="The answer is (B).", delay_s=0.0, max_requests=40, lifetime_s=30.0):
        self.script = list(script)
        self.answer = answer
        self.delay_s = delay_s
        self.max_requests = max_requests
        self.requests: list[dict] = []
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
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
                        }
                    )
                    action = server.script[n] if n < len(server.script) else "ok"
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
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
                    if action.startswith("sleep:"):
                        time.sleep(float(action.split(":")[1]))
                    time.sleep(server.delay_s)
                    text = server.answer(body) if callable(server.answer) else server.answer
                    self._send(200, _completion(body["model"], text))
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
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(model: str, text: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
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


@pytest.mark.parametrize("failure", ["429", "500", "sleep:1.5"])
def test_retries_then_succeeds(photos, tmp_path, failure):  # noqa: F811
    with ChatServer(script=[failure]) as server:
        backend = _backend(server, tmp_path, timeout_s=0.5, max_retries=3)
        t0 = time.perf_counter()
        (answer,) = backend.choose(_requests(photos, 1))
        elapsed = time.perf_counter() - t0
    assert answer.choice == 1 and answer.fallback is None
    assert len(server.requests) == 2  # the failure, then the success
    assert backend.calls == 1 and backend.attempts == 2
    if failure.startswith("sleep"):
        assert 0.5 <= elapsed < 1.5  # gave up on the slow attempt at the timeout


def test_out_of_retries_falls_back_and_is_not_cached(photos, tmp_path, caplog):  # noqa: F811
    with ChatServer(script=["500", "500", "500"]) as server:
        backend = _backend(server, tmp_path, max_retries=2)
        with caplog.at_level(logging.WARNING):
            (answer,) = backend.choose(_requests(photos, 1))
        assert (answer.choice, answer.fallback) == (0, "api_error: InternalServerError")
        assert len(server.requests) == 3
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
    with ChatServer(delay_s=0.15) as server:
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
