"""The GRPO-family switches wired end to end: a short run with every new kind of option on at once."""
import json

import torch

from r1kit.stages import grpo


def test_new_loss_advantage_corrections_and_routing_replay_run_and_log(tmp_path, monkeypatch):
    from r1kit.stages import pretrain
    from r1kit.training import ModelSpec

    spec = ModelSpec(arch="deepseek", config=dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=128))
    pretrain.run(pretrain.PretrainConfig(out_dir=str(tmp_path / "base"), model=spec, steps=4, batch_size=8,
                                         save_every=4, eval_problems=4, max_new_tokens=16))
    # a from-scratch model earns no reward: random reward parts give the estimator something to normalise
    monkeypatch.setattr(grpo, "reward_parts_of", lambda cfg, task, rollouts: (torch.rand(len(rollouts), 2),
                                                                              torch.tensor([1.0, 0.1])))
    cfg = grpo.GRPOConfig(base=str(tmp_path / "base"), out_dir=str(tmp_path / "grpo"), steps=2, prompts_per_step=2,
                          group_size=4, max_new_tokens=12, eval_problems=4, mu=2, loss="sapo", advantage="gdpo",
                          corrections=["tis", "icepop", "offpolicy_seq_mask"], entropy_top_frac=0.2,
                          routing_replay="rollout")
    summary = grpo.run(cfg)
    assert summary["steps"] == 2 and "stopped" not in summary
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    for key in ("mismatch_abs_logp", "tis_clip_frac", "icepop_mask_frac", "seqmask_frac", "entropy_threshold",
                "gate_weight_mean", "routing_disagreement"):
        assert all(key in r for r in rows), key
    # the engine's and the trainer's fp32 log-probs of the same tokens agree closely on CPU
    assert all(0 <= r["mismatch_abs_logp"] < 1e-3 for r in rows)
    assert all(0 <= r["routing_disagreement"] <= 1 for r in rows)


def test_target_accuracy_stops_the_run_at_the_first_evaluation_that_reaches_it(tmp_path, monkeypatch):
    from r1kit.stages import pretrain
    from r1kit.training import ModelSpec

    spec = ModelSpec(arch="llama", config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, max_position_embeddings=128))
    pretrain.run(pretrain.PretrainConfig(out_dir=str(tmp_path / "base"), model=spec, steps=2, batch_size=8,
                                         save_every=2, eval_problems=4, max_new_tokens=16))
    scores = iter([0.0, 0.5, 0.97, 1.0])  # the base, then evaluations after steps 2, 4, ...
    monkeypatch.setattr(grpo, "greedy_accuracy", lambda *a, **k: next(scores))
    cfg = grpo.GRPOConfig(base=str(tmp_path / "base"), out_dir=str(tmp_path / "grpo"), steps=10, prompts_per_step=2,
                          group_size=2, max_new_tokens=8, eval_every=2, eval_problems=4, target_accuracy=0.95)
    summary = grpo.run(cfg)
    assert summary["steps"] == 4 and summary["final_accuracy"] == 1.0
