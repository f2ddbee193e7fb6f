"""The rollout engine without transformers: sampling maths, log-prob semantics, seeds, stop strings,
KV caches of both families, continuous batching, MoE routing and MTP speculation."""
import math

import pytest
import torch

from r1kit import sampling
from r1kit.engine import Engine, SamplingParams
from r1kit.models.deepseek import DeepseekV3, MLACache, NaiveMLACache
from r1kit.speculative import mtp_generate

from model_fixtures import YARN, build, make_model, tiny


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
    m = make_model("llama3")
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
    m = make_model("llama3")
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
    m = make_model("llama3")
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


def test_streamed_prompts_start_as_groups_finish_and_sample_as_if_begun_together(monkeypatch):
    """begin / on_group: a prompt named by on_group starts in the slots finished rows leave, while the other
    rows decode; with per-prompt seeds every group is the one a single generate() of all prompts draws."""
    from r1kit.engine import Batch
    m = make_model("llama3")
    prompts, seeds = [[1, 2], list(range(10, 25)), [42], [7] * 9, [5, 6, 7]], [40, 41, 42, 43, 44]
    # a quarter of the vocabulary ends a row: with these seeds the groups' longest rows run 5, 12, 9 and 4 tokens
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, stop_token_ids=tuple(range(3, 83)))
    steps = {"n": 0}
    real_step = Batch.step

    def counted(self):
        steps["n"] += 1
        return real_step(self)
    monkeypatch.setattr(Batch, "step", counted)
    whole = Engine(m).generate(prompts[:4], sp, seeds=seeds[:4])
    assert [max(len(x.tokens) for x in g) for g in whole] == [5, 12, 9, 4]
    rounds = 0
    for part in ([0, 1], [2], [3]):  # the same work in rounds: each waits for the last one's longest row
        before = steps["n"]
        Engine(m).generate([prompts[i] for i in part], sp, seeds=[seeds[i] for i in part])
        rounds += steps["n"] - before
    chain, seen = {0: [2], 2: [3]}, []

    def on_group(i, samples):
        seen.append((i, len(samples)))
        return chain.get(i, [])
    steps["n"] = 0
    got = Engine(m, max_batch=6).generate(prompts, sp, seeds=seeds, begin=[0, 1], on_group=on_group)
    assert [[s.tokens for s in g] for g in got[:4]] == [[s.tokens for s in g] for g in whole] and got[4] == []
    assert sorted(seen) == [(0, 3), (1, 3), (2, 3), (3, 3)] and seen.index((0, 3)) < seen.index((2, 3))
    assert steps["n"] < rounds  # the later prompts ran beside prompt 1's rows, not after them
    with pytest.raises(ValueError, match="on_group .after prompt 0. named prompt 1, which is already begun"):
        Engine(m).generate(prompts, sp, seeds=seeds, begin=[0, 1], on_group=lambda i, s: [1])
    with pytest.raises(ValueError, match="begin named prompt 9, which is not one of the 5"):
        Engine(m).generate(prompts, sp, begin=[9])


# ---------------------------------------------------------------------------------------------
# stop strings: tokens and text agree
# ---------------------------------------------------------------------------------------------
class Scripted(torch.nn.Module):
    """A stand-in model keeping the r1kit contract that emits `script` whatever it is fed: after the
    token at position p comes script[p] (so a one-token prompt continues with script[0], script[1], …)."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(1, 1)  # the engine reads the device from it
        self.script, self.V = torch.tensor(script), vocab_size
        self.max_seq_len = len(script) + 1

    def new_cache(self, batch, max_len):
        from r1kit.models.llama import KVCache
        return KVCache(1, batch, 1, max_len, 1, torch.float32, "cpu")

    def forward(self, idx, kv_cache=None, logit_pos=None):
        pos = kv_cache.positions(idx.shape[1])  # (B, T)
        kv_cache.advance(idx.shape[1])
        if logit_pos is not None:
            pos = pos.gather(1, logit_pos[:, None])
        return torch.nn.functional.one_hot(self.script[pos], self.V).float() * 20  # (B, T, V)


def assert_tokens_agree_with_text(tok, s, stops):
    full = tok.decode(s.tokens)
    assert full.startswith(s.text)
    if s.finish_reason == "stop" and any(x in full for x in stops):
        # the text is cut right before the stop, and no token lies wholly after it
        assert any(full[len(s.text):].startswith(x) for x in stops)
        assert not any(x in tok.decode(s.tokens[:-1]) for x in stops)
        assert len(s.logprobs) == len(s.tokens)


def test_stop_string_behind_tokens_that_decode_to_nothing(tiny_tok):
    a, b, pad = tiny_tok.encode("a")[0], tiny_tok.encode("b")[0], tiny_tok.pad_id
    assert tiny_tok.decode([a] + [pad] * 3 + [b]) == "ab"  # the padding decodes to nothing
    script = [a] + [pad] * 40 + [b] + tiny_tok.encode("cdefgh") * 4
    eng = Engine(Scripted(script, tiny_tok.vocab_size), tiny_tok)
    s = eng.generate([[a]], SamplingParams(max_new_tokens=len(script), temperature=0, stop=("ab",)))[0][0]
    assert (s.text, s.finish_reason, s.tokens) == ("", "stop", script[:42])
    assert_tokens_agree_with_text(tiny_tok, s, ("ab",))


def test_stop_strings_cut_tokens_and_text_together(tiny_tok):
    m = make_model("llama3")
    eng = Engine(m, tiny_tok)
    prompt = tiny_tok.encode("12+34=")
    free = eng.generate([prompt], SamplingParams(max_new_tokens=24, temperature=1.0, n=8, seed=3, ignore_eos=True))
    texts = [s.text for s in free[0]]
    checked = 0
    for text in texts:
        for stop in {text[4:6], text[9:10], text[2:7]}:  # stops inside one token and across tokens
            if not stop.strip():
                continue
            cut = eng.generate([prompt], SamplingParams(max_new_tokens=24, temperature=1.0, n=8, seed=3,
                                                        ignore_eos=True, stop=(stop, "\x00never")))
            for s in cut[0]:
                assert_tokens_agree_with_text(tiny_tok, s, (stop,))
                assert stop not in s.text
                checked += s.finish_reason == "stop"
    assert checked >= 8  # the stop strings really ended rows


def test_stop_token_ends_the_row(tiny_tok):
    m = make_model("llama3")
    eng = Engine(m, tiny_tok)
    prompt = tiny_tok.encode("12+34=")
    first = eng.generate([prompt], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))[0][0].tokens[0]
    forced = eng.generate([prompt], SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=(first,)))[0][0]
    assert forced.tokens == [first] and forced.finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# KV caches and continuous batching, dense family
# ---------------------------------------------------------------------------------------------
def test_cached_equals_uncached():
    m = make_model("qwen3")
    idx = torch.randint(0, 320, (3, 16))
    with torch.no_grad():
        full = m(idx)
        cache = m.new_cache(3, 32)
        parts = [m(idx[:, :9], kv_cache=cache)] + [m(idx[:, t:t + 1], kv_cache=cache) for t in range(9, 16)]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5


def test_rope_table_equals_the_angles_computed_directly_and_follows_its_buffer():
    from r1kit.models.llama import rope_cos_sin
    m = make_model("llama3")  # llama3 frequency scaling: the table must hold the scaled angles
    pos = torch.tensor([[0, 5, 70], [3, 3, 200]])  # (B, T); 200 lies past the first table
    for bound in (71, 201):  # the second lookup grows the table
        p = pos.clamp(max=bound - 1)
        cos, sin = m.rope.lookup(m.inv_freq, p, bound, torch.float32)
        want_cos, want_sin = rope_cos_sin(m.inv_freq, p, torch.float32)
        assert cos.shape == (2, 3, 1, m.config.head_dim)
        torch.testing.assert_close(cos[:, :, 0], want_cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[:, :, 0], want_sin, atol=1e-6, rtol=0)
    assert m.rope.table.shape[0] >= 201
    m.inv_freq = m.inv_freq * 0.5  # a new buffer (as after .to() or reset_buffers): the table follows it
    cos, _ = m.rope.lookup(m.inv_freq, pos, 201, torch.float32)
    torch.testing.assert_close(cos[:, :, 0], rope_cos_sin(m.inv_freq, pos, torch.float32)[0], atol=1e-6, rtol=0)


def test_rope_rotates_pairs_half_a_head_apart():
    from r1kit.models.llama import apply_rope, rope_cos_sin
    x = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(0))  # (B, T, H, D)
    cos, sin = rope_cos_sin(torch.tensor([1.0, 0.1, 0.01, 0.001]), torch.arange(3), torch.float32)  # (T, D)
    got = apply_rope(x, cos[:, None], sin[:, None])
    c, s = cos[:, None, :4], -sin[:, None, :4]  # the angles' cos and sin, (T, 1, D/2)
    x1, x2 = x[..., :4], x[..., 4:]
    torch.testing.assert_close(got, torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1))  # (x1, x2) rotated


def test_cache_writes_land_at_each_rows_positions():
    from r1kit.models.llama import KVCache
    g = torch.Generator().manual_seed(0)
    cache = KVCache(2, 3, 2, 10, 4, torch.float32, "cpu")
    view = cache.leading_rows(2)  # writes through a view of the first rows land in the cache
    for c, pos in ((cache, torch.tensor([[0, 1, 2], [4, 5, 6], [7, 8, 9]])), (view, torch.tensor([[3], [0]]))):
        B, T = pos.shape
        k = torch.randn(B, T, 2, 4, generator=g).transpose(1, 2)  # (B, H, T, D) strided, as attention gives it
        v = torch.randn(B, 2, T, 4, generator=g)
        before_k, before_v = cache.k.clone(), cache.v.clone()
        out_k, _ = c.write(1, k, v, pos, 10)
        for b in range(B):
            before_k[1, b, :, pos[b]], before_v[1, b, :, pos[b]] = k[b], v[b]
        assert torch.equal(cache.k, before_k) and torch.equal(cache.v, before_v)  # those slots and no others
        assert torch.equal(out_k, cache.k[1, :B])


def test_ragged_batch_matches_each_prompt_alone():
    m = make_model("llama3")
    eng = Engine(m)
    prompts = [[5, 6, 7], list(range(10, 30)), [42], [7] * 11]
    sp = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    batched = eng.generate(prompts, sp)
    for p, got in zip(prompts, batched):
        assert got[0].tokens == eng.generate([p], sp)[0][0].tokens


@pytest.mark.parametrize("family", ["llama3", "deepseek"])
def test_busy_rows_move_down_once_most_slots_are_idle_and_decode_as_before(family):
    """Two long rows among sixteen: once the short ones end, the long ones move to slots 0 and 1 (the tail
    of the batch decodes at its own size), and their tokens and log-probs are those of each row alone."""
    from r1kit.engine import Batch
    m = make_model("llama3") if family == "llama3" else build(tiny())
    prompts = [[(3 * i) % 40 + 1, i + 2] for i in range(16)]
    long = {5, 12}
    params = [SamplingParams(max_new_tokens=12 if i in long else 2, temperature=1.0, ignore_eos=True, seed=i)
              for i in range(16)]
    batch = Batch(m, None, capacity=16, max_len=16)
    batch.add(prompts, params, list(range(16)))
    slots_seen = []
    while batch.active:
        batch.step()
        slots_seen.append([(slot, r.tag) for slot, r in enumerate(batch.rows) if r is not None])
    assert slots_seen[0] == [(5, 5), (12, 12)]  # the short rows ended at step 1 …
    assert slots_seen[1] == [(0, 5), (1, 12)]  # … so step 2 moved the long ones down
    done = {r.tag: r for r in batch.pop_finished()}
    assert len(done) == 16
    for i in long:
        alone = Batch(m, None, capacity=1, max_len=16)
        alone.add([prompts[i]], [params[i]], [i])
        while alone.active:
            alone.step()
        (ref,) = alone.pop_finished()
        assert done[i].tokens == ref.tokens
        assert torch.allclose(torch.tensor(done[i].logprobs), torch.tensor(ref.logprobs), atol=1e-5)


def test_compaction_moves_rows_with_their_state():
    from r1kit.engine import Batch
    m = make_model("qwen2")
    params = [SamplingParams(max_new_tokens=8 if i in (6, 9) else 1, temperature=0.7, top_k=5, ignore_eos=True,
                             seed=i) for i in range(10)]
    batch = Batch(m, None, capacity=10, max_len=12)
    batch.add([[i + 1, i + 3] for i in range(10)], params, list(range(10)))
    batch.step()  # rows 6 and 9 are the only busy ones: 2 of 10 leading rows, so they move down
    assert [r.tag if r else None for r in batch.rows[:3]] == [6, 9, None]
    assert batch.top_k[:2].tolist() == [5, 5] and torch.allclose(batch.temp[:2], torch.tensor([0.7, 0.7]))
    assert batch.cache.lens[:2].tolist() == [3, 3] and batch.cache.lens[2:].tolist() == [0] * 8
    # only the filled columns move (and the one fed next): the moved rows' keys and values, and their tokens,
    # are those of the same two rows decoded alone
    alone = Batch(m, None, capacity=2, max_len=12)
    alone.add([[7, 9], [10, 12]], [params[6], params[9]], [6, 9])
    alone.step()
    for name in ("k", "v"):
        torch.testing.assert_close(getattr(batch.cache, name)[:, :2, :, :3], getattr(alone.cache, name)[:, :, :, :3])
    assert [batch.rows[i].tokens for i in (0, 1)] == [alone.rows[i].tokens for i in (0, 1)]


def test_per_token_nll_and_logprobs_agree():
    m = make_model("qwen2")
    eng = Engine(m)
    out = eng.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True, seed=1))
    s = out[0][0]
    seq = torch.tensor([[1, 2, 3, 4] + s.tokens])
    targets = torch.cat([seq[:, 1:], torch.full((1, 1), -100)], 1)
    targets[:, :3] = -100  # only completion tokens
    with torch.no_grad():
        nll = m(seq, targets=targets, loss_reduction="none")
    assert nll.shape == seq.shape
    got = -nll[0, 3:3 + len(s.tokens)]
    assert torch.allclose(got, torch.tensor(s.logprobs), atol=1e-4)


def test_more_rows_than_max_batch_wait_for_free_slots():
    m = make_model("qwen3")
    prompts = [[i + 1, i + 2, i + 3] for i in range(7)]
    sp = SamplingParams(max_new_tokens=6, temperature=0, n=2, ignore_eos=True)
    small = Engine(m, max_batch=3).generate(prompts, sp)
    big = Engine(m).generate(prompts, sp)
    assert [[s.tokens for s in g] for g in small] == [[s.tokens for s in g] for g in big]


# ---------------------------------------------------------------------------------------------
# MLA paths and caches
# ---------------------------------------------------------------------------------------------
def test_naive_and_absorbed_agree():
    m = build(tiny(q_lora_rank=12, rope_scaling=YARN), std=0.3)
    idx = torch.randint(0, 64, (3, 30))
    with torch.no_grad():
        a = m(idx)
        m.attn_impl = "naive"
        assert (m(idx) - a).abs().max() <= 1e-5


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_cached_greedy_equals_uncached(impl):
    m = build(tiny(), std=0.5, attn_impl=impl)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]  # ragged: rows fill their caches independently
    got = Engine(m).generate(prompts, max_new_tokens=12, temperature=0, ignore_eos=True)
    for p, samples in zip(prompts, got):
        seq = list(p)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert samples[0].tokens == seq[len(p):]


def test_cache_bytes_per_token_per_layer():
    c = tiny()
    m = DeepseekV3(c)
    latent = m.new_cache(2, 10)
    assert isinstance(latent, MLACache) and latent.c_kv.shape == (3, 2, 10, 16) and latent.k_pe.shape == (3, 2, 10, 8)
    assert latent.bytes_per_token_per_layer() == (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    assert m.new_cache(2, 10, dtype=torch.bfloat16).bytes_per_token_per_layer() == (16 + 8) * 2
    m.attn_impl = "naive"
    naive = m.new_cache(2, 10)
    assert isinstance(naive, NaiveMLACache)
    assert naive.bytes_per_token_per_layer() == c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 4


# ---------------------------------------------------------------------------------------------
# MoE balancing and the training loss
# ---------------------------------------------------------------------------------------------
def _skewed_load(balance: str, steps: int) -> list[float]:
    """Every token prefers expert 0 (its affinity is lifted by +2 logits); → max/mean load per step."""
    cfg = tiny(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1, bias_update_speed=0.02,
               balance=balance, num_nextn_predict_layers=0, num_hidden_layers=2)
    m = DeepseekV3(cfg).init_weights(0).train()
    gate, d = m.layers[1].ffn.gate, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(4, d, generator=g) / d ** 0.5)
        gate.weight[0] += 2.0 / d
    x = torch.randn(256, d, generator=g) + 1.0
    ratios = []
    for _ in range(steps):
        gate(x)  # a training forward (grad on) counts the routed tokens
        load = m.after_optimizer_step()[0].float()
        ratios.append(float(load.max() / load.mean()))
    return ratios


def test_bias_update_moves_load_toward_balance():
    free, none = _skewed_load("aux_free", 40), _skewed_load("none", 40)
    assert free[0] == none[0] > 2.5  # the same skewed start
    assert max(free[-10:]) <= 1.3 and min(none) > 2.5


def test_training_loss_parts_and_reductions():
    m = build(tiny(num_nextn_predict_layers=2)).train()
    idx = torch.randint(0, 64, (2, 16))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -100
    loss = m(idx, targets)
    p = m.last_losses
    assert p["mtp"].shape == (2,)
    want = p["main"] + 0.3 * p["mtp"].mean() + p["balance"]
    assert torch.allclose(loss.detach(), want) and p["balance"] > 0
    loss.backward()
    assert m.layers[3].eh_proj.weight.grad is not None and m.layers[1].ffn.gate.weight.grad is not None
    load = m.after_optimizer_step()
    # only tokens with a target count: 2 main MoE layers see 2×15, MTP depths 2×14 and 2×13; k = 2 experts each
    assert load.shape == (4, 8) and load.sum(1).tolist() == [60, 60, 56, 52]
    nll = m(idx, targets, loss_reduction="none")
    assert nll.shape == (2, 16) and nll[:, -1].eq(0).all()
    m.eval()
    assert torch.allclose(m(idx, targets), nll.sum() / 30)


def test_bias_stays_fp32_in_bf16():
    m = build(tiny()).to(torch.bfloat16)
    assert all(g.e_score_correction_bias.dtype == torch.float32 for g in m.gates())
    with torch.no_grad():
        assert m(torch.randint(0, 64, (1, 5))).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# MTP self-speculative decoding
# ---------------------------------------------------------------------------------------------
def test_speculative_equals_greedy():
    cfg = tiny(vocab_size=16, num_hidden_layers=2, n_routed_experts=4, n_group=1, topk_group=1)
    m = DeepseekV3(cfg).init_weights(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):  # learn t → 3t+1 mod 16, so drafts are often (not always) right
        start = torch.randint(0, 16, (8, 1))
        seq = [start]
        for _ in range(23):
            seq.append((3 * seq[-1] + 1) % 16)
        seq = torch.cat(seq, 1)
        m.train()
        loss = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step()
    prompts = [[5, 0], [2, 7, 3, 1]]
    greedy = Engine(m).generate(prompts, max_new_tokens=20, temperature=0, ignore_eos=True)
    for p, g in zip(prompts, greedy):
        r = mtp_generate(m, p, 20)
        assert r.tokens == g[0].tokens
        assert r.drafted > 0 and r.accepted > 0
    want = greedy[0][0].tokens
    stop = want[3]
    assert mtp_generate(m, [5, 0], 20, stop_ids={stop}).tokens == want[: want.index(stop) + 1]


def test_a_row_that_fails_its_own_checks_ends_alone(tiny_tok):
    from r1kit.engine import Batch
    m = make_model("llama3")
    batch = Batch(m, tiny_tok, 3, 64)
    ok = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    # ignore_eos: no end token can end the row before its stop-string check runs (a seedless draw did, now and then)
    bad = SamplingParams(max_new_tokens=6, stop=("x",), ignore_eos=True, seed=0)
    bad.stop = (5,)  # slipped past validation: its stop check raises
    batch.add([[1, 2], [3, 4]], [ok, bad], ["ok", "bad"])
    while batch.active:
        batch.step()
    rows = {r.tag: r for r in batch.pop_finished()}
    assert rows["bad"].finish_reason == "error" and isinstance(rows["bad"].error, TypeError)
    assert rows["ok"].finish_reason == "length" and len(rows["ok"].tokens) == 6
    with pytest.raises(ValueError, match="stop strings must be non-empty strings"):
        SamplingParams(stop=("",))
    with pytest.raises(ValueError, match="stop strings must be non-empty strings"):
        Engine(m, tiny_tok).generate([[1, 2]], bad)  # generate() re-checks the params it copies
