"""SamplingParams: validation (ranges, seeds, finite floats, logit_bias, integer fields), defaults,
choice params, and the engine honouring min_tokens for stop strings, include_stop_str_in_output and
skip_special_tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
from support import checkpoint_path

from plm_core.sampling import SEED_MAX, SEED_MIN, SamplingParams, StructuredOutput

REE = 500  # token "ree" in the test tokenizer
EOT = 128009  # <|eot_id|>, the tiny checkpoint's eos
RESERVED = 128010  # <|reserved_special_token_5|>


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.1),
        dict(top_p=0),
        dict(top_p=1.1),
        dict(top_k=-2),
        dict(max_tokens=0),
        dict(n=0),
        dict(min_p=-0.1),
        dict(min_p=1.5),
        dict(presence_penalty=2.5),
        dict(presence_penalty=-2.1),
        dict(frequency_penalty=2.1),
        dict(frequency_penalty=-3),
        dict(repetition_penalty=0),
        dict(repetition_penalty=-1),
        dict(logprobs=-1),
        dict(logprobs=21),
        dict(min_tokens=-1),
        dict(min_tokens=20, max_tokens=10),
        dict(stop=[""]),
        dict(stop=["ok", ""]),
        dict(logit_bias={"x": 1.0}),
        dict(logit_bias={-1: 1.0}),
        dict(seed=1.5),
        dict(stop_token_ids=[-1]),
        dict(logit_bias={5: 100.5}),
        dict(logit_bias={5: -101}),
        dict(seed=2**64),
        dict(seed=-(2**63) - 1),
    ],
)
def test_params_validation_errors(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (1.0, 1.0, 0, None, 16)
    assert (p.n, p.min_p, p.presence_penalty, p.frequency_penalty) == (1, 0.0, 0.0, 0.0)
    assert p.repetition_penalty == 1.0 and p.stop_token_ids == [] and not p.ignore_eos
    assert p.logit_bias is None and p.stop == [] and p.logprobs is None and p.min_tokens == 0
    assert p.skip_special_tokens and not p.include_stop_str_in_output
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    bias = SamplingParams(logit_bias={"5": 100, 6: -100, 7: 3}).logit_bias
    assert bias == {5: 100.0, 6: -100.0, 7: 3.0}
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=20).logprobs == 20
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize("seed", [SEED_MAX + 1, SEED_MIN - 1, 2**100, -(2**100)])
def test_seed_outside_what_torch_accepts_is_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=seed)


@pytest.mark.parametrize(
    "seed", [SEED_MIN, -1, 0, 2**63, SEED_MAX, np.int64(-5), np.uint64(2**64 - 1)]
)
def test_seed_inside_the_range_is_kept(seed):
    p = SamplingParams(seed=seed)
    assert p.seed == int(seed) and type(p.seed) is int


@pytest.mark.parametrize(
    "field",
    [
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 100.001, -100.5, 1e9, "3", None])
def test_logit_bias_values_outside_openai_range_are_rejected(value):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"5": value})


def test_logit_bias_in_range_is_kept():
    p = SamplingParams(logit_bias={"5": 100, 6: -100.0, np.int64(7): np.float32(0.5), "8": True})
    assert p.logit_bias == {5: 100.0, 6: -100.0, 7: 0.5, 8: 1.0}
    with pytest.raises(ValueError, match="logit_bias keys"):
        SamplingParams(logit_bias={1.5: 1.0})


@pytest.mark.parametrize(
    "kw",
    [
        dict(logprobs=2.5),
        dict(top_k=2.5),
        dict(max_tokens=3.0),
        dict(n=1.5),
        dict(min_tokens=0.5),
        dict(stop_token_ids=[1.5]),
        dict(stop_token_ids=["7"]),
        dict(temperature="1"),
        dict(seed="3"),
    ],
)
def test_integer_and_float_fields_need_numbers(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_numpy_numbers_become_python_numbers():
    p = SamplingParams(
        temperature=np.float32(0.5),
        top_k=np.int32(3),
        logprobs=np.int64(2),
        stop_token_ids=np.array([4, 5]),
    )
    assert (p.temperature, p.top_k, p.logprobs, p.stop_token_ids) == (0.5, 3, 2, [4, 5])
    assert all(type(x) is int for x in (p.top_k, p.logprobs, *p.stop_token_ids))


def test_choice_seeds_wrap_around_the_range():
    ordinary = SamplingParams(seed=5, n=3)
    # unchanged for ordinary seeds
    assert [ordinary.for_choice(i).seed for i in range(3)] == [5, 6, 7]
    assert [SamplingParams(seed=-2, n=3).for_choice(i).seed for i in range(3)] == [-2, -1, 0]
    top = SamplingParams(seed=SEED_MAX - 1, n=4)
    # seed + index past SEED_MAX wraps by 2**64, as torch reads it
    assert [top.for_choice(i).seed for i in range(4)] == [SEED_MAX - 1, SEED_MAX, 0, 1]
    assert SamplingParams(seed=SEED_MAX, n=2).for_choice(1).seed == 0
    assert all(top.for_choice(i).n == 1 for i in range(4))
    assert SamplingParams(n=2).for_choice(1).seed is None


def test_choice_params_keep_every_other_field():
    spec = StructuredOutput(regex="[ab]+")
    params = SamplingParams(
        n=3,
        seed=9,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        max_tokens=7,
        stop=["x"],
        logit_bias={3: 1.0},
        logprobs=2,
        min_tokens=1,
        structured_output=spec,
    )
    choice = params.for_choice(2)
    assert (choice.n, choice.seed) == (1, 11)
    assert (choice.temperature, choice.top_p, choice.top_k, choice.max_tokens) == (0.7, 0.9, 5, 7)
    assert (choice.stop, choice.logit_bias, choice.logprobs) == (["x"], {3: 1.0}, 2)
    assert choice.min_tokens == 1 and choice.structured_output is spec
    assert (params.n, params.seed) == (3, 9)  # the request's own params are unchanged


# -- through the engine (tiny checkpoint, CPU) -----------------------------------------------------
CONV = [{"role": "user", "content": "Go."}]


@pytest.fixture(scope="module")
def llm():
    from plm_core import LLM

    return LLM(str(checkpoint_path("tiny")), device="cpu", dtype="float32")


def forced(llm, token, **kw):
    """One completion whose every token is `token` (a logit bias of 100 beats the tiny model's
    logits)."""
    kw.setdefault("max_tokens", 5)
    params = SamplingParams(temperature=0, logit_bias={token: 100}, **kw)
    return llm.chat(CONV, params)[0].outputs[0]


def ending(out) -> tuple:
    """(text, number of tokens, finish_reason, stop_reason) of a completion."""
    return out.text, len(out.token_ids), out.finish_reason, out.stop_reason


def test_min_tokens_holds_back_stop_strings(llm):
    assert ending(forced(llm, REE, stop="ree")) == ("", 1, "stop", "ree")
    # tokens 1-3 are ordinary text; token 4 completes the stop
    out = forced(llm, REE, stop="ree", min_tokens=3)
    assert ending(out) == ("reereeree", 4, "stop", "ree")
    out = forced(llm, REE, stop="eree", min_tokens=1)  # begun in token 1, completed by token 2
    assert ending(out) == ("re", 2, "stop", "eree")
    out = forced(llm, REE, stop="ree", min_tokens=5)  # never past min_tokens: runs to max_tokens
    assert ending(out) == ("ree" * 5, 5, "length", None)
    stream = forced(llm, REE, stop="ree", min_tokens=2, include_stop_str_in_output=True)
    assert (stream.text, len(stream.token_ids)) == ("ree" * 3, 3)


def test_include_stop_str_in_output(llm):
    assert forced(llm, REE, stop="ree", include_stop_str_in_output=True).text == "ree"
    out = forced(llm, REE, stop_token_ids=[REE])
    assert (out.text, out.token_ids, out.stop_reason) == ("", [REE], REE)
    out = forced(llm, REE, stop_token_ids=[REE], include_stop_str_in_output=True)
    assert (out.text, out.token_ids, out.stop_reason) == ("ree", [REE], REE)
    # eos is a special token: kept only when special tokens are not skipped
    assert forced(llm, EOT, include_stop_str_in_output=True).text == ""
    out = forced(llm, EOT, include_stop_str_in_output=True, skip_special_tokens=False)
    assert (out.text, out.finish_reason, out.token_ids) == ("<|eot_id|>", "stop", [EOT])
    assert forced(llm, EOT, skip_special_tokens=False).text == ""


def test_skip_special_tokens(llm):
    assert forced(llm, RESERVED, max_tokens=2).text == ""
    out = forced(llm, RESERVED, max_tokens=2, skip_special_tokens=False)
    assert out.text == "<|reserved_special_token_5|>" * 2 and out.finish_reason == "length"


def test_seeds_at_the_top_of_the_range_run_and_wrap(llm):
    def sample(seed, n=1):
        params = SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=4, ignore_eos=True)
        return [c.token_ids for c in llm.chat(CONV, params)[0].outputs]

    both = sample(SEED_MAX, n=2)  # choice 1 would be seeded 2**64: it wraps to 0
    assert both == [sample(-1)[0], sample(0)[0]]  # torch seeds -1 and 2**64 - 1 alike
    assert sample(SEED_MIN) == sample(2**63)


def test_requests_the_engine_cannot_serve_are_rejected_before_they_run(llm):
    vocab = llm.model_config.text.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        llm.chat(CONV, SamplingParams(logit_bias={vocab: 1.0}))
    good, bad = SamplingParams(max_tokens=2), SamplingParams(max_tokens=2, logit_bias={2**70: 1.0})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.chat([CONV, CONV, CONV], [good, bad, good])
    # the good request queued before the bad one was dropped too
    assert not llm.engine.has_unfinished()
    prompt = llm.process(CONV)
    prompt.prompt_token_ids = prompt.prompt_token_ids + [vocab]
    with pytest.raises(ValueError, match="prompt"):
        llm.generate_prompts([prompt], [good])
    assert not llm.engine.has_unfinished()
    # huge stop token ids are fine (they can never be sampled) and the engine still works
    params = SamplingParams(max_tokens=3, stop_token_ids=[2**70], min_tokens=2, ignore_eos=True)
    assert len(llm.chat(CONV, params)[0].token_ids) == 3


def test_a_failing_step_leaves_no_request_queued(llm, monkeypatch):
    def broken(sched):
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine.runner, "execute", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.chat([CONV, CONV], SamplingParams(max_tokens=2, n=2))
    monkeypatch.undo()
    assert not llm.engine.has_unfinished()
    assert len(llm.chat(CONV, SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids) == 2
    blocks = llm.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
