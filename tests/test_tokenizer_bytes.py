"""PLMTokenizer.token_bytes / token_text (OpenAI's logprobs `bytes`); invalid Unicode in encode."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from plm_core.testing.tokenizer import EOT, build_llama3_style_tokenizer
from plm_core.tokenizer import InvalidTextError, PLMTokenizer

TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _plm_tokenizer(tok: Tokenizer, path) -> PLMTokenizer:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return PLMTokenizer(path, TEMPLATE, bos_token_id=0, eos_token_ids=(1,))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> PLMTokenizer:
    return _plm_tokenizer(build_llama3_style_tokenizer(), tmp_path_factory.mktemp("byte-level"))


@pytest.mark.parametrize(
    "text",
    [
        "café",
        "naïve über ß",
        "你好，世界",
        "emoji 😀🚀 and 👩‍👩‍👧",
        "mixed é 中 😀 " + EOT + " end",
        "plain ASCII only",
        "\u00a0\u2028\ufeff\x00\x7f",
    ],
)
def test_token_bytes_concatenate_to_the_utf8_text(tok, text):
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_a_split_character_gives_its_raw_bytes(tok):
    assert tok.is_byte_level
    ids = tok.encode("é")
    assert [tok.token_bytes(i) for i in ids] == [b"\xc3", b"\xa9"]  # OpenAI's bytes: [195], [169]
    assert [tok.token_text(i) for i in ids] == ["\ufffd", "\ufffd"]
    emoji = tok.encode("😀")
    assert [tok.token_bytes(i) for i in emoji] == [bytes([b]) for b in "😀".encode()]
    space = tok.encode(" the")
    assert [tok.token_bytes(i) for i in space] == [b" the"] and tok.token_text(space[0]) == " the"


def test_special_tokens_and_ids_outside_the_vocabulary(tok):
    eot = tok.token_id(EOT)
    assert tok.token_bytes(eot) == EOT.encode() and tok.token_text(eot) == EOT
    assert tok.token_bytes(tok.token_id("<|image|>")) == b"<|image|>"
    for bad in (-1, tok.vocab_size, 2**70):
        assert tok.token_bytes(bad) == b"" and tok.token_text(bad) == ""


def test_token_text_equals_decoding_the_token_alone(tok):
    for i in list(range(0, tok.vocab_size, 7)) + list(range(128000, 128256)):
        assert tok.token_text(i) == tok.decode([i], skip_special_tokens=False), i
    the = tok.encode(" the")[0]  # several bytes: CPython shares only the one-byte bytes objects
    assert tok.token_bytes(the) is tok.token_bytes(the)  # cached


def test_vocabulary_that_is_not_byte_level_falls_back_to_decode(tmp_path):
    word = Tokenizer(
        models.WordLevel(
            {"<s>": 0, "</s>": 1, "hello": 2, "wörld": 3, "[UNK]": 4}, unk_token="[UNK]"
        )
    )
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = _plm_tokenizer(word, tmp_path)
    assert not plain.is_byte_level
    assert plain.token_bytes(3) == "wörld".encode() and plain.token_text(2) == "hello"
    assert plain.token_bytes(99) == b""


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "ok \udc80"])
def test_lone_surrogate_is_a_value_error(tok, text):
    with pytest.raises(InvalidTextError, match="lone surrogate") as e:
        tok.encode(text)
    assert isinstance(e.value, ValueError)
    assert tok.encode("a\U0001f600b")  # a proper surrogate-free astral character is fine
