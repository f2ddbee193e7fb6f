"""Tiny models built in code for the tests of both families (no transformers needed)."""
import torch

from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
from r1kit.models.llama import Llama, LlamaConfig

FAMILIES = {
    "llama3": dict(architecture="LlamaForCausalLM", max_position_embeddings=512,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=24),
}


def make_model(family, seed=0):
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **FAMILIES[family])
    m = Llama(cfg).init_weights(seed=seed, std=0.1)
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        g = torch.Generator().manual_seed(seed + 1)
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


def tiny(**kw) -> DeepseekConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64)
    return DeepseekConfig(**{**base, **kw})


def build(cfg, seed=0, std=0.2, attn_impl="absorb") -> DeepseekV3:
    torch.manual_seed(seed)
    m = DeepseekV3(cfg, attn_impl).init_weights(seed, std)
    for g in m.gates():  # a non-zero bias, so selection and weighting visibly differ
        g.e_score_correction_bias.normal_(0, 0.1)
    return m.eval()
