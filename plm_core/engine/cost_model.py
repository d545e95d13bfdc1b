"""What a step costs, learned from the steps the engine runs: seconds = base + per_decode x decodes
+ per_token x prefill tokens + per_tile x encoder tiles. Plain Python, fed by the engine core after
each step.

A decode and a prefill token are priced apart because they cost very different amounts: a decode
brings a sampled row through the LM head (on the `bench` checkpoint's CPU runs about 5 ms, against
about 0.13 ms for a prefill token), so one price fitted to both misjudges a long prefill chunk by
an order of magnitude. The engine counts every sampled row as a decode (a prompt's last chunk
samples too) and the other tokens as prefill tokens.

(base, per_decode) is a least-squares line over recent steps that only decode; per_token is the
mean time per prefill token that this line leaves unexplained in steps that prefill; per_tile the
mean time per tile that both leave unexplained in steps that encode.
Until prefill steps are seen a prefill token is priced as a decode, and until tiles are seen a tile
as `tokens_per_tile` prefill tokens (for PerceptionLM about right: a vision-tower tile and 256
decoder tokens take similar work); a share that comes out at zero or less (noise, or another
estimate off) falls back to the same cautious prices instead of making work look free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCosts:
    """The model's current estimates, in seconds."""

    base_s: float
    per_decode_s: float
    per_token_s: float  # a prefill token
    per_tile_s: float

    def step_s(self, decodes: int, tokens: int = 0, tiles: int = 0) -> float:
        """A step of `decodes` decodes, `tokens` prefill tokens and `tiles` encoder tiles."""
        return (
            self.base_s
            + self.per_decode_s * decodes
            + self.per_token_s * tokens
            + self.per_tile_s * tiles
        )


class _Residuals:
    """A window of (decodes, tokens, tiles, seconds) steps with running sums of each, and of
    decodes x decodes and decodes x seconds (for the line)."""

    def __init__(self, window: int):
        self.window = window
        self.steps: deque[tuple[int, int, int, float]] = deque()
        self.sums = [0.0] * 6

    def add(self, step: tuple[int, int, int, float]) -> None:
        self._count(step, 1)
        self.steps.append(step)
        if len(self.steps) > self.window:
            self._count(self.steps.popleft(), -1)

    def _count(self, step: tuple[int, int, int, float], sign: int) -> None:
        decodes, seconds = step[0], step[3]
        for i, value in enumerate((*step, decodes * decodes, decodes * seconds)):
            self.sums[i] += sign * value


class StepCostModel:
    """Online estimates of a step's cost from (decodes, prefill tokens, tiles, seconds)
    observations. Each step updates running sums, so an estimate costs the same whatever the
    window."""

    def __init__(self, tokens_per_tile: int, *, window: int = 256, min_steps: int = 8):
        self.tokens_per_tile = tokens_per_tile
        self.min_steps = min_steps
        self._decode = _Residuals(window)  # steps that only decode
        self._prefill = _Residuals(window)  # steps with prefill tokens and no tiles
        self._tiles = _Residuals(window)  # steps with encoder tiles

    def observe(self, decodes: int, tokens: int, tiles: int, seconds: float) -> None:
        """Records one step: its decodes, prefill tokens and encoder tiles, and its duration."""
        if seconds <= 0 or decodes + tokens + tiles <= 0:
            return
        step = (decodes, tokens, tiles, seconds)
        if tiles:
            self._tiles.add(step)
        elif tokens:
            self._prefill.add(step)
        else:
            self._decode.add(step)

    @property
    def ready(self) -> bool:
        """True once enough decode-only steps were seen to estimate anything."""
        return len(self._decode.steps) >= self.min_steps

    def costs(self) -> StepCosts | None:
        """The current estimates, or None before `min_steps` decode-only steps."""
        if not self.ready:
            return None
        base, per_decode = self._fit_line()
        per_token = self._share(self._prefill, 1, base, per_decode, 0.0, 0.0) or per_decode
        prior_tile = per_token * self.tokens_per_tile
        per_tile = self._share(self._tiles, 2, base, per_decode, per_token, 0.0) or prior_tile
        return StepCosts(base, per_decode, per_token, per_tile)

    @staticmethod
    def _share(
        r: _Residuals, index: int, base: float, per_decode: float, per_token: float, per_tile: float
    ) -> float | None:
        """Mean time per unit of sums[index] (1: prefill tokens, 2: tiles) that the given prices
        leave unexplained in r's steps (the caller gives 0 for the price being estimated); None
        without steps or when nothing is left (the caller's cautious price then)."""
        decodes, tokens, tiles, seconds = r.sums[:4]
        units = r.sums[index]
        if not r.steps or units <= 0:
            return None
        known = base * len(r.steps) + per_decode * decodes + per_token * tokens + per_tile * tiles
        left = seconds - known
        return left / units if left > 0 else None

    def _fit_line(self) -> tuple[float, float]:
        """(base, per_decode) by least squares; with too little spread in the decode counts to
        separate the two, all the time is put on the decodes (the cautious choice: it makes
        decodes look dear, so budgets stay small)."""
        n = len(self._decode.steps)
        sx, _, _, sy, sxx, sxy = self._decode.sums
        mean_x, mean_y = sx / n, sy / n
        var_x = sxx - n * mean_x * mean_x
        cautious = 0.0, mean_y / max(mean_x, 1.0)
        if var_x <= 1e-9 * max(mean_x, 1.0) ** 2 * n:
            return cautious
        slope = (sxy - n * mean_x * mean_y) / var_x
        if slope <= 0:  # noise swamps the decodes' share: same cautious choice
            return cautious
        base = mean_y - slope * mean_x
        if base < 0:  # a line through the origin, then
            return 0.0, sxy / sxx
        return base, slope
