"""The OpenAI-compatible backend against a loopback server that answers every request after a fixed delay.

Measured in one run, side by side:

1. images/s at concurrency 1, 4, 16 and 64 (score mode: one request per image, logprobs of the first
   token), the ratio to concurrency 1 (the ideal is the concurrency itself: the server is never the
   limit), and the client's own CPU time per request (``time.process_time``: key hashing, image
   encoding, HTTP and JSON in this process; the server runs in another process);
2. one slow request in eight: the stage handing the backend batches of 8 (each batch waits for its
   slowest request: the old behaviour) against one large stage batch on the same request pool.

``python bench/api.py [--delay_ms 50] [--images 0]`` (0: ten rounds of each concurrency, 40 to 640).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def serve(port_queue, delay_s: float, slow_every: int, slow_s: float) -> None:
    """A chat-completions server (HTTP/1.1, keep-alive) answering "B" with logprobs after ``delay_s``;
    every ``slow_every``-th request (0: none) takes ``slow_s`` instead."""
    import threading

    lock = threading.Lock()
    count = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed-ACK stall)

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                count[0] += 1
                n = count[0]
            time.sleep(slow_s if slow_every and n % slow_every == 0 else delay_s)
            choice = {"index": 0, "message": {"role": "assistant", "content": "B"}, "finish_reason": "stop"}
            if body.get("logprobs"):
                top = [{"token": t, "logprob": lp, "bytes": [ord(t)]} for t, lp in (("B", -0.1), ("A", -2.4))]
                choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
            data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [choice]}).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.request_queue_size = 256
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever(poll_interval=0.05)


class Server:
    def __init__(self, delay_s: float, slow_every: int = 0, slow_s: float = 0.0) -> None:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(target=serve, args=(q, delay_s, slow_every, slow_s), daemon=True)
        self.proc.start()
        self.url = f"http://127.0.0.1:{q.get(timeout=60)}/v1"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join()


def make_requests(n: int, photo, offset: int = 0):
    """``n`` distinct 224x224 crops of a photo (distinct keys: no request is shared or cached)."""
    from cascadevlm.lvlm.base import LVLMRequest

    w, h = photo.size
    out = []
    for i in range(offset, offset + n):
        x, y = (i * 7) % (w - 224), (i * 13) % (h - 224)
        crop = photo.crop((x, y, x + 224, y + 224))
        out.append(LVLMRequest(image=crop, candidates=["cat", f"dog {i}", "horse"], key=f"bench/{i}"))
    return out


def backend(url: str, concurrency: int, **kw):
    from cascadevlm.lvlm.api_backend import OpenAIBackend

    return OpenAIBackend(model="bench-vlm", base_url=url, api_key_env=None, mode="score", cache_path=None,
                         max_concurrency=concurrency, progress=False, timeout_s=30, **kw)  # fmt: skip


def timed(b, batches) -> tuple[float, float, int]:
    """Wall seconds and client CPU seconds to answer ``batches`` one ``choose`` at a time."""
    n = sum(len(x) for x in batches)
    c0, t0 = time.process_time(), time.perf_counter()
    for reqs in batches:
        answers = b.choose(reqs)
        assert all(a.choice == 1 and a.fallback is None for a in answers)
    return time.perf_counter() - t0, time.process_time() - c0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delay_ms", type=float, default=50.0)
    ap.add_argument("--images", type=int, default=0, help="images per concurrency (0: 10 rounds, 40..640)")
    args = ap.parse_args()
    from cascadevlm.testing.images import sample_photos

    photo = sample_photos()["chelsea"].convert("RGB")  # 451 x 300
    delay = args.delay_ms / 1000
    print(f"OpenAI-compatible backend, score mode, loopback server answering after {args.delay_ms:.0f} ms "
          f"(another process); client: {os.cpu_count()} CPUs")  # fmt: skip

    server = Server(delay)
    try:
        timed(backend(server.url, 4), [make_requests(8, photo, 10**6)])  # warm-up: imports, connections
        rows, base = [], None
        for c in (1, 4, 16, 64):
            n = args.images or min(640, max(40, 10 * c))
            wall, cpu, n = timed(
                backend(server.url, c, stage_batch_size=n), [make_requests(n, photo, c * 1000)]
            )
            rate = n / wall
            base = base or rate
            rows.append((c, n, wall, rate, c / delay, rate / base, 1000 * cpu / n))
    finally:
        server.close()
    print(f"{'concurrency':>11} {'images':>6} {'seconds':>7} {'images/s':>9} {'ideal/s':>8} {'x conc 1':>8} "
          f"{'client CPU ms/request':>21}")  # fmt: skip
    for c, n, wall, rate, ideal, ratio, cpu in rows:
        print(f"{c:>11} {n:>6} {wall:>7.2f} {rate:>9.1f} {ideal:>8.0f} {ratio:>7.1f}x {cpu:>21.2f}")
    r16 = rows[2][5]
    print(f"concurrency 16 / concurrency 1: {r16:.1f}x (target >= 10x) -> {'PASS' if r16 >= 10 else 'FAIL'}")

    # one slow request in eight (8x the delay): batches of 8 wait for their slowest; one pool does not
    slow_s, n, c = 8 * delay, 64, 8
    server = Server(delay, slow_every=8, slow_s=slow_s)
    try:
        reqs = make_requests(n, photo, 10**5)
        timed(backend(server.url, c), [make_requests(8, photo, 10**6)])
        per_batch, _, _ = timed(backend(server.url, c), [reqs[i : i + 8] for i in range(0, n, 8)])
        pooled, _, _ = timed(backend(server.url, c), [make_requests(n, photo, 2 * 10**5)])
    finally:
        server.close()
    print(f"one request in 8 takes {slow_s * 1000:.0f} ms, {n} images, concurrency {c}: stage batches of 8 "
          f"{per_batch:.2f}s, one stage batch (pool) {pooled:.2f}s -> {per_batch / pooled:.1f}x faster")  # fmt: skip


if __name__ == "__main__":
    main()
