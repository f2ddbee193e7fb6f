"""Training planner: parameter counts, memory parts, and the cost line against DeepSeek-V3's report."""
import pytest

from r1kit import plan, plan_train as pt


def resolve(name):
    return plan.resolve_config(name)


def test_deepseek_v3_report_reproduced():
    name, cfg, where = resolve("deepseek-v3")
    c = pt.count_params(*pt.build_meta(cfg, where))
    assert 660e9 < c.total < 680e9 and 36e9 < c.active < 38e9  # the paper: 671 B total, 37 B activated
    k = pt.train_cost(c.active, 14.8e12, 2048, "h800", 0.33, 2.0)
    # DeepSeek-V3 technical report: 2.788 M H800 GPU-hours, $5.576 M at $2 per GPU-hour
    assert abs(k.gpu_hours / 2.788e6 - 1) <= 0.15 and abs(k.dollars / 5.576e6 - 1) <= 0.15
    assert abs(k.days - 2.788e6 / 2048 / 24) / (2.788e6 / 2048 / 24) <= 0.15  # ≈ 57 days
    assert "6·N·D" in k.assumptions and "MFU 0.33" in k.assumptions


@pytest.mark.parametrize("name", ["qwen2.5-1.5b", "tiny-deepseek"])
def test_sampled_layers_count_like_the_whole_model(name):
    if name == "tiny-deepseek":
        cfg = {**plan.DEEPSEEK_V3, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 16,
               "num_hidden_layers": 6, "num_attention_heads": 4, "n_routed_experts": 16, "vocab_size": 300,
               "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
               "num_nextn_predict_layers": 1}
        where = "tiny"
    else:
        _, cfg, where = resolve(name)
    sampled = pt.count_params(*pt.build_meta(cfg, where))
    whole = pt.count_params(*pt.build_meta(cfg, where, sample_layers=False))
    assert sampled == whole


def test_lora_counts_and_memory_parts():
    name, cfg, where = resolve("qwen2.5-1.5b")
    full = pt.plan_training(name, cfg, where, pt.TrainSetup(seq=512, rows=4))
    small = pt.plan_training(name, cfg, where, pt.TrainSetup(seq=512, rows=4, lora_rank=16, grad_checkpointing=True,
                                                              chunk=256, base_dtype="bf16"))
    c = full.counts
    assert c.trainable == c.total and full.parts["optimizer"] == 8 * c.total and full.parts["grads"] == 4 * c.total
    # LoRA r on every q/k/v/o/gate/up/down: r·(in + out) per wrapped linear, 28 layers
    d, f, kv = 1536, 8960, 2 * 128
    per_layer = 16 * ((d + d) + (d + kv) * 2 + (d + d) + 2 * (d + f) + (f + d))
    assert small.counts.lora == small.counts.trainable == 28 * per_layer
    assert small.parts["logits"] == 2 * 4 * 151936 * 256
    assert small.parts["activations"] < full.parts["activations"] / 5
    assert small.peak < full.peak / 4


def test_bad_planner_input_names_the_option():
    name, cfg, where = resolve("qwen2.5-1.5b")
    with pytest.raises(pt.PlanError, match="--train"):
        pt.plan_training(name, cfg, where, pt.TrainSetup(stage="rlhf"))
    with pytest.raises(pt.PlanError, match="--gpu 'tpu'"):
        pt.train_cost(1e9, 1e12, 8, "tpu", 0.4, 2)
    with pytest.raises(pt.PlanError, match="--mfu"):
        pt.train_cost(1e9, 1e12, 8, "h100", 1.5, 2)


def test_a_rollout_copy_of_the_weights_counts_for_the_whole_step():
    """grpo.rollout_dtype keeps a second copy of the weights all run long (not only while generating)."""
    name, cfg, where = resolve("qwen2.5-1.5b")
    plain = pt.plan_training(name, cfg, where, pt.TrainSetup(seq=512, rows=4))
    bf16 = pt.plan_training(name, cfg, where, pt.TrainSetup(seq=512, rows=4, rollout_dtype="bf16"))
    assert bf16.parts["rollout weights"] == 2 * bf16.counts.total
    assert bf16.peak - plain.peak == bf16.parts["rollout weights"]
    lora = pt.plan_training(name, cfg, where, pt.TrainSetup(seq=512, rows=4, lora_rank=8, rollout_dtype="bf16"))
    assert "rollout weights" not in lora.parts  # LoRA samples its own (bf16) base: no copy
    with pytest.raises(pt.PlanError, match="--rollout-dtype must be one of"):
        pt.plan_training(name, cfg, where, pt.TrainSetup(rollout_dtype="int8"))
