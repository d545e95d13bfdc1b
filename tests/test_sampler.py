"""The engine's BatchSampler: every sampling field, logprobs, seeded reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from plm_core.engine.sampler import BatchSampler, Logprobs, SamplingState
from plm_core.sampling import SamplingParams

EOS = 7
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def state(device="cpu", prompt=(), output=None, eos=(EOS,), **kw) -> SamplingState:
    return SamplingState.create(
        SamplingParams(**kw), list(prompt), [] if output is None else output, eos, device
    )


def run(logits, *states, sampler=BatchSampler()):
    tokens, logprobs = sampler(torch.as_tensor(logits, dtype=torch.float32), list(states))
    return tokens, logprobs


def draws(logits_row, n=400, **kw) -> list[int]:
    """n tokens drawn from one row (a fresh seeded state each time, so draws are independent)."""
    row = torch.as_tensor([logits_row], dtype=torch.float32)
    return [run(row, state(seed=seed, **kw))[0][0] for seed in range(n)]


def probs_logits(probs) -> list[float]:
    return [math.log(p) for p in probs]


# -- SamplingState ---------------------------------------------------------------------------------
def test_state_create():
    out = []
    s = SamplingState.create(SamplingParams(temperature=0), [1, 2], out, (EOS,), "cpu")
    assert s.generator is None and s.output_token_ids is out and s.eos_token_ids == (EOS,)
    a, b = state(seed=5), state(seed=5)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    c, d = state(), state()  # no seed: fresh random seeds
    assert not torch.equal(c.generator.get_state(), d.generator.get_state())


# -- greedy ----------------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    tokens, _ = run(
        logits,
        *[state(temperature=0) for _ in range(3)],
        *[state(top_k=1, temperature=0.8) for _ in range(3)],
    )
    assert tokens == logits.argmax(-1).tolist()


def test_greedy_is_argmax_of_processed_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 30, generator=g)
    states = [
        state(
            temperature=0,
            output=[int(logits[0].argmax())],
            presence_penalty=2.0,
            frequency_penalty=2.0,
        ),
        state(temperature=0, logit_bias={3: 50.0}),
        state(
            temperature=0,
            prompt=[int(logits[2].argmax())],
            repetition_penalty=1.9,
            min_tokens=1,
            eos=(int(logits[2].topk(2).indices[1]),),
        ),
        state(temperature=0, output=[5, 5, 1], frequency_penalty=1.5),
    ]
    sampler = BatchSampler()
    processed = sampler.process(logits, states)
    tokens, _ = sampler(logits, states)
    assert tokens == processed.argmax(-1).tolist()
    assert tokens[1] == 3
    assert tokens[0] != int(logits[0].argmax())
    # the input is untouched
    assert torch.equal(logits, torch.randn(4, 30, generator=torch.Generator().manual_seed(1)))


# -- processors on a hand-made row -----------------------------------------------------------------
ROW = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0, 4.0, 1.5]


def processed(**kw) -> list[float]:
    return BatchSampler().process(torch.tensor([ROW]), [state(**kw)])[0].tolist()


def test_repetition_penalty_over_prompt_and_output():
    out = processed(prompt=[0, 1], output=[1, 3, 5], repetition_penalty=2.0)
    expected = list(ROW)
    expected[0] = 2.0 / 2  # positive: divided
    expected[1] = -1.0 * 2  # negative: multiplied (counted once although in prompt and output)
    expected[3] = -3.0 * 2
    expected[5] = 0.0
    assert out == pytest.approx(expected)
    assert processed(prompt=[0], repetition_penalty=0.5)[0] == pytest.approx(4.0)  # < 1 encourages


def test_presence_and_frequency_penalties_over_output_only():
    out = processed(
        prompt=[6], output=[0, 0, 0, 2, 4, 4], presence_penalty=0.5, frequency_penalty=0.25
    )
    expected = list(ROW)
    expected[0] -= 0.5 + 3 * 0.25
    expected[2] -= 0.5 + 1 * 0.25
    expected[4] -= 0.5 + 2 * 0.25
    assert out == pytest.approx(expected)  # prompt token 6 untouched
    neg = processed(output=[1, 1], presence_penalty=-1.0, frequency_penalty=-0.5)
    assert neg[1] == pytest.approx(-1.0 + 1.0 + 1.0)


def test_logit_bias_adds_and_forces_a_token():
    out = processed(logit_bias={1: 10.0, 6: -2.0, 10_000: 5.0})  # ids past the vocabulary: ignored
    assert out[1] == pytest.approx(9.0) and out[6] == pytest.approx(2.0)
    assert set(draws(ROW, n=50, logit_bias={3: 100.0})) == {3}
    assert set(draws(ROW, n=50, temperature=0.7, top_p=0.5, logit_bias={3: 100.0})) == {3}


def test_min_tokens_masks_eos_and_stop_tokens():
    out_ids: list[int] = []
    s = state(temperature=0, output=out_ids, eos=(6,), min_tokens=2, stop_token_ids=[0])
    logits = torch.tensor([ROW])
    sampler = BatchSampler()
    for _ in range(2):
        x = sampler.process(logits, [s])[0]
        assert x[6] == -math.inf and x[0] == -math.inf
        token = sampler(logits, [s])[0][0]
        assert token not in (6, 0)
        out_ids.append(token)
    assert sampler(logits, [s])[0][0] == 6  # enough output: eos allowed again
    ignore = state(output=[], eos=(6,), min_tokens=2, stop_token_ids=[0], ignore_eos=True)
    x = sampler.process(logits, [ignore])[0]
    assert x[6] == 4.0 and x[0] == -math.inf  # eos does not stop this request, so it is not masked
    assert set(draws(ROW, n=100, eos=(6,), min_tokens=1)).isdisjoint({6})


# -- truncation ------------------------------------------------------------------------------------
PROBS = [0.5, 0.3, 0.15, 0.05]


def test_temperature_sampling_follows_the_distribution():
    got = draws(probs_logits(PROBS), n=2000)
    for token, p in enumerate(PROBS):
        assert abs(got.count(token) / len(got) - p) < 0.04
    hot = draws(probs_logits(PROBS), n=2000, temperature=3.0)  # flatter
    cold = draws(probs_logits(PROBS), n=2000, temperature=0.3)  # sharper
    assert hot.count(0) < got.count(0) < cold.count(0)


def test_draws_match_the_distribution_and_its_edges():
    """The inverse-transform draw: chi-square over 20k seeded rows, one-hot rows at both ends of the
    vocabulary, zero-probability tokens never drawn, and each row from its own generator only."""
    probs = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    tokens, _ = run(probs.log().expand(20000, -1), *[state(seed=seed) for seed in range(20000)])
    counts = torch.bincount(torch.tensor(tokens), minlength=7).double()
    expected = probs.double() * 20000
    assert counts[expected == 0].sum() == 0
    chi2 = ((counts - expected)[expected > 0] ** 2 / expected[expected > 0]).sum().item()
    assert chi2 < 16.3  # p = 0.001 at 3 degrees of freedom
    ends = torch.full((2, 128256), -math.inf)
    ends[0, 0] = ends[1, -1] = 0.0
    first, last = state(seed=0), state(seed=1)
    for _ in range(50):
        assert run(ends, first, last)[0] == [0, 128255]
    row = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    for seed in range(20):
        alone = run(row, state(seed=seed))[0][0]
        batch = run(
            torch.cat([torch.flip(row, [1]), row, row]),
            *[state(seed=s) for s in (seed + 100, seed, seed + 200)],
        )[0]
        assert batch[1] == alone


def test_top_k():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(3)).tolist()
    top = set(torch.tensor(logits).topk(5).indices.tolist())
    got = set(draws(logits, n=300, temperature=2.0, top_k=5))
    assert got == top


@pytest.mark.parametrize(
    "top_p, allowed",
    [
        (0.49, {0}),
        (0.51, {0, 1}),
        (0.79, {0, 1}),
        (0.81, {0, 1, 2}),
        (0.96, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
        (0.01, {0}),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, allowed):
    got = set(draws(probs_logits(PROBS), n=300, top_p=top_p))
    assert got == allowed


def test_top_k_then_top_p():
    # top_k=3 renormalises [0.5, 0.3, 0.15] to [0.53, 0.32, 0.16]; top_p=0.84 then needs 0, 1 only
    got = set(draws(probs_logits(PROBS), n=300, top_k=3, top_p=0.84))
    assert got == {0, 1}


TRUNCATIONS = [
    dict(top_p=0.9),  # settles among the first 256 candidates
    dict(top_k=50, top_p=0.95),
    dict(top_k=300),  # more than 256: settles among 4096
    dict(top_k=3000, top_p=0.9),
    dict(top_k=4500),  # more than 4096: a full sort
    dict(top_p=0.999, temperature=5.0),  # flat: the kept set reaches past 4096, a full sort
    dict(min_p=0.05, top_p=0.8),
]


@pytest.mark.parametrize("kw", TRUNCATIONS)
def test_truncation_among_candidates_equals_a_full_sort(monkeypatch, kw):
    """Looking for the kept tokens among the top-k candidates draws exactly what sorting the whole
    vocabulary draws, seed for seed, for rows settled at every stage."""
    import plm_core.engine.sampler as sampler_module

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(24, 6000, generator=g) * 4

    def sampled() -> list[int]:
        return run(logits, *[state(seed=seed, **kw) for seed in range(len(logits))])[0]

    fast = sampled()
    monkeypatch.setattr(sampler_module, "_CANDIDATES", ())  # straight to the full sort
    assert fast == sampled()


def test_peaked_rows_never_sort_the_vocabulary(monkeypatch):
    """A top-p row whose nucleus lies among the candidates is settled by torch.topk alone; a flat
    row whose nucleus does not is sorted, and keeps its whole nucleus."""
    sorted_rows = []
    real_sort = torch.sort

    def counting_sort(x, *args, **kwargs):
        sorted_rows.append(x.shape[0])
        return real_sort(x, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", counting_sort)
    peaked = torch.full((1, 128256), -10.0)
    peaked[0, 1000:1020] = 5.0
    for seed in range(30):
        (token,), _ = run(peaked, state(seed=seed, top_p=0.95))
        assert 1000 <= token < 1020
    assert sorted_rows == []
    flat = torch.zeros(1, 128256)
    tokens = [run(flat, state(seed=seed, top_p=0.9))[0][0] for seed in range(30)]
    assert sorted_rows == [1] * 30 and len(set(tokens)) == 30


@pytest.mark.parametrize(
    "min_p, allowed", [(0.0, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.5, {0, 1}), (0.7, {0})]
)
def test_min_p(min_p, allowed):
    assert set(draws(probs_logits(PROBS), n=300, min_p=min_p)) == allowed


def test_min_p_applies_before_top_p():
    # vLLM's order: min_p 0.2 drops token 3 and renormalises to [0.53, 0.32, 0.16]; top_p 0.84
    # then keeps 0 and 1 (top_p alone would keep 0, 1 and 2)
    assert set(draws(probs_logits(PROBS), n=300, min_p=0.2, top_p=0.84)) == {0, 1}
    assert set(draws(probs_logits(PROBS), n=300, top_p=0.84)) == {0, 1, 2}


def test_min_p_applies_after_temperature():
    # at temperature 0.5 the probabilities become ~[0.69, 0.25, 0.06, 0.006]: min_p 0.3 keeps 0, 1
    assert set(draws(probs_logits(PROBS), n=300, temperature=0.5, min_p=0.3)) == {0, 1}


# -- logprobs --------------------------------------------------------------------------------------
def test_logprobs_come_from_raw_logits():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 40, generator=g) * 3
    states = [
        # processing does not change logprobs
        state(temperature=0, logprobs=5, logit_bias={9: 100.0}),
        state(seed=1, logprobs=0, presence_penalty=1.0, output=[2, 3]),
        state(seed=2),
        state(seed=3, logprobs=20, top_k=3),
    ]
    tokens, logprobs = BatchSampler()(logits, states)
    raw = torch.log_softmax(logits, -1)
    assert tokens[0] == 9 and logprobs[2] is None
    for i in (0, 1, 3):
        lp = logprobs[i]
        assert isinstance(lp, Logprobs) and lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(raw[i, tokens[i]].item(), abs=1e-6)
        order = raw[i].argsort(descending=True).tolist()
        assert lp.rank == order.index(tokens[i]) + 1
        k = states[i].params.logprobs
        assert [t for t, _ in lp.top] == order[:k]
        assert [v for _, v in lp.top] == pytest.approx(raw[i, order[:k]].tolist(), abs=1e-6)
    assert logprobs[1].top == []
    assert len(logprobs[3].top) == 20 and logprobs[3].rank <= 3
    assert logprobs[0].rank > 1  # the biased token was not the raw favourite


def test_greedy_logprob_rank_is_one():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(5))
    _, (lp,) = run(logits, state(temperature=0, logprobs=1))
    assert lp.rank == 1 and lp.top[0][0] == lp.token_id
    assert lp.top[0][1] == pytest.approx(lp.logprob)


# -- reproducibility -------------------------------------------------------------------------------
SEEDED = dict(
    seed=1234,
    temperature=0.9,
    top_p=0.9,
    top_k=50,
    min_p=0.02,
    presence_penalty=0.3,
    frequency_penalty=0.2,
    repetition_penalty=1.1,
    logit_bias={3: 2.0},
    min_tokens=3,
)
STEPS, VOCAB = 12, 500


def generate(order: list[str], device: str) -> dict[str, list[int]]:
    """Runs a batch for STEPS steps; each name is a request type; returns each request's tokens."""
    g = torch.Generator().manual_seed(42)
    # fixed logits per request slot
    per_step = [torch.randn(8, VOCAB, generator=g) * 2 for _ in range(STEPS)]
    slot = {
        "target": 0,
        "other_random": 1,
        "greedy": 2,
        "plain": 3,
        "other_seeded": 4,
        "truncated": 5,
    }
    kinds = {
        "target": SEEDED,
        "other_random": dict(temperature=1.3),
        "greedy": dict(temperature=0, frequency_penalty=1.0),
        "plain": dict(seed=7),
        "other_seeded": dict(seed=99, top_p=0.5, logprobs=3),
        "truncated": dict(seed=5, top_k=10, min_p=0.1),
    }
    states = {name: state(device, prompt=[1, 2, 3], output=[], **kinds[name]) for name in order}
    sampler = BatchSampler()
    for step in range(STEPS):
        logits = torch.stack([per_step[step][slot[name]] for name in order]).to(device)
        tokens, _ = sampler(logits, [states[name] for name in order])
        for name, token in zip(order, tokens):
            states[name].output_token_ids.append(token)
    return {name: s.output_token_ids for name, s in states.items()}


@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproducible_whatever_the_batch(device):
    alone = generate(["target"], device)["target"]
    assert len(set(alone)) > 1
    for order in (
        ["target", "other_random", "greedy"],
        ["greedy", "plain", "target", "other_seeded"],
        ["other_seeded", "truncated", "other_random", "greedy", "plain", "target"],
        ["truncated", "target"],
    ):
        assert generate(order, device)["target"] == alone, order
    # every seeded request, not only the target, is independent of its neighbours
    for name in ("plain", "other_seeded", "truncated"):
        by_itself = generate([name], device)[name]
        assert generate(["other_random", name, "target", "greedy"], device)[name] == by_itself


@pytest.mark.parametrize("device", DEVICES)
def test_different_seeds_differ(device):
    logits = torch.zeros(1, 1000, device=device)  # uniform
    runs = []
    for seed in (1, 2):
        s = state(device, seed=seed)
        runs.append([run(logits, s)[0][0] for _ in range(10)])
    assert runs[0] != runs[1]
    again = state(device, seed=1)
    assert [run(logits, again)[0][0] for _ in range(10)] == runs[0]
    assert len(set(runs[0])) > 1  # the generator advances between steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_and_logprobs_match_cpu():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 1000, generator=g)
    kinds = [
        dict(temperature=0, logprobs=5, presence_penalty=1.0, output=[int(logits[0].argmax())]),
        dict(temperature=0, repetition_penalty=1.5, prompt=[1, 2]),
        dict(temperature=0, logit_bias={4: 100.0}),
    ]
    cpu = BatchSampler()(logits, [state("cpu", **k) for k in kinds])
    cuda = BatchSampler()(logits.cuda(), [state("cuda", **k) for k in kinds])
    assert cpu[0] == cuda[0]
    assert cpu[1][0].rank == cuda[1][0].rank
    assert cpu[1][0].logprob == pytest.approx(cuda[1][0].logprob, abs=1e-5)


# -- values that pass validation never fail (or go NaN) in a step ----------------------------------
def test_seeds_at_the_ends_of_the_range_seed_like_torch():
    """torch reads seeds modulo 2**64: -1 and 2**64 - 1 are one generator, and neither raises."""
    assert torch.equal(
        state(seed=-1).generator.get_state(), state(seed=2**64 - 1).generator.get_state()
    )
    assert torch.equal(
        state(seed=-(2**63)).generator.get_state(), state(seed=2**63).generator.get_state()
    )
    params = SamplingParams(seed=5)
    params.seed = 2**70 + 5  # changed after validation: still no error inside the engine
    s = SamplingState.create(params, [], [], (), "cpu")
    assert torch.equal(s.generator.get_state(), state(seed=5).generator.get_state())


def test_extreme_legal_values_never_raise():
    vocab = len(ROW)
    extremes = [
        dict(seed=2**64 - 1),
        dict(seed=-(2**63)),
        dict(temperature=1e300),
        dict(temperature=1e-5),
        dict(top_k=10**30),
        dict(top_k=10**30, top_p=1e-300),
        dict(min_p=1.0),
        dict(repetition_penalty=1e-300),
        dict(repetition_penalty=1e300),
        dict(stop_token_ids=[2**70, 0], min_tokens=3),
        dict(logit_bias={2**70: 100, 0: -100, 1: 100}, min_tokens=2, stop_token_ids=[1]),
        # every token masked
        dict(stop_token_ids=list(range(vocab)), eos=tuple(range(vocab)), min_tokens=2),
        dict(presence_penalty=2, frequency_penalty=-2, logprobs=20, top_k=-1),
        dict(temperature=0, logprobs=0),
    ]
    states = [state(prompt=[0, 2, 2**40], output=[1, 1], **kw) for kw in extremes]
    tokens, logprobs = run([ROW] * len(states), *states)
    assert all(0 <= t < vocab for t in tokens)
    assert logprobs[-2] is not None and len(logprobs[-2].top) == vocab


def test_extreme_repetition_penalty_never_makes_nan():
    # a penalty beyond fp32's range must not become 0 or inf (logit 0 * inf = NaN wins the argmax)
    greedy = state(temperature=0, prompt=[0], repetition_penalty=1e300)
    assert run([[0.0, 1.0, 2.0]], greedy)[0] == [2]
    # tiny: the seen tokens 2 and 3 both grow past fp32's range (inf - inf = NaN in softmax); both
    # stay likely
    got = draws([0.5, 1.0, 5.0, 6.0], n=100, prompt=[2, 3], repetition_penalty=1e-300)
    assert set(got) == {2, 3}


def test_infinite_temperature_is_uniform_over_unmasked_tokens():
    # fp32 turns 1e300 into inf, and -inf / inf = NaN would make the masked eos win the draw
    got = draws(ROW, n=400, eos=(6,), min_tokens=1, temperature=1e300)
    assert set(got) == set(range(len(ROW))) - {6}
