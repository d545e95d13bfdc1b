"""Structured outputs: xgrammar grammars over the vocabulary, a matcher per request, token masks.

The grammars (JSON schema, JSON object, regex, choice, EBNF) are compiled with xgrammar over the
model's vocabulary; each request gets its own matcher, and the sampler masks the logits with it.

`GrammarCompiler` is shared and thread-safe (the server compiles in a worker thread to validate a
request; the engine compiles again and hits the cache). `Grammar` is one request's position in its
grammar: the sampler asks it for the allowed tokens, the engine tells it each token it appends.
xgrammar is imported on first use, so a server that never sees a constrained request never loads it.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from typing import TYPE_CHECKING, Any

import torch

from plm_core.sampling import StructuredOutput

if TYPE_CHECKING:
    import xgrammar as xgr

    from plm_core.tokenizer import PLMTokenizer

_BITS = torch.arange(32, dtype=torch.int32)  # bit i of each int32 word is token 32 * word + i
_BIT_VALUES = [(1 << i) - (1 << 32 if i == 31 else 0) for i in range(32)]  # bit i as an int32 value
# xgrammar's "[12:00:00] /path/file.cc:123: " on errors
_LOG_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")


# JSON Schema keywords xgrammar 0.2.9 accepts but does not enforce (seen: `uniqueItems` gave [1, 1],
# `not` and `contains` were ignored, `allOf` of two schemas let anything through): refused, as
# OpenAI refuses keywords its strict mode cannot honour, rather than promising a shape the output
# may not have.
_UNENFORCED = (
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "patternProperties",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_LOOKAROUND = re.compile(r"\(\?<?[=!]")  # xgrammar ignores lookahead/lookbehind assertions


# Compile time grows fast with a schema's size and depth (measured on 2 CPU cores: 5,000 properties
# took 93 s, arrays nested 900 deep 35 s), so a request may not make the server spend it: these caps
# keep a compile under about a second.
MAX_CONSTRAINT_BYTES = 64 * 1024  # the schema, regex, grammar or choices, as text
MAX_SCHEMA_DEPTH = 64  # subschemas inside subschemas


def unenforced_feature(schema: object) -> str | None:
    """A description of the first part of a JSON schema the grammar would silently not enforce (or
    could not compile in reasonable time: nesting deeper than MAX_SCHEMA_DEPTH), or None."""
    # (where, subschema, depth); iterative: a deep schema must not become a RecursionError
    stack: list[tuple[str, Any, int]] = [("#", schema, 0)]
    while stack:
        where, node, depth = stack.pop()
        if not isinstance(node, dict):
            continue
        if depth > MAX_SCHEMA_DEPTH:
            return f"subschemas nested more than {MAX_SCHEMA_DEPTH} deep (at {where})"
        for key in _UNENFORCED:
            if key in node and not (key == "uniqueItems" and node[key] is False):
                return f"'{key}' (at {where})"
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            return f"'allOf' with more than one schema (at {where})"
        if "multipleOf" in node and node.get("type") != "integer":
            return f"'multipleOf' on a non-integer (at {where})"
        if isinstance(node.get("pattern"), str) and _LOOKAROUND.search(node["pattern"]):
            return f"a lookahead or lookbehind in 'pattern' (at {where})"
        children = [
            (f"{where}/{m}/{k}", v)
            for m in _SUBSCHEMA_MAPS
            if isinstance(node.get(m), dict)
            for k, v in node[m].items()
        ]
        children += [
            (f"{where}/{m}/{i}", v)
            for m in _SUBSCHEMA_LISTS
            if isinstance(node.get(m), list)
            for i, v in enumerate(node[m])
        ]
        children += [
            (f"{where}/{m}", node[m]) for m in ("items", "additionalProperties") if m in node
        ]
        stack.extend((path, child, depth + 1) for path, child in reversed(children))
    return None


class GrammarCompiler:
    """Compiles StructuredOutput specs into grammars over one tokenizer (cached, thread-safe)."""

    def __init__(
        self,
        tokenizer: PLMTokenizer,
        vocab_size: int,
        stop_token_ids: tuple[int, ...],
        cache_limit_bytes: int = 256 << 20,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's vocabulary)
        self.stop_token_ids = tuple(stop_token_ids)
        self.cache_limit_bytes = cache_limit_bytes
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def _xgr_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tok = self.tokenizer
                special = tok.special_token_ids()
                # special tokens get no text, so no grammar can ever produce them (xgrammar's
                # convention); the stop tokens are allowed where the grammar may end
                vocab = [
                    b"" if i in special else tok.token_bytes(i)
                    for i in range(min(tok.vocab_size, self.vocab_size))
                ]
                info = xgr.TokenizerInfo(
                    vocab,
                    xgr.VocabType.RAW,
                    vocab_size=self.vocab_size,
                    stop_token_ids=list(self.stop_token_ids),
                )
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=2, cache_limit_bytes=self.cache_limit_bytes
                )
            return self._compiler

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar of spec; ValueError for an invalid schema, regex or grammar."""
        # cached: the engine's compile repeats the server's, on the engine thread
        refusal = _refusal(spec)
        if refusal:
            raise ValueError(refusal)
        compiler = self._xgr_compiler()
        try:
            if spec.json_object:
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.json is not None:
                return compiler.compile_json_schema(spec.json, any_whitespace=False)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                return compiler.compile_grammar(choice_grammar(spec.choice))
            assert spec.grammar is not None  # StructuredOutput holds exactly one kind
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse errors: RuntimeError
            lines = str(e).strip().splitlines()
            message = _LOG_PREFIX.sub("", lines[0]) if lines else type(e).__name__
            raise ValueError(f"cannot compile the {spec.kind} constraint: {message}") from None

    def grammar(self, spec: StructuredOutput) -> Grammar:
        """A fresh matcher for one request."""
        import xgrammar as xgr

        return Grammar(xgr.GrammarMatcher(self.compile(spec)))


@functools.lru_cache(maxsize=256)
def _refusal(spec: StructuredOutput) -> str | None:
    """Why spec is refused before compiling (too big, unenforced keywords, lookaround), or None."""
    texts = [
        t for t in (spec.json, spec.regex, spec.grammar, *(spec.choice or ())) if t is not None
    ]
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if size > MAX_CONSTRAINT_BYTES:
        return (
            f"the {spec.kind} constraint is {size} bytes; "
            f"this server compiles at most {MAX_CONSTRAINT_BYTES}"
        )
    if spec.json is not None:
        found = unenforced_feature(json.loads(spec.json))
        if found:
            return (
                f"cannot compile the json constraint: the schema uses {found}, "
                "which this server cannot enforce"
            )
    if spec.regex is not None and _LOOKAROUND.search(spec.regex):
        return "cannot compile the regex constraint: lookahead and lookbehind are not supported"
    return None


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose language is exactly the given strings."""
    # JSON string syntax with ASCII escapes is also EBNF string-literal syntax
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=True) for c in choices)


class Grammar:
    """One request's matcher: which tokens may come next, and the tokens it has taken."""

    def __init__(self, matcher: xgr.GrammarMatcher):
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advances past token_id; False (and no change) if the grammar does not allow it."""
        return self._matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was taken: nothing more may follow."""
        return self._matcher.is_terminated()

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._matcher.stop_token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into row `row` of an int32 [R, ceil(V/32)] CPU bitmask."""
        self._matcher.fill_next_token_bitmask(bitmask, row)


def allowed_tokens(grammars: list[Grammar], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(grammars), vocab_size] bool on device: True where each grammar allows the token next.

    A grammar with no way forward (`root ::= root`, say) allows its stop tokens instead, so the
    request ends rather than taking a token outside its grammar."""
    words = (vocab_size + 31) // 32
    bitmask = torch.full((len(grammars), words), -1, dtype=torch.int32)
    for row, grammar in enumerate(grammars):
        grammar.fill_bitmask(bitmask, row)
        if not bitmask[row].any():
            for token in grammar.stop_token_ids:
                bitmask[row, token // 32] |= _BIT_VALUES[token % 32]
    bits = (bitmask.to(device)[:, :, None] >> _BITS.to(device)) & 1  # [R, words, 32]
    return bits.view(len(grammars), -1)[:, :vocab_size].bool()
