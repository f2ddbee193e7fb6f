"""MoE routing replay: a replayed forward routes exactly as the recorded one, and disagreement is measured."""
import pytest
import torch

from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.models.routing import record_routing, replay_routing


def moe(seed=0):
    cfg = DeepseekConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=3, num_attention_heads=2, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
                         first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64)
    torch.manual_seed(seed)
    return DeepseekV3(cfg).init_weights(seed, 0.2)


def shift_gates(model, scale=0.5):
    """A policy update that moves the routers: what happens between rollout and training forward."""
    with torch.no_grad():
        for g in model.gates():
            g.weight.add_(torch.randn_like(g.weight) * scale)


def test_replayed_forward_routes_exactly_like_the_recorded_one():
    model, idx = moe(), torch.randint(0, 64, (3, 10))
    with record_routing(model) as rollout_routes:
        before = model(idx)
    # 2 MoE layers, (B*T, k) each; the MTP block's gate does not run in a logits-only forward
    assert len(rollout_routes) == 3 and rollout_routes[0].shape == (30, 2) and rollout_routes[2] is None
    shift_gates(model)
    with record_routing(model) as free_routes:
        model(idx)
    assert any(not torch.equal(a, b) for a, b in zip(rollout_routes[:2], free_routes[:2]))  # the update moved routing

    with replay_routing(model, rollout_routes) as replay_stats, record_routing(model) as replayed:
        after = model(idx)
    for a, b in zip(rollout_routes[:2], replayed[:2]):
        assert torch.equal(a, b)  # the training forward used the rollout's experts, token for token
    assert replay_stats["routing_disagreement"] > 0  # and reports how often its own choice differed
    assert not torch.allclose(before, after)  # the gate weights (and so the outputs) are the new ones


def test_disagreement_is_measured_with_replay_off_and_zero_without_drift():
    model, idx = moe(1), torch.randint(0, 64, (2, 8))
    with record_routing(model) as routes:
        ref = model(idx)
    with replay_routing(model, routes, replay=False) as s:
        same = model(idx)
    assert s["routing_disagreement"] == 0 and torch.equal(ref, same)
    shift_gates(model)
    with replay_routing(model, routes, replay=False) as s, record_routing(model) as own:
        model(idx)
    # off: the forward keeps its own routing, and the metric is the share of picks not recorded
    pairs = list(zip(own[:2], routes[:2]))
    share = [float((~(o[:, :, None] == r[:, None, :]).any(-1)).float().mean()) for o, r in pairs]
    assert s["routing_disagreement"].item() == pytest.approx(sum(share) / 2)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_replay_gradients_flow_to_the_gate_and_state_is_cleared():
    model, idx = moe(2), torch.randint(0, 64, (2, 6))
    with record_routing(model) as routes:
        model(idx)
    model.train()
    with replay_routing(model, routes):
        model(idx).sum().backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in model.gates()[:2])
    assert all(g.replay is None and g.recorded is None and g.disagreement is None for g in model.gates())


def test_replay_refuses_other_tokens_and_is_a_no_op_on_dense_models():
    model = moe(3)
    with record_routing(model) as routes:
        model(torch.randint(0, 64, (2, 6)))
    with pytest.raises(ValueError, match="do not match"):
        with replay_routing(model, routes):
            model(torch.randint(0, 64, (2, 7)))
    dense = Llama(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=32))
    with record_routing(dense) as none:
        dense(torch.randint(0, 64, (1, 4)))
    assert none == []


def test_engine_records_the_rollout_routing_and_training_replays_it():
    """R3: the sampler's own expert ids, laid out like the training forward, are what it routes by."""
    from r1kit.engine import Engine, SamplingParams
    from r1kit.rollout import Rollout
    from r1kit.stages.grpo import engine_routes, rollout_batch

    model = moe(4).eval()
    prompts = [[1, 2, 3, 4], [5, 6]]  # ragged: rows are padded differently in the training batch
    groups = Engine(model, None, record_routing=True).generate(
        prompts, SamplingParams(max_new_tokens=5, temperature=1.0, n=2, seed=0, ignore_eos=True))
    rollouts = [Rollout(None, prompts[i], s, "", {}) for i, g in enumerate(groups) for s in g]
    for r in rollouts:  # every fed token: the prompt and all generated tokens but the last
        assert r.sample.routes[0].shape == (len(r.prompt_ids) + len(r.sample.tokens) - 1, 2)
        assert r.sample.routes[2] is None  # the MTP gate never runs while sampling
    batch, _ = rollout_batch(rollouts, [[i] for i in range(len(rollouts))])  # one right-padded row each
    idx, routes = batch.idx, engine_routes(rollouts, batch)
    kw = {"positions": batch.positions, "attn_rows": batch.rows}  # the flat tokens, attending in their rows
    with record_routing(model) as own:
        model(idx, **kw)
    recorded = routes[0][:, 0] >= 0
    # fp32 on one CPU: the full forward routes like the cached decode, token for token
    for o, r in zip(own[:2], routes[:2]):
        assert torch.equal(o[recorded], r[recorded])
    shift_gates(model)
    with replay_routing(model, routes) as s, record_routing(model) as replayed:
        model(idx, **kw)
    for o, r in zip(replayed[:2], routes[:2]):
        assert torch.equal(o[recorded], r[recorded])  # replayed: exactly the rollout's experts
    assert s["routing_disagreement"] > 0
