"""Does the server stay responsive under a burst? A separate process probes GET /health every 50 ms
while N image chats (each a ~360 KB base64 JPEG) are sent at once; prints the probe's latency
percentiles and the chats' status codes (429s must carry Retry-After).

    .venv/bin/python benchmarks/liveness_burst.py                    # 300 at once, then 1000
    .venv/bin/python benchmarks/liveness_burst.py --bursts 300:64 --url http://127.0.0.1:8000

Each burst `N:P` starts a fresh server on the tiny demo checkpoint with --max-pending-requests P
(unless --url names a running one), waits until it is ready, then sends N chats (8 output tokens
each) over N connections at once, --repeat times (2 s apart); the /health figures count the probes
sent while a burst was in flight. Default flags otherwise (log level info, the default, so the
access log runs as it does for users).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_launchers import free_port, server_command, start_server, stop_server  # noqa: E402


def photo_url(target_bytes: int = 270_000) -> str:
    """A noisy JPEG of about target_bytes (its base64 ~4/3 of that)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    side = 600
    while True:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=70)
        if buf.tell() >= target_bytes or side > 4000:
            return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        side = int(side * (target_bytes / buf.tell()) ** 0.5) + 8


async def burst(base: str, n: int, body: bytes) -> tuple[Counter, int, float]:
    """n chats at once over n connections; (status counts, 429s without Retry-After, seconds)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one():
            try:
                r = await client.post(
                    f"{base}/v1/chat/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                return r.status_code, r.status_code == 429 and "retry-after" not in r.headers
            except httpx.HTTPError as e:
                return type(e).__name__, False

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)))
        return Counter(s for s, _ in results), sum(b for _, b in results), time.perf_counter() - t0


def probe_run(base: str, n: int, body: bytes, repeat: int) -> dict:
    """`repeat` bursts, one after another, with the probe running beside them. The figures count
    only the probes sent while a burst was in flight (from its first request until its last
    answer): the idle seconds around a burst would dilute the percentiles."""
    parent, child = mp.Pipe()
    prober = mp.Process(target=_probe_until_told, args=(base, child))
    prober.start()
    time.sleep(2.0)  # the probe is connected and steady before the first burst
    statuses, no_retry_after, windows = Counter(), 0, []
    for _ in range(repeat):
        t0 = time.time()
        counts, missing, _took = asyncio.run(burst(base, n, body))
        windows.append((t0, time.time()))
        statuses.update(counts)
        no_retry_after += missing
        time.sleep(2.0)  # the server drains its admitted requests
    parent.send("stop")
    probes = parent.recv()
    prober.join()
    during = [lat for sent, lat in probes if any(a <= sent <= b for a, b in windows)]
    arr = np.array([x for x in during if np.isfinite(x)])
    return {
        "requests": n * repeat,
        "bursts": repeat,
        "statuses": dict(statuses),
        "429_without_retry_after": no_retry_after,
        "burst_s": [round(b - a, 1) for a, b in windows],
        "health_probes_during_bursts": len(during),
        "health_failed": sum(not np.isfinite(x) for x in during),
        "health_ms": {
            k: round(float(v) * 1000, 1)
            for k, v in zip(("p50", "p90", "p99", "max"), np.percentile(arr, [50, 90, 99, 100]))
        },
    }


def _probe_until_told(base: str, conn) -> None:
    """In its own process: GET /health every 50 ms until told to stop; sends back (sent at, wall
    clock; latency, inf for a failure) per probe."""
    probes = []
    with httpx.Client(timeout=30) as client:
        while not conn.poll():
            sent, t0 = time.time(), time.perf_counter()
            try:
                client.get(f"{base}/health").raise_for_status()
                probes.append((sent, time.perf_counter() - t0))
            except httpx.HTTPError:
                probes.append((sent, float("inf")))
            time.sleep(max(0.0, 0.05 - (time.perf_counter() - t0)))
    conn.recv()
    conn.send(probes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--bursts",
        default="300:64,1000:256",
        help="comma-separated N:P, N chats at once against --max-pending-requests P "
        "(default: %(default)s)",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="bursts per N:P, one after another (default: 3)"
    )
    ap.add_argument("--url", help="a running server instead (its own flags apply)")
    ap.add_argument("--model", help="checkpoint (default: the tiny demo checkpoint)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    url = photo_url()
    print(f"photo: {len(url) / 1e3:.0f} KB of base64", file=sys.stderr)
    body = json.dumps(
        {
            "model": "plm-bench",
            "max_tokens": 8,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "Describe it."},
                    ],
                }
            ],
        }
    ).encode()
    results = []
    for spec in args.bursts.split(","):
        n, pending = (int(x) for x in spec.split(":"))
        proc = None
        base = args.url
        if base is None:
            from plm_core.demo import demo_checkpoint

            model = args.model or str(demo_checkpoint("tiny"))
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            # the default log level (info: an access line per request), not the launchers' warning
            extra = ["--max-pending-requests", str(pending), "--log-level", "info"]
            cmd = server_command("plm-serve", model, port, "plm-bench", extra)
            proc = start_server(cmd, base, ["/ready"], Path("/tmp") / f"burst-{port}.log", 300)
        try:
            result = {"max_pending_requests": pending, **probe_run(base, n, body, args.repeat)}
        finally:
            if proc is not None:
                stop_server(proc)
        print(json.dumps(result))
        results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
