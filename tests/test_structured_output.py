"""Structured outputs in the engine: the constraint spec, the grammars over the real tokenizer's
bytes, the token masks, and constrained generation (alone, batched, preempted) that always follows
the spec."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from support import checkpoint_path

from plm_core.sampling import SamplingParams, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "sure": {"type": "boolean"},
    },
    "required": ["answer", "count", "sure"],
    "additionalProperties": False,
}
CHOICES = ('say "hi"', "café au lait", "no", "n\\o\n")
BOOLEANS = {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}


@pytest.fixture(scope="module")
def llm():
    from plm_core import LLM

    return LLM(str(checkpoint_path("tiny")), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def compiler(llm):
    return llm.engine.grammars


# -- the spec --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"json": "{}", "regex": "a"}, "exactly one"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": "[1, 2]"}, "must be a JSON object"),
        ({"regex": ""}, "non-empty"),
        ({"choice": ()}, "non-empty list"),
        ({"choice": ("a", 3)}, "non-empty list"),
        ({"choice": ("a", "")}, "non-empty list"),
    ],
)
def test_bad_specs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutput(**kwargs)


def test_spec_kind_and_params():
    assert StructuredOutput(json_object=True).kind == "json_object"
    # lists become tuples (hashable)
    assert StructuredOutput(choice=["a", "b"]).choice == ("a", "b")
    params = SamplingParams(structured_output=StructuredOutput(regex="a+"))
    assert params.structured_output.kind == "regex"
    with pytest.raises(ValueError, match="StructuredOutput"):
        SamplingParams(structured_output={"regex": "a+"})


# -- grammars and masks over the tokenizer ---------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutput(regex="("),
        StructuredOutput(grammar="root ::= ("),
        StructuredOutput(grammar='start ::= "a"'),
        StructuredOutput(json='{"type": "integer", "minimum": 5, "maximum": 1}'),
        StructuredOutput(json='{"type": "foo"}'),
    ],
)
def test_compile_errors_are_value_errors(compiler, spec):
    with pytest.raises(ValueError, match=f"cannot compile the {spec.kind} constraint") as err:
        compiler.compile(spec)
    assert ".cc:" not in str(err.value)  # xgrammar's source location is not the client's business


@pytest.mark.parametrize(
    "schema, found",
    [
        (
            {"type": "array", "items": {"enum": [1]}, "minItems": 2, "uniqueItems": True},
            "'uniqueItems' (at #)",
        ),
        ({"not": {"type": "boolean"}}, "'not' (at #)"),
        (
            {"type": "object", "properties": {"a": {"type": "array", "contains": {"const": 9}}}},
            "'contains' (at #/properties/a)",
        ),
        (
            {"allOf": [{"type": "integer"}, {"maximum": 6}]},
            "'allOf' with more than one schema (at #)",
        ),
        (
            {"anyOf": [{"type": "number", "multipleOf": 0.5}]},
            "'multipleOf' on a non-integer (at #/anyOf/0)",
        ),
        (
            {"$defs": {"A": {"type": "string", "pattern": "(?=a)a"}}, "$ref": "#/$defs/A"},
            "lookahead",
        ),
        (
            {"type": "array", "items": {"if": {"type": "string"}, "then": {"maxLength": 2}}},
            "'if' (at #/items)",
        ),
    ],
)
def test_schemas_with_unenforced_keywords_are_refused(compiler, schema, found):
    """xgrammar accepts these keywords but ignores them (uniqueItems gave [1, 1]): refused, not
    weakened."""
    with pytest.raises(ValueError, match="cannot enforce") as err:
        compiler.compile(StructuredOutput(json=json.dumps(schema)))
    assert found in str(err.value)


def test_costly_constraints_are_refused_before_compiling(compiler):
    """Compile time grows fast with size and depth (5,000 properties took 93 s): caps, checked
    first."""
    from plm_core.engine.structured_output import (
        MAX_CONSTRAINT_BYTES,
        MAX_SCHEMA_DEPTH,
        unenforced_feature,
    )

    def nested(depth):
        schema = {"type": "string"}
        for _ in range(depth):
            schema = {"type": "array", "items": schema}
        return schema

    compiler.compile(StructuredOutput(json=json.dumps(nested(MAX_SCHEMA_DEPTH))))
    with pytest.raises(ValueError, match=f"nested more than {MAX_SCHEMA_DEPTH} deep"):
        compiler.compile(StructuredOutput(json=json.dumps(nested(MAX_SCHEMA_DEPTH + 1))))
    assert "nested more than" in unenforced_feature(nested(5000))  # iterative: no RecursionError
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    with pytest.raises(ValueError, match=f"compiles at most {MAX_CONSTRAINT_BYTES}"):
        compiler.compile(StructuredOutput(json=json.dumps(wide)))
    with pytest.raises(ValueError, match="compiles at most"):
        compiler.compile(StructuredOutput(choice=tuple(f"option number {i}" for i in range(5000))))
    with pytest.raises(ValueError, match="nested too deeply"):
        StructuredOutput(json="[" * 100000 + "]" * 100000)


def test_enforced_keywords_and_keyword_like_names_pass(compiler):
    from plm_core.engine.structured_output import unenforced_feature

    fine = {
        "type": "object",
        "properties": {
            "not": {"type": "integer", "multipleOf": 7},
            "if": {"type": "array", "uniqueItems": False, "items": {"enum": ["not"]}},
            "tags": {"allOf": [{"$ref": "#/$defs/T"}]},
        },
        "$defs": {"T": {"type": "string", "pattern": "^[a-z]+$", "format": "email"}},
    }
    assert unenforced_feature(fine) is None
    compiler.compile(StructuredOutput(json=json.dumps(fine)))
    with pytest.raises(ValueError, match="lookahead"):
        compiler.compile(StructuredOutput(regex="(?!x)[a-z]+"))


def _feed(grammar, tokenizer, text: str, eos: int) -> bool:
    ok = all(grammar.accept(t) for t in tokenizer.encode(text))
    return ok and grammar.accept(eos) and grammar.is_terminated


def test_choice_grammar_takes_exactly_the_choices(llm, compiler):
    tok, eos = llm.tokenizer, llm.model_config.eos_token_ids[0]
    spec = StructuredOutput(choice=CHOICES)
    for choice in CHOICES:
        assert _feed(compiler.grammar(spec), tok, choice, eos), choice
    for other in ("say hi", "cafe au lait", "n", "no!"):
        assert not _feed(compiler.grammar(spec), tok, other, eos), other


def test_first_mask_is_exactly_the_tokens_that_start_a_choice(llm, compiler):
    """Checks the bit order of the mask against the tokenizer's own bytes, token by token."""
    from plm_core.engine.structured_output import allowed_tokens

    tok, vocab = llm.tokenizer, llm.model_config.text.vocab_size
    special = tok.special_token_ids()
    # a multi-byte token of this vocabulary
    word = next(
        t
        for t in range(tok.vocab_size)
        if t not in special and len(tok.token_bytes(t)) >= 3 and tok.token_bytes(t).isalnum()
    )
    choices = CHOICES + (tok.token_bytes(word).decode() + " tail",)
    mask = allowed_tokens(
        [compiler.grammar(StructuredOutput(choice=choices))], vocab, torch.device("cpu")
    )[0]
    encoded = [c.encode() for c in choices]
    expected = {
        t
        for t in range(tok.vocab_size)
        if t not in special
        and tok.token_bytes(t)
        and any(c.startswith(tok.token_bytes(t)) for c in encoded)
    }
    assert set(mask.nonzero().flatten().tolist()) == expected
    assert word in expected and len(expected) > len(choices)


def test_special_tokens_never_allowed_and_only_eos_at_the_end(llm, compiler):
    from plm_core.engine.structured_output import allowed_tokens

    tok, vocab = llm.tokenizer, llm.model_config.text.vocab_size
    eos = set(llm.model_config.eos_token_ids)
    grammar = compiler.grammar(StructuredOutput(json='{"type": "string"}'))
    inside = allowed_tokens([grammar], vocab, torch.device("cpu"))[0]
    assert not inside[sorted(tok.special_token_ids())].any()  # no <|eot_id|> or <|image|> as text
    assert all(grammar.accept(t) for t in tok.encode('"done"'))
    end = allowed_tokens([grammar], vocab, torch.device("cpu"))[0]
    assert set(end.nonzero().flatten().tolist()) == eos


def test_a_grammar_with_no_way_forward_allows_its_stop_tokens(llm):
    from plm_core.engine.structured_output import allowed_tokens

    class Dead:  # fills nothing: no token may follow
        stop_token_ids = [31, 64, 95]

        def fill_bitmask(self, bitmask, row):
            bitmask[row] = 0

    allowed = allowed_tokens([Dead()], 100, torch.device("cpu"))[0]
    assert allowed.nonzero().flatten().tolist() == [31, 64, 95]
    dead = StructuredOutput(grammar="root ::= root")  # compiles, yet matches nothing
    params = SamplingParams(temperature=0, max_tokens=5, structured_output=dead)
    out = llm.chat(_convs(1)[0], params)[0].outputs[0]
    assert out.text == "" and out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.model_config.eos_token_ids


# -- the sampler -----------------------------------------------------------------------------------
def test_grammar_wins_over_min_tokens_and_logit_bias(llm, compiler):
    """Once the output is complete only eos may follow; min_tokens forbids eos: the row falls back
    to the grammar alone instead of becoming all -inf."""
    from plm_core.engine.sampler import BatchSampler, SamplingState

    tok, vocab = llm.tokenizer, llm.model_config.text.vocab_size
    eos = llm.model_config.eos_token_ids
    grammar = compiler.grammar(StructuredOutput(choice=("no",)))
    out = list(tok.encode("no"))
    assert all(grammar.accept(t) for t in out)
    params = SamplingParams(
        temperature=0,
        min_tokens=10,
        max_tokens=20,
        logit_bias={0: 100.0},
        structured_output=StructuredOutput(choice=("no",)),
    )
    state = SamplingState.create(params, [1, 2], out, eos, grammar=grammar)
    tokens, _ = BatchSampler()(torch.randn(1, vocab), [state])
    assert tokens[0] in eos


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_and_draws_on_cuda_match_cpu(llm, compiler):
    """The bitmask unpacking and the masked draw on a GPU: the same allowed sets and seeded tokens
    as on CPU."""
    from plm_core.engine.sampler import BatchSampler, SamplingState
    from plm_core.engine.structured_output import allowed_tokens

    vocab, eos = llm.model_config.text.vocab_size, llm.model_config.eos_token_ids
    spec = StructuredOutput(json=json.dumps(SCHEMA))
    cpu = allowed_tokens([compiler.grammar(spec)], vocab, torch.device("cpu"))
    cuda = allowed_tokens([compiler.grammar(spec)], vocab, torch.device("cuda"))
    assert torch.equal(cuda.cpu(), cpu)
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    picked = {}
    for device in ("cpu", "cuda"):
        params = [
            SamplingParams(temperature=0, structured_output=spec),
            SamplingParams(temperature=1.0, seed=5, logprobs=2, structured_output=spec),
        ]
        states = [
            SamplingState.create(p, [1], [], eos, device, grammar=compiler.grammar(spec))
            for p in params
        ]
        tokens, logprobs = BatchSampler()(logits.to(device), states)
        assert all(cpu[0, t] for t in tokens)  # both rows start the grammar: the same allowed set
        assert logprobs[1].logprob > float("-inf")  # the drawn token is one the mask kept
        picked[device] = tokens[0]
    assert picked["cpu"] == picked["cuda"]  # greedy under the mask


# -- generation ------------------------------------------------------------------------------------
def _convs(n):
    return [
        [{"role": "user", "content": f"Question {i}: is it red? Answer in JSON."}] for i in range(n)
    ]


def test_json_schema_outputs_validate_greedy_and_sampled(llm):
    spec = StructuredOutput(json=json.dumps(SCHEMA))
    for params in (
        SamplingParams(temperature=0, max_tokens=64, structured_output=spec),
        SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=64, structured_output=spec),
    ):
        for out in llm.chat(_convs(2), params):
            for choice in out.outputs:
                assert choice.finish_reason == "stop", choice.text
                jsonschema.validate(json.loads(choice.text), SCHEMA)


def test_each_kind_is_followed(llm):
    import re

    cases = [
        (
            StructuredOutput(regex=r"[0-9]{3}-[a-z]{2}"),
            lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t),
        ),
        (StructuredOutput(choice=CHOICES), lambda t: t in CHOICES),
        (
            StructuredOutput(grammar='root ::= "A" [0-9] [0-9] "B"'),
            lambda t: re.fullmatch(r"A\d\dB", t),
        ),
        (
            StructuredOutput(json=json.dumps(BOOLEANS)),
            lambda t: isinstance(json.loads(t), list) and 1 <= len(json.loads(t)) <= 3,
        ),
    ]
    for spec, check in cases:
        for seed in range(3):
            out = llm.chat(
                _convs(1)[0],
                SamplingParams(temperature=1.0, seed=seed, max_tokens=30, structured_output=spec),
            )[0].outputs[0]
            assert out.finish_reason == "stop" and check(out.text), (spec.kind, out.text)


def test_json_object_starts_an_object(llm):
    out = llm.chat(
        _convs(1)[0],
        SamplingParams(
            temperature=1.0,
            seed=0,
            max_tokens=12,
            structured_output=StructuredOutput(json_object=True),
        ),
    )[0].outputs[0]
    assert out.text.startswith("{")


def test_constrained_tokens_same_alone_batched_and_preempted(llm, monkeypatch):
    """A constrained request's tokens do not depend on the batch, and survive preemption (its
    grammar keeps its place while the request is recomputed)."""
    from plm_core import LLM

    spec = StructuredOutput(json='{"type": "array", "items": {"type": "integer"}, "maxItems": 30}')
    params = [
        SamplingParams(temperature=0.9, seed=i, max_tokens=40, structured_output=spec)
        for i in range(4)
    ]
    alone = [llm.chat(c, p)[0].token_ids for c, p in zip(_convs(4), params)]
    small = LLM(
        str(checkpoint_path("tiny")),
        device="cpu",
        dtype="float32",
        max_model_len=160,
        kv_cache_memory_gb=11 * 16 * 512 / 2**30,
    )
    scheduler, preempted = small.engine.scheduler, []
    schedule = scheduler.schedule

    def schedule_and_record(budget=None):
        out = schedule(budget)
        preempted.extend((r.grammar, len(r.output_token_ids)) for r in out.preempted)
        return out

    monkeypatch.setattr(scheduler, "schedule", schedule_and_record)
    # the unconstrained requests come first, so the constrained ones (the latest) are preempted
    outs = small.chat(
        _convs(2) + _convs(4),
        [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 2 + params,
    )
    # a constrained request was preempted mid-output
    assert any(grammar is not None and n_out > 0 for grammar, n_out in preempted)
    assert [o.token_ids for o in outs[2:]] == alone
    blocks = small.engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
