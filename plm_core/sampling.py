"""Sampling parameters of a request: vLLM's names and defaults, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
LOGIT_BIAS_LIMIT = 100.0  # OpenAI clamps logit_bias values to [-100, 100]
_GREEDY_TEMPERATURE = 1e-5  # below this, temperature sampling is argmax (vLLM's _SAMPLING_EPS)


@dataclass
class SamplingParams:
    """How to pick tokens for one request (vLLM's names and defaults where they exist)."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # choices per prompt; the engine runs them as separate requests
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top token's
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    repetition_penalty: float = 1.0  # divides (or multiplies, if negative) logits of prompt + output tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, clamped to [-100, 100]
    stop: list[str] | str | None = None  # stop strings; normalised to a list
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k (0..20)
    skip_special_tokens: bool = True
    min_tokens: int = 0  # eos and stop tokens are masked until this many tokens are generated

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {self.stop_token_ids}")

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")

        if self.logit_bias is not None:
            bias = {}
            for token, value in self.logit_bias.items():
                try:
                    token_id = int(token)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {token!r}") from None
                if token_id < 0:
                    raise ValueError(f"logit_bias keys must be non-negative token ids, got {token_id}")
                bias[token_id] = min(max(float(value), -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
            self.logit_bias = bias

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax: temperature (almost) 0, or top_k == 1."""
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1
