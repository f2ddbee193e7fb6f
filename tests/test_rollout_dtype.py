"""grpo.rollout_dtype: rollouts sample a copy of the fp32 master weights in another dtype (bf16 on a GPU),
refreshed before each draw; the trainer's weights, optimizer and log-probs stay fp32."""
import json

import pytest
import torch

import r1kit
from r1kit.config import ConfigError, load_config
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.stages import grpo
from r1kit.stages.grpo_async import PolicyCopy

from model_fixtures import build, make_model, tiny


def test_a_bf16_copy_follows_trained_weights_and_buffers_and_keeps_its_fp32_parts():
    live = build(tiny())  # DeepSeek: router biases are buffers that stay fp32 in a bf16 model
    live.layers[0].attn_norm.weight.requires_grad_(False)  # a frozen parameter: copied once, never synced
    c = PolicyCopy(live, torch.bfloat16)
    assert c.cast and c.module.embed.weight.dtype == torch.bfloat16 and c.module.inv_freq.dtype == torch.float32
    assert all(g.e_score_correction_bias.dtype == torch.float32 for g in c.module.gates())
    with torch.no_grad():
        live.embed.weight.add_(0.5)
        live.gates()[0].e_score_correction_bias.add_(0.25)
        live.layers[0].attn_norm.weight.add_(1.0)
    c.sync()
    assert torch.equal(c.module.embed.weight, live.embed.weight.to(torch.bfloat16))
    assert torch.equal(c.module.gates()[0].e_score_correction_bias, live.gates()[0].e_score_correction_bias)
    assert not torch.equal(c.module.layers[0].attn_norm.weight.float(), live.layers[0].attn_norm.weight)
    assert live.embed.weight.dtype == torch.float32 and not any(p.requires_grad for p in c.module.parameters())
    same = PolicyCopy(make_model("llama3"))  # no dtype: a snapshot in the policy's own
    assert not same.cast and same.module.embed.weight.dtype == torch.float32


def _cfg(tmp_path, tiny_tok, *extra):
    cfg = LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=256)
    if not (tmp_path / "base").exists():
        r1kit.save(Llama(cfg).init_weights(0), tiny_tok, tmp_path / "base")
    return load_config(grpo.GRPOConfig, None, [
        f"grpo.base={json.dumps(str(tmp_path / 'base'))}", "task=\"arithmetic\"",
        "task_args={digits = 2, train_size = 50, test_size = 4, require_think = false}", "steps=2",
        "prompts_per_step=3", "group_size=4", "max_new_tokens=12", "eval_every=2", "eval_problems=4",
        "save_every=100", "device=\"cpu\"", *extra], section="grpo")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_bf16_rollouts_of_an_fp32_policy(tmp_path, tiny_tok, monkeypatch, mode):
    """The engine samples a bf16 copy (its log-probs then sit a bf16 rounding away from the trainer's, which
    mismatch_abs_logp shows) that follows every update — in async mode its snapshot, the in-line first draw
    included; the trained checkpoint stays fp32."""
    monkeypatch.setattr(grpo, "rewards_of", lambda cfg, rollouts: (torch.arange(len(rollouts)) % 2) * 1.0)
    sampled = []
    real = grpo.rollout

    def spy(model, tok, task, problems, params, engine=None, *a, **kw):
        sampled.append((engine.model.embed.weight.dtype, engine.model.embed.weight.float().clone()))
        return real(model, tok, task, problems, params, engine, *a, **kw)

    monkeypatch.setattr(grpo, "rollout", spy)
    mismatch = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{mode}-{dtype}"
        # async: step s + 1 samples θ_s, so steps 0 and 1 both sample θ_0 and a third step shows the refresh
        extra = ["async=true", "corrections=[\"tis\"]", "steps=3"] if mode == "async" else []
        grpo.run(_cfg(tmp_path, tiny_tok, f"out_dir={json.dumps(str(out))}", f"rollout_dtype=\"{dtype}\"", *extra))
        m = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        mismatch[dtype] = max(x["mismatch_abs_logp"] for x in m)
        saved = r1kit.load(out / "model")[0]
        assert saved.embed.weight.dtype == torch.float32
    if mode == "sync":  # (async's samples are also a step stale: their mismatch is not the dtype's alone)
        assert mismatch["float32"] < 1e-5 < 1e-4 < mismatch["bfloat16"] < 0.1
    bf16 = sampled[len(sampled) // 2:]  # the bf16 run's draws: every one from a bf16 copy …
    assert len(bf16) == (2 if mode == "sync" else 3) and all(d == torch.bfloat16 for d, _ in bf16)
    assert not torch.equal(bf16[0][1], bf16[-1][1])  # … refreshed after the first step's update


def test_rollout_dtype_resolves_and_refuses_by_name(tmp_path, tiny_tok):
    model = make_model("llama3")
    cpu = torch.device("cpu")
    assert grpo.rollout_dtype(_cfg(tmp_path, tiny_tok), model, cpu) is None  # auto on a CPU: fp32, the policy's own
    assert grpo.rollout_dtype(_cfg(tmp_path, tiny_tok, "dtype=\"bfloat16\""), model, cpu) == torch.bfloat16
    assert grpo.rollout_dtype(_cfg(tmp_path, tiny_tok, "dtype=\"bfloat16\"", "lora_rank=4"), model, cpu) is None
    with pytest.raises(ConfigError, match="grpo.rollout_dtype = 'bf16'; choose auto, float32, bfloat16"):
        _cfg(tmp_path, tiny_tok, "rollout_dtype=\"bf16\"")
    with pytest.raises(ConfigError, match="grpo.rollout_dtype: with lora_rank"):
        _cfg(tmp_path, tiny_tok, "rollout_dtype=\"bfloat16\"", "lora_rank=4")
