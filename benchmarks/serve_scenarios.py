"""Three named serving scenarios over HTTP, each run the same way on every target.

- burst: photos x questions streamed photo chats, all sent at once (16 = 4 photos x 4 questions);
  output tok/s, TTFT and ITL percentiles of the median of 3 bursts (new photos each), after one
  unmeasured burst of the same shape.
- repeat: for each of N new photos, a cold request (a photo the server has never seen), then warm
  requests with new questions on the same photo, one at a time; cold TTFT, warm TTFT, the ratio.
- interference: text streams decoding long outputs; once one has streamed steady_tokens tokens, a
  cold photo chat is sent. The text streams' gaps between tokens that overlap the photo's prefill
  window (its send time to its first token) give ITL p50/p99; the photo's TTFT is set against the
  TTFT of another photo of the same size sent alone on the idle server just before.

Photos come from serve_photos (new ones for every scenario and repetition); every request is
greedy and streamed with a fixed output length where the target can be asked for one.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from serve_client import (
    BenchRequest,
    OnContent,
    RequestRecord,
    distribution,
    http_client,
    rounded,
    send,
)
from serve_launchers import Dialect, chat_body
from serve_photos import Photo, PhotoBook

SCENARIOS = ("burst", "repeat", "interference")
QUESTIONS = [
    "Describe this photo in detail.",
    "What colours dominate the picture?",
    "What shapes can you see, and where?",
    "Write a caption for this photo.",
    "What is in the background?",
    "Count the objects you can see.",
    "What might happen next in this scene?",
    "Summarise the photo in one sentence.",
]
STORY_WORDS = "river lantern orbit maple copper harbor violet meadow falcon glacier ember".split()


@dataclass(frozen=True)
class ScenarioConfig:
    """The sizes of the three scenarios (defaults: the issue's table)."""

    max_tokens: int = 32  # output tokens of every photo chat
    burst_photos: int = 4
    burst_questions: int = 4  # per photo, all sent at once with the other photos'
    burst_repeats: int = 3  # measured bursts (new photos each) after one unmeasured burst
    repeat_photos: int = 3  # repetitions, each with a new photo
    repeat_warm: int = 3  # warm requests (new questions) after each cold one
    text_streams: int = 4
    text_tokens: int = 512  # output tokens of each text stream
    steady_tokens: int = 16  # the photo is sent once a text stream has streamed this many
    interference_photos: int = 3  # repetitions, each with new photos
    warmup: int = 2  # unmeasured requests (a photo chat, a text chat, ...) before the scenario
    seed: int = 0


@dataclass
class Endpoint:
    """Where a scenario sends its chats, with which model name and in which dialect."""

    url: str  # the chat completions URL
    model: str
    dialect: Dialect
    timeout_s: float = 900


class Chats:
    """Numbered chat requests, with their bodies in the endpoint's dialect."""

    def __init__(self, ep: Endpoint):
        self.ep, self.count = ep, 0

    def _make(
        self, kind: str, content: Any, max_tokens: int, media_id: str | None
    ) -> tuple[BenchRequest, bytes]:
        messages = [{"role": "user", "content": content}]
        req = BenchRequest(self.count, kind, messages, media_id)
        self.count += 1
        body = chat_body(messages, self.ep.model, max_tokens, self.ep.dialect)
        return req, json.dumps(body).encode()

    def photo(self, photo: Photo, question: str, max_tokens: int) -> tuple[BenchRequest, bytes]:
        content = [photo.part(), {"type": "text", "text": question}]
        return self._make("image", content, max_tokens, photo.id)

    def text(self, index: int, max_tokens: int) -> tuple[BenchRequest, bytes]:
        words = " ".join(STORY_WORDS[(index + i) % len(STORY_WORDS)] for i in range(40))
        prompt = f"Story {index}. Use these words: {words}. Write a long story."
        return self._make("text", prompt, max_tokens, None)

    async def send(
        self,
        client: httpx.AsyncClient,
        chat: tuple[BenchRequest, bytes],
        start: float,
        on_content: OnContent | None = None,
    ) -> RequestRecord:
        req, body = chat
        return await send(
            client, self.ep.url, req, body, start, self.ep.dialect.sends_done, on_content
        )


# -- runs ------------------------------------------------------------------------------------------
async def warm_up(ep: Endpoint, cfg: ScenarioConfig, book: PhotoBook) -> list[RequestRecord]:
    """Unmeasured requests one at a time, photo and text in turn, each photo its own."""
    chats = Chats(ep)
    async with http_client(ep.timeout_s) as client:
        start = time.perf_counter()
        out = []
        for i in range(cfg.warmup):
            chat = (
                chats.photo(book.get("warmup", i), QUESTIONS[i % len(QUESTIONS)], 8)
                if i % 2 == 0
                else chats.text(10_000 + i, 8)  # texts no scenario sends
            )
            out.append(await chats.send(client, chat, start))
        return out


async def run_burst(ep: Endpoint, cfg: ScenarioConfig, book: PhotoBook) -> dict:
    """One unmeasured burst (its own photos: it warms the server's concurrent paths, never its
    caches), then `burst_repeats` measured bursts, each with new photos; the figures are the median
    burst's by output tok/s, and every burst's are kept."""
    bursts = []
    for r in range(1 + cfg.burst_repeats):
        role = "burst-warmup" if r == 0 else f"burst{r}"
        bursts.append(
            await _one_burst(ep, cfg, [book.get(role, p) for p in range(cfg.burst_photos)])
        )
    measured = sorted(bursts[1:], key=lambda b: b["summary"]["output_throughput"])
    summary = dict(measured[len(measured) // 2]["summary"])
    summary["bursts"] = [
        {k: b["summary"][k] for k in ("wall_s", "output_throughput", "completed", "failed")}
        for b in bursts[1:]
    ]
    summary["failed"] = sum(b["summary"]["failed"] for b in bursts[1:])
    summary["errors"] = [e for b in bursts[1:] for e in b["summary"]["errors"]]
    return {"summary": summary, "records": [rec for b in bursts[1:] for rec in b["records"]]}


async def _one_burst(ep: Endpoint, cfg: ScenarioConfig, photos: list[Photo]) -> dict:
    """All photo chats sent at once: question q of every photo, then question q + 1, ..."""
    chats = Chats(ep)
    batch = [
        chats.photo(photo, QUESTIONS[q % len(QUESTIONS)], cfg.max_tokens)
        for q in range(cfg.burst_questions)
        for photo in photos
    ]
    async with http_client(ep.timeout_s) as client:
        start = time.perf_counter()
        records = await asyncio.gather(*(chats.send(client, chat, start) for chat in batch))
        wall = time.perf_counter() - start
    return {"summary": burst_summary(list(records), wall), "records": list(records)}


async def run_repeat(ep: Endpoint, cfg: ScenarioConfig, book: PhotoBook) -> dict:
    """Per photo: one cold chat, then warm chats with new questions, one at a time."""
    chats = Chats(ep)
    reps, records = [], []
    async with http_client(ep.timeout_s) as client:
        start = time.perf_counter()
        for r in range(cfg.repeat_photos):
            photo = book.get("repeat", r)
            asked = [
                chats.photo(photo, QUESTIONS[(r + q) % len(QUESTIONS)], cfg.max_tokens)
                for q in range(1 + cfg.repeat_warm)
            ]
            done = [await chats.send(client, chat, start) for chat in asked]
            reps.append({"photo": photo.id, "cold": done[0], "warm": done[1:]})
            records += done
    return {"summary": repeat_summary(reps), "records": records}


async def run_interference(ep: Endpoint, cfg: ScenarioConfig, book: PhotoBook) -> dict:
    """Per repetition: a photo alone on the idle server, then a new photo sent into text streams."""
    chats = Chats(ep)
    reps, records = [], []
    async with http_client(ep.timeout_s) as client:
        for r in range(cfg.interference_photos):
            start = time.perf_counter()
            question = QUESTIONS[r % len(QUESTIONS)]
            alone = await chats.send(
                client, chats.photo(book.get("alone", r), question, cfg.max_tokens), start
            )
            await asyncio.sleep(0.5)  # the server is idle again
            texts, photo = await _photo_into_streams(
                client, chats, cfg, r, book.get("interfere", r), question
            )
            reps.append(window_figures(texts, photo, alone))
            records += [alone, *texts, photo]
    return {"summary": interference_summary(reps), "records": records}


async def _photo_into_streams(
    client: httpx.AsyncClient,
    chats: Chats,
    cfg: ScenarioConfig,
    rep: int,
    photo: Photo,
    question: str,
) -> tuple[list[RequestRecord], RequestRecord]:
    """Starts the text streams (new texts each repetition), sends the photo chat once one of them
    is decoding steadily."""
    steady = asyncio.Event()

    def on_content(rec: RequestRecord) -> None:
        if rec.content_chunks >= cfg.steady_tokens:
            steady.set()

    start = time.perf_counter()
    streams = asyncio.gather(
        *(
            chats.send(
                client, chats.text(rep * cfg.text_streams + i, cfg.text_tokens), start, on_content
            )
            for i in range(cfg.text_streams)
        )
    )
    waiting = asyncio.ensure_future(steady.wait())
    await asyncio.wait([streams, waiting], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    photo_rec = await chats.send(client, chats.photo(photo, question, cfg.max_tokens), start)
    return list(await streams), photo_rec


def run_scenario(name: str, ep: Endpoint, cfg: ScenarioConfig, book: PhotoBook) -> dict:
    """Runs one scenario against one endpoint: {"summary": ..., "records": [...]} (JSON-ready)."""
    runner = {"burst": run_burst, "repeat": run_repeat, "interference": run_interference}[name]
    result = asyncio.run(runner(ep, cfg, book))
    result["records"] = [rounded(asdict(r)) for r in result["records"]]
    return result


# -- figures ---------------------------------------------------------------------------------------
def _failures(records: list[RequestRecord]) -> list[str]:
    return [f"#{r.index} ({r.kind} {r.media_id or ''}): {r.error}" for r in records if not r.ok]


def burst_summary(records: list[RequestRecord], wall_s: float) -> dict:
    """Output tok/s over the burst's wall time (completed requests), TTFT and pooled ITL."""
    ok = [r for r in records if r.ok]
    outputs = [r.output_tokens or 0 for r in ok]
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": _failures(records),
        "wall_s": wall_s,
        "output_tokens": sum(outputs),
        "output_tokens_min": min(outputs, default=None),
        "output_tokens_max": max(outputs, default=None),
        "prompt_tokens_mean": sum(r.prompt_tokens or 0 for r in ok) / len(ok) if ok else None,
        "output_throughput": sum(outputs) / wall_s,
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": distribution([x for r in ok for x in r.itl_s]),
    }


def repeat_summary(reps: list[dict]) -> dict:
    """Cold and warm TTFT per photo and over all photos (p50s), and their ratio."""
    per_photo, cold_all, warm_all, records = [], [], [], []
    for rep in reps:
        cold, warm = rep["cold"], [w for w in rep["warm"] if w.ok]
        records += [cold, *rep["warm"]]
        warm_ttfts = [w.ttft_s for w in warm if w.ttft_s is not None]
        cold_ttft = cold.ttft_s if cold.ok else None
        warm_p50 = distribution(warm_ttfts)["p50"]
        per_photo.append(
            {
                "photo": rep["photo"],
                "cold_ttft_s": cold_ttft,
                "warm_ttft_s": warm_ttfts,
                "warm_ttft_p50_s": warm_p50,
                "cold_over_warm": cold_ttft / warm_p50 if cold_ttft and warm_p50 else None,
            }
        )
        cold_all += [] if cold_ttft is None else [cold_ttft]
        warm_all += warm_ttfts
    cold_d, warm_d = distribution(cold_all), distribution(warm_all)
    return {
        "requests": len(records),
        "completed": sum(r.ok for r in records),
        "failed": sum(not r.ok for r in records),
        "errors": _failures(records),
        "output_tokens_min": min((r.output_tokens or 0 for r in records if r.ok), default=None),
        "output_tokens_max": max((r.output_tokens or 0 for r in records if r.ok), default=None),
        "cold_ttft_s": cold_d,
        "warm_ttft_s": warm_d,
        "cold_over_warm": cold_d["p50"] / warm_d["p50"]
        if cold_d["p50"] and warm_d["p50"]
        else None,
        "per_photo": per_photo,
    }


def window_figures(texts: list[RequestRecord], photo: RequestRecord, alone: RequestRecord) -> dict:
    """The text streams' token gaps overlapping the photo's prefill window (send to first token),
    and those that ended before the photo was sent (steady decoding)."""
    rep: dict[str, Any] = {
        "photo": photo.media_id,
        "photo_ttft_s": photo.ttft_s if photo.ok else None,
        "alone_ttft_s": alone.ttft_s if alone.ok else None,
        "records": [alone, *texts, photo],
    }
    t0 = photo.start_s
    t1 = t0 + photo.ttft_s if photo.ok and photo.ttft_s is not None else None
    in_window, before, decoding = [], [], 0
    for rec in texts:
        pairs = list(zip(rec.chunk_at_s, rec.chunk_at_s[1:]))
        before += [b - a for a, b in pairs if b <= t0]
        if t1 is not None:
            mine = [b - a for a, b in pairs if b > t0 and a < t1]
            in_window += mine
            decoding += bool(mine)
    rep.update(
        {
            "window_s": None if t1 is None else t1 - t0,
            "itl_window_s": in_window,
            "itl_before_s": before,
            "streams_decoding_in_window": decoding,
            "text_streams": len(texts),
        }
    )
    return rep


def interference_summary(reps: list[dict]) -> dict:
    """Pooled in-window ITL, photo TTFT with the streams and alone (p50s over repetitions)."""
    records = [r for rep in reps for r in rep.pop("records")]
    with_streams = distribution([x["photo_ttft_s"] for x in reps if x["photo_ttft_s"]])
    alone = distribution([x["alone_ttft_s"] for x in reps if x["alone_ttft_s"]])
    texts = [r for r in records if r.kind == "text" and r.ok]
    return {
        "requests": len(records),
        "completed": sum(r.ok for r in records),
        "failed": sum(not r.ok for r in records),
        "errors": _failures(records),
        "text_output_tokens_min": min((r.output_tokens or 0 for r in texts), default=None),
        "itl_window_s": distribution([g for x in reps for g in x["itl_window_s"]]),
        "itl_before_s": distribution([g for x in reps for g in x["itl_before_s"]]),
        "photo_ttft_s": with_streams,
        "alone_ttft_s": alone,
        "ttft_over_alone": with_streams["p50"] / alone["p50"]
        if with_streams["p50"] and alone["p50"]
        else None,
        "streams_decoding_in_window": min(
            (x["streams_decoding_in_window"] for x in reps), default=0
        ),
        "text_streams": reps[0]["text_streams"] if reps else 0,
        "repetitions": [
            {k: v for k, v in x.items() if k not in ("itl_window_s", "itl_before_s")}
            | {
                "itl_window": distribution(x["itl_window_s"]),
                "itl_before": distribution(x["itl_before_s"]),
            }
            for x in reps
        ],
    }
