"""Batched token sampling: logit processors, penalties, per-request seeded draws, raw logprobs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from itertools import chain

import torch

from plm_core.engine.structured_output import Grammar, allowed_tokens
from plm_core.sampling import SamplingParams

_NEG_INF = float("-inf")
_FIXED_ONE = 2**48  # probability 1 in the fixed-point sums of top-p
_NO_TOP_P = 2**62  # a fixed-point top_p no running sum reaches
# top-k/top-p rows look for their kept tokens among the K most likely first (torch.topk: 2 ms for
# 16 rows of a 128k vocabulary at K = 256, against 90 ms for a full sort); a row whose kept set may
# reach past them tries the next K, then a full sort
_CANDIDATES = (256, 4096)
_FP32 = torch.finfo(torch.float32)


@dataclass
class SamplingState:
    """What the sampler keeps for one request over its whole life (created once, at admission).

    `output_token_ids` is the Request's own list: the engine appends every sampled token to it and
    the sampler reads it for penalties and min_tokens, so both always see the same tokens.
    """

    params: SamplingParams
    generator: torch.Generator | None  # on the logits' device; None for greedy requests
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: tuple[int, ...] = ()
    # the request's structured-output matcher (the engine advances it)
    grammar: Grammar | None = None
    # prompt token ids as a device tensor, built on first use by repetition_penalty
    _prompt_ids: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        eos_token_ids: tuple[int, ...] = (),
        device: torch.device | str = "cpu",
        grammar: Grammar | None = None,
    ) -> SamplingState:
        """Seeds the request's own generator with params.seed, or a fresh random seed if none."""
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            # torch reads a seed modulo 2**64 (a negative one as two's complement) and raises
            # outside [-2**63, 2**64 - 1]; reducing it here gives the same generator and can never
            # raise.
            seed = params.seed % 2**64 if params.seed is not None else secrets.randbits(63)
            generator.manual_seed(seed)
        return cls(
            params, generator, prompt_token_ids, output_token_ids, tuple(eos_token_ids), grammar
        )

    @property
    def needs_penalties(self) -> bool:
        p = self.params
        return (
            p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        )

    def blocked_token_ids(self) -> list[int]:
        """Tokens min_tokens forbids now: the stop tokens (and eos unless ignore_eos), if any."""
        p = self.params
        if len(self.output_token_ids) >= p.min_tokens:
            return []
        ids = list(p.stop_token_ids)
        if not p.ignore_eos:
            ids.extend(self.eos_token_ids)
        return ids

    def prompt_ids(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        if self._prompt_ids is None or self._prompt_ids.device != device:
            ids = torch.tensor(
                sorted({t for t in self.prompt_token_ids if 0 <= t < vocab_size}), dtype=torch.long
            )
            self._prompt_ids = ids.to(device)
        return self._prompt_ids


@dataclass
class Logprobs:
    """Log-probabilities of one sampled position, from the raw (unprocessed) logits."""

    token_id: int  # the chosen token
    logprob: float  # its log-probability
    rank: int  # 1 + the number of tokens with a strictly higher logprob (1 = the most likely)
    # the `params.logprobs` most likely (token id, logprob), highest first
    top: list[tuple[int, float]]


class BatchSampler:
    """Picks one token per row of a [B, V] logits batch, each row by its own request's settings.

    Order per row (vLLM v1's): the structured-output mask; logprobs from those (otherwise raw)
    logits; logit_bias; min_tokens; repetition, frequency and presence penalties; then argmax for
    greedy rows, and for the others temperature, min_p, top-k, top-p and a draw from the row's own
    generator. Every operation is row-wise, and which operations touch a row depends only on that
    row's own settings, so a seeded request samples the same tokens whatever else is in the batch.
    """

    def __call__(
        self, logits: torch.Tensor, states: list[SamplingState]
    ) -> tuple[list[int], list[Logprobs | None]]:
        # logits: [B, V] fp32; row i belongs to states[i]; not modified
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits {tuple(logits.shape)} do not match {len(states)} sampling states"
            )
        logits = self._apply_grammars(logits, states)  # a masked copy when some row has a grammar
        lp_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        # [L, V]
        raw_logprobs = torch.log_softmax(logits[lp_rows].float(), dim=-1) if lp_rows else None

        x = self.process(logits, states)  # [B, V]
        tokens = x.argmax(dim=-1)  # [B]; kept for greedy rows
        random_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if random_rows:
            tokens[random_rows] = self._sample(x[random_rows], [states[i] for i in random_rows])
        logprobs = self._logprobs(raw_logprobs, tokens, lp_rows, states)
        return tokens.tolist(), logprobs

    def process(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """The processed fp32 (grammar-masked) logits [B, V]; greedy takes their argmax.

        Applies logit_bias, min_tokens and the repetition, frequency and presence penalties. With
        none of them on any row, the logits themselves when already fp32 (no copy a step).
        """
        if not any(
            s.params.logit_bias or s.needs_penalties or s.blocked_token_ids() for s in states
        ):
            return logits.float()
        x = logits.to(torch.float32, copy=True)
        self._apply_logit_bias(x, states)
        self._apply_min_tokens(x, states)
        self._apply_penalties(x, states)
        # A grammar row left with nothing (min_tokens forbidding the only token the grammar allows,
        # the stop token once the output is complete, or an extreme repetition_penalty): the
        # grammar wins.
        rows = [
            i
            for i, s in enumerate(states)
            if s.grammar is not None and (s.needs_penalties or s.blocked_token_ids())
        ]
        if rows:
            stuck = ~torch.isfinite(x[rows]).any(dim=-1)
            if stuck.any():
                x[rows] = torch.where(stuck[:, None], logits[rows].float(), x[rows])
        return x

    @staticmethod
    def _apply_grammars(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """logits with -inf where a row's structured-output grammar forbids the token (a copy; the
        same tensor when no row has a grammar). Masked before logprobs, as vLLM v1 does: logprobs
        describe the distribution the token is drawn from, and forbidden tokens get -inf."""
        rows: list[int] = []
        grammars: list[Grammar] = []
        for i, s in enumerate(states):
            if s.grammar is not None and not s.grammar.is_terminated:
                rows.append(i)
                grammars.append(s.grammar)
        if not rows:
            return logits
        allowed = allowed_tokens(grammars, logits.shape[1], logits.device)  # [G, V]
        masked = logits.clone()
        masked[rows] = logits[rows].masked_fill(~allowed, _NEG_INF)
        return masked

    # -- processors that can change the argmax -----------------------------------------------------
    @staticmethod
    def _apply_logit_bias(x: torch.Tensor, states: list[SamplingState]) -> None:
        vocab = x.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for i, s in enumerate(states):
            for token, bias in (s.params.logit_bias or {}).items():
                if token < vocab:  # EngineCore.add_request rejects ids past the vocabulary; a guard
                    rows.append(i)
                    cols.append(token)
                    values.append(bias)
        if rows:
            index = (torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device))
            x.index_put_(
                index, torch.tensor(values, dtype=x.dtype, device=x.device), accumulate=True
            )

    @staticmethod
    def _apply_min_tokens(x: torch.Tensor, states: list[SamplingState]) -> None:
        vocab = x.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        for i, s in enumerate(states):
            for token in s.blocked_token_ids():
                if token < vocab:
                    rows.append(i)
                    cols.append(token)
        if rows:
            index = (torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device))
            x.index_put_(index, torch.tensor(_NEG_INF, dtype=x.dtype, device=x.device))

    @staticmethod
    def _apply_penalties(x: torch.Tensor, states: list[SamplingState]) -> None:
        rows = [i for i, s in enumerate(states) if s.needs_penalties]
        if not rows:
            return
        device, vocab = x.device, x.shape[1]
        sub = [states[i] for i in rows]
        counts = _token_counts([s.output_token_ids for s in sub], vocab, device)  # [P, V] in output
        logits = x[rows]  # [P, V]
        if any(s.params.repetition_penalty != 1.0 for s in sub):
            rep = torch.tensor([s.params.repetition_penalty for s in sub], device=device)[:, None]
            # a penalty beyond fp32's range would become 0 or inf, and 0 * inf (a zero logit) NaN
            rep = rep.clamp(min=_FP32.tiny, max=_FP32.max)
            seen = counts > 0
            prompt = [s.prompt_ids(vocab, device) for s in sub]
            lengths = torch.tensor([len(p) for p in prompt], device=device)
            prompt_rows = torch.repeat_interleave(torch.arange(len(sub), device=device), lengths)
            seen[prompt_rows, torch.cat(prompt)] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        freq = torch.tensor([s.params.frequency_penalty for s in sub], device=device)[:, None]
        presence = torch.tensor([s.params.presence_penalty for s in sub], device=device)[:, None]
        logits = logits - freq * counts - presence * (counts > 0).float()
        x[rows] = logits

    # -- random sampling ---------------------------------------------------------------------------
    @staticmethod
    def _sample(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        # x: [R, V] processed logits of the random rows -> [R] token ids
        device, vocab = x.device, x.shape[1]
        # Neither may become inf: a temperature of inf turns a masked -inf logit into NaN, which
        # wins the draw, and +inf logits (an extreme repetition_penalty, or a small temperature
        # after it) make softmax NaN.
        temperature = torch.tensor([s.params.temperature for s in states], device=device)[:, None]
        x = (x / temperature.clamp(max=_FP32.max)).clamp_(max=_FP32.max)
        if any(s.params.min_p > 0 for s in states):
            min_p = torch.tensor([s.params.min_p for s in states], device=device)[:, None]
            probs = torch.softmax(x, dim=-1)
            # min_p = 0: no-op
            x = x.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), _NEG_INF)

        tokens = torch.empty(len(states), dtype=torch.long, device=device)
        # Rows with top-k/top-p go through a truncating path, the rest through a plain one. Which
        # path a row takes depends only on its own settings, never on the batch (float sums differ
        # between them).
        truncated = [
            j for j, s in enumerate(states) if 0 < s.params.top_k < vocab or s.params.top_p < 1.0
        ]
        plain = sorted(set(range(len(states))) - set(truncated))
        if plain:
            probs = torch.softmax(x[plain], dim=-1)
            tokens[plain] = _draw(probs, [states[j].generator for j in plain])
        if truncated:
            tokens[truncated] = _sample_truncated(x[truncated], [states[j] for j in truncated])
        return tokens

    # -- logprobs ----------------------------------------------------------------------------------
    @staticmethod
    def _logprobs(
        raw: torch.Tensor | None, tokens: torch.Tensor, rows: list[int], states: list[SamplingState]
    ) -> list[Logprobs | None]:
        out: list[Logprobs | None] = [None] * len(states)
        if raw is None:
            return out
        chosen = tokens[rows][:, None]  # [L, 1]
        chosen_lp = raw.gather(1, chosen)  # [L, 1]
        ranks = (raw > chosen_lp).sum(dim=-1) + 1  # [L]
        # rows are the states with logprobs set
        wanted = [states[i].params.logprobs or 0 for i in rows]
        k = min(max(wanted), raw.shape[1])
        top_lp, top_ids = raw.topk(k, dim=-1) if k > 0 else (raw[:, :0], chosen[:, :0])  # [L, k]
        chosen_l, lp_l, rank_l = chosen[:, 0].tolist(), chosen_lp[:, 0].tolist(), ranks.tolist()
        top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
        for j, (i, n) in enumerate(zip(rows, wanted)):
            top = list(zip(top_ids_l[j][:n], top_lp_l[j][:n]))
            out[i] = Logprobs(chosen_l[j], lp_l[j], rank_l[j], top)
        return out


def _sample_truncated(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Token ids [T] for rows with top-k and/or top-p, x: [T, V] processed, temperature-scaled.

    Exact, without sorting the vocabulary when it can: a row's kept tokens are looked for among its
    K most likely (sorted descending, as a full sort would order them). A row is settled there when
    they provably hold its whole kept set: its top_k is at most K, or (top_p alone) the candidates'
    probability mass, normalised over the whole vocabulary, already reaches top_p. Other rows try a
    larger K and at last a full sort. Which path a row takes depends on its own logits and settings
    only, never on the batch.
    """
    device, vocab = x.device, x.shape[1]
    params = [s.params for s in states]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    # The cumulative sums run on fixed-point integers: integer sums are exact in any order, and
    # CUDA's float cumsum picks its kernel (and so its rounding) by the number of rows.
    top_p = torch.tensor(
        [round(p.top_p * _FIXED_ONE) if p.top_p < 1.0 else _NO_TOP_P for p in params],
        device=device,
    )
    row_lse = torch.logsumexp(x, dim=-1)  # normaliser of the rows without top_k
    tokens = torch.empty(len(states), dtype=torch.long, device=device)
    stages = [k for k in _CANDIDATES if k < vocab] + [vocab]
    todo: dict[int, list[int]] = {0: list(range(len(states)))}  # stage -> rows
    for stage, k in enumerate(stages):
        rows = todo.pop(stage, [])
        if not rows:
            continue
        if k == vocab:
            values, order = torch.sort(x[rows], dim=-1, descending=True, stable=True)
        else:
            values, order = torch.topk(x[rows], k, dim=-1)
        next_k = stages[min(stage + 1, len(stages) - 1)]
        kept, settled, hopeful = _truncate(
            values, top_k[rows], top_p[rows], row_lse[rows], vocab, next_k
        )
        if k == vocab:
            settled.fill_(True)
        done = settled.nonzero()[:, 0].tolist()
        if done:
            # [D] positions among the candidates
            picked = _draw(
                torch.softmax(kept[done], dim=-1), [states[rows[i]].generator for i in done]
            )
            tokens[[rows[i] for i in done]] = order[done].gather(1, picked[:, None])[:, 0]
        for i in (~settled).nonzero()[:, 0].tolist():
            todo.setdefault(stage + 1 if hopeful[i] else len(stages) - 1, []).append(rows[i])
    return tokens


def _truncate(
    values: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    row_lse: torch.Tensor,
    vocab: int,
    next_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Applies top-k then top-p to each row's K largest logits (values [R, K], descending).

    Returns the values with dropped tokens at -inf, [R] bools True when the row's kept set surely
    lies within these K, and [R] bools True when it may lie within the next_k largest (False: no
    use trying them, since next_k - K more tokens, none likelier than the K-th, cannot reach top_p).
    top_p keeps the smallest prefix whose mass reaches it; a row's masses are normalised over its
    top_k tokens (top_k == vocab: none), or without top_k over the whole row (row_lse).
    """
    k = values.shape[1]
    position = torch.arange(k, device=values.device)
    values = values.masked_fill(position[None] >= top_k[:, None], _NEG_INF)
    whole_top_k = top_k <= k  # the row's top_k tokens are all here
    lse = torch.where(whole_top_k, torch.logsumexp(values, dim=-1), row_lse)
    mass = (values - lse[:, None]).exp_().mul_(_FIXED_ONE).round_().long()  # [R, K]
    reached = mass.cumsum(dim=-1)
    drop = (reached - mass) >= top_p[:, None]  # the more likely tokens already reach top_p
    drop[:, 0] = False
    # without top_k, masses here are the row's own: once they reach top_p, the cut is here
    no_top_k = top_k == vocab
    settled = whole_top_k | (no_top_k & (reached[:, -1] >= top_p))
    at_most = reached[:, -1] + (next_k - k) * mass[:, -1]  # the next_k largest hold no more
    hopeful = (top_k <= next_k) | (no_top_k & (at_most >= top_p))
    return values.masked_fill(drop, _NEG_INF), settled, hopeful


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float counts of each id in each list (one copy, one scatter)."""
    counts = torch.zeros(len(token_lists), vocab, device=device)
    flat = list(chain.from_iterable(token_lists))
    if flat:
        rows = torch.repeat_interleave(
            torch.arange(len(token_lists)), torch.tensor([len(t) for t in token_lists])
        )
        index = (rows.to(device), torch.tensor(flat, device=device))
        counts.index_put_(index, torch.ones(len(flat), device=device), accumulate=True)
    return counts


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One sample per row of probs [N, V], row i drawn with generators[i] only.

    Inverse transform sampling: a row's probabilities become fixed-point integers (2**48 for 1),
    whose running sum is exact in any order and on any device, so a row's draw never depends on the
    batch around it; one uniform number from the row's own generator then picks the token whose
    interval holds it: token i with probability p_i (to 2**-48). One random number per row, not one
    per token: the exponential race this replaced spent 2.5 ms per row of a 128k vocabulary on a
    CPU drawing noise.
    """
    # [N, V]; in place: a fresh [N, V] tensor per operation costs more than the arithmetic (page
    # faults on every step's new 16 MB allocation for 16 rows of a 128k vocabulary)
    cumulative = (probs * _FIXED_ONE).round_().long().cumsum_(dim=-1)
    uniform = torch.cat(
        [torch.rand(1, generator=g, device=probs.device, dtype=torch.float64) for g in generators]
    )
    target = (uniform * cumulative[:, -1].double()).long()  # [N], in [0, the row's total)
    # the first running sum above it
    picked = torch.searchsorted(cumulative, target[:, None], right=True)[:, 0]
    return picked.clamp_(max=probs.shape[1] - 1)
