"""The multi-turn routing benchmark (benchmarks/serve_multiturn*.py) on synthetic data: the sending
order, uuid references, the figures, the kill summary and the report; then one small real run on
the tiny checkpoint (one replica, and three behind HAProxy where it is installed)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from support import REPO, checkpoint_path

sys.path.insert(0, str(REPO / "benchmarks"))
import serve_multiturn as mt  # noqa: E402
import serve_multiturn_bench as mtb  # noqa: E402
from serve_cluster import balancer_problem  # noqa: E402


def test_turns_are_sent_turn_by_turn_in_a_new_order_each_time():
    cfg = mt.MultiturnConfig(conversations=10, turns=3)
    order = mt.turn_order(cfg)
    assert len(order) == 30
    blocks = [order[i * 10 : (i + 1) * 10] for i in range(3)]
    for turn, block in enumerate(blocks):
        assert sorted(c for c, _ in block) == list(range(10)) and {t for _, t in block} == {turn}
    firsts = [[c for c, _ in b] for b in blocks]
    assert firsts[0] != firsts[1] != firsts[2], "conversations of one turn must be shuffled anew"
    assert mt.turn_order(cfg) == order  # seeded


def test_a_uuid_reference_replaces_only_the_media_part():
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}, "uuid": "v1"}
    conv = mt.Conversation(0, "video", part, "v1", [])
    question = {"type": "text", "text": "What happens?"}
    messages = [
        {"role": "user", "content": [part, question]},
        {"role": "assistant", "content": "A ball rolls."},
    ]
    out = mt.by_reference(messages, conv)
    assert out[0]["content"] == [{"type": "video_url", "video_url": None, "uuid": "v1"}, question]
    assert out[1] is messages[1]
    assert messages[0]["content"][0] is part  # the conversation's own history is untouched


def row(conv, turn, *, ok=True, prompt=100, cached=0, ttft=0.1, body=1000, kind="image", **kw):
    return {
        "conversation": conv,
        "turn": turn,
        "kind": kind,
        "ok": ok,
        "error": None if ok else "boom",
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "ttft_s": ttft,
        "body_bytes": body,
        **kw,
    }


def test_the_figures():
    rows = [
        row(0, 1, ttft=2.0),
        row(0, 2, cached=90, ttft=0.1),
        row(1, 1, kind="video", body=5000, ttft=3.0),
        row(1, 2, kind="video", body=200, cached=80, ttft=0.3),
        row(1, 3, kind="video", ok=False),
    ]
    s = mt.summarize(rows, [3.0, 1.0, 0.0], wall_s=10.0)
    assert s["failed"] == 1 and s["requests"] == 5
    assert s["hit_rate"] == pytest.approx(170 / 400)
    assert s["hit_rate_follow_ups"] == pytest.approx(170 / 200)
    assert s["ttft_follow_ups_s"]["p50"] == pytest.approx(0.2)
    assert s["ttft_first_turns_s"]["p50"] == pytest.approx(2.5)
    assert s["max_over_mean"] == pytest.approx(3 / (4 / 3))
    assert s["video_conversation_bytes"]["mean"] == 6200  # every turn sent, the failed one too
    assert s["video_bytes_each"]["mean"] == 5000  # its first turn


def test_the_kill_summary_counts_failures_after_the_kill_and_moved_live_conversations():
    rows = [
        row(0, 1, served_by="r0", sent_at=1.0),
        row(0, 2, served_by="r0", sent_at=3.0),
        row(1, 1, served_by="r1", sent_at=1.1),
        row(1, 2, served_by="r2", sent_at=3.1),  # a live conversation that moved
        row(2, 1, served_by="r2", sent_at=1.2),
        row(2, 2, served_by=None, ok=False, sent_at=1.9),  # in flight on the victim
        row(2, 3, served_by="r0", sent_at=3.2, connection_retries=1),
    ]
    k = mtb.kill_summary(rows, ["r2", 2.0])
    assert k["killed"] == "r2" and k["requests_after_kill"] == 3
    assert k["failed_after_kill"] == 0 and k["failed_in_all"] == 1
    assert k["retried_after_kill"] == 1
    assert k["live_conversations"] == 2 and k["live_conversations_moved"] == 1


def test_the_report_states_the_targets():
    def result(label, p50, hit, per_replica, video=None):
        summary = mt.summarize([row(0, 1)], per_replica, 1.0)
        summary.update(
            hit_rate=hit,
            ttft_follow_ups_s={"p50": p50, "p90": p50},
            video_conversation_bytes=video,
            video_bytes_each={"mean": 100.0},
        )
        return {"setup": {"label": label}, "summary": summary}

    results = {
        "command": "x",
        "environment": {},
        "checkpoint": "ckpt",
        "config": {
            "conversations": 24,
            "turns": 4,
            "video_every": 3,
            "concurrency": 4,
            "max_tokens": 16,
        },  # fmt: skip
        "setups": {
            "single": result("one", 0.1, 0.74, [96.0]),
            "round-robin": result("rr", 1.5, 0.40, [32.0, 32.0, 32.0]),
            "haproxy": result("hap", 0.1, 0.74, [40.0, 32.0, 24.0]),
            "haproxy-uuid": result("uuid", 0.1, 0.74, [40.0, 32.0, 24.0], {"mean": 120.0}),
        },
    }
    text = mtb.report_markdown(results)
    assert "round robin / haproxy: 15.0x (target >= 5x)" in text
    assert "single-replica hit rate: 1.00" in text
    assert "max / mean requests per replica: 1.25" in text
    assert "(the video once: 1.20x the first turn)" in text


@pytest.mark.slow
def test_a_small_run_through_haproxy_keeps_conversations_on_their_replica(tmp_path):
    """Four 2-turn conversations on three tiny replicas behind the committed HAProxy file, without
    any client key: every follow-up is served from cache, and uuid references upload less."""
    if balancer_problem("haproxy"):
        pytest.skip(balancer_problem("haproxy"))
    args = SimpleNamespace(
        model=str(checkpoint_path("tiny")),
        setups="single,haproxy,haproxy-uuid",
        kill_after=0,
        conversations=4,
        turns=2,
        video_every=2,
        multiturn_concurrency=2,
        max_tokens=4,
        seed=0,
        out=str(tmp_path),
        note=[],
        startup_timeout=300,
    )
    assert mtb.bench_multiturn(args, ["--scenario", "multiturn"]) == 0
    import json

    results = json.loads((tmp_path / "results.json").read_text())
    one, three, uuid = (
        results["setups"][k]["summary"] for k in ("single", "haproxy", "haproxy-uuid")
    )
    assert three["failed"] == 0 and three["hit_rate_follow_ups"] > 0.5
    assert three["hit_rate"] == pytest.approx(one["hit_rate"], rel=0.05)
    assert sum(three["per_replica"]) == 8
    assert uuid["bytes_uploaded"] < three["bytes_uploaded"]
    assert (tmp_path / "report.md").read_text().count("| 3 replicas") == 2
