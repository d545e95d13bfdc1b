"""Sampling parameters of a request: vLLM's names and defaults, validated on creation (an
InputError naming the field for a value that could later fail a step)."""

from __future__ import annotations

import json
import math
import numbers
import operator
from dataclasses import dataclass, field, replace
from typing import Any

from plm_core.errors import InputError

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
LOGIT_BIAS_LIMIT = 100.0  # OpenAI accepts logit_bias values in [-100, 100] and rejects the rest
# what torch.Generator.manual_seed accepts (it reads seeds modulo 2**64)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
_GREEDY_TEMPERATURE = 1e-5  # below this, temperature sampling is argmax (vLLM's _SAMPLING_EPS)
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
_INTEGER_FIELDS = ("top_k", "max_tokens", "n", "min_tokens")


def _field(name: str) -> str:
    """The request field a checked value belongs to (`logit_bias[5]` -> `logit_bias`)."""
    return name.split("[", 1)[0]


def _integer(name: str, value: Any) -> int:
    """value as a plain int (ints, numpy integers); ValueError for floats, strings and the rest."""
    try:
        return operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {value!r}", param=_field(name)) from None


def _finite(name: str, value: Any) -> float:
    """value as a finite float; ValueError for NaN, infinities and non-numbers."""
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}", param=_field(name))
    return float(value)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output's text, enforced token by token (exactly one field is set).

    vLLM's `structured_outputs` kinds; OpenAI's response_format maps onto `json` and `json_object`.
    """

    json: str | None = None  # a JSON Schema, as JSON text: the output is one JSON value it accepts
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the output matches this regular expression
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # an EBNF grammar (GBNF-style, `root ::= ...`)

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(
                f"structured output needs exactly one of json, json_object, regex, choice and "
                f"grammar; got {kinds or 'none'}"
            )
        if self.json is not None:
            text = self.json if isinstance(self.json, str) else None
            try:
                schema = json.loads(text) if text is not None else None
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            except RecursionError:
                raise ValueError("the JSON schema is nested too deeply") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("the JSON schema must be a JSON object (or true/false)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"the {name} must be a non-empty string")
        if self.choice is not None:
            choice = tuple(self.choice) if isinstance(self.choice, (list, tuple)) else ()
            if not choice or any(not isinstance(c, str) or not c for c in choice):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", choice)

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(
            k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None
        )


@dataclass
class SamplingParams:
    """How to pick tokens for one request (vLLM's names and defaults where they exist).

    Every field is checked here (token ids against the vocabulary in EngineCore.add_request), so
    that a request the engine accepts can never make a step fail.
    """

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    seed: int | None = None  # in [-2**63, 2**64 - 1]
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # choices per prompt; the engine runs them as separate requests
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top token's
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    # divides (or multiplies, if negative) logits of prompt + output tokens
    repetition_penalty: float = 1.0
    # token id -> added to its logit; values in [-100, 100]
    logit_bias: dict[int, float] | None = None
    stop: list[str] | str | None = None  # stop strings; normalised to a list
    # keep the stop string (or stop/eos token's text) in the text
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k (0..20)
    skip_special_tokens: bool = True
    # eos, stop tokens and stop strings do not end the output before this many tokens
    min_tokens: int = 0
    # constrain the text to a JSON schema, regex, ...
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        for name in _FLOAT_FIELDS:
            setattr(self, name, _finite(name, getattr(self, name)))
        for name in _INTEGER_FIELDS:
            setattr(self, name, _integer(name, getattr(self, name)))
        self._check_ranges()
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
            if not SEED_MIN <= self.seed <= SEED_MAX:
                raise InputError(
                    f"seed must be in [-2**63, 2**64 - 1], got {self.seed}", param="seed"
                )
        stop_token_ids = () if self.stop_token_ids is None else self.stop_token_ids
        self.stop_token_ids = [_integer("stop_token_ids", t) for t in stop_token_ids]
        if any(t < 0 for t in self.stop_token_ids):
            raise InputError(
                f"stop_token_ids must be non-negative, got {self.stop_token_ids}",
                param="stop_token_ids",
            )
        self.stop = _stop_strings(self.stop)
        if self.structured_output is not None and not isinstance(
            self.structured_output, StructuredOutput
        ):
            raise ValueError(
                f"structured_output must be a StructuredOutput, got {self.structured_output!r}"
            )
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)

    def _check_ranges(self) -> None:
        """ValueError for a number outside its field's range (logprobs is made an int here)."""
        if self.temperature < 0:
            raise InputError(
                f"temperature must be >= 0, got {self.temperature}", param="temperature"
            )
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < -1:
            raise InputError(
                f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}", param="top_k"
            )
        if self.max_tokens < 1:
            raise InputError(
                f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens"
            )
        if self.n < 1:
            raise InputError(f"n must be at least 1, got {self.n}", param="n")
        if not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        if not -2 <= self.presence_penalty <= 2:
            raise InputError(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
                param="presence_penalty",
            )
        if not -2 <= self.frequency_penalty <= 2:
            raise InputError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
                param="frequency_penalty",
            )
        if not self.repetition_penalty > 0:
            raise InputError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                param="repetition_penalty",
            )
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise InputError(
                    f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
                    param="logprobs",
                )
        if self.min_tokens < 0:
            raise InputError(f"min_tokens must be >= 0, got {self.min_tokens}", param="min_tokens")
        if self.min_tokens > self.max_tokens:
            raise InputError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                param="min_tokens",
            )

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax: temperature (almost) 0, or top_k == 1."""
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1

    def for_choice(self, index: int) -> SamplingParams:
        """The params of choice `index` of an n-choice request: n=1 and, with a seed, seed + index.

        seed + index past SEED_MAX wraps around by 2**64 (to 0, 1, ...): torch reads seeds modulo
        2**64, so that is the generator seed + index stands for, and the seed stays in the range
        torch accepts.
        """
        seed = None
        if self.seed is not None:
            seed = self.seed + index
            if seed > SEED_MAX:
                seed -= 2**64
        return replace(self, n=1, seed=seed)


def _stop_strings(stop: list[str] | str | None) -> list[str]:
    """stop as a list of non-empty strings; ValueError for an empty or non-string one."""
    if stop is None:
        strings = []
    elif isinstance(stop, str):
        strings = [stop]
    else:
        strings = list(stop)
    if any(not isinstance(s, str) or s == "" for s in strings):
        raise InputError(f"stop must be non-empty strings, got {strings!r}", param="stop")
    return strings


def _logit_bias(logit_bias: dict[Any, Any]) -> dict[int, float]:
    """logit_bias with int token ids (JSON gives string keys) and finite values in [-100, 100]."""
    bias = {}
    for token, value in logit_bias.items():
        try:
            token_id = int(token) if isinstance(token, str) else operator.index(token)
        except (TypeError, ValueError):
            raise InputError(
                f"logit_bias keys must be token ids, got {token!r}", param="logit_bias"
            ) from None
        if token_id < 0:
            raise InputError(
                f"logit_bias keys must be non-negative token ids, got {token_id}",
                param="logit_bias",
            )
        value = _finite(f"logit_bias[{token_id}]", value)
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise InputError(
                f"logit_bias values must be in [-100, 100], got {value} for token {token_id}",
                param="logit_bias",
            )
        bias[token_id] = value
    return bias
