"""IncrementalDetokenizer on a byte-level BPE tokenizer: deltas vs a full decode, split characters,
stop strings."""

from __future__ import annotations

import random

import pytest

from plm_core.engine.detokenizer import IncrementalDetokenizer
from plm_core.testing.tokenizer import build_llama3_style_tokenizer
from plm_core.tokenizer import bytes_to_unicode

EOT, IMAGE = 128009, 128002
PIECES = [
    "Hello",
    " world",
    ".",
    " The",
    " cat",
    " 😀",
    "😀",
    " 你好",
    "世界",
    " café",
    " naïve",
    " 🚀🌍",
    "\n",
    " ",
    " über",
    "ß",
    " 1234",
    "!",
    " Ω≈ç√",
    " 👩‍👩‍👧",
    " a",
    "bc",
    "##",
    "#",
]


@pytest.fixture(scope="module")
def tok():
    return build_llama3_style_tokenizer()


_BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


@pytest.fixture(scope="module")
def byte_ids(tok) -> dict[int, int]:
    """byte value -> the id of its single-byte token."""
    ids = {b: tok.token_to_id(c) for b, c in bytes_to_unicode().items()}
    assert None not in ids.values()
    return ids


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def shattered(tok, byte_ids, text: str, rng: random.Random) -> list[int]:
    """Token ids for text, random tokens replaced by their single bytes (splitting characters)."""
    out = []
    for token_id in encode(tok, text):
        if rng.random() < 0.4:
            out.extend(byte_ids[_BYTE_OF[c]] for c in tok.id_to_token(token_id))
        else:
            out.append(token_id)
    assert tok.decode(out) == text
    return out


def stream(tok, ids, **kw) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, **kw)
    deltas = []
    for token_id in ids:
        deltas.append(d.add(token_id))
        if d.finished:
            break
    deltas.append(d.flush())
    return deltas, d


def stopped(text: str, stops: list[str], include: bool, after: int = 0) -> tuple[str, str | None]:
    """Reference: text cut at the first stop string completed, reading character by character
    (past `after`)."""
    for end in range(after + 1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[: end - len(s)]), s
    return text, None


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))


# -- plain decoding --------------------------------------------------------------------------------
def test_split_emoji_is_held_back(tok, byte_ids):
    ids = [byte_ids[b] for b in "😀".encode()]  # four single-byte tokens
    d = IncrementalDetokenizer(tok)
    assert [d.add(i) for i in ids] == ["", "", "", "😀"]
    assert d.flush() == "" and d.text == "😀"


def test_random_sequences_match_full_decode(tok, byte_ids):
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng)
        ids = shattered(tok, byte_ids, text, rng)
        deltas, d = stream(tok, ids)
        assert "".join(deltas) == text == d.text
        assert all("\ufffd" not in x for x in deltas)
        assert d.stop_reason is None


def test_arbitrary_token_ids_match_full_decode(tok):
    # random ids, invalid UTF-8 included: still exactly what a full decode gives (U+FFFD and all)
    rng = random.Random(1)
    for _ in range(300):
        ids = [
            rng.choice(
                [rng.randrange(256), rng.randrange(256, 2300), rng.randrange(128000, 128256)]
            )
            for _ in range(rng.randint(1, 30))
        ]
        for skip in (True, False):
            deltas, _ = stream(tok, ids, skip_special_tokens=skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), ids


def test_unfinished_character_at_the_end_is_flushed(tok, byte_ids):
    ids = encode(tok, "Hi") + [byte_ids[b] for b in "😀".encode()[:2]]
    d = IncrementalDetokenizer(tok)
    assert "".join(d.add(i) for i in ids) == "Hi"
    assert d.flush() == tok.decode(ids)[2:] and d.text == tok.decode(ids)
    assert d.finished and d.flush() == ""


def test_skip_special_tokens(tok):
    ids = encode(tok, "Hello") + [IMAGE] + encode(tok, " world") + [EOT]
    assert "".join(stream(tok, ids)[0]) == "Hello world"
    kept = "".join(stream(tok, ids, skip_special_tokens=False)[0])
    assert kept == "Hello<|image|> world<|eot_id|>"


def test_prompt_context(tok):
    prompt = encode(tok, "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = encode(tok, "The cat 😀")
    deltas, _ = stream(tok, ids, prompt_token_ids=prompt)
    assert "".join(deltas) == "The cat 😀"


# -- stop strings ----------------------------------------------------------------------------------
def test_stop_string_across_tokens_is_never_partly_emitted(tok):
    ids = encode(tok, "The end### more")
    assert [tok.id_to_token(i) for i in ids[3:7]] == ["d", "#", "#", "#"]  # one "#" per token
    d = IncrementalDetokenizer(tok, stop=["###"])
    deltas = []
    for i in ids[:7]:
        deltas.append(d.add(i))
        assert "#" not in "".join(deltas)
        assert d.finished == (len(deltas) == 7)
    assert "".join(deltas) == "The end" == d.text and d.stop_reason == "###"
    assert deltas[0] == "T"  # two characters ("he") held back: they could start "###"
    with pytest.raises(RuntimeError):
        d.add(ids[7])
    assert d.flush() == ""


def test_stop_string_included(tok):
    deltas, d = stream(
        tok, encode(tok, "The cat sat. The dog"), stop=["sat."], include_stop_str_in_output=True
    )
    assert "".join(deltas) == "The cat sat." == d.text and d.stop_reason == "sat."


def test_partial_stop_string_is_released(tok):
    # "##" looks like the start of "###" but the text goes on: everything comes out in the end
    deltas, d = stream(tok, encode(tok, "a## b#"), stop=["###"])  # tokens: a # # " b" #
    assert deltas == ["", "", "a", "##", " ", "b#"]  # the last two characters come from flush()
    assert d.text == "a## b#" and d.stop_reason is None


def test_stop_at_the_first_token(tok):
    ids = encode(tok, "The cat")
    for stop, include, delta in [
        ("The", False, ""),
        ("The", True, "The"),
        ("he", False, "T"),
        ("Th", True, "Th"),
    ]:
        d = IncrementalDetokenizer(tok, stop=[stop], include_stop_str_in_output=include)
        assert d.add(ids[0]) == delta
        assert d.finished and d.stop_reason == stop and d.text == delta


def test_earliest_stop_string_wins(tok):
    deltas, d = stream(tok, encode(tok, "one, two; three. four"), stop=[".", ";", "four"])
    assert "".join(deltas) == "one, two" and d.stop_reason == ";"
    # several characters in one token: the stop string completed first wins ("12" before "w123")
    token = tok.token_to_id("\u0120w123")
    assert tok.decode([token]) == " w123"
    for stops in (["w123", "12"], ["12", "w123"]):
        deltas, d = stream(tok, encode(tok, "x") + [token], stop=stops)
        assert "".join(deltas) == "x w" and d.stop_reason == "12"
    # both end together: the longer wins
    deltas, d = stream(tok, encode(tok, "x") + [token], stop=["w12", "12"])
    assert "".join(deltas) == "x " and d.stop_reason == "w12"


def test_stop_string_inside_a_split_character(tok, byte_ids):
    ids = encode(tok, "go") + [byte_ids[b] for b in " 🚀🌍".encode()] + encode(tok, " now")
    deltas, d = stream(tok, ids, stop=["🚀🌍"])
    assert "".join(deltas) == "go " and d.stop_reason == "🚀🌍"
    assert all("\ufffd" not in x for x in deltas)


def random_stops(rng: random.Random, text: str, p_substring: float) -> list[str]:
    """1-3 stop strings: substrings of the text (with probability p_substring), or pieces that may
    not occur."""
    stops = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text))
        stops.append(
            text[i : i + rng.randint(1, 6)] if rng.random() < p_substring else rng.choice(PIECES)
        )
    return stops


def test_random_sequences_with_stop_strings(tok, byte_ids):
    rng = random.Random(2)
    for _ in range(300):
        text = random_text(rng)
        ids = shattered(tok, byte_ids, text, rng)
        stops = random_stops(rng, text, 0.7)
        include = rng.random() < 0.5
        deltas, d = stream(tok, ids, stop=stops, include_stop_str_in_output=include)
        expected, reason = stopped(text, stops, include)
        assert "".join(deltas) == expected == d.text, (text, stops)
        assert d.stop_reason == reason
        assert all("\ufffd" not in x for x in deltas)
        if reason is not None and not include:
            assert not any(s in d.text for s in stops)


def test_empty_stop_string_rejected(tok):
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, stop=[""])


# -- min_tokens and stop tokens (vLLM's rules) -----------------------------------------------------
def test_min_tokens_hold_back_stop_strings(tok):
    ids = encode(tok, "a#b#c#d")  # one character per token
    assert len(ids) == 7
    for min_tokens, expected in [
        (0, "a"),
        (1, "a"),
        (2, "a#b"),
        (4, "a#b#c"),
        (6, "a#b#c#d"),
        (7, "a#b#c#d"),
    ]:
        deltas, d = stream(tok, ids, stop=["#"], min_tokens=min_tokens)
        assert "".join(deltas) == expected == d.text, min_tokens
        assert d.stop_reason == (None if expected == "a#b#c#d" else "#")


def test_stop_string_begun_within_min_tokens_counts_once_completed_after(tok):
    ids = encode(tok, "The dog")
    assert [tok.decode([i]) for i in ids] == ["The", " dog"]
    deltas, d = stream(tok, ids, stop=["e d"], min_tokens=1)  # "e" from token 1, " d" from token 2
    assert "".join(deltas) == "Th" and d.stop_reason == "e d"
    deltas, d = stream(tok, ids, stop=["The"], min_tokens=1)  # completed by token 1: ordinary text
    assert "".join(deltas) == "The dog" and d.stop_reason is None


def test_random_sequences_with_stop_strings_and_min_tokens(tok, byte_ids):
    rng = random.Random(3)
    for _ in range(300):
        text = random_text(rng)
        ids = shattered(tok, byte_ids, text, rng)
        stops = random_stops(rng, text, 0.8)
        include, min_tokens = rng.random() < 0.5, rng.randint(0, len(ids))
        deltas, d = stream(
            tok, ids, stop=stops, include_stop_str_in_output=include, min_tokens=min_tokens
        )
        # the text of the first min_tokens tokens, less a character they leave unfinished
        boundary = len(tok.decode(ids[:min_tokens]).rstrip("\ufffd"))
        expected, reason = stopped(text, stops, include, after=boundary)
        assert "".join(deltas) == expected == d.text, (text, stops, min_tokens)
        assert d.stop_reason == reason


def test_flush_keeps_the_stop_token_text(tok):
    ids = encode(tok, "The dog")
    for skip, expected in [(False, "The dog<|eot_id|>"), (True, "The dog")]:
        d = IncrementalDetokenizer(
            tok, skip_special_tokens=skip, stop=["eot", "g<"], include_stop_str_in_output=True
        )
        deltas = [d.add(i) for i in ids] + [d.flush(EOT)]
        # the stop token's own text is not searched for stop strings (vLLM's rule)
        assert "".join(deltas) == expected == d.text and d.stop_reason is None and d.finished
    d = IncrementalDetokenizer(tok)
    deltas = [d.add(i) for i in encode(tok, "ab")] + [d.flush(encode(tok, "!")[0])]
    assert "".join(deltas) == "ab!"
