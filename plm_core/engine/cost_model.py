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
    """Online estimates of a step's cost from (tokens, tiles, seconds) observations."""

    def __init__(self, tokens_per_tile: int, *, window: int = 256, min_steps: int = 8):
        self.tokens_per_tile = tokens_per_tile
        self.min_steps = min_steps
        self._lm: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds)
        self._tiles: deque[tuple[int, int, float]] = deque(maxlen=window)  # (tokens, tiles, s)

    def observe(self, tokens: int, tiles: int, seconds: float) -> None:
        """Records one step: LM tokens computed, encoder tiles run, its duration."""
        if seconds <= 0 or (tokens <= 0 and tiles <= 0):
            return
        if tiles:
            self._tiles.append((tokens, tiles, seconds))
        else:
            self._lm.append((tokens, seconds))

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
            unexplained = sum(s - base - per_token * n for n, _, s in self._tiles)
            per_tile = max(unexplained / sum(t for _, t, _ in self._tiles), 0.0)
        return StepCosts(base, per_token, per_tile)

    def _fit_line(self) -> tuple[float, float]:
        """(base, per_token) by least squares; with too little spread in the token counts to
        separate the two, all the time is put on the tokens (the cautious choice: it makes tokens
        look dear, so budgets stay small)."""
        n = len(self._lm)
        mean_x = sum(x for x, _ in self._lm) / n
        mean_y = sum(y for _, y in self._lm) / n
        var_x = sum((x - mean_x) ** 2 for x, _ in self._lm)
        if var_x < 1e-9 * max(mean_x, 1.0) ** 2 or var_x == 0:
            return 0.0, mean_y / max(mean_x, 1.0)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in self._lm) / var_x
        if slope <= 0:  # noise swamps the tokens' share: same cautious choice
            return 0.0, mean_y / max(mean_x, 1.0)
        base = mean_y - slope * mean_x
        if base < 0:  # a line through the origin, then
            return 0.0, sum(x * y for x, y in self._lm) / sum(x * x for x, _ in self._lm)
        return base, slope
