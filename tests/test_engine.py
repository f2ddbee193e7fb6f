"""The rollout engine without transformers: sampling maths, log-prob semantics, seeds, stop strings,
KV caches of both families, continuous batching, MoE routing and MTP speculation."""
import math

import pytest
import torch

from r1kit import sampling
from r1kit.engine import Engine, SamplingParams
from r1kit.models.llama import Llama, LlamaConfig


def dense(seed=0, **kw) -> Llama:
    cfg = LlamaConfig(**{**dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512), **kw})
    return Llama(cfg).init_weights(seed=seed, std=0.1).eval()


# ---------------------------------------------------------------------------------------------
# sampling: temperature → top-k → top-p, as transformers' warpers
# ---------------------------------------------------------------------------------------------
def reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The truncated distribution (V,), written out plainly in float64: transformers' order and rules."""
    p = torch.softmax(logits.double() / temperature, -1)
    if top_k:
        kth = p.sort(descending=True).values[top_k - 1]
        p = torch.where(p >= kth, p, 0.0)
        p = p / p.sum()  # top-p sees the renormalised distribution
    if top_p < 1:
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]
        drop = before >= top_p
        drop[0] = False
        p = p.clone()
        p[order[drop]] = 0.0
        p = p / p.sum()
    return p


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of χ²(df) by Wilson–Hilferty (χ²/df is close to normal after a cube root):
    within 1% of the exact quantile for df ≥ 2, and no scipy needed. z = 3.09 is the normal 99.9% point,
    so a correct sampler fails this test once in a thousand seeds — and these seeds are fixed."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def assert_matches(tokens: torch.Tensor, want: torch.Tensor) -> None:
    """Empirical counts of `tokens` against the distribution `want` (V,): support and χ² goodness of fit."""
    counts = torch.bincount(tokens, minlength=want.numel()).double()
    support = want > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the kept set: {(~support & (counts > 0)).nonzero()}"
    expected = want[support] * tokens.numel()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    assert df >= 2
    assert stat < chi_square_critical(df), f"χ² {stat:.1f} over {df} degrees of freedom"


def test_chi_square_top_k_then_top_p_on_the_renormalised_distribution():
    probs = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.05, 0.04, 0.03, 0.02, 0.005, 0.003, 0.001, 0.001])
    logits = probs.log() * 0.8  # at temperature 0.8 the tempered distribution is `probs` again
    T, k, p, n = 0.8, 4, 0.8, 20_000
    want = reference(logits, T, k, p)
    # renormalised after top-k, 0.353 + 0.294 + 0.235 ≥ 0.8 keeps 3; the raw mass 0.30 + 0.25 + 0.20 < 0.8 keeps 4
    assert int((want > 0).sum()) == 3
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tokens, logp = sampling.sample(logits.expand(n, -1), torch.full((n,), T), torch.full((n,), p),
                                   torch.full((n,), k), u)
    assert_matches(tokens, want)
    assert torch.allclose(logp, want.log()[tokens].float(), atol=1e-5)  # log π_rollout of each draw


@pytest.mark.parametrize("top_p", [0.2, 0.5, 0.9, 1.0])
def test_engine_top_p_at_several_p(top_p):
    m = dense()
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        logits = m(torch.tensor([prompt]))[0, -1]
    want = reference(logits, 0.5, 0, top_p)
    got = Engine(m).generate([prompt], SamplingParams(max_new_tokens=1, temperature=0.5, top_p=top_p, n=4000,
                                                      seed=1, ignore_eos=True))
    first = torch.tensor([s.tokens[0] for s in got[0]])
    assert_matches(first, want)
    assert torch.allclose(torch.tensor([s.logprobs[0] for s in got[0]]), want.log()[first].float(), atol=1e-4)


def test_top_k_keeps_ties_and_top_p_keeps_tie_groups_whole():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    u = torch.linspace(0, 0.999, 500)
    one = lambda t: t.expand(500, -1) if t.dim() == 2 else t.expand(500)  # noqa: E731
    for top_k, top_p, kept in [(2, 1.0, {0, 1, 2, 3}),  # the 2nd value is tied 3 ways: all kept
                               (0, 0.5, {0, 1, 2, 3})]:  # the cut falls inside the tie group
        tokens, _ = sampling.sample(one(logits), one(torch.tensor([1.0])), one(torch.tensor([top_p])),
                                    one(torch.tensor([top_k])), u)
        assert set(tokens.tolist()) == kept


def test_greedy_logprobs_are_the_raw_log_softmax():
    m = dense()
    prompt = [7, 8, 9]
    s = Engine(m).generate([prompt], SamplingParams(max_new_tokens=4, temperature=0, top_k=3, top_p=0.5,
                                                    ignore_eos=True))[0][0]
    seq = torch.tensor([prompt + s.tokens])
    with torch.no_grad():
        logp = torch.log_softmax(m(seq)[0, len(prompt) - 1:-1], -1)  # (4, V) raw, untruncated
    assert s.tokens == logp.argmax(-1).tolist()
    assert torch.allclose(torch.tensor(s.logprobs), logp.gather(1, torch.tensor(s.tokens)[:, None])[:, 0], atol=1e-5)


def test_prefiltered_sampling_equals_the_full_sort():
    g = torch.Generator().manual_seed(0)
    n, V = 64, 5000
    # sharp rows (mass reached inside the window), flat rows (it is not: the full sort takes over), ties
    logits = torch.cat([torch.randn(24, V, generator=g) * 6, torch.randn(24, V, generator=g) * 0.1,
                        torch.randint(0, 3, (16, V), generator=g).float()])
    temp = torch.rand(n, generator=g) + 0.3
    top_p = torch.tensor([0.5, 0.9, 0.99, 1.0]).repeat(16)
    top_k = torch.tensor([0, 0, 5, 0, 50, 2000, 0, 1]).repeat(8)
    u = torch.rand(n, generator=g)
    logp = torch.log_softmax(logits / temp[:, None], -1)
    spill = sampling.truncation(logp, top_p, top_k, int(top_k.max())).spill[(top_p < 1) | (top_k > 0)]
    assert spill.any() and not spill.all()  # both paths are taken
    fast = sampling.sample(logits, temp, top_p, top_k, u, prefilter=64)
    full = sampling.sample(logits, temp, top_p, top_k, u, prefilter=0)
    assert torch.equal(fast[0], full[0]) and torch.equal(fast[1], full[1])


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------
def test_seeded_generate_is_independent_of_max_batch_and_admission():
    m = dense()
    prompts = [[1, 2], list(range(10, 25)), [42], [7] * 9, [5, 6, 7]]
    # a common stop token makes rows finish at different steps, so later rows are admitted mid-way
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, n=3, seed=11, stop_token_ids=(3, 4, 5, 6))
    runs = [Engine(m, max_batch=b).generate(prompts, sp) for b in (1, 3, 64)]
    tokens = [[s.tokens for g in run for s in g] for run in runs]
    assert tokens[0] == tokens[1] == tokens[2]
    for run in runs[1:]:  # log-probs too, up to the rounding of a different batch shape in the matmuls
        assert all(torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
                   for ga, gb in zip(runs[0], run) for a, b in zip(ga, gb))
    assert len({tuple(t) for t in tokens[0]}) > 10  # and rows differ from one another
    other = Engine(m).generate(prompts, sp, seed=12)
    assert [s.tokens for g in other for s in g] != tokens[0]
