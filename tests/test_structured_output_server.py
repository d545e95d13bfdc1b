"""Structured outputs over HTTP: OpenAI's `response_format`, vLLM's `structured_outputs` and
`guided_*`.

One real `python -m server` process on the tiny random-weight checkpoint. Its free text is
gibberish, so every constraint here forces a complete, checkable answer within a few tokens (enums,
small integer ranges, choices, bounded regexes); the engine must then end the request with
finish_reason "stop". Responses are validated against OpenAI's published schemas
(../shared/openai-openapi.json) when present.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from openai_schema import openai_validator
from pydantic import BaseModel, Field
from server_proc import start_server, stop_server

MODEL = "plm-test"
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["answer", "count", "ok"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True},
}
CHOICES = ['say "hi"', "café au lait", "no"]


@pytest.fixture(scope="module")
def base():
    proc, url = start_server(model_name=MODEL)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(base):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def validate():
    """validate(schema_name, obj) against OpenAI's schema; None when the file is absent."""
    return openai_validator()


def _check(validate, name, obj):
    if validate is not None:
        validate(name, obj)


def body(**change) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 30, "temperature": 0, **change}


def post(base: str, payload: dict) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=60)


def assert_still_serving(base: str) -> None:
    r = post(base, body(max_tokens=2))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text[
        :400
    ]


# --- OpenAI response_format -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0), dict(temperature=1.0, seed=7, n=3)],
    ids=["greedy", "sampled-n3"],
)
def test_json_schema_output_validates(client, validate, sampling):
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=64,
        response_format=JSON_SCHEMA_FORMAT,
        **sampling,
    )
    assert len(r.choices) == sampling.get("n", 1)
    for choice in r.choices:
        text = choice.message.content
        assert choice.finish_reason == "stop", (choice.finish_reason, text)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert text == json.dumps(
            json.loads(text), ensure_ascii=False, separators=(", ", ": ")
        ) or text == json.dumps(json.loads(text), separators=(",", ":")), (
            f"free whitespace in {text!r}"
        )
    assert r.usage.completion_tokens <= 64 * len(r.choices)
    _check(validate, "CreateChatCompletionResponse", r.model_dump(exclude_unset=True))


def test_json_schema_sampling_is_reproducible_with_seed(client):
    kw = dict(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=64,
        temperature=1.0,
        seed=3,
        n=2,
        response_format=JSON_SCHEMA_FORMAT,
    )
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    score: int = Field(ge=0, le=9)


def test_sdk_parse_with_pydantic_model(base):
    from openai import OpenAI

    sent = []
    http = httpx.Client(event_hooks={"request": [lambda req: sent.append(json.loads(req.read()))]})
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, http_client=http)
    completions = (
        client.chat.completions
        if hasattr(client.chat.completions, "parse")
        else client.beta.chat.completions
    )
    r = completions.parse(
        model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0, response_format=Verdict
    )
    fmt = sent[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Verdict"
    schema = fmt["json_schema"]["schema"]
    assert schema["properties"]["answer"]["enum"] == ["yes", "no"]
    assert (
        set(schema["required"]) == {"answer", "score"}
        and schema.get("additionalProperties") is False
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop", msg.content
    assert isinstance(msg.parsed, Verdict), msg.content
    assert msg.parsed.answer in ("yes", "no")
    # the SDK kept the range: the server must honour it
    if schema["properties"]["score"].get("maximum") == 9:
        assert 0 <= msg.parsed.score <= 9
    jsonschema.validate(json.loads(msg.content), schema)


def test_streamed_json_schema(client, validate):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        stream=True,
        response_format=JSON_SCHEMA_FORMAT,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop" and all(x is None for x in reasons[:-1]), reasons
    jsonschema.validate(json.loads(text), SCHEMA)
    whole = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        response_format=JSON_SCHEMA_FORMAT,
    )
    assert text == whole.choices[0].message.content
    for c in chunks:
        _check(validate, "CreateChatCompletionStreamResponse", c.model_dump(exclude_unset=True))


def test_json_object(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
    )
    choice = r.choices[0]
    assert choice.message.content.startswith("{"), choice.message.content
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert r.usage.completion_tokens == 64


def test_json_schema_without_schema_is_any_json_value(base):
    r = post(
        base,
        body(max_tokens=8, response_format={"type": "json_schema", "json_schema": {"name": "any"}}),
    )
    assert r.status_code == 200, r.text[:400]
    text = r.json()["choices"][0]["message"]["content"]
    assert text and text[0] in '{["-0123456789tfn', text
    if r.json()["choices"][0]["finish_reason"] == "stop":
        json.loads(text)


def test_response_format_text_is_unconstrained(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**kw)
    text = client.chat.completions.create(response_format={"type": "text"}, **kw)
    assert text.choices[0].message.content == plain.choices[0].message.content
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 6


# --- vLLM structured_outputs and guided_* ---------------------------------------------------------


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0), dict(temperature=1.0, seed=5, n=4)],
    ids=["greedy", "sampled-n4"],
)
def test_choice_with_quote_non_ascii_and_space(client, sampling):
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": CHOICES}},
        **sampling,
    )
    for choice in r.choices:
        assert choice.message.content in CHOICES, choice.message.content
        assert choice.finish_reason == "stop"


def test_choice_each_option_is_reachable(base):
    """With logit_bias pushing towards each option's first token, that option comes out (the grammar
    lets every option through, not just one)."""
    from support import checkpoint_path
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint_path("tiny") / "tokenizer.json"))
    seen = set()
    for option in CHOICES:
        first = tok.encode(option, add_special_tokens=False).ids[0]
        r = post(
            base,
            body(
                max_tokens=20, logit_bias={str(first): 100}, structured_outputs={"choice": CHOICES}
            ),
        )
        assert r.status_code == 200, r.text[:400]
        c = r.json()["choices"][0]
        assert c["message"]["content"] in CHOICES and c["finish_reason"] == "stop"
        seen.add(c["message"]["content"])
    assert seen == set(CHOICES)


@pytest.mark.parametrize(
    "field, value, check",
    [
        (
            "structured_outputs",
            {"regex": "[0-9]{3}-[a-z]{2}"},
            lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t),
        ),
        ("guided_regex", "[0-9]{3}-[a-z]{2}", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        (
            "structured_outputs",
            {"grammar": 'root ::= "A" [0-9] [0-9]? "B"'},
            lambda t: re.fullmatch(r"A[0-9]{1,2}B", t),
        ),
        ("guided_grammar", 'root ::= "x" ("yes" | "no")', lambda t: t in ("xyes", "xno")),
        ("guided_choice", ["red", "green", "blue"], lambda t: t in ("red", "green", "blue")),
        (
            "structured_outputs",
            {"json": SCHEMA},
            lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None,
        ),
        (
            "structured_outputs",
            {"json": json.dumps(SCHEMA)},
            lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None,
        ),
        ("guided_json", SCHEMA, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ("structured_outputs", {"json": {"type": "boolean"}}, lambda t: t in ("true", "false")),
    ],
    ids=[
        "so-regex",
        "guided_regex",
        "so-grammar",
        "guided_grammar",
        "guided_choice",
        "so-json",
        "so-json-text",
        "guided_json",
        "so-json-boolean",
    ],
)
def test_vllm_constraints(base, field, value, check):
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=1, n=3)):
        r = post(base, body(max_tokens=64, **{field: value}, **sampling))
        assert r.status_code == 200, r.text[:400]
        for c in r.json()["choices"]:
            text = c["message"]["content"]
            assert check(text), text
            assert c["finish_reason"] == "stop", (c["finish_reason"], text)


def test_structured_outputs_json_object(base):
    r = post(base, body(max_tokens=40, structured_outputs={"json_object": True}))
    assert r.status_code == 200, r.text[:400]
    c = r.json()["choices"][0]
    assert c["message"]["content"].startswith("{"), c
    if c["finish_reason"] == "stop":
        assert isinstance(json.loads(c["message"]["content"]), dict)


def test_regex_hits_max_tokens_gives_a_prefix(base):
    r = post(base, body(max_tokens=2, structured_outputs={"regex": "[0-9]{30}"}))
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "length" and re.fullmatch(r"[0-9]+", c["message"]["content"]), c
    assert len(c["message"]["content"]) < 30


# --- interplay with other sampling options --------------------------------------------------------


def test_logit_bias_cannot_break_the_grammar(base):
    # token 1000 is " w348" in the tiny tokenizer: allowed by neither constraint
    for field, value, pattern in [
        ("structured_outputs", {"regex": "[0-9]{3}-[a-z]{2}"}, r"[0-9]{3}-[a-z]{2}"),
        ("response_format", JSON_SCHEMA_FORMAT, None),
    ]:
        for sampling in (dict(temperature=0), dict(temperature=1.0, seed=2, n=2)):
            r = post(
                base, body(max_tokens=64, logit_bias={"1000": 100}, **{field: value}, **sampling)
            )
            assert r.status_code == 200, r.text[:400]
            for c in r.json()["choices"]:
                text = c["message"]["content"]
                assert "w348" not in text and c["finish_reason"] == "stop", (
                    c["finish_reason"],
                    text,
                )
                if pattern:
                    assert re.fullmatch(pattern, text), text
                else:
                    jsonschema.validate(json.loads(text), SCHEMA)
    free = post(base, body(max_tokens=3, logit_bias={"1000": 100})).json()["choices"][0]["message"][
        "content"
    ]
    assert "w348" in free  # the bias does work when nothing constrains the text


def test_with_logprobs(client, validate):
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=64,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        response_format=JSON_SCHEMA_FORMAT,
    )
    c = r.choices[0]
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), SCHEMA)
    entries = c.logprobs.content
    assert len(entries) == r.usage.completion_tokens
    tokens = [e.token for e in entries]
    # the stop token that ended it may be listed last (as vLLM does)
    if "".join(tokens) != c.message.content:
        assert "".join(tokens[:-1]) == c.message.content and tokens[-1] in (
            "<|eot_id|>",
            "<|end_of_text|>",
        ), tokens
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.logprob <= 0
    _check(validate, "CreateChatCompletionResponse", r.model_dump(exclude_unset=True))


def test_logprobs_describe_the_constrained_distribution(base):
    """Logprobs come after the grammar mask (as in vLLM v1): the greedy token ranks first, and
    tokens the grammar forbids are sent as -9999.0 (-inf is not JSON)."""
    r = post(
        base,
        body(
            max_tokens=10,
            temperature=0,
            logprobs=True,
            top_logprobs=20,
            structured_outputs={"choice": ["no"]},
        ),
    )
    assert r.status_code == 200, r.text[:300]
    c = r.json()["choices"][0]
    assert c["message"]["content"] == "no"
    for e in c["logprobs"]["content"]:
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert e["logprob"] == max(tops) > -9999.0, e
        # one path through "no": most of the top 20 are forbidden
        assert tops.count(-9999.0) >= 1, e


def test_with_logprobs_streamed_choice(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body={"guided_choice": CHOICES},
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text in CHOICES and chunks[-1].choices[0].finish_reason == "stop"


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, param",
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json_object"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema.name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "my schema", "schema": SCHEMA},
                }
            },
            "response_format.json_schema.name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x" * 65, "schema": SCHEMA},
                }
            },
            "response_format.json_schema.name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": [SCHEMA]},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"regex": "[0-9]", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": "[0-9]"}, "structured_outputs"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "[0-9]"}},
            "structured_outputs",
        ),
        ({"guided_choice": ["a"], "guided_regex": "[0-9]"}, ("guided_choice", "guided_regex")),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
        ({"guided_regex": "("}, "guided_regex"),
        ({"structured_outputs": {"grammar": 'root ::= "A" ['}}, "structured_outputs"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"choice": ["a", 3]}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "s",
                        "schema": {"type": "integer", "minimum": 5, "maximum": 1},
                    },
                }
            },
            "response_format",
        ),
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "s",
                        "schema": {
                            "type": "array",
                            "items": {"type": "integer"},
                            "uniqueItems": True,
                        },
                    },
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"json": "[" * 100000 + "]" * 100000}}, "structured_outputs"),
        ({"guided_choice": [f"option number {i}" for i in range(5000)]}, "guided_choice"),
    ],
    ids=[
        "rf-type-xml",
        "rf-not-object",
        "rf-no-json_schema",
        "rf-no-name",
        "rf-name-space",
        "rf-name-long",
        "rf-schema-list",
        "so-two-kinds",
        "so-empty",
        "so-not-object",
        "rf-and-so",
        "two-guided",
        "so-bad-regex",
        "guided-bad-regex",
        "so-bad-grammar",
        "guided-bad-grammar",
        "so-choice-empty",
        "guided-choice-empty",
        "so-choice-non-string",
        "so-json-not-json",
        "rf-schema-uncompilable",
        "guided-json-uncompilable",
        "rf-schema-unenforced",
        "so-json-nested-deep",
        "guided-choice-huge",
    ],
)
def test_bad_constraints_are_400(base, validate, change, param):
    for stream in (False, True):
        r = post(base, body(stream=stream, **change))
        assert r.status_code == 400, r.text[:400]
        assert r.headers["content-type"].startswith("application/json")
        err = r.json()["error"]
        assert err["param"] in (param if isinstance(param, tuple) else (param,)), err
        assert err["message"] and err["type"] == "invalid_request_error", err
        _check(validate, "ErrorResponse", r.json())
    assert_still_serving(base)


def test_openai_client_raises_bad_request(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=4,
            extra_body={"structured_outputs": {"regex": "("}},
        )
    assert e.value.status_code == 400 and e.value.body["param"] == "structured_outputs"
