"""What a step costs, learned from the steps the engine runs: seconds = base + per_token x LM tokens
+ per_tile x encoder tiles. Plain Python, fed by the engine core after each step.

The token part is a least-squares line over a window of recent steps without encoder work; the
tile part is the mean time per tile those steps' line leaves unexplained in steps that encode.
Until a tile has been seen, a tile is assumed to cost what `tokens_per_tile` LM tokens do (for
PerceptionLM about right: a vision-tower tile and 256 decoder tokens take similar work).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCosts:
    """The model's current estimates, in seconds."""

    base_s: float
    per_token_s: float
    per_tile_s: float

    def step_s(self, tokens: int, tiles: int = 0) -> float:
        return self.base_s + self.per_token_s * tokens + self.per_tile_s * tiles


class StepCostModel:
    """Online estimates of a step's cost from (tokens, tiles, seconds) observations. Each step
    updates running sums, so an estimate costs the same whatever the window."""

    def __init__(self, tokens_per_tile: int, *, window: int = 256, min_steps: int = 8):
        self.tokens_per_tile = tokens_per_tile
        self.window = window
        self.min_steps = min_steps
        self._lm: deque[tuple[int, float]] = deque()  # (tokens, seconds) of steps without tiles
        self._tiles: deque[tuple[int, int, float]] = deque()  # (tokens, tiles, seconds)
        # over _lm: sums of x (tokens), y (seconds), x*x and x*y
        self._sx = self._sy = self._sxx = self._sxy = 0.0
        # over _tiles: sums of tokens, tiles and seconds
        self._tn = self._tt = self._ts = 0.0

    def observe(self, tokens: int, tiles: int, seconds: float) -> None:
        """Records one step: LM tokens computed, encoder tiles run, its duration."""
        if seconds <= 0 or (tokens <= 0 and tiles <= 0):
            return
        if tiles:
            self._tiles.append((tokens, tiles, seconds))
            self._add_tiles(tokens, tiles, seconds, 1)
            if len(self._tiles) > self.window:
                self._add_tiles(*self._tiles.popleft(), -1)
        else:
            self._lm.append((tokens, seconds))
            self._add_lm(tokens, seconds, 1)
            if len(self._lm) > self.window:
                self._add_lm(*self._lm.popleft(), -1)

    def _add_lm(self, x: float, y: float, sign: int) -> None:
        self._sx += sign * x
        self._sy += sign * y
        self._sxx += sign * x * x
        self._sxy += sign * x * y

    def _add_tiles(self, tokens: float, tiles: float, seconds: float, sign: int) -> None:
        self._tn += sign * tokens
        self._tt += sign * tiles
        self._ts += sign * seconds

    @property
    def ready(self) -> bool:
        """True once enough steps were seen to estimate anything."""
        return len(self._lm) >= self.min_steps

    def costs(self) -> StepCosts | None:
        """The current estimates, or None before `min_steps` steps without encoder work."""
        if not self.ready:
            return None
        base, per_token = self._fit_line()
        per_tile = per_token * self.tokens_per_tile
        if self._tiles:
            unexplained = self._ts - base * len(self._tiles) - per_token * self._tn
            per_tile = max(unexplained / self._tt, 0.0)
        return StepCosts(base, per_token, per_tile)

    def _fit_line(self) -> tuple[float, float]:
        """(base, per_token) by least squares; with too little spread in the token counts to
        separate the two, all the time is put on the tokens (the cautious choice: it makes tokens
        look dear, so budgets stay small)."""
        n = len(self._lm)
        mean_x, mean_y = self._sx / n, self._sy / n
        var_x = self._sxx - n * mean_x * mean_x
        cautious = 0.0, mean_y / max(mean_x, 1.0)
        if var_x <= 1e-9 * max(mean_x, 1.0) ** 2 * n:
            return cautious
        slope = (self._sxy - n * mean_x * mean_y) / var_x
        if slope <= 0:  # noise swamps the tokens' share: same cautious choice
            return cautious
        base = mean_y - slope * mean_x
        if base < 0:  # a line through the origin, then
            return 0.0, self._sxy / self._sxx
        return base, slope
