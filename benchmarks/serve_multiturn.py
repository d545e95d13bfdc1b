"""The multi-turn scenario: many conversations, each about its own photo or video, several turns
each, sent through a balancer to replicas; what routing does to the caches.

Every conversation opens with its media (a synthetic phone photo, or every third one a synthetic
H.264 clip) and a question; each later turn resends the whole history (the media, the questions and
the answers so far) with a new question, as chat clients do. Turns of different conversations are
interleaved: turn 1 of every conversation in a seeded random order, then turn 2 in another order,
and so on, sent by `concurrency` clients at once; a turn is sent only after its conversation's
previous answer arrived.

Variants of what a client sends (`key`):
- none: only the request; the balancer must find affinity in the body (or not);
- header: an `X-Session-Id` header naming the conversation;
- body: the conversation's name as OpenAI's `prompt_cache_key`.
With `uuid_refs`, turn 1 names its media with a `uuid` and later turns send the `uuid` alone.

The figures: cluster prefix-cache hit rate (cached / prompt tokens, from each response's usage),
TTFT of follow-up turns (2 and later) and of first turns, completions per replica (from the
replicas' own counters), and bytes uploaded.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
from serve_client import (
    BenchRequest,
    RequestRecord,
    distribution,
    http_client,
    rounded,
    send,
)
from serve_launchers import Dialect, chat_body
from serve_photos import PhotoBook

FOLLOW_UPS = [
    "What colours dominate it?",
    "What is in the background?",
    "Describe the largest shape and where it is.",
    "Write a one-line caption for it.",
    "What might happen next?",
    "Count the objects you can see.",
]
OPENERS = ["Describe this photo.", "What happens in this video?"]
KEYS = ("none", "header", "body")
# Connection errors before any response (nothing reached a replica, or the connection broke before
# the status line) are re-sent up to this many times, as the OpenAI SDK does (max_retries=2; it
# also re-sends 429s and 5xx, which this client does not). Each row says how many it took.
CONNECTION_RETRIES = 2


@dataclass(frozen=True)
class MultiturnConfig:
    conversations: int = 24
    turns: int = 4
    video_every: int = 3  # every n-th conversation is about a video (0: photos only)
    video_frames: int = 16  # frames in each synthetic clip (the server samples its default count)
    concurrency: int = 4  # requests in flight at once
    max_tokens: int = 16  # output tokens of every turn (ignore_eos)
    key: str = "none"  # none | header | body: how a client names its conversation
    uuid_refs: bool = False  # later turns refer to the media by uuid
    seed: int = 0


@dataclass
class Conversation:
    index: int
    kind: str  # image or video
    part: dict  # the media's content part as turn 1 sends it
    uuid: str
    messages: list[dict]
    media_bytes: int = 0  # length of the data: URL

    @property
    def name(self) -> str:
        return f"conversation-{self.index}"


def make_conversations(cfg: MultiturnConfig, book: PhotoBook) -> list[Conversation]:
    """The conversations' media and first messages (deterministic for a seed)."""
    from serve_bench import data_url, synthetic_video  # the sweep's clips (lazy: no import cycle)

    convs = []
    for i in range(cfg.conversations):
        is_video = cfg.video_every > 0 and i % cfg.video_every == cfg.video_every - 1
        if is_video:
            rng = np.random.default_rng([cfg.seed, i])
            url = data_url("video/mp4", synthetic_video(rng, cfg.video_frames))
            part = {"type": "video_url", "video_url": {"url": url}}
        else:
            url = book.get("multiturn", i).url
            part = {"type": "image_url", "image_url": {"url": url}}
        kind = "video" if is_video else "image"
        uuid = f"bench-{cfg.seed}-{kind}-{i}"
        if cfg.uuid_refs:
            part = {**part, "uuid": uuid}
        opener = OPENERS[is_video]
        messages = [{"role": "user", "content": [part, {"type": "text", "text": opener}]}]
        convs.append(Conversation(i, kind, part, uuid, messages, len(url)))
    return convs


def by_reference(messages: list[dict], conv: Conversation) -> list[dict]:
    """The messages with the media part replaced by its uuid alone (`"image_url": null`)."""
    field = conv.part["type"]
    ref = {"type": field, field: None, "uuid": conv.uuid}
    first = messages[0]
    content = [ref if p is conv.part else p for p in first["content"]]
    return [{**first, "content": content}, *messages[1:]]


def turn_order(cfg: MultiturnConfig) -> list[tuple[int, int]]:
    """(conversation, turn) in sending order: each turn's conversations in a seeded shuffle."""
    rng = random.Random(cfg.seed)
    order = []
    for turn in range(cfg.turns):
        convs = list(range(cfg.conversations))
        rng.shuffle(convs)
        order += [(c, turn) for c in convs]
    return order


async def run_multiturn(
    url: str, model: str, dialect: Dialect, cfg: MultiturnConfig, book: PhotoBook
) -> tuple[list[dict], float]:
    """Runs the conversations against the chat completions URL; (per-request rows, wall seconds)."""
    convs = make_conversations(cfg, book)
    done = {(c.index, -1): asyncio.Event() for c in convs}
    for c in convs:
        done[(c.index, -1)].set()
    done.update({(c, t): asyncio.Event() for c, t in turn_order(cfg)})
    queue: asyncio.Queue = asyncio.Queue()
    for item in turn_order(cfg):
        queue.put_nowait(item)
    rows: list[dict] = []

    async def client_loop(client) -> None:
        while not queue.empty():
            ci, turn = queue.get_nowait()
            conv = convs[ci]
            await done[(ci, turn - 1)].wait()
            if turn > 0:
                q = FOLLOW_UPS[(ci + turn) % len(FOLLOW_UPS)]
                conv.messages.append({"role": "user", "content": q})
            messages = conv.messages
            if cfg.uuid_refs and turn > 0:
                messages = by_reference(messages, conv)
            body = chat_body(messages, model, cfg.max_tokens, dialect)
            headers = {}
            if cfg.key == "header":
                headers["X-Session-Id"] = conv.name
            elif cfg.key == "body":
                body["prompt_cache_key"] = conv.name
            raw = json.dumps(body).encode()
            req = BenchRequest(len(rows), conv.kind, messages, conv.name, turn > 0)
            sent_at = time.perf_counter()
            retries, retried_for = 0, None
            while True:
                rec: RequestRecord = await send(
                    client, url, req, raw, start, dialect.sends_done, headers=headers
                )
                if rec.ok or rec.status is not None or retries == CONNECTION_RETRIES:
                    break
                retries, retried_for = retries + 1, rec.error
            conv.messages.append({"role": "assistant", "content": rec.text or "(no answer)"})
            rows.append(
                {
                    "conversation": ci,
                    "turn": turn + 1,
                    "kind": conv.kind,
                    "body_bytes": len(raw),
                    "sent_at": sent_at,  # perf_counter: compared with events outside the run
                    "connection_retries": retries,
                    "retried_for": retried_for,  # the first attempt's error
                    **rounded(asdict(rec)),
                }
            )
            done[(ci, turn)].set()

    async with http_client(900) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(cfg.concurrency)))
        wall = time.perf_counter() - start
    for row in rows:
        for bulky in ("itl_s", "chunk_at_s", "text"):
            row.pop(bulky, None)
    return rows, wall


def summarize(rows: list[dict], per_replica: list[float], wall_s: float) -> dict:
    """The scenario's figures from its rows and the completions each replica counted."""
    ok = [r for r in rows if r["ok"]]
    follow = [r for r in ok if r["turn"] > 1]
    first = [r for r in ok if r["turn"] == 1]

    def hit_rate(rs):
        prompt = sum(r["prompt_tokens"] or 0 for r in rs)
        return sum(r["cached_tokens"] or 0 for r in rs) / prompt if prompt else None

    video_convs = {r["conversation"] for r in rows if r["kind"] == "video"}
    video_bytes = [
        sum(r["body_bytes"] for r in rows if r["conversation"] == c) for c in sorted(video_convs)
    ]
    mean = sum(per_replica) / len(per_replica) if per_replica else 0
    return {
        "requests": len(rows),
        "failed": len(rows) - len(ok),
        "failures": [r["error"] for r in rows if not r["ok"]][:10],
        "connection_retries": sum(r.get("connection_retries", 0) for r in rows),
        "wall_s": wall_s,
        "hit_rate": hit_rate(ok),
        "hit_rate_follow_ups": hit_rate(follow),
        "ttft_follow_ups_s": distribution([r["ttft_s"] for r in follow if r["ttft_s"]]),
        "ttft_first_turns_s": distribution([r["ttft_s"] for r in first if r["ttft_s"]]),
        "per_replica": per_replica,
        "max_over_mean": max(per_replica) / mean if mean else None,
        "bytes_uploaded": sum(r["body_bytes"] for r in rows),
        "video_conversation_bytes": distribution(video_bytes) if video_bytes else None,
        "video_bytes_each": distribution(
            [r["body_bytes"] for r in rows if r["kind"] == "video" and r["turn"] == 1]
        ),
    }
