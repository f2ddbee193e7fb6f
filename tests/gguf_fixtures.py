"""Tiny random F32 GGUF models (llama, qwen2, qwen3, deepseek2) written straight with GGUFWriter.

Only what llama.cpp's quantizer reads is there: architecture hyper-parameters, a minimal
byte-level tokenizer, and tensors named and shaped as llama.cpp expects. Used by
tests/test_quants.py and bench/quantize.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGUFWriter


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    hidden: int = 256
    ffn: int = 512
    vocab: int = 320
    n_layer: int = 2
    n_head: int = 4
    n_kv: int = 2
    tied: bool = False
    n_expert: int = 0  # deepseek2 only: routed experts per MoE layer
    expert_ffn: int = 256
    lora: int = 256  # deepseek2 only: q and kv LoRA ranks
    seed: int = 0


def _hparams(w: GGUFWriter, s: TinySpec) -> None:
    w.add_context_length(256)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(s.hidden // s.n_head)
    w.add_vocab_size(s.vocab)
    w.add_file_type(0)
    if s.arch == "deepseek2":
        a = s.arch
        w.add_uint32(f"{a}.leading_dense_block_count", 1)
        w.add_uint32(f"{a}.attention.q_lora_rank", s.lora)
        w.add_uint32(f"{a}.attention.kv_lora_rank", s.lora)
        w.add_uint32(f"{a}.expert_feed_forward_length", s.expert_ffn)
        w.add_uint32(f"{a}.expert_count", s.n_expert)
        w.add_uint32(f"{a}.expert_used_count", 2)
        w.add_uint32(f"{a}.expert_shared_count", 1)


def _tokenizer(w: GGUFWriter, s: TinySpec) -> None:
    # GPT-2 style byte-level vocabulary: unique printable symbols are all llama.cpp checks
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([chr(0x100 + i) for i in range(s.vocab)])
    w.add_token_types([1] * s.vocab)


def _layer_tensors(s: TinySpec, i: int) -> list[tuple[str, tuple[int, ...]]]:
    h, hd = s.hidden, s.hidden // s.n_head
    p = f"blk.{i}."
    out = [(p + "attn_norm.weight", (h,)), (p + "ffn_norm.weight", (h,))]
    if s.arch == "deepseek2":
        out += [(p + "attn_q_a_norm.weight", (s.lora,)), (p + "attn_kv_a_norm.weight", (s.lora,)),
                (p + "attn_q_a.weight", (s.lora, h)), (p + "attn_q_b.weight", (s.n_head * hd, s.lora)),
                (p + "attn_kv_a_mqa.weight", (s.lora + 64, h)),
                (p + "attn_kv_b.weight", (2 * s.n_head * hd, s.lora)),
                (p + "attn_output.weight", (h, s.n_head * hd))]
    else:
        out += [(p + "attn_q.weight", (s.n_head * hd, h)), (p + "attn_k.weight", (s.n_kv * hd, h)),
                (p + "attn_v.weight", (s.n_kv * hd, h)), (p + "attn_output.weight", (h, s.n_head * hd))]
    if s.arch == "qwen2":
        out += [(p + "attn_q.bias", (s.n_head * hd,)), (p + "attn_k.bias", (s.n_kv * hd,)),
                (p + "attn_v.bias", (s.n_kv * hd,))]
    if s.arch == "qwen3":
        out += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
    if s.arch == "deepseek2" and i > 0:
        e, f = s.n_expert, s.expert_ffn
        out += [(p + "ffn_gate_inp.weight", (e, h)), (p + "exp_probs_b.bias", (e,)),
                (p + "ffn_gate_exps.weight", (e, f, h)), (p + "ffn_up_exps.weight", (e, f, h)),
                (p + "ffn_down_exps.weight", (e, h, f)), (p + "ffn_gate_shexp.weight", (f, h)),
                (p + "ffn_up_shexp.weight", (f, h)), (p + "ffn_down_shexp.weight", (h, f))]
    else:
        out += [(p + "ffn_gate.weight", (s.ffn, h)), (p + "ffn_up.weight", (s.ffn, h)),
                (p + "ffn_down.weight", (h, s.ffn))]
    return out


def tensor_specs(s: TinySpec) -> list[tuple[str, tuple[int, ...]]]:
    specs = [("token_embd.weight", (s.vocab, s.hidden)), ("output_norm.weight", (s.hidden,))]
    if not s.tied:
        specs.append(("output.weight", (s.vocab, s.hidden)))
    for i in range(s.n_layer):
        specs += _layer_tensors(s, i)
    return specs


def write_tiny_gguf(path, spec: TinySpec) -> None:
    """Write a random F32 model. Weights are Gaussian with a few heavy-tailed rows and an
    all-zero row, so the quantizers' edge paths are exercised too."""
    rng = np.random.default_rng(spec.seed)
    w = GGUFWriter(str(path), spec.arch)
    _hparams(w, spec)
    _tokenizer(w, spec)
    for name, shape in tensor_specs(spec):
        if len(shape) == 1:
            data = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            data = rng.standard_normal(shape) * 0.05
            rows = data.reshape(-1, shape[-1])
            rows[0] = 0.0
            rows[1 % len(rows)] *= np.exp(rng.standard_normal(shape[-1]))
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
