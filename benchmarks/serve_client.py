"""The serving benchmark's client side: one streamed chat sent and timed, and latency statistics.

Every request streams and is timed from the moment it is sent: TTFT to the first content chunk,
ITL between content chunks, end-to-end to the end of the stream; output tokens come from the usage
chunk. Failures (non-200, error events, broken streams) land in the record, never raise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class BenchRequest:
    """One chat of a workload: its OpenAI messages, and which media item it carries."""

    index: int
    kind: str  # text, image or video
    messages: list[dict]
    media_id: str | None = None  # "image-3": the same id means the same bytes
    reused: bool = False  # True when the media item appeared earlier in the workload


@dataclass
class RequestRecord:
    """What one request did, as the client saw it (seconds; start_s from the start of its run)."""

    index: int
    kind: str
    media_id: str | None = None
    reused: bool = False
    ok: bool = False
    status: int | None = None
    error: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunk_at_s: list[float] = field(default_factory=list)  # content chunk arrivals, from run start
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    output_tokens: int | None = None
    served_by: str | None = None  # the balancer's X-Served-By header, where it sends one
    content_chunks: int = 0
    finish_reason: str | None = None
    text: str = ""


OnContent = Callable[[RequestRecord], None]


class StreamParser:
    """Turns the SSE lines of one streamed chat completion, with their arrival times, into a
    record.

    expect_done: the stream must end with `data: [DONE]` (OpenAI's streams do); without it, a
    stream that closes after a finish_reason and a usage chunk is complete (`transformers serve`
    sends no [DONE]).
    """

    def __init__(
        self,
        record: RequestRecord,
        sent_at: float,
        expect_done: bool = True,
        on_content: OnContent | None = None,
    ):
        self.record, self.sent_at = record, sent_at
        self.expect_done, self.on_content = expect_done, on_content
        self.last_content_at: float | None = None
        self.done = False
        self.text: list[str] = []

    def feed(self, line: str, now: float) -> None:
        if not line.startswith("data:"):
            return  # blank separators, comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        rec = self.record
        try:
            event = json.loads(data)
        except ValueError:
            rec.error = rec.error or f"unparseable event: {data[:200]}"
            return
        if "error" in event:
            err = event["error"]
            rec.error = (
                rec.error or f"error event: {err.get('message') if isinstance(err, dict) else err}"
            )
            return
        if event.get("usage"):
            rec.prompt_tokens = event["usage"].get("prompt_tokens")
            rec.output_tokens = event["usage"].get("completion_tokens")
            details = event["usage"].get("prompt_tokens_details") or {}
            rec.cached_tokens = details.get("cached_tokens")
        for choice in event.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                self._content(content, now)
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]

    def _content(self, content: str, now: float) -> None:
        rec = self.record
        if self.last_content_at is None:
            rec.ttft_s = now - self.sent_at
        else:
            rec.itl_s.append(now - self.last_content_at)
        self.last_content_at = now
        rec.chunk_at_s.append(rec.start_s + now - self.sent_at)
        rec.content_chunks += 1
        self.text.append(content)
        if self.on_content is not None:
            self.on_content(rec)

    def finish(self, now: float) -> RequestRecord:
        rec = self.record
        rec.e2e_s = now - self.sent_at
        rec.text = "".join(self.text)
        complete = self.done or (not self.expect_done and rec.finish_reason is not None)
        if rec.error is None and not complete:
            rec.error = (
                "the stream ended without [DONE]"
                if self.expect_done
                else "the stream ended without a finish_reason"
            )
        if rec.error is None and rec.output_tokens is None:
            rec.error = "no usage chunk"
        rec.ok = rec.error is None
        return rec


async def send(
    client: httpx.AsyncClient,
    url: str,
    req: BenchRequest,
    body: bytes,
    run_start: float,
    expect_done: bool = True,
    on_content: OnContent | None = None,
    headers: dict[str, str] | None = None,
) -> RequestRecord:
    """Sends one streamed chat and times it; never raises (failures land in the record)."""
    rec = RequestRecord(req.index, req.kind, req.media_id, req.reused)
    sent_at = time.perf_counter()
    rec.start_s = sent_at - run_start
    try:
        async with client.stream(
            "POST",
            url,
            content=body,
            headers={"content-type": "application/json", **(headers or {})},
        ) as resp:
            rec.status = resp.status_code
            rec.served_by = resp.headers.get("x-served-by")
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                rec.e2e_s = time.perf_counter() - sent_at
                return rec
            parser = StreamParser(rec, sent_at, expect_done, on_content)
            async for line in resp.aiter_lines():
                parser.feed(line, time.perf_counter())
            return parser.finish(time.perf_counter())
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
        rec.e2e_s = time.perf_counter() - sent_at
        return rec


def http_client(timeout_s: float) -> httpx.AsyncClient:
    """An async client with no connection limit (a benchmark's concurrency is its own)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits)


def distribution(values: list[float]) -> dict:
    """count, mean, p50, p90, p99, max (linear-interpolated percentiles); None figures if empty."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99]).tolist()
    return {
        "count": len(values),
        "mean": float(arr.mean()),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": float(arr.max()),
    }


def rounded(record: dict) -> dict:
    """A record's times to the microsecond (keeps results.json small)."""

    def r(x):
        return round(x, 6) if isinstance(x, float) else x

    return {k: [r(x) for x in v] if isinstance(v, list) else r(v) for k, v in record.items()}
