"""The DeepSeek-V3 family in Hugging Face form: config.json translation and the tensor name map.

Lives beside hf.py (not in the model file) so models/ never import a format; hf.py imports this module
the first time a DeepseekV3ForCausalLM directory is read.
"""
from __future__ import annotations

from pathlib import Path

from r1kit.formats import hf
from r1kit.models.deepseek import DeepseekConfig, DeepseekV3

_HF_INTS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "n_routed_experts")
_HF_OPTIONAL = {  # field: (type, default when absent — transformers' defaults, i.e. V3's values)
    "n_shared_experts": (int, 1), "num_experts_per_tok": (int, 8), "n_group": (int, 8),
    "topk_group": (int, 4), "routed_scaling_factor": (float, 2.5), "norm_topk_prob": (bool, True),
    "first_k_dense_replace": (int, 3), "scoring_func": (str, "sigmoid"), "topk_method": (str, "noaux_tc"),
    "rope_interleave": (bool, True), "rms_norm_eps": (float, 1e-6), "tie_word_embeddings": (bool, False),
    "max_position_embeddings": (int, 4096)}
_R1KIT_KNOBS = {"bias_update_speed": float, "seq_aux_alpha": float, "mtp_lambda": float, "balance": str}
_KNOWN = {*_HF_INTS, *_HF_OPTIONAL, "q_lora_rank", "architectures", "rope_theta", "rope_scaling", "rope_parameters",
          "hidden_act", "attention_bias", "moe_layer_freq", "num_nextn_predict_layers", "num_mtp_layers",
          "num_key_value_heads", "head_dim", "qk_head_dim", "r1kit", "model_type", "torch_dtype", "dtype",
          "transformers_version"}


def config_from_hf(d: dict, where: str) -> DeepseekConfig:
    f = lambda k, t, default=hf.REQUIRED: hf.field(d, k, t, default, where)  # noqa: E731
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("moe_layer_freq", 1)):
        if f(key, type(want), want) != want:
            raise hf.CheckpointError(f"{where}: field '{key}' must be {want!r} for DeepseekV3ForCausalLM")
    kw = {k: f(k, int) for k in _HF_INTS}
    kw.update({k: f(k, t, default) for k, (t, default) in _HF_OPTIONAL.items()})
    kw["q_lora_rank"] = f("q_lora_rank", int, None) if "q_lora_rank" in d else 1536  # null = no compression
    kw["rope_theta"], kw["rope_scaling"] = hf.rope_from_hf(d, where)
    depth = f("num_nextn_predict_layers", int, f("num_mtp_layers", int, 0))
    if depth and not _has_mtp_tensors(Path(where).parent, kw["num_hidden_layers"]):
        depth = 0  # transformers writes num_nextn_predict_layers=1 but saves no MTP weights
    knobs = hf.field(d, "r1kit", dict, {}, where)
    kw.update({k: hf.field(knobs, k, t, default=hf.REQUIRED, where=f"{where} r1kit")
               for k, t in _R1KIT_KNOBS.items() if k in knobs})
    try:
        return DeepseekConfig(**kw, num_nextn_predict_layers=depth,
                              extra={k: v for k, v in d.items() if k not in _KNOWN})
    except ValueError as e:
        raise hf.CheckpointError(f"{where}: {e}") from None


def _has_mtp_tensors(path: Path, n_layers: int) -> bool:
    """Whether the checkpoint next to config.json holds MTP depth 1 (True when there are no weights to ask)."""
    try:
        return f"model.layers.{n_layers}.eh_proj.weight" in hf.tensor_files(path)
    except hf.CheckpointError:
        return True


def config_to_hf(c: DeepseekConfig) -> dict:
    d = {"architectures": [c.architecture], "model_type": "deepseek_v3",
         **{k: getattr(c, k) for k in (*_HF_INTS, *_HF_OPTIONAL, "q_lora_rank")},
         "num_key_value_heads": c.num_attention_heads,  # MLA has no KV groups; HF's attention reads this
         "num_nextn_predict_layers": c.num_nextn_predict_layers, "hidden_act": "silu", "attention_bias": False,
         "moe_layer_freq": 1, **hf.rope_to_hf(c.rope_theta, c.rope_scaling),
         "r1kit": {k: getattr(c, k) for k in _R1KIT_KNOBS}}
    return {**{k: v for k, v in c.extra.items() if k not in d}, **d}


_ATTN = [("attn.wq", "self_attn.q_proj"), ("attn.wq_a", "self_attn.q_a_proj"),
         ("attn.q_norm", "self_attn.q_a_layernorm"), ("attn.wq_b", "self_attn.q_b_proj"),
         ("attn.wkv_a", "self_attn.kv_a_proj_with_mqa"), ("attn.kv_norm", "self_attn.kv_a_layernorm"),
         ("attn.wkv_b", "self_attn.kv_b_proj"), ("attn.wo", "self_attn.o_proj"),
         ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]
_SWIGLU = [("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")]
_MTP = [("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"), ("head_norm", "shared_head.norm"),
        ("embed", "embed_tokens"), ("head", "shared_head.head")]
NAME_MAP = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
            ("head.weight", "lm_head.weight"),
            *[(f"layers.{{i}}.{a}.weight", f"model.layers.{{i}}.{b}.weight") for a, b in _ATTN],
            *[(f"layers.{{i}}.ffn.{a}.weight", f"model.layers.{{i}}.mlp.{b}.weight") for a, b in _SWIGLU],
            ("layers.{i}.ffn.gate.weight", "model.layers.{i}.mlp.gate.weight"),
            ("layers.{i}.ffn.gate.e_score_correction_bias", "model.layers.{i}.mlp.gate.e_score_correction_bias"),
            *[(f"layers.{{i}}.ffn.experts.{{e}}.{a}.weight", f"model.layers.{{i}}.mlp.experts.{{e}}.{b}.weight")
              for a, b in _SWIGLU],
            *[(f"layers.{{i}}.ffn.shared_experts.{a}.weight", f"model.layers.{{i}}.mlp.shared_experts.{b}.weight")
              for a, b in _SWIGLU],
            *[(f"layers.{{i}}.{a}.weight", f"model.layers.{{i}}.{b}.weight") for a, b in _MTP]]


hf.register(hf.Family("DeepseekV3ForCausalLM", "deepseek_v3", config_from_hf, config_to_hf, NAME_MAP, DeepseekV3))
