"""GRPO's memory switches: token-budget micro-batches, chunked log-probs, checkpointing and LoRA
change where memory goes, never the update."""
import copy

import pytest
import torch

import r1kit
from r1kit import rl
from r1kit.engine import Engine, SamplingParams
from r1kit.models import lora
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.rollout import Rollout
from r1kit.stages.grpo import GRPOConfig, micro_batch_bounds, plan_micro_batches, policy_update


@pytest.fixture()
def batch(tiny_tok):
    cfg = LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=128)
    model = Llama(cfg).init_weights(0, std=0.1)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    groups = Engine(model, tiny_tok).generate(prompts, SamplingParams(max_new_tokens=12, n=4, seed=0))
    rollouts = [Rollout(None, p, s, "", {}) for p, g in zip(prompts, groups) for s in g]
    adv = rl.grpo_advantages(torch.randn(12, generator=torch.Generator().manual_seed(0)), 4)
    return model, tiny_tok, rollouts, adv


def updated(model, cfg, rollouts, adv):
    m = copy.deepcopy(model)
    for k in ("grad_checkpointing", "logprob_chunk"):
        setattr(m, k, getattr(cfg, k))
    stats = policy_update(cfg, m, None, torch.optim.SGD(m.parameters(), lr=1.0), rollouts, adv)
    return m.state_dict(), stats


def test_memory_switches_leave_the_update_unchanged(batch):
    model, tok, rollouts, adv = batch
    want, s0 = updated(model, GRPOConfig(grad_clip=1e9, max_new_tokens=12), rollouts, adv)
    cfg = GRPOConfig(grad_clip=1e9, max_new_tokens=12, max_tokens_per_micro_batch=40, logprob_chunk=7,
                     grad_checkpointing=True)
    got, s1 = updated(model, cfg, rollouts, adv)
    assert len(plan_micro_batches(cfg, rollouts)) > 2  # the budget really splits the batch
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k
    assert abs(s0["entropy"] - s1["entropy"]) <= 1e-5 and abs(s0["loss"] - s1["loss"]) <= 1e-6


@pytest.mark.parametrize("packing", [True, False])
def test_token_budget_bounds_every_micro_batch(batch, packing):
    _, _, rollouts, _ = batch
    lengths = [len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts]
    for budget in (1, 30, 64):
        for rows in plan_micro_batches(GRPOConfig(max_tokens_per_micro_batch=budget, packing=packing), rollouts):
            widest = max(sum(lengths[i] for i in row) for row in rows)  # the forward's (rows, W) tensor
            assert len(rows) == 1 or len(rows) * widest <= budget
    assert micro_batch_bounds([3] * 12, 5, 0) == [(0, 5), (5, 10), (10, 12)]


def test_merged_and_unmerged_adapters_sample_the_same(batch):
    model, tok, _, _ = batch
    lora.apply_lora(model, rank=4)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(0, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp = SamplingParams(max_new_tokens=16, n=3, seed=3, temperature=1.0)
    plain = Engine(model, tok).generate([[1, 2, 3], [9, 8]], sp)
    with lora.merged(model):
        merged = Engine(model, tok).generate([[1, 2, 3], [9, 8]], sp)
    assert [[s.tokens for s in g] for g in plain] == [[s.tokens for s in g] for g in merged]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base came back exactly


def test_lora_grpo_saves_a_peft_adapter_and_resumes(tmp_path, tiny_tok, monkeypatch):
    from r1kit.stages import grpo
    # a reward with variance (the random base solves nothing): completions opening with an odd token id score 1
    monkeypatch.setattr(grpo, "rewards_of", lambda cfg, rs: torch.tensor([r.sample.tokens[0] % 2 * 1.0 for r in rs]))
    cfg = LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=256)
    base = Llama(cfg).init_weights(0, std=0.1)
    r1kit.save(base, tiny_tok, tmp_path / "base")
    common = dict(base=str(tmp_path / "base"), out_dir=str(tmp_path / "run"), task_args={"digits": 2, "train_size": 200, "test_size": 10},
                  prompts_per_step=2, group_size=4, max_new_tokens=8, lr=1e-2, kl_coef=0.04, eval_problems=2,
                  eval_every=100, save_every=1, lora_rank=4, logprob_chunk=16, grad_checkpointing=True)
    grpo.run(GRPOConfig(steps=2, **common))
    out = tmp_path / "run" / "model"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    model, _ = r1kit.load(out)
    assert lora.has_lora(model)
    base_again, _ = r1kit.load(tmp_path / "base")
    trained = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(p, dict(base_again.named_parameters())[n]) for n, p in trained.items())  # base frozen
    assert any(m.lora_B.abs().sum() > 0 for m in lora.lora_layers(model).values())  # the adapters moved
    summary = grpo.run(GRPOConfig(steps=3, **common))  # resumes from the adapter checkpoint
    assert summary["steps"] == 3
