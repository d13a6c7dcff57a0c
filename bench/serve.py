"""Serving the cascade (cascadevlm-serve, issue 25): measured side by side in one run on loopback.

Models and gate: ``--config`` (default the demo: the demo CLIP and the demo LLaVA of
cascadevlm/zoo/checkpoints, ``cascade.budget: 0.3``, so the server's online budget controller sends about
30% of the images to the LVLM). Images: the first ``--images`` Fashion-MNIST test photos, as PNG.

- throughput at ``--clients`` concurrent clients (each sends its share of the images one after another):
  the server with dynamic batching (``--max_batch_size``) against the same server with batch size 1;
- p50 / p95 latency (as the clients saw it) of the images kept by CLIP and of those sent to the LVLM;
- the batched server's throughput against the same pipeline called in-process on the same images
  (``CascadePipeline.answer`` in batches of ``--max_batch_size``, base64 decoding included).

Each server gets a fresh answer store, so every LVLM answer is computed (none reused); 16 warm-up
requests on other images come first. Targets (issue 25): batching >= 3x batch size 1; server >= 0.8x
in-process.

    python bench/serve.py [--images 256] [--clients 16] [--max_batch_size 16] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402

from cascadevlm.data.demo import fashion_mnist_dir  # noqa: E402
from cascadevlm.serve import ServerProcess, build_pipeline, image_from_base64  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WARMUP = 16


def png_base64(images) -> list[str]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def post(url: str, b64: str) -> dict:
    req = urllib.request.Request(
        url + "/predict",
        data=json.dumps({"image": b64}).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    return {**answer, "client_ms": 1000 * (time.perf_counter() - t0)}  # as the client saw it


def run_clients(url: str, bodies: list[str], clients: int) -> tuple[float, list[dict]]:
    """Seconds for ``clients`` threads to get every answer (client c sends images c, c + clients, ...)."""

    def client(c: int) -> list[dict]:
        return [post(url, b) for b in bodies[c::clients]]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for part in pool.map(client, range(clients)) for a in part]
    return time.perf_counter() - t0, answers


def serve_run(
    config_args: list[str], batch: int, bodies: list[str], warmup: list[str], clients: int, tmp: Path
):
    cache = tmp / f"cache_b{batch}"
    server = ServerProcess([*config_args, "--cache_dir", str(cache), "--max_batch_size", str(batch)],
                           tmp / f"server_b{batch}.log", cwd=REPO)  # fmt: skip
    try:
        run_clients(server.url, warmup, clients)
        before = server.metrics()
        seconds, answers = run_clients(server.url, bodies, clients)
        after = server.metrics()
    finally:
        server.stop()
    sent = sum(a["deferred"] for a in answers)
    return {"seconds": seconds, "img_s": len(bodies) / seconds, "sent": sent, "metrics": after,
            "answers": answers, "warm_requests": before["answered"]}  # fmt: skip


def in_process(config_args: list[str], bodies: list[str], warmup: list[str], batch: int, tmp: Path) -> dict:
    pipeline, cfg = build_pipeline([*config_args, "--cache_dir", str(tmp / "cache_inproc")])

    def answer_all(items: list[str]) -> list:
        out = []
        for i in range(0, len(items), batch):
            images = [image_from_base64(b, cfg.max_pixels) for b in items[i : i + batch]]
            out += pipeline.answer(images)
        return out

    answer_all(warmup)
    t0 = time.perf_counter()
    answers = answer_all(bodies)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "img_s": len(bodies) / seconds, "sent": sum(a.deferred for a in answers)}


def pct(answers: list[dict], deferred: bool) -> str:
    """p50 / p95 of the client-side latency of the timed images kept by CLIP (or sent to the LVLM)."""
    ms = [a["client_ms"] for a in answers if a["deferred"] == deferred]
    if not ms:
        return "none"
    p50, p95 = np.percentile(ms, [50, 95])
    return f"p50 {p50:.1f} ms, p95 {p95:.1f} ms ({len(ms)} images)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max_batch_size", type=int, default=16)
    args = ap.parse_args()
    os.chdir(REPO)
    ds = datasets.load_from_disk(str(fashion_mnist_dir("data")))["test"]
    bodies = png_base64(ds[i]["image"] for i in range(args.images))
    warmup = png_base64(ds[i]["image"] for i in range(args.images, args.images + WARMUP))
    config_args = ["--config", args.config, "--trainer.enable_progress_bar", "false"]
    print(f"{os.cpu_count()} CPU cores, shared with other work while this ran; {args.images} images, "
          f"{args.clients} clients, config {args.config}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        batched = serve_run(config_args, args.max_batch_size, bodies, warmup, args.clients, tmp)
        single = serve_run(config_args, 1, bodies, warmup, args.clients, tmp)
        local = in_process(config_args, bodies, warmup, args.max_batch_size, tmp)
    m = batched["metrics"]
    rows = [
        (f"server, dynamic batching (max {args.max_batch_size})", batched),
        ("server, batch size 1", single),
        (f"in-process pipeline (batches of {args.max_batch_size})", local),
    ]
    for name, r in rows:
        print(f"{name:48s} {r['img_s']:8.1f} img/s  ({r['seconds']:.1f} s, {r['sent']} sent to the LVLM)")
    for name, r in rows[:2]:
        print(
            f"latency ({name}): kept by CLIP: {pct(r['answers'], False)}; sent to the LVLM: {pct(r['answers'], True)}"
        )
    stages = {k: v.get("p50") for k, v in m["latency_ms"].items()}
    print(
        f"stage p50 (ms), batched server, warm-up included: {json.dumps({k: round(v, 2) for k, v in stages.items() if v})}"
    )
    r1 = batched["img_s"] / single["img_s"]
    r2 = batched["img_s"] / local["img_s"]
    print(f"batching vs batch size 1: {r1:.2f}x (target >= 3x): {'holds' if r1 >= 3 else 'does NOT hold'}")
    print(
        f"server vs in-process:     {r2:.2f}x (target >= 0.8x): {'holds' if r2 >= 0.8 else 'does NOT hold'}"
    )


if __name__ == "__main__":
    main()
