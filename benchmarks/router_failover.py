"""What a balancer does when a replica dies: three plm-serve replicas (the tiny demo checkpoint)
behind it, 12 conversation keys (X-Session-Id) mapped to replicas, the replica holding most keys
SIGKILLed, then every key sent again at once and 5 s later.

    .venv/bin/python benchmarks/router_failover.py haproxy        # or vllm-router, sglang-router

Prints, for each round: failed requests (with their status), live keys that changed replica (should
be none), where the dead replica's keys went, and the slowest request. Which replica served a
request is read from the replicas' own completion counters, one request at a time, so it works for
balancers that do not say.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve_cluster import BALANCERS, SERVED, start_balancer, start_replicas, stop_replicas

KEYS = [f"conversation-{i}" for i in range(12)]
BODY = {"model": "plm-bench", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}


def main(kind: str) -> None:
    from plm_core.demo import demo_checkpoint

    work = Path(tempfile.mkdtemp(prefix=f"failover-{kind}-"))
    replicas = start_replicas(str(demo_checkpoint("tiny")), 3, work, [])
    balancer = None
    try:
        balancer = start_balancer(kind, replicas, work)

        def send(key: str) -> tuple[int | str, str | None, float]:
            """(status or error, the replica that served it, seconds)"""
            before = [r.metric(SERVED) if r.alive else 0.0 for r in replicas]
            t0 = time.perf_counter()
            try:
                status: int | str = httpx.post(
                    f"{balancer.url}/v1/chat/completions",
                    json=BODY,
                    headers={"X-Session-Id": key},
                    timeout=120,
                ).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            took = time.perf_counter() - t0
            after = [r.metric(SERVED) if r.alive else 0.0 for r in replicas]
            served = [r.name for r, a, b in zip(replicas, after, before, strict=True) if a > b]
            return status, (served[0] if served else None), took

        home = {k: send(k)[1] for k in KEYS}
        print(f"{kind}: keys per replica before the kill: {home}")
        victim = max(replicas, key=lambda r: list(home.values()).count(r.name))
        victim.proc.kill()
        victim.proc.wait()
        for label, pause in (("right after the kill", 0.0), ("5 s after", 5.0)):
            time.sleep(pause)
            res = {k: send(k) for k in KEYS}
            failed = [res[k][0] for k in KEYS if res[k][0] != 200]
            moved = [k for k in KEYS if home[k] != victim.name and res[k][1] != home[k]]
            dead_keys_to = sorted({str(res[k][1]) for k in KEYS if home[k] == victim.name})
            print(
                f"{kind} {label} ({victim.name} killed): failed {len(failed)}/{len(KEYS)} "
                f"{failed}; live keys moved {len(moved)}; its keys went to {dead_keys_to}; "
                f"slowest {max(t for _, _, t in res.values()):.2f} s"
            )
    finally:
        if balancer is not None:
            balancer.stop()
        stop_replicas(replicas)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in BALANCERS[1:]:
        sys.exit(f"usage: router_failover.py {{{','.join(BALANCERS[1:])}}}")
    main(sys.argv[1])
