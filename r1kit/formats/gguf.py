"""GGUF export: r1kit models → files that llama.cpp loads, in F32/F16 or a quantized mix.

One function does the work, `export_gguf(model, tokenizer, out_path, quant)`:

  1. the architecture spec (`ARCHS`) gives llama.cpp's architecture name, the explicit name-map
     table (r1kit parameter → GGUF tensor) and the hyper-parameter keys llama.cpp reads;
  2. the tokenizer becomes GGUF vocabulary metadata: byte-level BPE tokens, merges, token types,
     special ids, the llama.cpp pre-tokenizer recognised from the split regex, the chat template;
  3. each tensor's type comes from quants.plan_types — llama.cpp's own per-tensor rules for the
     mix — and its bytes from quants.quantize, so a Q4_K_M export equals what
     `llama-quantize` makes of our F32 export, tensor for tensor;
  4. the file is written to a temporary sibling and renamed into place: an error never leaves
     a partial file behind.

Layout facts that are easy to get wrong (learned from llama.cpp's loader, not copied):
  * Hugging Face stores each head's rotary pairs as (i, i + D/2). llama.cpp's `llama` arch
    rotates adjacent pairs (2i, 2i+1) ("normal" RoPE), so q/k rows (and biases) are interleaved
    per head on export. `qwen2`/`qwen3` use NEOX RoPE, which is the HF layout: no change.
  * Llama 3.1's rope scaling is not a metadata key: llama.cpp divides each frequency by the
    matching entry of a `rope_freqs.weight` tensor, which we compute from the config.
  * Tied embeddings: no `output.weight`; llama.cpp then uses token_embd as the output matrix.
  * A GGUF tensor's NumPy shape is (ne[n-1], ..., ne[0]), so a torch Linear weight (out, in)
    is written as is.
  * deepseek2 (DeepSeek-V3): llama.cpp runs absorbed MLA as multi-query attention over a latent
    cache ([c_kv | k_pe] per token, head_count_kv = 1), so wkv_b is written split per head into
    attn_k_b (W_UKᵀ) and attn_v_b (W_UV); routed experts are stacked into one 3-D tensor per
    projection; MTP depths are left out (llama.cpp runs the main model). DeepSeek checkpoints
    already store RoPE dims as adjacent pairs, llama.cpp's layout.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from r1kit.common import require
require("gguf", "GGUF export")  # one line naming the extra when it is missing
from gguf import (GGML_QUANT_SIZES, ExpertGatingFuncType, GGMLQuantizationType as QT, GGUFWriter, RopeScalingType,
                  TokenType)

from r1kit.common import umask_mode
from r1kit.formats import quants
from r1kit.tokenizer import QWEN2_SPLIT, STYLES, Tokenizer

GGML_QUANT_VERSION = 2  # what llama.cpp's quantizer writes to general.quantization_version


class GGUFExportError(ValueError):
    """The model, tokenizer or output path cannot be exported; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Name maps: (r1kit parameter template, GGUF tensor template); "{i}" is the layer index
# ---------------------------------------------------------------------------------------------
DENSE_GGUF_MAP = [
    ("embed.weight", "token_embd.weight"),
    ("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.attn.wq.weight", "blk.{i}.attn_q.weight"),
    ("layers.{i}.attn.wq.bias", "blk.{i}.attn_q.bias"),
    ("layers.{i}.attn.wk.weight", "blk.{i}.attn_k.weight"),
    ("layers.{i}.attn.wk.bias", "blk.{i}.attn_k.bias"),
    ("layers.{i}.attn.wv.weight", "blk.{i}.attn_v.weight"),
    ("layers.{i}.attn.wv.bias", "blk.{i}.attn_v.bias"),
    ("layers.{i}.attn.wo.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.attn.wo.bias", "blk.{i}.attn_output.bias"),
    ("layers.{i}.attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("layers.{i}.attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    ("layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.ffn.w1.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.ffn.w2.weight", "blk.{i}.ffn_down.weight"),
    ("layers.{i}.ffn.w3.weight", "blk.{i}.ffn_up.weight"),
    ("norm.weight", "output_norm.weight"),
    ("head.weight", "output.weight"),
]


@dataclass
class TensorSrc:
    """One tensor to write: GGUF name, NumPy shape, and how to get its float32 values."""
    name: str
    shape: tuple[int, ...]
    values: Callable[[], np.ndarray]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, reorder rows (i, i + D/2) → (2i, 2i+1): HF's rotary layout → llama.cpp's `llama`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # llama.cpp's LLM_ARCH name, written to general.architecture
    name_map: list[tuple[str, str]]
    check: Callable  # (config) → None, raises GGUFExportError for what llama.cpp cannot run
    hparams: Callable  # (GGUFWriter, config) → None
    tensors: Callable  # (model, spec) → list[TensorSrc]
    info: Callable  # (config, tensor names) → quants.ArchInfo for the type rules
    permute_qk: bool = False


def _check_dense(arch: str) -> Callable:
    def check(c) -> None:
        if arch == "qwen2" and c.head_dim * c.num_attention_heads != c.hidden_size:
            raise GGUFExportError(f"qwen2 in llama.cpp needs head_dim × heads = hidden_size, got "
                                  f"{c.head_dim} × {c.num_attention_heads} ≠ {c.hidden_size}")
        if c.o_bias and arch != "llama":
            raise GGUFExportError(f"llama.cpp's {arch} has no attention output bias (attn_output.bias)")
        if c.qk_norm and arch != "qwen3":
            raise GGUFExportError(f"llama.cpp's {arch} has no QK-norm (attn_q_norm/attn_k_norm); use Qwen3")
        kind = _rope_kind(c)
        if kind not in ("default", "linear", "llama3") or (kind == "llama3" and arch != "llama"):
            raise GGUFExportError(f"rope_scaling type {kind!r} cannot be exported for {arch} "
                                  "(supported: default, linear; llama3 for Llama)")
    return check


def _rope_kind(c) -> str:
    s = c.rope_scaling or {}
    return s.get("rope_type", s.get("type", "default"))


def _dense_hparams(w: GGUFWriter, c) -> None:
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    if _rope_kind(c) == "linear":  # llama.cpp multiplies positions by 1/factor
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))


def llama3_rope_factors(c) -> np.ndarray:
    """Per frequency, how much Llama 3.1 scaling slows it down: default / scaled (≥ 1).

    llama.cpp rotates by pos · base^(-2i/D) / factor[i], so this reproduces the scaled table.
    """
    from r1kit.models.llama import rope_inv_freq
    d = c.head_dim
    base = 1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    return (base / rope_inv_freq(c).double().numpy()).astype(np.float32)


def _dense_tensors(model, spec: ArchSpec) -> list[TensorSrc]:
    c = model.config
    out = []
    if _rope_kind(c) == "llama3":
        out.append(TensorSrc("rope_freqs.weight", (c.head_dim // 2,), lambda: llama3_rope_factors(c)))
    for pname, p in model.state_dict().items():
        if pname == "head.weight" and c.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        gname = gguf_name(pname, spec)
        heads = _rotary_heads(gname, c) if spec.permute_qk else None
        out.append(TensorSrc(gname, tuple(p.shape), _values(p, heads)))
    return out


def _rotary_heads(gname: str, c) -> int | None:
    """Head count of a q/k projection (weight or bias) whose rows RoPE rotates, else None."""
    parts = gname.split(".")
    if len(parts) == 4 and parts[2] == "attn_q":
        return c.num_attention_heads
    if len(parts) == 4 and parts[2] == "attn_k":
        return c.num_key_value_heads
    return None


def _values(p: torch.Tensor, permute_heads: int | None) -> Callable[[], np.ndarray]:
    def get() -> np.ndarray:
        x = to_numpy(p)
        return interleave_rope_rows(x, permute_heads) if permute_heads else x
    return get


def _dense_info(c, names: list[str], arch: str) -> quants.ArchInfo:
    return quants.ArchInfo(arch=arch, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                           n_head_kv=c.num_key_value_heads, tied_embeddings="output.weight" not in names)


def _dense_spec(arch: str, permute: bool) -> ArchSpec:
    return ArchSpec(arch, DENSE_GGUF_MAP, _check_dense(arch), _dense_hparams, _dense_tensors,
                    lambda c, names: _dense_info(c, names, arch), permute_qk=permute)


# ---------------------------------------------------------------------------------------------
# deepseek2: DeepSeek-V3 (MLA + MoE) as llama.cpp runs it — absorbed MLA over a latent cache
# ---------------------------------------------------------------------------------------------
_SWIGLU = (("w1", "gate"), ("w2", "down"), ("w3", "up"))
DEEPSEEK2_GGUF_MAP = [
    ("embed.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight"), ("head.weight", "output.weight"),
    ("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.attn.wq.weight", "blk.{i}.attn_q.weight"),  # no query compression (V2-Lite style)
    ("layers.{i}.attn.wq_a.weight", "blk.{i}.attn_q_a.weight"),
    ("layers.{i}.attn.q_norm.weight", "blk.{i}.attn_q_a_norm.weight"),
    ("layers.{i}.attn.wq_b.weight", "blk.{i}.attn_q_b.weight"),
    ("layers.{i}.attn.wkv_a.weight", "blk.{i}.attn_kv_a_mqa.weight"),
    ("layers.{i}.attn.kv_norm.weight", "blk.{i}.attn_kv_a_norm.weight"),
    ("layers.{i}.attn.wkv_b.weight", "blk.{i}.attn_kv_b.weight"),  # written split: attn_k_b + attn_v_b
    ("layers.{i}.attn.wo.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.ffn.gate.weight", "blk.{i}.ffn_gate_inp.weight"),
    ("layers.{i}.ffn.gate.e_score_correction_bias", "blk.{i}.exp_probs_b.bias"),
    *[(f"layers.{{i}}.ffn.{w}.weight", f"blk.{{i}}.ffn_{g}.weight") for w, g in _SWIGLU],  # dense layers
    *[(f"layers.{{i}}.ffn.experts.{{e}}.{w}.weight", f"blk.{{i}}.ffn_{g}_exps.weight") for w, g in _SWIGLU],
    *[(f"layers.{{i}}.ffn.shared_experts.{w}.weight", f"blk.{{i}}.ffn_{g}_shexp.weight") for w, g in _SWIGLU],
]


def _check_deepseek(c) -> None:
    if not c.n_shared_experts:
        raise GGUFExportError("llama.cpp's deepseek2 needs shared experts (n_shared_experts ≥ 1)")
    s = c.rope_scaling or {}
    if s.get("rope_type", "default") == "yarn":
        # llama.cpp derives both YaRN scales from one number (mscale_all_dim); HF's formula agrees
        # with it only when mscale == mscale_all_dim (DeepSeek-V3: both 1.0)
        if not s.get("mscale_all_dim") or s.get("mscale") != s.get("mscale_all_dim") or s.get("attention_factor") \
                or not s.get("truncate", True):
            raise GGUFExportError("YaRN rope_scaling is exported only with mscale == mscale_all_dim, no "
                                  "attention_factor and truncate=true (DeepSeek-V3's form); llama.cpp would "
                                  f"scale attention differently for {s}")


def _deepseek_hparams(w: GGUFWriter, c) -> None:
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)  # MTP blocks are not exported
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)  # absorbed MLA is multi-query attention over one latent "head"
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)  # cached key: [c_kv | k_pe]
    w.add_value_length(c.kv_lora_rank)  # value: c_kv, read from the same cache
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)  # per-head sizes once decompressed
    w.add_value_length_mla(c.v_head_dim)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_q_lora_rank(c.q_lora_rank or 0)
    w.add_kv_lora_rank(c.kv_lora_rank)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_weights_scale(float(c.routed_scaling_factor))
    w.add_expert_weights_norm(bool(c.norm_topk_prob))
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    if c.n_group > 1:
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.topk_group)
    s = c.rope_scaling or {}
    if s.get("rope_type", "default") == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        old_ctx = int(s["original_max_position_embeddings"])
        w.add_rope_scaling_factor(float(s.get("factor") or c.max_position_embeddings / old_ctx))
        w.add_rope_scaling_orig_ctx_len(old_ctx)
        w.add_rope_scaling_yarn_log_mul(0.1 * float(s["mscale_all_dim"]))  # llama.cpp divides by 0.1 again
        w.add_rope_scaling_yarn_beta_fast(float(s.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(s.get("beta_slow") or 1))


def _deepseek_tensors(model, spec: ArchSpec) -> list[TensorSrc]:
    c, out, experts = model.config, [], {}
    for pname, p in model.state_dict().items():
        layer = re.match(r"layers\.(\d+)\.", pname)
        if layer and int(layer.group(1)) >= c.num_hidden_layers:
            continue  # MTP depths: a training / speculation aid, not part of llama.cpp's deepseek2 graph
        if pname == "head.weight" and c.tie_word_embeddings:
            continue
        gname, e = map_name(pname, spec)
        if e is not None:
            experts.setdefault(gname, {})[e] = p
        elif gname.endswith(".attn_kv_b.weight"):
            out += _split_kv_b(gname, p, c)
        else:
            out.append(TensorSrc(gname, tuple(p.shape), _deepseek_values(gname, p, c)))
    for gname, by_e in experts.items():
        if sorted(by_e) != list(range(c.n_routed_experts)):
            raise GGUFExportError(f"{gname}: experts {sorted(by_e)} do not cover 0..{c.n_routed_experts - 1}")
        ws = [by_e[e] for e in range(c.n_routed_experts)]
        out.append(TensorSrc(gname, (len(ws), *ws[0].shape), lambda ws=ws: np.stack([to_numpy(w) for w in ws])))
    return out


def _split_kv_b(gname: str, p: torch.Tensor, c) -> list[TensorSrc]:
    """wkv_b (H·(d_nope + d_v), r) → attn_k_b (H, r, d_nope) = W_UKᵀ per head, attn_v_b (H, d_v, r) = W_UV."""
    H, nope, v, r = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    per_head = lambda: to_numpy(p).reshape(H, nope + v, r)  # noqa: E731
    base = gname.removesuffix("attn_kv_b.weight")
    k_b = lambda: np.ascontiguousarray(per_head()[:, :nope].swapaxes(1, 2))  # noqa: E731
    v_b = lambda: np.ascontiguousarray(per_head()[:, nope:])  # noqa: E731
    return [TensorSrc(base + "attn_k_b.weight", (H, r, nope), k_b), TensorSrc(base + "attn_v_b.weight", (H, v, r), v_b)]


def _deepseek_values(gname: str, p: torch.Tensor, c) -> Callable[[], np.ndarray]:
    """DeepSeek checkpoints keep RoPE dims as adjacent pairs, llama.cpp's layout; half-split ones
    (rope_interleave=false) are reordered — the query's rope slice of each head, the key's tail."""
    kind = gname.split(".")[-2]
    if c.rope_interleave or kind not in ("attn_q", "attn_q_b", "attn_kv_a_mqa"):
        return lambda: to_numpy(p)
    rope = c.qk_rope_head_dim

    def get() -> np.ndarray:
        x = to_numpy(p).copy()  # to_numpy may share the parameter's memory: never edit it in place
        if kind == "attn_kv_a_mqa":
            x[c.kv_lora_rank:] = interleave_rope_rows(x[c.kv_lora_rank:], 1)
            return x
        heads = x.reshape(c.num_attention_heads, c.qk_head_dim, -1)  # a view into x
        for h in heads:
            h[c.qk_head_dim - rope:] = interleave_rope_rows(h[c.qk_head_dim - rope:], 1)
        return x
    return get


def _deepseek_info(c, names: list[str]) -> quants.ArchInfo:
    return quants.ArchInfo(arch="deepseek2", n_layer=c.num_hidden_layers, n_expert=c.n_routed_experts,
                           n_head=c.num_attention_heads, n_head_kv=1, tied_embeddings="output.weight" not in names)


ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _dense_spec("llama", permute=True),
    "Qwen2ForCausalLM": _dense_spec("qwen2", permute=False),
    "Qwen3ForCausalLM": _dense_spec("qwen3", permute=False),
    "DeepseekV3ForCausalLM": ArchSpec("deepseek2", DEEPSEEK2_GGUF_MAP, _check_deepseek, _deepseek_hparams,
                                      _deepseek_tensors, _deepseek_info),
}


def arch_spec(architecture: str) -> ArchSpec:
    if architecture not in ARCHS:
        known = ", ".join(f"{a} ({s.gguf_arch})" for a, s in ARCHS.items())
        raise GGUFExportError(f"architecture {architecture!r} cannot be exported to GGUF; supported: {known}")
    return ARCHS[architecture]


def _template_regex(t: str) -> re.Pattern:
    return re.compile("^" + re.escape(t).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)") + "$")


def map_name(param: str, spec: ArchSpec) -> tuple[str, int | None]:
    """r1kit parameter → (GGUF tensor name, expert index when experts are stacked into one tensor)."""
    for ours, theirs in spec.name_map:
        m = _template_regex(ours).match(param)
        if m:
            g = m.groupdict()
            return theirs.replace("{i}", g.get("i") or ""), int(g["e"]) if "e" in g else None
    raise GGUFExportError(f"parameter {param!r} has no GGUF name in the {spec.gguf_arch} name map "
                          "(r1kit/formats/gguf.py)")


def gguf_name(param: str, spec: ArchSpec) -> str:
    return map_name(param, spec)[0]


def model_tensors(model) -> tuple[ArchSpec, list[TensorSrc]]:
    """The spec and every tensor the GGUF will hold, in name-map terms (no data is read yet)."""
    spec = arch_spec(model.config.architecture)
    spec.check(model.config)
    return spec, spec.tensors(model, spec)


# ---------------------------------------------------------------------------------------------
# Tokenizer → GGUF vocabulary
# ---------------------------------------------------------------------------------------------
# The Llama 3 split regex (digits in runs of up to three); llama.cpp's "llama-bpe".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Pre-tokenizer signature → (llama.cpp pre-tokenizer name, the BPE `ignore_merges` llama.cpp
# assumes for it). A signature is what decides how text is split before BPE: each step's kind
# and its regex / flags. Only entries whose splitting is identical in both libraries are here.
_BYTELEVEL = ("ByteLevel", False, False)  # add_prefix_space=False, use_regex=False
PRE_TOKENIZERS: dict[tuple, tuple[str, bool]] = {
    (("Split", QWEN2_SPLIT, "Isolated", False), _BYTELEVEL): ("qwen2", False),
    (("Split", LLAMA3_SPLIT, "Isolated", False), _BYTELEVEL): ("llama-bpe", True),
    (("ByteLevel", False, True),): ("gpt-2", False),
    (("Digits", True), ("ByteLevel", False, True)): ("smollm", False),  # SmolLM: every digit alone
}


def _pre_signature(pt: dict | None) -> tuple:
    if pt is None:
        return ()
    steps = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    sig = []
    for s in steps:
        kind = s.get("type")
        if kind == "Split":
            pat = s.get("pattern", {})
            sig.append(("Split", pat.get("Regex", pat.get("String")), s.get("behavior"), bool(s.get("invert"))))
        elif kind == "ByteLevel":
            sig.append(("ByteLevel", bool(s.get("add_prefix_space")), bool(s.get("use_regex", True))))
        elif kind == "Digits":
            sig.append(("Digits", bool(s.get("individual_digits"))))
        else:
            sig.append((kind,))
    return tuple(sig)


def pre_tokenizer_name(tk_json: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a clear refusal."""
    model = tk_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFExportError("only byte-level BPE tokenizers can be exported (llama.cpp 'gpt2' model); "
                              f"got {model.get('type')} (byte_fallback={model.get('byte_fallback')})")
    norm = tk_json.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":  # Qwen2 ships NFC; llama.cpp applies none
        raise GGUFExportError(f"tokenizer normalizer {norm.get('type')!r} has no llama.cpp equivalent")
    sig = _pre_signature(tk_json.get("pre_tokenizer"))
    if sig not in PRE_TOKENIZERS:
        raise GGUFExportError("unknown BPE pre-tokenizer: llama.cpp would split text differently. "
                              f"Signature {sig!r:.300}; known: {', '.join(n for n, _ in PRE_TOKENIZERS.values())}"
                              " (add an entry to PRE_TOKENIZERS in r1kit/formats/gguf.py once verified)")
    name, ignore_merges = PRE_TOKENIZERS[sig]
    if bool(model.get("ignore_merges")) != ignore_merges:
        raise GGUFExportError(f"pre-tokenizer {name!r}: llama.cpp assumes ignore_merges={ignore_merges}, "
                              f"the tokenizer has {bool(model.get('ignore_merges'))}")
    return name


@dataclass
class Vocab:
    """Everything llama.cpp's tokenizer reads from a GGUF. Special ids are None when the source has none."""
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    eot: int | None  # the token that ends an assistant turn, when the chat style says which
    pad: int | None
    unk: int | None
    add_bos: bool  # what the source's post-processor does to a plain text, so llama.cpp's tokenize agrees
    add_eos: bool
    chat_template: str | None = None
    named_templates: dict[str, str] | None = None  # tokenizer.chat_template.NAME, as llama.cpp's converter writes


def vocab_from_tokenizer(tok: Tokenizer, n_vocab: int) -> Vocab:
    """Tokens in id order, padded with unused `[PAD{id}]` tokens up to the embedding rows."""
    d = json.loads(tok.tk.to_str())
    pre = pre_tokenizer_name(d)
    by_id = {i: t for t, i in tok.tk.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > n_vocab or max(by_id) >= n_vocab:
        raise GGUFExportError(f"tokenizer has ids up to {max(by_id)} but the model has only {n_vocab} embedding rows")
    added = {a["id"]: a for a in d.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # a hole or the padding rows some models round their vocabulary to
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:  # special → control (parsed only on request); others always matched
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"].get("merges", [])]
    template = tok.jinja_template() if tok.has_chat_template else None
    add_bos, add_eos = _added_specials(tok, by_id, added)
    unk = tok.unk_token or d["model"].get("unk_token")  # the declared one, as llama.cpp's converter reads it
    eot = STYLES[tok.style_name].eos if tok.style_name in STYLES else None
    return Vocab(tokens, [int(t) for t in types], merges, pre, tok.bos_id, tok.eos_id,
                 eot=tok.token_to_id(eot) if eot else None,
                 pad=tok.token_to_id(tok.pad_token) if tok.pad_token else None,  # the declared one only
                 unk=tok.token_to_id(unk) if unk else None, add_bos=add_bos, add_eos=add_eos, chat_template=template,
                 named_templates=tok.extra_templates)


def _added_specials(tok: Tokenizer, by_id: dict[int, str], added: dict) -> tuple[bool, bool]:
    """(add_bos, add_eos): whether tokenizer.json's post-processor puts BOS before / EOS after a text.

    Read from behaviour — a plain text encoded with and without special tokens — not from flags,
    which transformers 5 ignores when tokenizer.json exists. llama.cpp can only add its own BOS and
    EOS, so a post-processor that adds anything else is refused rather than exported wrongly.
    """
    # probe with an ordinary token's text (one that encodes to something: a lone byte may not)
    ordinary = (tok.tk.decode([i]) for i in sorted(by_id) if i not in added)
    probe = next((t for t in ordinary if tok.tk.encode(t, add_special_tokens=False).ids), None)
    if probe is None:
        raise GGUFExportError("no token of the vocabulary encodes back to itself; cannot tell what the "
                              "tokenizer adds to a text")
    plain = tok.tk.encode(probe, add_special_tokens=False).ids
    full = tok.tk.encode(probe, add_special_tokens=True).ids
    at = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), None)
    if at is None:
        raise GGUFExportError("tokenizer.json's post-processor changes a text's own tokens; llama.cpp cannot do that")
    before, after = full[:at], full[at + len(plain):]
    for ids, want, what, where in ((before, tok.bos_id, "BOS", "before"), (after, tok.eos_id, "EOS", "after")):
        if ids and ids != [want]:
            raise GGUFExportError(f"tokenizer.json's post-processor adds {[by_id.get(i) for i in ids]} {where} every "
                                  f"text; llama.cpp can add only the {what} token "
                                  f"({by_id.get(want) if want is not None else 'none declared'})")
    return bool(before), bool(after)


def _write_vocab(w: GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.merges:
        w.add_token_merges(v.merges)
    for setter, tid in ((w.add_bos_token_id, v.bos), (w.add_eos_token_id, v.eos), (w.add_eot_token_id, v.eot),
                        (w.add_pad_token_id, v.pad), (w.add_unk_token_id, v.unk)):
        if tid is not None:
            setter(tid)
    # what llama.cpp's tokenize(add_special=True) adds to a plain prompt — chat templates write BOS themselves
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.chat_template or v.named_templates:
        w.add_chat_template([{"name": "default", "template": v.chat_template}] * bool(v.chat_template)
                            + [{"name": k, "template": t} for k, t in (v.named_templates or {}).items()])


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    n_tensors: int
    n_bytes: int
    seconds: float
    types: dict[str, QT]  # tensor name → GGML type written

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t.name] = out.get(t.name, 0) + 1
        return out


def _byte_shape(shape: tuple[int, ...], qtype: QT) -> tuple[int, ...]:
    block, size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size)


def _encode(t: TensorSrc, qtype: QT) -> np.ndarray:
    x = t.values()
    if tuple(x.shape) != t.shape:
        raise GGUFExportError(f"tensor {t.name!r}: got shape {list(x.shape)}, expected {list(t.shape)}")
    if qtype not in (QT.F32, QT.F16) and not np.isfinite(x).all():
        raise GGUFExportError(f"tensor {t.name!r} contains NaN or Inf; refusing to quantize it")
    try:
        return quants.quantize(x, qtype)
    except ValueError as e:
        raise GGUFExportError(f"tensor {t.name!r}: {e}") from None


def _temp_path(out: Path) -> str:
    if not out.parent.is_dir():
        raise GGUFExportError(f"{out.parent}: output directory does not exist")
    if out.is_dir():
        raise GGUFExportError(f"{out}: is a directory; give a .gguf file path")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    os.chmod(tmp, umask_mode())  # mkstemp's 0600 would survive the rename
    return tmp


def write_gguf(out_path, spec: ArchSpec, config, vocab: Vocab, tensors: list[TensorSrc], mix: str,
               name: str = "r1kit") -> ExportResult:
    """Header, metadata and tensors of one model, atomically; types from llama.cpp's mix rules."""
    t0 = time.perf_counter()
    try:
        m = quants.get_mix(mix)
    except ValueError as e:
        raise GGUFExportError(str(e)) from None
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        raise GGUFExportError("two parameters map to the same GGUF tensor name")
    info = spec.info(config, list(by_name))
    plan = quants.plan_types(((t.name, t.shape, QT.F32) for t in tensors), m, info)
    out = Path(out_path)
    tmp = _temp_path(out)
    try:
        w = GGUFWriter(tmp, spec.gguf_arch)
        w.add_name(name)
        spec.hparams(w, config)
        _write_vocab(w, vocab)
        # last, in this order, as llama.cpp's quantizer rewrites them: then quantizing our F32
        # file with llama.cpp gives the very bytes of our own quantized export
        w.add_quantization_version(GGML_QUANT_VERSION)
        w.add_file_type(int(m.ftype))
        for tname, qtype in plan.items():
            bshape = _byte_shape(by_name[tname].shape, qtype)
            w.add_tensor_info(tname, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tname, qtype in plan.items():  # one tensor in memory at a time
            w.write_tensor_data(_encode(by_name[tname], qtype))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return ExportResult(out, len(plan), out.stat().st_size, time.perf_counter() - t0, plan)


def export_gguf(model, tok: Tokenizer, out_path, quant: str = "F16", name: str = "r1kit") -> ExportResult:
    """Write `model` + `tok` as a GGUF file llama.cpp runs. quant: F32, F16, Q8_0, Q4_K_M, Q5_K_M, Q6_K …"""
    spec, tensors = model_tensors(model)
    vocab = vocab_from_tokenizer(tok, model.config.vocab_size)
    with torch.no_grad():
        return write_gguf(out_path, spec, model.config, vocab, tensors, quant, name)
