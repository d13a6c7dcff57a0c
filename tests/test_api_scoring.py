"""The API backend at scale (cascadevlm/lvlm/api_backend.py): log-probability scoring in the OpenAI
chat-completions wire format, guided choice, image-size cap, the request pool and the rate limit,
against a chat-completions server on loopback (tests/test_lvlm_api.py's ChatServer)."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import pickle
import time

import pytest
from lvlm_fixtures import photos  # noqa: F401
from PIL import Image
from test_lvlm_api import KEY_ENV, SECRET, ChatServer, _backend, _requests

from cascadevlm.lvlm.api_backend import (
    APIFatalError,
    OpenAIBackend,
    RateLimiter,
    letter_scores,
    limit_pixels,
    normalize_letter_token,
)
from cascadevlm.lvlm.base import LVLMRequest
from cascadevlm.lvlm.prompts import LETTERS, PromptConfig, option_order


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def first_token_logprobs(
    top: list[tuple[str, float]], token: str | None = None, logprob: float | None = None
):
    """A ``logprobs`` function for ChatServer: the OpenAI chat-completions format for one generated token
    (``choices[0].logprobs.content[0]`` with its ``top_logprobs``)."""

    def entry(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

    def make(body: dict) -> dict | None:
        if not body.get("logprobs"):  # a generate-mode request: no logprobs asked, none sent
            return None
        assert body["max_tokens"] == 1
        tops = top[: body["top_logprobs"]]
        tok, lp = (token, logprob) if token is not None else tops[0]
        return {
            "content": [{**entry(tok, lp), "top_logprobs": [entry(t, x) for t, x in tops]}],
            "refusal": None,
        }

    return make


def score_backend(server, tmp_path, **kw) -> OpenAIBackend:
    return _backend(server, tmp_path, mode="score", **kw)


def test_scores_are_the_servers_letter_logprobs_mapped_to_candidates(photos, tmp_path):  # noqa: F811
    top = [(" C", -0.25), ("A", -1.5), ("B", -2.75), ("D", -3.0), ("The", -4.5)]
    config = PromptConfig(shuffle=True, shuffle_seed=3)
    reqs = _requests(photos, 3)
    for i, r in enumerate(reqs):
        r.candidates.append(["coins", "galaxy", "china"][i])  # 4 candidates: A-D
        r.key = f"test/{i}"
    with ChatServer(logprobs=first_token_logprobs(top), answer="C") as server:
        backend = score_backend(server, tmp_path, prompt=config, top_logprobs=5)
        answers = backend.choose(reqs)
        body = server.requests[0]["body"]
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 1
    by_letter = {"A": -1.5, "B": -2.75, "C": -0.25, "D": -3.0}
    for r, a in zip(reqs, answers, strict=True):
        order = option_order(r, config)  # order[d] = candidate shown as letter d
        expected = [by_letter[LETTERS[order.index(c)]] for c in range(4)]
        assert a.scores == expected  # exactly the server's numbers, candidate by candidate
        assert a.choice == order[2] and a.raw == " C" and a.fallback is None  # "C" is shown candidate
    assert len({tuple(option_order(r, config)) for r in reqs}) > 1  # the shuffle did move candidates


def test_letter_variants_sum_and_absent_letters_are_minus_inf():
    assert [normalize_letter_token(t) for t in [" B", "b", "(B", "B.", " **B", "Bo"]] == [
        "B",
        "B",
        "B",
        "B",
        "B",
        "BO",
    ]
    scores = letter_scores([("B", -1.0), (" B", -1.0), ("b", -2.0), ("A", -0.5), ("Boeing", -0.1)], 3)
    assert scores[0] == -0.5
    assert scores[1] == pytest.approx(math.log(2 * math.exp(-1.0) + math.exp(-2.0)))
    assert scores[2] == -math.inf  # "C" is not among the top tokens
    assert letter_scores([("B", -1.0), ("B", -1.0)], 2) == [-math.inf, -1.0]  # one token listed twice


def test_missing_letter_scores_minus_inf_and_choice_is_the_argmax(photos, tmp_path):  # noqa: F811
    top = [("B", -0.1), ("Sure", -2.5), ("A", -3.0)]
    with ChatServer(logprobs=first_token_logprobs(top)) as server:
        (answer,) = score_backend(server, tmp_path).choose(_requests(photos, 1))
    assert answer.scores == [-3.0, -0.1, -math.inf] and answer.choice == 1 and answer.fallback is None


def test_non_letter_answer_token_scores_from_top_logprobs(photos, tmp_path):  # noqa: F811
    top = [("The", -0.2), (" A", -2.0), ("C", -1.75)]
    with ChatServer(logprobs=first_token_logprobs(top)) as server:
        (answer,) = score_backend(server, tmp_path).choose(_requests(photos, 1))
    assert answer.raw == "The" and answer.scores == [-2.0, -math.inf, -1.75]
    assert answer.choice == 2 and answer.fallback is None


def test_non_letter_token_with_empty_top_logprobs_is_unparseable(photos, tmp_path):  # noqa: F811
    with ChatServer(logprobs=first_token_logprobs([], token="The", logprob=-0.3)) as server:
        backend = score_backend(server, tmp_path)
        req = _requests(photos, 1)[0]
        req.fallback = 2
        (answer,) = backend.choose([req])
    assert (answer.choice, answer.raw, answer.scores, answer.fallback) == (2, "The", None, "unparseable")


def test_letter_token_with_empty_top_logprobs_scores_that_letter(photos, tmp_path):  # noqa: F811
    with ChatServer(logprobs=first_token_logprobs([], token="B", logprob=-0.7)) as server:
        (answer,) = score_backend(server, tmp_path).choose(_requests(photos, 1))
    assert answer.scores == [-math.inf, -0.7, -math.inf] and answer.choice == 1


def test_server_without_logprobs_stops_the_run_after_one_request(photos, tmp_path):  # noqa: F811
    with ChatServer(answer="B") as server:  # answers, but leaves the logprobs field out
        backend = score_backend(server, tmp_path, max_concurrency=4)
        with pytest.raises(APIFatalError) as err:
            backend.choose(_requests(photos, 4))
        assert len(server.requests) == 1
    assert str(err.value) == (
        f"{server.url} (model 'gpt-test-vision') returned no log-probabilities, which lvlm.init_args.mode "
        "score needs: set lvlm.init_args.mode generate, or serve the model with an engine that returns "
        "logprobs (vLLM, SGLang)"
    )
    assert len(backend.cache) == 0


def test_score_cache_serves_a_rerun_with_zero_requests(photos, tmp_path):  # noqa: F811
    top = [("A", -0.4), ("B", -1.1), ("C", -2.2)]
    with ChatServer(logprobs=first_token_logprobs(top)) as server:
        first = score_backend(server, tmp_path).choose(_requests(photos, 3))
        again = score_backend(server, tmp_path)  # a new process on the same cache file
        second = again.choose(_requests(photos, 3))
        assert len(server.requests) == 3 and again.calls == 0 and again.cache_hits == 3
        _backend(server, tmp_path).choose(
            _requests(photos, 1)
        )  # generate mode is another question: not served from score
        assert len(server.requests) == 4
    assert [(a.choice, a.scores) for a in second] == [(a.choice, a.scores) for a in first]


def test_score_mode_refuses_named_options_and_guided_choice():
    with pytest.raises(ValueError) as err:
        OpenAIBackend(model="m", mode="score", prompt=PromptConfig(options="names"), cache_path=None)
    assert str(err.value) == (
        "lvlm.init_args.mode score reads the log-probabilities of the answer letter and needs lettered "
        "options: set lvlm.init_args.prompt.options letters (got 'names') or lvlm.init_args.mode generate"
    )
    with pytest.raises(ValueError, match="set guided_choice false"):
        OpenAIBackend(model="m", mode="score", guided_choice=True, cache_path=None)
    for name in ("max_concurrency", "stage_batch_size", "top_logprobs"):
        with pytest.raises(ValueError, match=f"^lvlm.init_args.{name} must be >= 1, got 0$"):
            OpenAIBackend(model="m", cache_path=None, **{name: 0})
    with pytest.raises(ValueError, match="requests_per_minute must be > 0"):
        OpenAIBackend(model="m", cache_path=None, requests_per_minute=0)


@pytest.mark.parametrize(
    ("guided", "field", "value"),
    [
        (True, "structured_outputs", {"choice": ["A", "B", "C"]}),
        ("guided_choice", "guided_choice", ["A", "B", "C"]),
        ("regex", "regex", "(A|B|C)"),
    ],
)
def test_guided_choice_sends_the_options(photos, tmp_path, guided, field, value):  # noqa: F811
    with ChatServer(answer="B") as server:
        backend = _backend(server, tmp_path, guided_choice=guided, extra_body={"top_k": 1})
        (answer,) = backend.choose(_requests(photos, 1))
        body = server.requests[0]["body"]
    assert body[field] == value and body["top_k"] == 1 and answer.choice == 1


def test_guided_choice_by_name_escapes_regex(photos, tmp_path):  # noqa: F811
    req = LVLMRequest(image=photos["cat"], candidates=["Boeing 737-800", "A.320 (neo)"])
    with ChatServer(answer="A.320 (neo)") as server:
        backend = _backend(server, tmp_path, guided_choice="regex", prompt=PromptConfig(options="names"))
        (answer,) = backend.choose([req])
        body = server.requests[0]["body"]
    assert body["regex"] == r"(Boeing\ 737\-800|A\.320\ \(neo\))" and answer.choice == 1


def test_max_pixels_caps_the_uploaded_image_keeping_its_aspect(photos, tmp_path):  # noqa: F811
    image = photos["rocket"]  # 640 x 427
    with ChatServer() as server:
        backend = _backend(server, tmp_path, image_max_side=None, max_pixels=64 * 64, image_format="PNG")
        backend.choose([LVLMRequest(image=image, candidates=["rocket", "cat"])])
        url = server.requests[0]["body"]["messages"][0]["content"][0]["image_url"]["url"]
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    w, h = sent.size
    assert w * h <= 64 * 64 and w * h > 0.95 * 64 * 64
    assert abs(w / h - 640 / 427) < 0.03
    assert limit_pixels(image, None, 10**9) is image  # fits: untouched


def test_concurrency_bound_is_reached_and_never_exceeded(photos, tmp_path):  # noqa: F811
    reqs = [LVLMRequest(image=photos["cat"], candidates=["cat", f"dog {i}"]) for i in range(13)]
    with ChatServer(delay_s=0.1, hold_until_inflight=4) as server:
        backend = _backend(server, tmp_path, max_concurrency=4, cache_path=None)
        backend.choose(reqs)
    assert len(server.requests) == 13 and server.max_inflight == 4


def test_rate_limiter_spaces_starts_with_a_fake_clock():
    now = [100.0]
    waits: list[float] = []

    def sleep(s):
        waits.append(s)
        now[0] += s

    limiter = RateLimiter(per_minute=120, clock=lambda: now[0], sleep=sleep)
    starts = []
    for _ in range(5):
        limiter.acquire()
        starts.append(now[0])
    assert starts == [100.0, 100.5, 101.0, 101.5, 102.0] and waits == [0.5] * 4
    now[0] += 10  # idle time is not saved up into a burst beyond one request
    limiter.acquire()
    limiter.acquire()
    assert now[0] == 112.5


def test_requests_per_minute_is_honoured_on_the_wire(photos, tmp_path):  # noqa: F811
    reqs = [LVLMRequest(image=photos["cat"], candidates=["cat", f"dog {i}"]) for i in range(5)]
    with ChatServer() as server:
        backend = _backend(server, tmp_path, max_concurrency=5, requests_per_minute=600, cache_path=None)
        t0 = time.perf_counter()
        backend.choose(reqs)
        elapsed = time.perf_counter() - t0
        times = sorted(r["t"] for r in server.requests)
    # 600/min: starts 0.1 s apart, so the 5th starts >= 0.4 s after the 1st (unlimited: ~0.05 s in all);
    # arrival times at the server carry scheduling noise, hence the looser bound on their span
    assert len(times) == 5 and elapsed >= 0.4 and times[-1] - times[0] >= 0.3, (elapsed, times)


def test_stage_hands_the_backend_large_batches_and_reports_progress(photos, tmp_path, caplog):  # noqa: F811
    import lightning as L

    from cascadevlm.cascade.lvlm_stage import LVLMStage, read_answers, run_lvlm_stage
    from cascadevlm.records import PredictionRecord

    names = ["cat", "horse", "rocket", "flower", "coffee", "camera"]
    dataset = [{"image": photos[names[i % 6]].resize((64 + i, 48))} for i in range(12)]
    todo = [PredictionRecord(i, 0, [i % 6, (i + 1) % 6, (i + 2) % 6], [0.5, 0.3, 0.2], 1.0, i % 6, True)
            for i in range(12)]  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with (
        ChatServer(delay_s=0.1, hold_until_inflight=4) as server,
        caplog.at_level(logging.INFO, "cascadevlm.lvlm.api_backend"),
    ):
        backend = _backend(server, tmp_path, max_concurrency=4, stage_batch_size=64)
        sizes = []
        choose = backend.choose
        backend.choose = lambda reqs: sizes.append(len(reqs)) or choose(reqs)
        run_lvlm_stage(trainer, LVLMStage(backend, names), dataset, todo, 3, "test", tmp_path / "parts", 2)
    assert sizes == [12]  # one batch, not six of lvlm_batch_size 2
    assert server.max_inflight == 4  # the pool stayed full (batches of 2 would cap it at 2)
    answers = read_answers(tmp_path / "parts")
    assert sorted(answers) == list(range(12)) and all(
        a.lvlm_choice == a.candidate_ids[1] for a in answers.values()
    )
    assert (
        "12 images in" in caplog.text and "12 requests, 0 cache hits, 0 retries, 0 API errors" in caplog.text
    )


def test_key_is_in_no_written_file_in_score_mode(photos, tmp_path, caplog):  # noqa: F811
    top = [("A", -0.4), ("B", -1.1)]
    with ChatServer(logprobs=first_token_logprobs(top)) as server, caplog.at_level(logging.DEBUG):
        backend = score_backend(server, tmp_path)
        backend.begin_stage(3)
        answers = backend.choose(_requests(photos, 3))
        backend.end_stage()
        assert server.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    (tmp_path / "backend.pkl").write_bytes(pickle.dumps(backend))
    (tmp_path / "answers.json").write_text(json.dumps([vars(a) for a in answers]))
    (tmp_path / "log.txt").write_text(caplog.text)
    backend.cache.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    restored = pickle.loads((tmp_path / "backend.pkl").read_bytes())  # a worker process's copy works
    assert restored.mode == "score" and restored.cache_hits == 0 and restored.choose(_requests(photos, 1))


def test_vllm_score_config_against_a_loopback_server(photos, tmp_path, monkeypatch):  # noqa: F811
    from pathlib import Path

    from cascadevlm.lvlm.config import load_backend

    monkeypatch.setenv("VLLM_API_KEY", SECRET)
    config = Path(__file__).resolve().parents[1] / "configs" / "lvlm" / "api_vllm_qwen25vl_score.yaml"
    top = [("A", -1.25), ("B", -0.5), ("C", -2.0)]
    with ChatServer(logprobs=first_token_logprobs(top)) as server:
        backend = load_backend(config, base_url=server.url, cache_path=str(tmp_path / "c.sqlite"))
        (answer,) = backend.choose(_requests(photos, 1))
        body = server.requests[0]["body"]
    assert body["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and body["top_logprobs"] == 20
    assert answer.scores == [-1.25, -0.5, -2.0] and answer.choice == 1
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    w, h = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size
    assert w * h <= 1024 * 28 * 28
