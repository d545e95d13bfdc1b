"""Skipped pixels in the engine: resident items generate as before; evicted ones are made lazily."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from support import checkpoint_path

from plm_core import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def path():
    return str(checkpoint_path("tiny"))


def _conv(seed: int, size=(200, 150)) -> list[dict]:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]


def _process(llm: LLM, conv: list[dict], is_resident):
    return llm.processor.process(
        conv, max_prompt_len=llm.max_model_len - 1, is_resident=is_resident
    )


def _generate(llm: LLM, prompt) -> list[int]:
    return llm.generate_prompts([prompt], [GREEDY])[0].outputs[0].token_ids


def test_resident_image_without_pixels_generates_the_same_tokens(path):
    llm = LLM(path, device="cpu", dtype="float32", enable_prefix_caching=False)
    conv = _conv(1)
    eager = llm.chat(conv, GREEDY)[0].outputs[0].token_ids
    encoder = llm.engine.scheduler.encoder_cache
    misses = encoder.misses
    prompt = _process(llm, conv, encoder.has)
    (item,) = prompt.media
    assert encoder.has(item.cache_key) and item.pixel_values is None
    assert _generate(llm, prompt) == eager
    assert encoder.misses == misses  # served from the encoder cache: nothing encoded
    assert item.pixel_values is None  # and its pixels were never made


def test_evicted_image_without_pixels_is_encoded_from_its_pixel_source(path):
    probe = LLM(path, device="cpu", dtype="float32", enable_prefix_caching=False)
    a, b = _conv(2), _conv(3, size=(180, 240))
    sizes = [probe.process(c).media[0].num_tokens for c in (a, b)]
    eager = probe.chat(a, GREEDY)[0].outputs[0].token_ids
    del probe
    # room for one image's encoder output at a time: b evicts a
    llm = LLM(
        path,
        device="cpu",
        dtype="float32",
        enable_prefix_caching=False,
        encoder_cache_tokens=max(sizes),
    )
    encoder = llm.engine.scheduler.encoder_cache
    assert _generate(llm, _process(llm, a, encoder.has)) == eager
    _generate(llm, _process(llm, b, encoder.has))
    prompt = _process(llm, a, lambda key: True)  # as if checked just before the eviction
    (item,) = prompt.media
    assert item.pixel_values is None and not encoder.has(item.cache_key)
    misses = encoder.misses
    assert _generate(llm, prompt) == eager
    assert encoder.misses == misses + 1  # encoded again, from pixels made on the engine thread
    assert item.pixel_values is not None and item.pixel_source is None
