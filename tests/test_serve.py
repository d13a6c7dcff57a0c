"""cascadevlm.serve over real HTTP on 127.0.0.1: the server runs in a subprocess (LitServe), requests in
bounded loops, no timing assertions."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from cascadevlm.lvlm.base import LVLMAnswer, LVLMBackend, LVLMRequest
from cascadevlm.serve import BudgetGate, CascadePipeline, ServerProcess, predict

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 24  # evaluated and served
STARTUP_S = 600  # the bound on waiting for /health (2 busy cores: imports dominate)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _body(raw: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(raw).decode()}).encode()


def _model_args(tiny_clip_path, data_root, llava_dir, cache: Path) -> list[str]:
    """The tiny CLIP on the first Fashion-MNIST test images, with the tiny LLaVA unless ``llava_dir`` is None."""
    lvlm = [
        "--lvlm.class_path", "cascadevlm.lvlm.transformers_backend.TransformersBackend",
        "--lvlm.init_args.model", str(llava_dir), "--lvlm.init_args.device", "cpu",
    ]  # fmt: skip
    return [
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
        "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root), "--data.limit", str(N_IMAGES),
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--cache_dir", str(cache),
        *(lvlm if llava_dir is not None else []),
    ]  # fmt: skip


def _middle_tau(entropies: list[float]) -> float:
    """A tau half-way across the widest gap near the median: no image sits on the threshold."""
    e = np.sort(np.asarray(entropies))
    mid = len(e) // 2
    i = max(range(mid - 4, mid + 4), key=lambda j: e[j + 1] - e[j])
    return float((e[i] + e[i + 1]) / 2)


@pytest.fixture(scope="module")
def images(data_root) -> list[Image.Image]:
    ds = datasets.load_from_disk(str(data_root / "fashion_mnist"))["test"]
    return [ds[i]["image"] for i in range(N_IMAGES)]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_clip_path, data_root, tiny_llava_dir):
    """evaluate.py on the first images: CLIP only (for a tau that splits them), then the cascade at it."""
    from cascadevlm.cli import evaluate_main
    from cascadevlm.records import read_records

    out = tmp_path_factory.mktemp("evaluated")
    where = ["--output_dir", str(out), "--cascade.lvlm_on", "deferred"]
    evaluate_main(
        [*_model_args(tiny_clip_path, data_root, None, out / "cache"), *where, "--run_name", "clip"]
    )
    tau = _middle_tau([r.entropy for r in read_records(out / "clip" / "records.parquet")])
    cascade = _model_args(tiny_clip_path, data_root, tiny_llava_dir, out / "cache")
    evaluate_main([*cascade, *where, "--cascade.tau", str(tau), "--run_name", "cascade"])
    return tau, read_records(out / "cascade" / "records.parquet")


@pytest.fixture(scope="module")
def server(tmp_path_factory, evaluated, tiny_clip_path, data_root, tiny_llava_dir):
    tau, _ = evaluated
    cache = tmp_path_factory.mktemp("serve_cache")  # its own answer store: the LVLM is really asked
    args = _model_args(tiny_clip_path, data_root, tiny_llava_dir, cache)
    served = ServerProcess([*args, "--cascade.tau", str(tau)], cache / "server.log", STARTUP_S, REPO)
    yield served
    served.stop()


@pytest.mark.slow
def test_served_labels_equal_evaluate(server, evaluated, images):
    tau, records = evaluated
    answers = [predict(server.url, im) for im in images]
    assert 0 < sum(r.deferred for r in records) < len(records)  # both paths are exercised
    assert [a["class_index"] for a in answers] == [r.final for r in records]
    assert [a["deferred"] for a in answers] == [r.deferred for r in records]
    assert [a["clip"]["class_index"] for a in answers] == [r.clip_pred for r in records]
    for a, r in zip(answers, records, strict=True):
        assert a["tau"] == tau and a["fallback"] is None
        assert [t["class_index"] for t in a["clip"]["topk"]] == r.clip_topk[: len(a["clip"]["topk"])]
        if r.deferred:
            assert a["lvlm"]["class_index"] == r.lvlm_choice
            assert a["lvlm"]["scores"] == pytest.approx(r.lvlm_scores, abs=1e-4)
            assert set(a["timings_ms"]) == {"decode", "clip", "lvlm", "total"}
        else:
            assert a["lvlm"] is None


@pytest.mark.slow
def test_sixteen_concurrent_clients_get_their_own_answers(server, images):
    reference = {i: predict(server.url, im) for i, im in enumerate(images[:16])}
    bodies = {i: _body(_png(im)) for i, im in enumerate(images[:16])}
    jobs = [(c, (c + k) % 16) for c in range(16) for k in range(3)]  # each client sends 3 images

    def client(c: int) -> list[tuple[int, dict]]:
        return [(i, _post(server.url, bodies[i])) for cc, i in jobs if cc == c]

    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(client, range(16)) for r in rs]
    assert len(results) == len(jobs)
    for i, (status, answer) in results:
        assert status == 200
        ref = reference[i]
        # the same image's answer (probabilities equal up to float sums in batches of other sizes)
        assert (answer["class_index"], answer["deferred"]) == (ref["class_index"], ref["deferred"])
        assert [t["class_index"] for t in answer["clip"]["topk"]] == [
            t["class_index"] for t in ref["clip"]["topk"]
        ]
        assert answer["entropy"] == pytest.approx(ref["entropy"], rel=1e-5)
        assert [t["prob"] for t in answer["clip"]["topk"]] == pytest.approx(
            [t["prob"] for t in ref["clip"]["topk"]], rel=1e-4
        )


def _bad_inputs(image: Image.Image) -> dict[str, tuple[bytes, str, int, str]]:
    png = _png(image)
    huge = _png(Image.new("L", (4100, 4100)))  # over the default --max_pixels 4096 * 4096
    return {
        "not an image": (_body(b"hello, not an image"), "application/json", 400, "image: not a PNG or JPEG image"),
        "truncated image": (_body(png[: len(png) // 2]), "application/json", 400, "image: corrupt or truncated image"),
        "huge image": (_body(huge), "application/json", 413, "image: 4100x4100 pixels is more than --max_pixels"),
        "empty body": (b"", "application/json", 400, "empty body: send JSON"),
        "wrong JSON": (b"{not json", "application/json", 400, "the body is not valid JSON"),
        "no image field": (b'{"img": "x"}', "application/json", 422, "image: Field required"),
        "not base64": (b'{"image": "***"}', "application/json", 400, "image: not base64"),
        "wrong content type": (_body(png), "text/plain", 415, "content type 'text/plain' is not JSON"),
    }  # fmt: skip


@pytest.mark.slow
def test_bad_inputs_get_one_line_4xx_and_the_server_keeps_serving(server, images):
    before = json.loads(_get(server.url + "/metrics")[1])
    cases = _bad_inputs(images[0])
    for name, (body, ctype, status, message) in cases.items():
        got, answer = _post(server.url, body, ctype)
        assert (got, list(answer)) == (status, ["error"]), name
        assert answer["error"].startswith(message) and "\n" not in answer["error"], (name, answer)
    assert predict(server.url, images[0])["class_index"] == predict(server.url, images[0])["class_index"]
    after = json.loads(_get(server.url + "/metrics")[1])
    assert after["requests"] - before["requests"] == len(cases) + 2
    assert after["errors"] - before["errors"] == len(cases)
    assert after["answered"] - before["answered"] == 2


@pytest.mark.slow
def test_health_and_metrics(server, images):
    assert _get(server.url + "/health") == (200, b"ok")
    before = json.loads(_get(server.url + "/metrics")[1])
    answers = [predict(server.url, im) for im in images[:8]]
    after = json.loads(_get(server.url + "/metrics")[1])
    assert after["answered"] - before["answered"] == 8
    assert after["sent_to_lvlm"] - before["sent_to_lvlm"] == sum(a["deferred"] for a in answers)
    assert after["fraction_sent"] == pytest.approx(after["sent_to_lvlm"] / after["answered"])
    for stage in ("decode", "clip", "total", "http"):
        assert after["latency_ms"][stage]["count"] >= 8 and after["latency_ms"][stage]["p95"] >= 0


DOWN_URL = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there


@pytest.fixture(scope="module")
def down_server(tmp_path_factory, data_root):
    """The demo CLIP with an LVLM API that is down (nothing listens on its port), under a budget."""
    cache = tmp_path_factory.mktemp("down")
    args = [
        "--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", "cascadevlm/zoo/checkpoints/clip.safetensors",
        "--data.dataset", "fashion_mnist", "--data.data_root", str(data_root),
        "--trainer.accelerator", "cpu", "--cache_dir", str(cache),
        "--lvlm.class_path", "cascadevlm.lvlm.api_backend.OpenAIBackend", "--lvlm.init_args.model", "down",
        "--lvlm.init_args.base_url", DOWN_URL, "--lvlm.init_args.api_key_env", "null",
        "--lvlm.init_args.max_retries", "0", "--lvlm.init_args.cache_path", "null",
        "--cascade.budget", "0.3", "--budget_window", "50",
    ]  # fmt: skip
    served = ServerProcess(args, cache / "server.log", STARTUP_S, REPO)
    yield served
    served.stop()


BUDGET_TOLERANCE = 0.05  # docs/serving.md: the fraction sent over a stream stays within budget +- 0.05


@pytest.mark.slow
def test_lvlm_down_answers_clip_marked_and_budget_holds(down_server, data_root):
    ds = datasets.load_from_disk(str(data_root / "fashion_mnist"))["test"]
    stream = [ds[i]["image"] for i in range(200)]
    answers = [predict(down_server.url, im) for im in stream]
    sent = [a for a in answers if a["deferred"]]
    assert sent and all(a["fallback"] == "lvlm_unavailable" for a in sent)
    assert all(a["label"] == a["clip"]["label"] and a["lvlm"] is None for a in sent)
    assert all(a["fallback"] is None for a in answers if not a["deferred"])
    assert abs(len(sent) / len(answers) - 0.3) <= BUDGET_TOLERANCE
    metrics = json.loads(_get(down_server.url + "/metrics")[1])
    assert metrics["lvlm_fallbacks"] == len(sent) and metrics["errors"] == 0


def test_budget_gate_sends_the_most_uncertain_of_the_window():
    gate = BudgetGate(0.25, window=4)
    decisions = [gate.decide(e)[0] for e in [0.1, 0.2, 0.3, 0.9, 0.1, 0.2, 0.8, 0.05]]
    # 1 of every 4 at most: the 4th (0.9 is the top of 0.1, 0.2, 0.3, 0.9); not the 7th (0.8 is second to
    # 0.9, still in its window), nor any of the first 3 (floor(0.25 * n) = 0 while n < 4)
    assert decisions == [False, False, False, True, False, False, False, False]


def test_config_that_cannot_serve_is_refused_in_one_line(tiny_clip_path, data_root, tmp_path, capsys):
    from cascadevlm.serve import main

    args = _model_args(tiny_clip_path, data_root, tmp_path / "no_such_llava", tmp_path / "cache")
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and "\n" not in err, err


class BlockingLVLM(LVLMBackend):
    """Answers candidate 1 once ``release`` is set; raises when ``down``."""

    def __init__(self, down: bool = False) -> None:
        self.release = threading.Event()
        self.down = down

    def choose(self, requests: list[LVLMRequest]) -> list[LVLMAnswer]:
        if self.down:
            raise RuntimeError("connection refused")
        self.release.wait()
        return [LVLMAnswer(choice=1, raw="") for _ in requests]


@pytest.fixture(scope="module")
def tiny_clip_module(tiny_clip_path):
    from cascadevlm.clip.module import ClipClassifier
    from cascadevlm.zoo.tiny_clip import TINY_CLIP

    return ClipClassifier(TINY_CLIP, str(tiny_clip_path), class_names=["a", "b", "c"], topk=2).eval()


def _pipeline(model, backend: LVLMBackend, lvlm_timeout: float = 0.05) -> CascadePipeline:
    from cascadevlm.cascade.evaluate import CascadeOptions
    from cascadevlm.cascade.lvlm_stage import LVLMStage

    opts = CascadeOptions(tau=-math.inf, topk=2)  # every image goes to the LVLM
    stage = LVLMStage(backend, ["a", "b", "c"])
    return CascadePipeline(model, ["a", "b", "c"], opts, stage, lvlm_timeout, 10)


def test_slow_busy_and_down_lvlm_give_clip_answers_marked(tiny_clip_module):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    backend = BlockingLVLM()
    pipe = _pipeline(tiny_clip_module, backend)
    slow = pipe.answer([image])[0]  # the LVLM holds on: past --lvlm_timeout, CLIP's answer
    assert (slow.fallback, slow.fallback_reason, slow.class_index) == (
        "lvlm_unavailable",
        "timeout",
        slow.clip_ids[0],
    )
    busy = pipe.answer([image])[0]  # still busy with that call: not queued behind it
    assert (busy.fallback, busy.fallback_reason, busy.lvlm) == ("lvlm_unavailable", "busy", None)
    backend.release.set()
    pipe._pending.result()
    # The answers below must not depend on the LVLM's thread finishing within 0.05 s (a busy machine):
    # their calls end at once, so a timeout they can never reach leaves nothing to timing.
    pipe.lvlm_timeout = 600.0
    back = pipe.answer([image])[0]  # free again: the LVLM's answer
    assert (back.fallback, back.class_index) == (None, back.clip_ids[1])
    down = _pipeline(tiny_clip_module, BlockingLVLM(down=True), lvlm_timeout=600.0).answer([image])[0]
    assert (down.fallback, down.fallback_reason) == (
        "lvlm_unavailable",
        "error: RuntimeError: connection refused",
    )
    assert pipe.to_json(down)["label"] == pipe.to_json(down)["clip"]["label"]


@pytest.mark.parametrize("batch", [1, 4])
def test_api_answers_as_litserve_calls_it_batched_or_not(tiny_clip_module, batch):
    """LitServe calls predict with the list of a batch, or with max_batch_size 1, with one request."""
    from cascadevlm.serve import CascadeAPI, PredictRequest

    api = CascadeAPI(_pipeline(tiny_clip_module, BlockingLVLM(down=True)), batch, 0.0, 10**6)
    good = PredictRequest(image=base64.b64encode(_png(Image.new("RGB", (32, 32), (0, 90, 200)))).decode())
    bad = PredictRequest(image=base64.b64encode(b"not an image").decode())
    if batch == 1:
        responses = [api.encode_response(api.predict(api.decode_request(r))) for r in (good, bad)]
    else:
        responses = [
            api.encode_response(y)
            for y in api.unbatch(api.predict(api.batch([api.decode_request(good), api.decode_request(bad)])))
        ]
    assert [r.status_code for r in responses] == [200, 400]
    answer = json.loads(responses[0].body)
    assert (answer["fallback"], answer["tau"]) == ("lvlm_unavailable", "-inf")  # JSON has no -Infinity
    assert json.loads(responses[1].body) == {"error": "image: not a PNG or JPEG image"}
