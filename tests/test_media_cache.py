"""Raw-media cache: repeats skip decoding, give the uncached path's tokens, hashes and pixels."""

from __future__ import annotations

import base64
import io
import random
import threading

import numpy as np
import pytest
import torch
from media_sets import write_synthetic_video
from PIL import Image

from plm_core.config import MediaConfig
from plm_core.inputs import MediaItem
from plm_core.media.errors import MediaError
from plm_core.media.raw_cache import MediaFacts, RawMediaCache
from plm_core.model_config import load_model_config
from plm_core.processor import ContextLengthError, MediaOptions, PLMProcessor
from plm_core.tokenizer import PLMTokenizer

LOCAL = MediaConfig(allowed_local_media_path="/")


def _processor(checkpoint, media: MediaConfig = LOCAL, **kw) -> PLMProcessor:
    cfg = load_model_config(checkpoint)
    tok = PLMTokenizer.for_model(cfg)
    return PLMProcessor(cfg, tok, media, **kw)


@pytest.fixture
def fresh(tiny_checkpoint):
    """A new processor per test (a cache of its own), built from the tiny checkpoint."""
    return lambda media=LOCAL, **kw: _processor(tiny_checkpoint, media, **kw)


@pytest.fixture(scope="module")
def uncached(tiny_checkpoint):
    return _processor(tiny_checkpoint, raw_cache_entries=0)  # today's path: every item decoded


def _png(size=(120, 80), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _image(data: bytes, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": _url(data), **extra}}


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}]


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("cache-video") / "v.mp4"
    return write_synthetic_video(path, frames=20, size=(64, 48)).read_bytes()


@pytest.fixture(scope="module")
def conversation(video_bytes, tmp_path_factory):
    """Two images (one as a file path) and a video, in two user turns."""
    path = tmp_path_factory.mktemp("cache-image") / "b.png"
    path.write_bytes(_png((300, 200), seed=2))
    video = {"type": "video_url", "video_url": {"url": _url(video_bytes, "video/mp4")}}
    return [
        {
            "role": "user",
            "content": [_image(_png((120, 80), seed=1)), {"type": "text", "text": "a"}],
        },
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [video, {"type": "image", "image": str(path)}]},
    ]


def _same_layout(a, b) -> None:
    """Token ids and every item's key, counts, offset and meta equal."""
    assert a.prompt_token_ids == b.prompt_token_ids
    assert len(a.media) == len(b.media)
    for x, y in zip(a.media, b.media):
        assert (x.kind, x.content_hash, x.cache_key) == (y.kind, y.content_hash, y.cache_key)
        assert (x.num_tiles, x.num_tokens, x.offset) == (y.num_tiles, y.num_tokens, y.offset)
        assert x.meta == y.meta


@pytest.mark.parametrize("resident", [None, False, True])
def test_a_hit_gives_the_uncached_tokens_hashes_and_pixels(fresh, uncached, conversation, resident):
    p = fresh()
    ref = uncached.process(conversation)
    first = p.process(conversation)
    assert p.raw_cache.stats()["misses"] == 3 and len(p.raw_cache) == 3
    asked: list[str] = []

    def is_resident(key: str) -> bool:
        asked.append(key)
        return bool(resident)

    second = p.process(conversation, is_resident=None if resident is None else is_resident)
    assert p.raw_cache.stats()["hits"] == 3
    for out in (first, second):
        _same_layout(out, ref)
    if resident is not None:
        assert asked == [m.cache_key for m in second.media]
    for item, eager in zip(second.media, ref.media):
        if resident:
            assert item.pixel_values is None and item.pixel_source is not None
        else:
            assert item.pixel_values is not None and item.pixel_source is None
        assert torch.equal(item.pixels(), eager.pixel_values)
        assert item.pixel_source is None  # dropped once the pixels are made
    assert p.raw_cache.stats()["pixels_skipped"] == (3 if resident else 0)


def test_a_miss_decodes_and_remembers(fresh):
    p = fresh()
    out = p.process(_user(_image(_png())), is_resident=lambda key: True)
    (item,) = out.media
    assert item.pixel_values is not None  # a miss always makes its pixels
    assert item.cache_key in p.raw_cache
    assert p.raw_cache.stats() | {"max_entries": 0} == {
        "entries": 1,
        "max_entries": 0,
        "hits": 0,
        "misses": 1,
        "evictions": 0,
        "pixels_skipped": 0,
        "pixels_shared": 0,
    }


def test_lazy_pixels_equal_eager_bit_for_bit(fresh, video_bytes):
    p = fresh()
    video = {"type": "video_url", "video_url": {"url": _url(video_bytes, "video/mp4")}}
    conv = _user(_image(_png((500, 90), seed=3)), video)
    eager = p.process(conv)
    lazy = p.process(conv, is_resident=lambda key: True)
    for a, b in zip(lazy.media, eager.media):
        assert not a.has_pixels
        pixels = a.pixels()
        assert pixels.dtype == torch.float32 and torch.equal(pixels, b.pixel_values)
        assert a.pixels() is pixels  # made once


def test_least_recently_used_entries_are_evicted(fresh):
    p = fresh(raw_cache_entries=2)
    a, b, c = (_user(_image(_png(seed=s))) for s in (10, 11, 12))
    key = {}
    for name, conv in (("a", a), ("b", b)):
        key[name] = p.process(conv).media[0].cache_key
    p.process(a)  # a is now the most recently used
    key["c"] = p.process(c).media[0].cache_key
    assert key["a"] in p.raw_cache and key["c"] in p.raw_cache and key["b"] not in p.raw_cache
    assert p.raw_cache.stats()["evictions"] == 1
    again = p.process(b, is_resident=lambda k: True)  # evicted: decoded again, pixels made
    assert again.media[0].pixel_values is not None
    assert len(p.raw_cache) == 2


def _count_reads(p: PLMProcessor) -> list[str]:
    """The sources the processor's loader reads (a data: URL read = its base64 decoded)."""
    reads: list[str] = []
    read = p.loader._read

    def counted(source):
        reads.append(source)
        return read(source)

    p.loader._read = counted  # type: ignore[method-assign]
    return reads


def test_a_repeated_data_url_is_not_decoded_until_pixels_are_needed(fresh, uncached, video_bytes):
    p = fresh()
    video = {"type": "video_url", "video_url": {"url": _url(video_bytes, "video/mp4")}}
    conv = _user(_image(_png((300, 200), seed=7)), video)
    expected = uncached.process(conv)
    reads = _count_reads(p)
    p.process(conv)
    assert len(reads) == 2
    hit = p.process(conv, is_resident=lambda k: True)
    assert len(reads) == 2  # known by the URLs' texts: no base64 decoded, nothing read
    _same_layout(hit, expected)
    for item, eager in zip(hit.media, expected.media):
        assert torch.equal(item.pixels(), eager.pixel_values)  # the encoder needs them after all
    assert len(reads) == 4  # read then, once per item


def test_the_same_bytes_in_another_text_are_the_same_item(fresh):
    p = fresh()
    data = _png((200, 150), seed=8)
    payload = base64.b64encode(data).decode()
    wrapped = "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))  # MIME style
    first = p.process(_user(_image(data)))
    reads = _count_reads(p)
    other = p.process(
        _user({"type": "image_url", "image_url": {"url": "data:image/png;base64," + wrapped}}),
        is_resident=lambda k: True,
    )
    assert len(reads) == 1  # a text not seen before is read, its bytes then hit
    assert other.media[0].cache_key == first.media[0].cache_key
    assert other.media[0].pixel_values is None
    assert p.raw_cache.stats()["hits"] == 1


def test_a_known_text_with_new_settings_decodes_it_then(fresh, tiny_checkpoint):
    media = MediaConfig(max_num_tiles=4)
    p = fresh(media)
    ref = _processor(tiny_checkpoint, media, raw_cache_entries=0)
    data = _png((400, 300), seed=9)
    p.process(_user(_image(data)))
    reads = _count_reads(p)
    conv = _user(_image(data, detail="low"))
    out = p.process(conv, is_resident=lambda k: True)
    assert len(reads) == 1  # its settings were never decoded: read now
    _same_layout(out, ref.process(conv))
    assert out.media[0].pixel_values is not None


def test_known_texts_are_bounded_like_the_entries(fresh):
    p = fresh(raw_cache_entries=2)
    convs = [_user(_image(_png(seed=s))) for s in (20, 21, 22)]
    for conv in convs:
        p.process(conv)
    reads = _count_reads(p)
    p.process(convs[2], is_resident=lambda k: True)
    assert reads == []
    # its text and its entry were the least recently used: both evicted
    p.process(convs[0], is_resident=lambda k: True)
    assert len(reads) == 1


def test_cache_bound_must_be_positive():
    with pytest.raises(ValueError):
        RawMediaCache(0)


def _image_variants():
    return [
        ({}, None),
        ({}, MediaOptions(max_num_tiles=2)),
        ({"max_num_tiles": 3}, None),
        ({"detail": "low"}, None),
        ({"detail": "high"}, None),
    ]


def test_settings_of_the_same_image_bytes_are_separate_entries(fresh, tiny_checkpoint):
    media = MediaConfig(max_num_tiles=4)  # detail "high" then differs from the default
    p = fresh(media)
    ref = _processor(tiny_checkpoint, media, raw_cache_entries=0)
    data = _png((400, 300), seed=4)
    keys = set()
    for extra, options in _image_variants():
        conv = _user(_image(data, **extra))
        expected = ref.process(conv, options)
        p.process(conv, options)
        hit = p.process(conv, options, is_resident=lambda k: True)
        _same_layout(hit, expected)
        assert torch.equal(hit.media[0].pixels(), expected.media[0].pixel_values)
        keys.add(hit.media[0].cache_key)
    assert len(keys) == len(_image_variants()) == len(p.raw_cache)
    assert p.raw_cache.stats()["hits"] == len(keys)
    tiles = [
        p.process(_user(_image(data, **e)), o).media[0].num_tiles for e, o in _image_variants()
    ]
    assert len(set(tiles)) >= 4  # the variants really differ


@pytest.mark.parametrize(
    "sampling", [{"num_frames": 4}, {"num_frames": 6}, {"fps": 5.0}, {"fps": 10.0}, {}]
)
def test_settings_of_the_same_video_bytes_are_separate_entries(
    fresh, uncached, video_bytes, sampling
):
    p = fresh()
    url = _url(video_bytes, "video/mp4")
    variants = [{"num_frames": 4}, {"num_frames": 6}, {"fps": 5.0}, {"fps": 10.0}, {}]
    for other in variants:  # every variant cached first: the hit must pick its own entry
        p.process(_user({"type": "video_url", "video_url": {"url": url, **other}}))
    assert len(p.raw_cache) == len(variants)
    conv = _user({"type": "video_url", "video_url": {"url": url, **sampling}})
    expected = uncached.process(conv)
    hit = p.process(conv, is_resident=lambda k: True)
    _same_layout(hit, expected)
    assert torch.equal(hit.media[0].pixels(), expected.media[0].pixel_values)


def test_in_memory_media_is_not_cached(fresh):
    p = fresh()
    img = Image.open(io.BytesIO(_png(seed=5)))
    conv = [{"role": "user", "content": [{"type": "image", "image": img}]}]
    for _ in range(2):
        out = p.process(conv, is_resident=lambda k: True)
        assert out.media[0].pixel_values is not None
    assert len(p.raw_cache) == 0 and p.raw_cache.stats()["misses"] == 0


def test_errors_are_not_cached(fresh):
    p = fresh()
    bad = _user(_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64))
    for _ in range(2):
        with pytest.raises(MediaError) as e:
            p.process(bad)
        assert e.value.param is not None
    assert len(p.raw_cache) == 0


def test_a_hit_over_the_context_is_refused_before_any_pixels(fresh):
    p = fresh()
    conv = _user(_image(_png((400, 300), seed=6)))
    need = len(p.process(conv).prompt_token_ids)
    calls = []
    with pytest.raises(ContextLengthError):
        p.process(conv, max_prompt_len=need - 1, is_resident=lambda k: calls.append(k) or False)
    assert calls == []  # refused from the cached counts, nothing decoded


def test_no_cache_when_disabled(uncached):
    assert uncached.raw_cache is None and uncached.loader.cache is None


def test_pixels_without_a_source_is_an_error():
    from plm_core.media.settings import ImageSettings

    item = MediaItem("image", "h", ImageSettings(), 1, 4)
    with pytest.raises(RuntimeError, match="no pixels"):
        item.pixels()


def test_threads_share_the_cache_safely(fresh, uncached):
    p = fresh(raw_cache_entries=3)  # smaller than the working set: evictions race with hits
    convs = [_user(_image(_png((90 + 13 * s, 70), seed=20 + s))) for s in range(5)]
    expected = [uncached.process(c) for c in convs]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(12):
                k = rng.randrange(len(convs))
                out = p.process(convs[k], is_resident=lambda key: rng.random() < 0.5)
                _same_layout(out, expected[k])
                assert torch.equal(out.media[0].pixels(), expected[k].media[0].pixel_values)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    stats = p.raw_cache.stats()
    assert stats["hits"] + stats["misses"] == 4 * 12 and len(p.raw_cache) <= 3


def test_cache_bound_holds_under_concurrent_puts():
    cache = RawMediaCache(16)
    facts = MediaFacts(1, 4, {"width": 1})

    def worker(t: int) -> None:
        for i in range(500):
            cache.put(f"k{t}-{i % 40}", facts)
            cache.get(f"k{(t + 1) % 4}-{i % 40}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert len(cache) == 16 and stats["hits"] + stats["misses"] == 2000


def _count_decodes(p, monkeypatch, delay_s: float = 0.0) -> list[int]:
    calls = [0]
    decode = p.loader._decode

    def counted(src):
        calls[0] += 1
        if delay_s:
            threading.Event().wait(delay_s)  # keep the decode in flight while others arrive
        return decode(src)

    monkeypatch.setattr(p.loader, "_decode", counted)
    return calls


def test_requests_arriving_together_decode_new_bytes_once(fresh, monkeypatch):
    p = fresh()
    calls = _count_decodes(p, monkeypatch, delay_s=0.2)
    conv = _user(_image(_png((300, 200), seed=41)))
    outs: list = [None] * 4

    def worker(i: int) -> None:
        outs[i] = p.process(conv)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls[0] == 1
    first = outs[0].media[0].pixels()
    assert all(o.media[0].pixels() is first for o in outs)  # one tensor, shared read-only
    stats = p.raw_cache.stats()
    assert (stats["misses"], stats["hits"], stats["pixels_shared"]) == (1, 3, 3)


def test_pixels_are_shared_while_a_request_holds_them(fresh, monkeypatch):
    import gc

    p = fresh()
    calls = _count_decodes(p, monkeypatch)
    conv = _user(_image(_png((300, 200), seed=42)))
    first = p.process(conv)
    again = p.process(conv)  # the engine does not hold it (no is_resident), the first request does
    assert calls[0] == 1 and again.media[0].pixels() is first.media[0].pixels()
    del first, again
    gc.collect()
    later = p.process(conv)  # nobody holds the pixels any more: made again, equal
    assert calls[0] == 2 and later.media[0].has_pixels
    assert p.raw_cache.stats()["pixels_shared"] == 1


@pytest.mark.parametrize("payload", ["iVBOR-w0K", "iVBORw0KGgo=x", "aGk=aGk="])
def test_a_data_url_that_is_not_base64_is_refused_every_time(fresh, payload):
    p = fresh()
    conv = _user({"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}})
    for _ in range(2):  # a refused text is never remembered
        with pytest.raises(MediaError, match="not valid base64"):
            p.process(conv)
