"""Padding-free GRPO training forwards: rollouts packed into rows of documents compute what the
right-padded batch computes — log-probs, entropy, gradients, a whole update — with fewer tokens."""
import copy
import random

import pytest
import torch

from r1kit import rl
from r1kit.engine import Engine, Sample, SamplingParams
from r1kit.models import lora
from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
from r1kit.models.llama import Llama, LlamaConfig, document_mask
from r1kit.models.routing import record_routing
from r1kit.packing import first_fit_decreasing, pack_documents, shared_prompt_rows
from r1kit.rollout import Rollout
from r1kit.stages.grpo import (GRPOConfig, completion_logprobs, engine_routes, plan_micro_batches, policy_update,
                               rollout_batch)
from r1kit.stages.grpo_batch import shares_prompts

V = 64


def build(family, seed=0):
    if family == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return Llama(cfg).init_weights(seed, std=0.2)
    cfg = DeepseekConfig(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                         first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                         v_head_dim=8, max_position_embeddings=128, num_nextn_predict_layers=1)
    return DeepseekV3(cfg).init_weights(seed, std=0.2)


def ragged_rollouts(n=12, seed=0) -> list[Rollout]:
    """Prompts of 2–9 and completions of 1–15 tokens, sampler log-probs near the policy's scale."""
    g = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [g.randrange(V) for _ in range(g.randint(2, 9))]
        tokens = [g.randrange(V) for _ in range(g.randint(1, 15))]
        sample = Sample(i, tokens, [-4.0 + g.random() for _ in tokens], "stop")
        out.append(Rollout(None, prompt, sample, "", {}))
    return out


def padded_rows(rollouts):
    return [[i] for i in range(len(rollouts))]


def packed_rows(rollouts):
    return first_fit_decreasing([len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts],
                                max(len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts))


def in_rollout_order(x: torch.Tensor, order: list[int]) -> torch.Tensor:
    out = torch.empty_like(x)
    out[order] = x
    return out


# ------------------------------------------------------------------------------------ the packer
def test_first_fit_decreasing_places_every_document_once_and_no_row_over_capacity():
    g = random.Random(0)
    for _ in range(200):
        lengths = [g.randint(1, 60) for _ in range(g.randint(1, 40))]
        cap = max(lengths)
        rows = first_fit_decreasing(lengths, cap)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each exactly once
        fill = [sum(lengths[i] for i in row) for row in rows]
        assert max(fill) <= cap
        assert sum(f <= cap / 2 for f in fill) <= 1  # first fit: a second half-empty row would have fit the first
    assert first_fit_decreasing([9, 3, 4], 5) == [[0], [2], [1]]  # longer than the capacity: a row of its own


def test_packed_rows_hold_every_token_once_and_documents_never_see_each_other():
    rollouts = ragged_rollouts(40, seed=1)
    docs = [r.prompt_ids + r.sample.tokens for r in rollouts]
    rows = packed_rows(rollouts)
    b = pack_documents(docs, [len(r.sample.tokens) for r in rollouts], rows)
    assert len(rows) < len(rollouts) and b.packed  # ragged lengths really pack
    assert b.tokens == sum(len(d) for d in docs)  # the token-wise layers compute every token once, no padding
    flat, cells = b.idx[0], b.rows.index
    owner = torch.full(cells.shape, -1)  # which rollout each (row, column) of attention holds
    seen = []
    for i, where in zip(b.order, b.token_index):
        L = len(docs[i])
        assert flat[where].tolist() == docs[i] and b.positions[0, where].tolist() == list(range(L))
        home = b.rows.home[where]  # each token's output cell holds that token, in its document's row
        assert cells.flatten()[home].tolist() == where and (owner.flatten()[home] == -1).all()
        owner.view(-1)[home] = i
        seen += where
    assert sorted(seen) == list(range(b.tokens))  # every flat token belongs to exactly one document
    mask = document_mask(b.doc)[:, 0]  # (R, W, W)
    assert torch.equal(b.rows.mask[:, 0], mask)
    query, key = owner[:, :, None], owner[:, None, :]
    assert not (mask & (query >= 0) & (key != query)).any()  # a token sees only its own document
    # each scored token is the one right after the token whose output predicts it, in its own document
    predicted = torch.cat([flat[torch.tensor(w)[torch.isin(torch.tensor(w), b.logit_pos[0])] + 1]
                           for w in b.token_index])
    assert torch.equal(predicted, b.targets[b.mask.bool()])


def test_a_document_in_a_packed_row_computes_what_it_computes_alone():
    """Changing every other document of a row leaves a document's log-probs exactly as they were."""
    model = build("llama").eval()
    rollouts = ragged_rollouts(12, seed=2)
    rows = packed_rows(rollouts)
    with torch.no_grad():
        before = completion_logprobs(model, rollout_batch(rollouts, rows)[0], 1.0)[0]
    victim = rows[0][0]
    for i in rows[0][1:]:
        rollouts[i].prompt_ids = [(t + 7) % V for t in rollouts[i].prompt_ids]
    with torch.no_grad():
        b = rollout_batch(rollouts, rows)[0]
        after = completion_logprobs(model, b, 1.0)[0]
    k = b.order.index(victim)
    assert torch.equal(before[k], after[k])


# ------------------------------------------------------------------------------------ log-probs and gradients
@pytest.mark.parametrize("family", ["llama", "deepseek"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_packed_logprobs_equal_padded_and_each_sequence_alone(family, chunk):
    torch.manual_seed(0)
    model = build(family).train()  # GRPO's forwards run in training mode
    model.logprob_chunk = chunk
    rollouts = ragged_rollouts()
    got = {}
    for name, rows in (("padded", padded_rows(rollouts)), ("packed", packed_rows(rollouts))):
        b, _ = rollout_batch(rollouts, rows)
        with torch.no_grad():
            logp, ent = completion_logprobs(model, b, 0.7)  # the rollout temperature scales the log-probs
        got[name] = (in_rollout_order(logp, b.order), in_rollout_order(ent, b.order), in_rollout_order(b.mask, b.order))
    assert torch.equal(got["padded"][2], got["packed"][2])
    torch.testing.assert_close(got["packed"][0], got["padded"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["packed"][1], got["padded"][1], atol=1e-5, rtol=0)
    with torch.no_grad():  # and both are what each sequence alone gives
        for i, r in enumerate(rollouts):
            seq, P, T = torch.tensor([r.prompt_ids + r.sample.tokens]), len(r.prompt_ids), len(r.sample.tokens)
            logits = model(seq)[0, P - 1:P + T - 1] / 0.7  # (T, V)
            alone = torch.log_softmax(logits, -1).gather(1, seq[0, P:, None])[:, 0]
            torch.testing.assert_close(got["packed"][0][i, :T], alone, atol=1e-5, rtol=0)
            assert (got["packed"][0][i, T:] == 0).all()  # exact zeros at padding


@pytest.mark.parametrize("family", ["llama", "deepseek"])
def test_packed_gradients_equal_padded(family):
    model = build(family).train()
    model.grad_checkpointing = True  # recomputed blocks see the same positions and mask
    rollouts = ragged_rollouts(seed=3)
    weights = torch.randn(len(rollouts), 15, generator=torch.Generator().manual_seed(0))
    grads = []
    for rows in (padded_rows(rollouts), packed_rows(rollouts)):
        model.zero_grad(set_to_none=True)
        b, _ = rollout_batch(rollouts, rows)
        logp, _ = completion_logprobs(model, b, 1.0)
        (logp * weights[b.order, : logp.shape[1]]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-5, msg=n)


# ------------------------------------------------------------------------------------ shared prompts
def grouped_rollouts(prompts=4, group=5, seed=0) -> list[Rollout]:
    """GRPO's batch: `group` samples of each prompt (prompts of 2–9 tokens, completions of 1–15), interleaved."""
    g = random.Random(seed)
    heads = [[g.randrange(V) for _ in range(g.randint(2, 9))] for _ in range(prompts)]
    out = []
    for j in range(group):
        for p in heads:
            tokens = [g.randrange(V) for _ in range(g.randint(1, 15))]
            out.append(Rollout(None, list(p), Sample(len(out), tokens, [-4.0] * len(tokens), "stop"), "", {}))
    return out


def shared_rows(rollouts):
    lengths = [len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts]
    return shared_prompt_rows([tuple(r.prompt_ids) for r in rollouts], [len(r.prompt_ids) for r in rollouts],
                              [len(r.sample.tokens) for r in rollouts], max(lengths))


def test_shared_prompt_rows_write_each_prompt_once_per_segment_within_capacity():
    rollouts = grouped_rollouts(6, 8, seed=4)
    rows = shared_rows(rollouts)
    assert sorted(i for row in rows for i in row) == list(range(len(rollouts)))  # each exactly once
    b, _ = rollout_batch(rollouts, rows, share=True)
    cap = max(len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts)
    assert b.rows.index.shape[1] <= cap  # no row wider than the padded batch's: its W × W attention is no dearer
    full = sum(len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts)
    written = int((b.doc >= 0).sum())
    assert written < full - 2 * 6 * 2  # attention's rows: at least two prompt copies saved per prompt
    # the token-wise layers: each distinct prompt once, every completion token once
    assert b.tokens == sum(len(p) for p in {tuple(r.prompt_ids) for r in rollouts}) + sum(
        len(r.sample.tokens) for r in rollouts) < written
    # each scored token is the one whose column follows the output that predicts it, in its own document
    for k, i in enumerate(b.order):
        r = rollouts[i]
        assert b.targets[k, :len(r.sample.tokens)].tolist() == r.sample.tokens


@pytest.mark.parametrize("family", ["llama", "deepseek"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_shared_prompt_logprobs_and_gradients_equal_the_padded_batch(family, chunk):
    """A sample whose prompt it shares with the samples before it in a row sees the prompt and itself only:
    log-probs, entropy and gradients equal one sequence per padded row."""
    torch.manual_seed(0)
    model = build(family).train()
    model.logprob_chunk = chunk
    rollouts = grouped_rollouts()
    weights = torch.randn(len(rollouts), 15, generator=torch.Generator().manual_seed(1))
    got = {}
    for name, rows, share in (("padded", padded_rows(rollouts), False), ("shared", shared_rows(rollouts), True)):
        b, _ = rollout_batch(rollouts, rows, share=share)
        if share:
            assert b.packed and int(b.branch.max()) >= 3  # rows really hold several samples of one prompt
        model.zero_grad(set_to_none=True)
        logp, ent = completion_logprobs(model, b, 0.7)
        (logp * weights[b.order, : logp.shape[1]]).sum().backward()
        got[name] = (in_rollout_order(logp.detach(), b.order), in_rollout_order(ent, b.order),
                     {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    torch.testing.assert_close(got["shared"][0], got["padded"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["shared"][1], got["padded"][1], atol=1e-5, rtol=0)
    assert got["shared"][2].keys() == got["padded"][2].keys()
    for n, grad in got["padded"][2].items():  # fp32 sums in other orders: to 1e-5 of each gradient's scale
        torch.testing.assert_close(got["shared"][2][n], grad, atol=1e-5 * float(grad.abs().max()), rtol=1e-5, msg=n)


def test_prompts_are_shared_only_with_packing_and_without_routing_replay():
    assert shares_prompts(GRPOConfig())
    assert not shares_prompts(GRPOConfig(share_prompts=False))
    assert not shares_prompts(GRPOConfig(packing=False))
    assert not shares_prompts(GRPOConfig(routing_replay="rollout"))
    assert not shares_prompts(GRPOConfig(routing_replay="trainer"))


def test_a_shared_documents_scored_tokens_must_lie_past_its_prompt():
    with pytest.raises(ValueError, match="document 1: 3 scored tokens of 4 after a shared prompt of 2"):
        pack_documents([[1, 2, 3, 4], [1, 2, 5, 6]], [2, 3], [[0, 1]], prefix=[2, 2])


# ------------------------------------------------------------------------------------ one GRPO step
def step(model, cfg, rollouts, adv, ref=None):
    m = copy.deepcopy(model)
    r = m if ref == "self" else (copy.deepcopy(ref) if ref is not None else None)
    stats = policy_update(cfg, m, r, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5),
                          rollouts, adv)
    return m.state_dict(), stats


def assert_same_step(a, b):
    (wa, sa), (wb, sb) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sb[k] == pytest.approx(sa[k], abs=1e-5), k
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), atol=1e-5, rtol=0, msg=k)


CASES = {
    # μ = 2 (old log-probs, the ratio and clip), KL to a frozen reference, TIS, micro-batches of 3 rows
    "kl_mu2_tis_micro": dict(kl_coef=0.05, mu=2, corrections=["tis"], micro_batch=3),
    # chunked log-probs + activation checkpointing + a token budget, token-level mean
    "chunk_ckpt_budget": dict(logprob_chunk=4, grad_checkpointing=True, max_tokens_per_micro_batch=48,
                              aggregation="token_mean"),
    # LoRA: the reference is the policy with its adapters off
    "lora_kl": dict(lora_rank=4, kl_coef=0.05, mu=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_grpo_step_with_packing_equals_without(case):
    torch.manual_seed(0)  # LoRA's adapters are drawn from the global generator: the same ones whatever ran before
    over = CASES[case]
    model = build("llama").train()
    model.logprob_chunk, model.grad_checkpointing = over.get("logprob_chunk", 0), over.get("grad_checkpointing", False)
    ref = None
    if over.get("lora_rank"):
        lora.apply_lora(model, rank=over["lora_rank"])
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                layer.lora_B.normal_(0, 0.3)  # adapters that matter: the reference differs from the policy
        ref = "self"
    elif over.get("kl_coef"):
        ref = build("llama", seed=1).eval().requires_grad_(False)
    rollouts = ragged_rollouts(16, seed=4)
    adv = rl.grpo_advantages(torch.randn(16, generator=torch.Generator().manual_seed(1)), 4)
    cfgs = [GRPOConfig(grad_clip=1e9, max_new_tokens=15, temperature=0.8, packing=p, **over) for p in (False, True)]
    assert any(len(row) > 1 for mb in plan_micro_batches(cfgs[1], rollouts) for row in mb)  # it really packs
    assert_same_step(step(model, cfgs[0], rollouts, adv, ref), step(model, cfgs[1], rollouts, adv, ref))


def engine_rollouts(model):
    """Ragged samples from the engine, recording its expert ids (routing replay R3)."""
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15, 16]]
    params = SamplingParams(max_new_tokens=14, temperature=1.0, n=3, seed=0, stop_token_ids=tuple(range(20, 28)))
    groups = Engine(model, None, record_routing=True).generate(prompts, params)
    return [Rollout(None, prompts[i], s, "", {}) for i, g in enumerate(groups) for s in g]


@pytest.mark.parametrize("replay", ["trainer", "rollout"])
def test_moe_step_with_routing_replay_is_the_same_packed(replay):
    model = build("deepseek").eval()
    rollouts = engine_rollouts(model)
    assert len({len(r.sample.tokens) for r in rollouts}) > 2  # ragged completions
    with torch.no_grad():
        for g in model.gates():  # the policy moved since the rollout: replay decides the routing
            g.weight.add_(torch.randn_like(g.weight) * 0.5)
    model.train()
    adv = rl.grpo_advantages(torch.randn(len(rollouts), generator=torch.Generator().manual_seed(2)), 3)
    cfgs = [GRPOConfig(grad_clip=1e9, max_new_tokens=14, mu=2, routing_replay=replay, packing=p) for p in (False, True)]
    padded, packed = step(model, cfgs[0], rollouts, adv), step(model, cfgs[1], rollouts, adv)
    assert_same_step(padded, packed)
    if replay == "rollout":
        assert packed[1]["routing_disagreement"] > 0  # the engine's experts, not the moved gates', were used


def test_engine_routes_land_on_their_tokens_in_packed_rows():
    """R3: laid out in packed rows, the engine's expert ids are the ones the training forward picks itself."""
    model = build("deepseek").eval()
    rollouts = engine_rollouts(model)
    b, _ = rollout_batch(rollouts, packed_rows(rollouts))
    assert b.packed
    routes = engine_routes(rollouts, b)
    with torch.no_grad(), record_routing(model) as own:
        model(b.idx, **b.forward_kwargs())
    recorded = routes[0][:, 0] >= 0
    assert int(recorded.sum()) == sum(len(r.prompt_ids) + len(r.sample.tokens) - 1 for r in rollouts)
    for o, r in zip(own, routes):
        if r is not None:
            assert torch.equal(o[recorded], r[recorded])  # fp32 on one CPU: token for token
