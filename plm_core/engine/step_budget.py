"""Stall-free step sizing: the time budget of a step that carries decodes, in token equivalents."""

from __future__ import annotations

import math
from dataclasses import dataclass

# The least prefill work a step with decodes gets when the budget leaves none, in token
# equivalents: 16 tokens of the step's first prefill (or what it has left), or one encoder tile
# when a tile costs more. With chunked prefill off, the first prefill's whole prompt instead.
FLOOR_TOKENS = 16


@dataclass(frozen=True)
class StepBudget:
    """How long a step that carries decodes may take, and what its parts cost (seconds)."""

    target_s: float  # the step's target duration
    base_s: float  # fixed cost of any step
    per_token_s: float  # cost of one prefill token
    per_tile_s: float  # cost of one vision-encoder tile/frame
    per_decode_s: float | None = None  # cost of one decode (None: a prefill token's)

    def __post_init__(self) -> None:
        times = (self.target_s, self.base_s, self.per_tile_s, self.decode_s)
        if self.per_token_s <= 0 or min(times) < 0:
            raise ValueError(f"a step budget needs per_token_s > 0 and no negative time: {self}")

    @property
    def decode_s(self) -> float:
        return self.per_token_s if self.per_decode_s is None else self.per_decode_s

    @property
    def tile_tokens(self) -> float:
        """What one encoder tile costs, in prefill tokens."""
        return self.per_tile_s / self.per_token_s

    def cost_s(self, num_tokens: int, num_tiles: int, num_decodes: int = 0) -> float:
        """Predicted duration of a step of num_decodes decodes, num_tokens prefill tokens and
        num_tiles encoder tiles."""
        return (
            self.base_s
            + self.decode_s * num_decodes
            + self.per_token_s * num_tokens
            + self.per_tile_s * num_tiles
        )

    def allowance(self, num_decodes: int, *, chunked_prefill: bool) -> Allowance:
        """The prefill tokens and tiles a step with num_decodes decodes may add, and its floor."""
        left_s = self.target_s - self.base_s - self.decode_s * num_decodes
        tokens = left_s / self.per_token_s
        floor = max(float(FLOOR_TOKENS), self.tile_tokens) if chunked_prefill else math.inf
        return Allowance(tokens, self.tile_tokens, floor)


@dataclass
class Allowance:
    """Prefill work a step with decodes may still add, in token equivalents (a tile costs
    `tile_tokens`); its decodes are paid for up front and never limited."""

    tokens: float  # left of the budget; negative once the floor overspent it
    tile_tokens: float
    # what the step's first prefill work may use even when `tokens` is spent; 0 once it is used
    floor: float

    @property
    def available(self) -> float:
        """Token equivalents the next prefill chunk may use (tokens plus tiles)."""
        return max(self.tokens, self.floor)

    def token_cap(self, limit: int) -> int:
        """`limit` tokens, or fewer when the allowance is smaller (never below 0)."""
        available = self.available
        return limit if available >= limit else max(0, math.floor(available))

    def charge(self, num_tokens: int, num_tiles: int) -> None:
        """Spends a chunk's prefill tokens and tiles; the first work uses up the floor."""
        if num_tokens or num_tiles:
            self.tokens -= num_tokens + num_tiles * self.tile_tokens
            self.floor = 0.0
