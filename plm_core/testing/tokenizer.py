"""Builds an offline Llama-3-style byte-level BPE tokenizer with PerceptionLM's special tokens.

The hub tokenizer cannot be downloaded here, so test and demo checkpoints get a tokenizer with the
same structure: Llama-3's split regex and byte-level BPE, 128000 ordinary tokens, and the 256
special tokens at ids 128000-128255 in PerceptionLM's order (`<|image|>` = 128002, `<|video|>` =
128003, `<|eot_id|>` = 128009). Merges are learned from a small built-in English corpus; the rest of
the 128000 ordinary ids are filler words, so every id a random model samples decodes to text.
"""

from __future__ import annotations

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

NUM_ORDINARY_TOKENS = 128000
BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOT = "<|eot_id|>"
IMAGE = "<|image|>"
VIDEO = "<|video|>"

# Llama-3's pre-tokenizer pattern (the one tiktoken's cl100k-style encoders use).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Same order as PerceptionLM's converted tokenizer: ids 128000 + index.
SPECIAL_TOKENS = [
    BOS,
    END_OF_TEXT,
    IMAGE,
    VIDEO,
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    EOT,
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
assert len(SPECIAL_TOKENS) == 256

_CORPUS = """
The quick brown fox jumps over the lazy dog. A picture shows a cat sitting on a red sofa next to a
window. Describe the image in detail. What is happening in this video? The astronaut is floating in
space near the station. There are two people riding bicycles along a street in the city. The chart
shows sales numbers rising over the year, with a peak in the summer months. Please answer the
question using a single word or phrase. The coffee cup is white and sits on a wooden table. A rocket
launches into a clear blue sky, leaving a trail of smoke behind it. The document contains a title,
several paragraphs of text and a table with numbers. You are a helpful language and vision
assistant. You are able to understand the visual content that the user provides, and assist the
user with a variety of tasks using natural language. Yes, no, maybe. One two three four five six
seven eight nine ten. Colors: red, green, blue, yellow, black, white, orange, purple, pink, brown.
How many objects are in the scene? Where is the dog? When did the event happen? Why is the sky blue?
"""


def build_llama3_style_tokenizer(num_merges: int = 2000) -> Tokenizer:
    """A `tokenizers.Tokenizer` with Llama-3's pipeline and PerceptionLM's special-token ids."""
    tok = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + num_merges,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)

    # Pad the ordinary vocabulary to exactly 128000 ids with filler words (" w12345"), which the
    # merges never produce but which decode to readable text when a random model samples them.
    vocab = tok.get_vocab()
    merges = _merges_of(tok)
    next_id = len(vocab)
    filler = 0
    while next_id < NUM_ORDINARY_TOKENS:
        piece = f"\u0120w{filler}"  # \u0120 is the byte-level symbol for a space
        filler += 1
        if piece in vocab:
            continue
        vocab[piece] = next_id
        next_id += 1
    bpe = models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=True)
    full = Tokenizer(bpe)
    full.pre_tokenizer = tok.pre_tokenizer
    full.decoder = tok.decoder
    full.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert full.token_to_id(BOS) == 128000 and full.token_to_id(EOT) == 128009
    assert full.token_to_id(IMAGE) == 128002 and full.token_to_id(VIDEO) == 128003
    full.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, 128000)],
            ),
        ]
    )
    return full


def _merges_of(tok: Tokenizer) -> list[tuple[str, str]]:
    """The trained BPE merges (serialised as "a b" strings or as [a, b] pairs)."""
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    pairs = []
    for m in merges:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        pairs.append((left, right))
    return pairs
