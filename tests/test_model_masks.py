"""Explicit positions and attention masks (packed documents) in both model families, MTP and MoE included."""
import pytest
import torch

from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
from r1kit.models.llama import IGNORE_INDEX, AttnRows, Llama, LlamaConfig, document_mask

V = 64
LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
DEEPSEEK = dict(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=128,
                num_nextn_predict_layers=1, mtp_lambda=0.3)


def build(family, impl="absorb", **kw):
    if family == "llama":
        return Llama(LlamaConfig(**LLAMA)).init_weights(0, std=0.2)
    return DeepseekV3(DeepseekConfig(**{**DEEPSEEK, **kw}), attn_impl=impl).init_weights(0, std=0.2)


def documents(lengths=(7, 4, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def packed(docs, width=None):
    """Documents → one packed row: idx, targets (each document's own next tokens), positions, doc ids."""
    T = width or sum(len(d) for d in docs)
    idx, targets = torch.zeros(1, T, dtype=torch.long), torch.full((1, T), IGNORE_INDEX)
    doc, pos = torch.full((1, T), -1), torch.zeros(1, T, dtype=torch.long)
    at = 0
    for i, d in enumerate(docs):
        n = len(d)
        idx[0, at:at + n], targets[0, at:at + n - 1] = d, d[1:]
        doc[0, at:at + n], pos[0, at:at + n] = i, torch.arange(n)
        at += n
    pos[0, at:] = torch.arange(T - at)
    return idx, targets, pos, doc


CASES = [("llama", "absorb"), ("deepseek", "absorb"), ("deepseek", "naive")]


@pytest.mark.parametrize("family,impl", CASES)
def test_packed_forward_equals_each_document_alone(family, impl):
    model = build(family, impl).eval()
    docs = documents()
    idx, targets, pos, doc = packed(docs, width=24)  # 20 tokens + 4 of padding
    mask = document_mask(doc)
    with torch.no_grad():
        logits = model(idx, positions=pos, attn_mask=mask)[0]
        nll = model(idx, targets, loss_reduction="none", positions=pos, attn_mask=mask)[0]
        plain = model(idx)[0]
        at = 0
        for d in docs:
            alone = model(d[None])[0]
            alone_nll = model(d[None], torch.cat((d[1:], torch.tensor([IGNORE_INDEX])))[None], loss_reduction="none")[0]
            torch.testing.assert_close(logits[at: at + len(d)], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(nll[at: at + len(d)], alone_nll, atol=1e-5, rtol=1e-5)
            at += len(d)
    assert not torch.allclose(plain[7:11], logits[7:11], atol=1e-3)  # without the mask, documents do mix


@pytest.mark.parametrize("family,impl", CASES)
def test_flat_tokens_attending_in_rows_equal_each_document_alone(family, impl):
    """AttnRows: a prompt written once in the flat tokens and copied into two rows (one per sample), a third
    document beside one of them, padding in the other row — every token's output is its document's alone."""
    model = build(family, impl).eval()
    prompt, a, b, other = documents((5, 4, 6, 3), seed=1)
    flat = torch.cat((prompt, a, other, b))[None]  # (1, 18): the prompt once
    positions = torch.cat((torch.arange(9), torch.arange(3), torch.arange(5, 11)))[None]
    index = torch.tensor([list(range(9)) + list(range(9, 12)), list(range(5)) + list(range(12, 18)) + [0]])
    home = torch.tensor(list(range(12)) + list(range(17, 23)))  # row 1's cells 5…10 hold b's own tokens
    doc = torch.tensor([[0] * 9 + [1] * 3, [0] * 11 + [-1]])
    rows = AttnRows(index, home, document_mask(doc))
    with torch.no_grad():
        got = model(flat, positions=positions, attn_rows=rows)[0]  # (18, V)
        for want, at in ((model(torch.cat((prompt, a))[None])[0], list(range(9))),
                         (model(other[None])[0], list(range(9, 12))),
                         (model(torch.cat((prompt, b))[None])[0][5:], list(range(12, 18)))):
            torch.testing.assert_close(got[at], want, atol=1e-5, rtol=1e-5)


def test_bad_attention_rows_are_clear_errors():
    model = build("llama")
    flat, pos = torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None]
    rows = AttnRows(torch.tensor([[0, 1], [2, 3]]), torch.arange(4), None)
    with pytest.raises(ValueError, match=r"attn_rows: idx must be \(1, N\) with home \(N,\)"):
        model(torch.zeros(2, 2, dtype=torch.long), positions=torch.zeros(2, 2, dtype=torch.long), attn_rows=rows)
    with pytest.raises(ValueError, match=r"attn_rows.mask must be a bool tensor of shape \(R, 1, W, W\) = \(2, 1, 2, 2\)"):
        model(flat, positions=pos, attn_rows=AttnRows(rows.index, rows.home, torch.ones(2, 2, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="needs the tokens' positions"):
        model(flat, attn_rows=rows)
    with pytest.raises(ValueError, match="cannot be combined with a kv_cache"):
        model(flat, kv_cache=model.new_cache(1, 8), attn_rows=rows)
    with pytest.raises(ValueError, match="MTP and balance losses read each document as a row"):
        build("deepseek")(flat, flat, positions=pos, attn_rows=rows)


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_packed_mtp_loss_equals_the_documents_alone(impl):
    """MTP honours the mask and positions, and ignores targets whose input token is in the next document."""
    model = build("deepseek", impl, seq_aux_alpha=0.0).train()
    docs = documents()
    idx, targets, pos, doc = packed(docs, width=24)
    model(idx, targets, loss_reduction="sum", positions=pos, attn_mask=document_mask(doc))
    got = {k: float(v.sum()) for k, v in model.last_losses.items() if k in ("main", "mtp")}
    want = {"main": 0.0, "mtp": 0.0}
    for d in docs:
        model(d[None], torch.cat((d[1:], torch.tensor([IGNORE_INDEX])))[None], loss_reduction="sum")
        for k in want:
            want[k] += float(model.last_losses[k].sum())
    assert got == pytest.approx(want, rel=1e-5)
    model(idx, targets, loss_reduction="sum")  # the same row unmasked: MTP crosses documents and differs
    assert float(model.last_losses["mtp"].sum()) != pytest.approx(want["mtp"], rel=1e-3)


@pytest.mark.parametrize("family,impl", CASES)
def test_cached_decode_equals_uncached(family, impl):
    model = build(family, impl).eval()
    seq = documents((12,), seed=3)[0][None].repeat(2, 1)  # (2, 12)
    with torch.no_grad():
        full = model(seq)  # (2, 12, V)
        cache = model.new_cache(2, 16)
        steps = [model(seq[:, :5], kv_cache=cache)]  # prefill 5, then one token at a time
        steps += [model(seq[:, t: t + 1], kv_cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_bad_masks_and_positions_are_clear_errors():
    model = build("llama")
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attn_mask must be a bool tensor of shape \(B, 1, T, T\)"):
        model(idx, attn_mask=torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must be a bool"):
        model(idx, attn_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match=r"positions must have shape \(B, T\)"):
        model(idx, positions=torch.arange(5))
    with pytest.raises(ValueError, match="cannot be combined with a kv_cache"):
        model(idx, kv_cache=model.new_cache(2, 8), positions=torch.zeros(2, 5, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- MoE statistics
def next_tokens(d):
    return torch.cat((d[1:], torch.tensor([IGNORE_INDEX])))


def test_moe_statistics_of_a_padded_batch_equal_the_unpadded_ones():
    """Padding (and anything with target -100) neither moves the expert loads nor the balance loss."""
    model = build("deepseek", seq_aux_alpha=0.1).train()
    docs = documents((10, 6))
    idx = torch.zeros(2, 10, dtype=torch.long)
    targets = torch.full((2, 10), IGNORE_INDEX)
    for b, d in enumerate(docs):
        idx[b, : len(d)], targets[b, : len(d)] = d, next_tokens(d)
    idx[1, 6:] = 5  # padding tokens that would route somewhere
    model(idx, targets)
    padded_balance = float(model.last_losses["balance"])
    padded_load = model.after_optimizer_step()
    loads, balances = [], []
    for d in docs:
        model(d[None], next_tokens(d)[None])
        balances.append(float(model.last_losses["balance"]))
        loads.append(model.after_optimizer_step())
    assert torch.equal(padded_load, loads[0] + loads[1])  # the aux-loss-free bias sees the same counts
    # k = 2 per token with a target: 9 + 5 in the main MoE layer, 8 + 4 in MTP (whose targets start one later)
    assert padded_load.sum(1).tolist() == [2 * (9 + 5), 2 * (8 + 4)]
    assert padded_balance == pytest.approx(sum(balances) / 2, rel=1e-5)  # the same per-sequence balance loss


@pytest.mark.parametrize("rows", [[[0], [1]], [[0, 1]]])  # right-padded rows, or both documents in one row
def test_grpo_forward_counts_only_completion_tokens(rows):
    from r1kit.packing import pack_documents
    from r1kit.stages.grpo import completion_logprobs
    model = build("deepseek").train()
    docs = [torch.randint(0, V, (9,)).tolist(), torch.randint(0, V, (8,)).tolist()]  # 4 + 5 and 6 + 2 tokens
    completion_logprobs(model, pack_documents(docs, [5, 2], rows), 1.0)
    load = model.after_optimizer_step()
    assert load[0].sum() == 2 * 7 and load[1].sum() == 0  # 7 predicted tokens × k = 2; MTP does not run in GRPO


def test_documents_too_short_for_mtp_add_nothing_not_nan():
    model = build("deepseek").train()
    docs = documents((2, 2, 2))  # depth 1 needs t_{i+1} and t_{i+2} in one document: none has them
    idx, targets, pos, doc = packed(docs)
    loss = model(idx, targets, positions=pos, attn_mask=document_mask(doc))
    assert torch.isfinite(loss) and float(model.last_losses["mtp"].sum()) == 0.0
