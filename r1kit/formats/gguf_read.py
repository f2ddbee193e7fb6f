"""GGUF in: llama.cpp files → r1kit configs, models and tensor shapes.

    model = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")      # dequantized, float32 by default
    header = open_gguf(path)                                     # metadata + tensor infos, no data read

The second half of formats/gguf.py, and its inverse: the same name maps (`ARCHS[...].name_map`)
read right to left, the same q/k row interleave undone, the same metadata keys read back.

  * formats/gguf_file.py reads the header in one pass and memory-maps the rest. Tensor bytes are
    touched when a tensor is dequantized (`gguf.quants.dequantize`, every type the package knows),
    one tensor at a time, so planning and tokenizer reads never page in the weights.
  * A GGUF tensor's shape is listed ne0 first; NumPy's (and torch's) is the reverse.
  * `llama`: llama.cpp's converter interleaves each q/k head's rows for its "normal" RoPE;
    r1kit (and Hugging Face) keep the half-split layout, so rows are de-interleaved on load.
  * Llama 3.1 rope scaling lives in a `rope_freqs.weight` tensor, not in keys: it is matched
    against the llama3 formula with Meta's band limits (low 1, high 4), the original context
    8192 or the one a blended entry implies, and refused when no such scaling reproduces it.
  * `deepseek2`: attn_k_b / attn_v_b (absorbed MLA) are joined back into one wkv_b; stacked
    experts are unstacked; the router's bias is `exp_probs_b.bias`; MTP blocks a file appends
    (`nextn_predict_layers`) are left out, as the export leaves r1kit's own out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGML_QUANT_SIZES, GGUFValueType
from gguf.quants import dequantize

from r1kit.formats import gguf as gguf_out
from r1kit.formats.gguf_file import GGUFHeader, GGUFHeaderError
from r1kit.formats.hf import CheckpointError

ARCH_OF = {spec.gguf_arch: name for name, spec in gguf_out.ARCHS.items()}  # "llama" → "LlamaForCausalLM"
_INT = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16, GGUFValueType.UINT32,
        GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)
_KINDS = {int: _INT, float: (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64, *_INT), bool: (GGUFValueType.BOOL,),
          str: (GGUFValueType.STRING,)}
REQUIRED = object()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy order (ne[n-1], …, ne0)
    qtype: QT
    n_bytes: int


class GGUFFile:
    """One GGUF file's header: typed metadata getters and tensor infos (data stays on disk).

    The header is read by formats/gguf_file.py in one pass (gguf.GGUFReader needs seconds for a
    49k-token vocabulary); tensors are dequantized with `gguf.quants.dequantize`, one at a time.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        try:
            self.header = GGUFHeader(self.path)
        except GGUFHeaderError as e:
            raise CheckpointError(str(e)) from None
        self._raw = {t.name: t for t in self.header.tensors}  # offsets into the map: nothing read yet
        self.tensors = {t.name: TensorInfo(t.name, t.shape, QT(t.ggml_type), t.n_bytes) for t in self.header.tensors}
        self.arch = self.get("general.architecture", str)

    def has(self, key: str) -> bool:
        return key in self.header.fields

    def get(self, key: str, typ=str, default=REQUIRED):
        """Metadata value `key` (scalar of Python type `typ`), checked; `default` when absent."""
        v = self.header.fields.get(key)
        if v is None:
            if default is REQUIRED:
                raise CheckpointError(f"{self.path}: missing metadata key '{key}'")
            return default
        if v.type not in _KINDS[typ]:
            raise CheckpointError(f"{self.path}: metadata key '{key}' must be {typ.__name__}, "
                                  f"got {GGUFValueType(v.type).name}")
        return typ(v.value)

    def get_array(self, key: str, default=REQUIRED) -> list | None:
        v = self.header.fields.get(key)
        if v is None:
            if default is REQUIRED:
                raise CheckpointError(f"{self.path}: missing metadata key '{key}'")
            return default
        if v.type != GGUFValueType.ARRAY:
            raise CheckpointError(f"{self.path}: metadata key '{key}' must be an array")
        return v.value.tolist() if isinstance(v.value, np.ndarray) else list(v.value)

    def array_len(self, key: str) -> int | None:
        v = self.header.fields.get(key)
        return None if v is None or v.type != GGUFValueType.ARRAY else len(v.value)

    def hp(self, key: str, typ=int, default=REQUIRED):
        """An architecture hyper-parameter: `{arch}.{key}`."""
        return self.get(f"{self.arch}.{key}", typ, default)

    def values(self, name: str) -> np.ndarray:
        """Tensor `name` dequantized to float32, NumPy shape (reads its bytes, and only its)."""
        info = self.tensors[name]
        block, size = GGML_QUANT_SIZES[info.qtype]
        raw = self.header.data(self._raw[name]).reshape(-1, info.shape[-1] // block * size)  # (rows, row bytes)
        try:
            x = dequantize(raw, info.qtype)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor '{name}' has type {info.qtype.name}, which the gguf "
                                  "package cannot dequantize") from None
        return np.asarray(x, dtype=np.float32).reshape(info.shape)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def open_gguf(path) -> GGUFFile:
    """A GGUFFile for `path` (an already open one is passed through: parsing a big vocabulary costs seconds)."""
    return path if isinstance(path, GGUFFile) else GGUFFile(path)


def architecture(g: GGUFFile) -> str:
    """The r1kit/Hugging Face architecture name of a GGUF, or a refusal naming the key."""
    if g.arch not in ARCH_OF:
        raise CheckpointError(f"{g.path}: general.architecture {g.arch!r} is not supported; "
                              f"supported: {', '.join(sorted(ARCH_OF))}")
    return ARCH_OF[g.arch]


def n_vocab(g: GGUFFile) -> int:
    """Embedding rows, checked against the vocabulary the header lists."""
    if "token_embd.weight" not in g.tensors:
        raise CheckpointError(f"{g.path}: missing tensor 'token_embd.weight'")
    rows = g.tensors["token_embd.weight"].shape[0]
    n_tokens = g.array_len("tokenizer.ggml.tokens")
    if n_tokens is not None and n_tokens != rows:
        raise CheckpointError(f"{g.path}: tokenizer.ggml.tokens lists {n_tokens} tokens but tensor "
                              f"'token_embd.weight' has {rows} rows")
    declared = g.hp("vocab_size", int, rows)
    if declared != rows:
        raise CheckpointError(f"{g.path}: {g.arch}.vocab_size is {declared} but tensor 'token_embd.weight' "
                              f"has {rows} rows")
    return rows


# ---------------------------------------------------------------------------------------------
# Metadata → config
# ---------------------------------------------------------------------------------------------
def read_config(g: GGUFFile, rope_table: bool = True):
    """→ (Hugging Face architecture name, r1kit model config) from the header.

    `rope_table=False` reads no tensor data at all: a Llama 3 `rope_freqs.weight` is then not
    decoded into rope_scaling (the planner needs shapes, not frequencies).
    """
    arch = architecture(g)
    try:
        if arch == "DeepseekV3ForCausalLM":
            return arch, _deepseek_config(g)
        return arch, _dense_config(g, arch, rope_table)
    except (ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{g.path}: {e}") from None


def _dense_config(g: GGUFFile, arch: str, rope_table: bool):
    from r1kit.models.llama import LlamaConfig
    heads = g.hp("attention.head_count")
    hidden = g.hp("embedding_length")
    head_dim = g.hp("attention.key_length", int, hidden // heads)
    if g.hp("attention.value_length", int, head_dim) != head_dim:
        raise CheckpointError(f"{g.path}: {g.arch}.attention.value_length differs from key_length "
                              "(r1kit's dense model uses one head_dim)")
    if g.hp("rope.dimension_count", int, head_dim) != head_dim:
        raise CheckpointError(f"{g.path}: {g.arch}.rope.dimension_count must equal the head size {head_dim} "
                              "(partial rotary embeddings are not supported)")
    bias = "blk.0.attn_q.bias" in g.tensors
    return LlamaConfig(
        vocab_size=n_vocab(g), hidden_size=hidden, intermediate_size=g.hp("feed_forward_length"),
        num_hidden_layers=g.hp("block_count"), num_attention_heads=heads,
        num_key_value_heads=g.hp("attention.head_count_kv", int, heads), head_dim=head_dim,
        max_position_embeddings=g.hp("context_length", int, 2048),
        rms_norm_eps=g.hp("attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_theta=g.hp("rope.freq_base", float, 10000.0), rope_scaling=_dense_rope_scaling(g, head_dim, rope_table),
        attention_bias=bias or arch == "Qwen2ForCausalLM", o_bias="blk.0.attn_output.bias" in g.tensors,
        qk_norm=arch == "Qwen3ForCausalLM", tie_word_embeddings="output.weight" not in g.tensors,
        architecture=arch)


# Meta's Llama 3.1 / 3.2 band limits; the original context is solved from the table when it is not 8192
LLAMA3_BANDS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _dense_rope_scaling(g: GGUFFile, head_dim: int, rope_table: bool) -> dict | None:
    kind = g.hp("rope.scaling.type", str, "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": g.hp("rope.scaling.factor", float)}
    if kind not in ("none",):
        raise CheckpointError(f"{g.path}: {g.arch}.rope.scaling.type {kind!r} is not supported for {g.arch} "
                              "(supported: none, linear, and Llama 3 factors in rope_freqs.weight)")
    if "rope_freqs.weight" not in g.tensors or not rope_table:
        return None
    factors = g.values("rope_freqs.weight").astype(np.float64)
    if factors.shape != (head_dim // 2,):
        raise CheckpointError(f"{g.path}: tensor 'rope_freqs.weight' has shape {list(factors.shape)}, "
                              f"expected [{head_dim // 2}]")
    theta = g.hp("rope.freq_base", float, 10000.0)
    for scaling in _llama3_candidates(factors, head_dim, theta):
        probe = type("RopeProbe", (), {"head_dim": head_dim, "rope_theta": theta, "rope_scaling": scaling})()
        if np.allclose(gguf_out.llama3_rope_factors(probe), factors, rtol=1e-5, atol=1e-6):
            return scaling
    raise CheckpointError(f"{g.path}: tensor 'rope_freqs.weight' is not Llama 3 rope scaling with Meta's band "
                          f"limits (low 1, high 4); r1kit cannot reproduce it")


def _llama3_candidates(factors: np.ndarray, head_dim: int, theta: float):
    """Llama 3 scalings that may have made `factors`: 8192 original positions, then the context a
    blended entry implies (inverting smooth = (old_ctx / wavelength - low) / (high - low))."""
    factor, lo, hi = float(factors.max()), LLAMA3_BANDS["low_freq_factor"], LLAMA3_BANDS["high_freq_factor"]
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    olds = [8192]
    for f, w in zip(factors, wavelen):
        if factor > 1 and 1 + 1e-6 < f < factor - 1e-6:
            smooth = (1 / f - 1 / factor) / (1 - 1 / factor)
            olds.append(int(round(w * (smooth * (hi - lo) + lo))))
    for old in dict.fromkeys(olds):
        yield {"rope_type": "llama3", "factor": factor, **LLAMA3_BANDS, "original_max_position_embeddings": old}


def _deepseek_config(g: GGUFFile):
    from r1kit.models.deepseek import DeepseekConfig
    gating = g.hp("expert_gating_func", int, 1)  # llama.cpp's default for deepseek2 is softmax (V2)
    if gating != 2:
        raise CheckpointError(f"{g.path}: {g.arch}.expert_gating_func is {gating} (softmax, DeepSeek-V2); "
                              "r1kit runs DeepSeek-V3's sigmoid gating (2)")
    rope, kv_lora = g.hp("rope.dimension_count"), g.hp("attention.kv_lora_rank")
    if g.has(f"{g.arch}.attention.key_length_mla"):  # absorbed-MLA layout (split attn_k_b / attn_v_b)
        qk, v = g.hp("attention.key_length_mla"), g.hp("attention.value_length_mla")
    else:  # older files: per-head sizes in key_length / value_length, attn_kv_b unsplit
        qk, v = g.hp("attention.key_length"), g.hp("attention.value_length")
    # newer files append the MTP (nextn) blocks to block_count; r1kit loads the main model without them
    n_layer = main_layers(g) or g.hp("block_count")
    return DeepseekConfig(
        vocab_size=n_vocab(g), hidden_size=g.hp("embedding_length"), intermediate_size=g.hp("feed_forward_length"),
        moe_intermediate_size=g.hp("expert_feed_forward_length"), num_hidden_layers=n_layer,
        num_attention_heads=g.hp("attention.head_count"), q_lora_rank=g.hp("attention.q_lora_rank", int, 0) or None,
        kv_lora_rank=kv_lora, qk_rope_head_dim=rope, qk_nope_head_dim=qk - rope, v_head_dim=v,
        n_routed_experts=g.hp("expert_count"), n_shared_experts=g.hp("expert_shared_count", int, 0),
        num_experts_per_tok=g.hp("expert_used_count"), n_group=g.hp("expert_group_count", int, 1),
        topk_group=g.hp("expert_group_used_count", int, 1),
        routed_scaling_factor=g.hp("expert_weights_scale", float, 1.0),
        norm_topk_prob=g.hp("expert_weights_norm", bool, False),
        first_k_dense_replace=g.hp("leading_dense_block_count", int, 0), rope_theta=g.hp("rope.freq_base", float),
        rope_scaling=_yarn_scaling(g), rope_interleave=True, num_nextn_predict_layers=0,
        rms_norm_eps=g.hp("attention.layer_norm_rms_epsilon", float), tie_word_embeddings="output.weight" not in
        g.tensors, max_position_embeddings=g.hp("context_length", int, 4096))


def _yarn_scaling(g: GGUFFile) -> dict | None:
    kind = g.hp("rope.scaling.type", str, "none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise CheckpointError(f"{g.path}: {g.arch}.rope.scaling.type {kind!r} is not supported (none, yarn)")
    # llama.cpp stores 0.1 · mscale_all_dim (it multiplies by 0.1 · ln(factor) itself); float32 in the file
    mscale = round(g.hp("rope.scaling.yarn_log_multiplier", float) / 0.1, 6)
    return {"rope_type": "yarn", "factor": g.hp("rope.scaling.factor", float),
            "original_max_position_embeddings": g.hp("rope.scaling.original_context_length"),
            "mscale": mscale, "mscale_all_dim": mscale, "beta_fast": g.hp("rope.scaling.yarn_beta_fast", float, 32.0),
            "beta_slow": g.hp("rope.scaling.yarn_beta_slow", float, 1.0)}


# ---------------------------------------------------------------------------------------------
# Tensors → state dict (the export's name map, read right to left)
# ---------------------------------------------------------------------------------------------
def _inverse_map(spec) -> list[tuple[re.Pattern, str]]:
    """(GGUF-name regex, r1kit template) pairs from the export's own table."""
    return [(gguf_out._template_regex(theirs), ours) for ours, theirs in spec.name_map]


def param_name(gname: str, inverse) -> tuple[str, bool] | None:
    """GGUF tensor name → (r1kit parameter template with {i} filled, whether it stacks experts)."""
    for rx, ours in inverse:
        m = rx.match(gname)
        if m:
            return ours.replace("{i}", m.group("i") if "i" in m.groupdict() else ""), "{e}" in ours
    return None


def deinterleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, rows (2i, 2i+1) → (i, i + D/2): llama.cpp's `llama` layout back to Hugging Face's."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main_layers(g: GGUFFile) -> int | None:
    """Blocks of the main model when the file appends MTP (nextn) blocks to block_count, else None."""
    nextn = g.hp("nextn_predict_layers", int, 0)
    return g.hp("block_count") - nextn if nextn else None


def read_state(g: GGUFFile, model) -> dict[str, np.ndarray]:
    """{r1kit parameter: float32 array} for every tensor of `g`, checked against `model`'s state dict."""
    c, spec = model.config, gguf_out.ARCHS[model.config.architecture]
    inverse, out = _inverse_map(spec), {}
    n_main = main_layers(g)
    for gname in g.tensors:
        if gname == "rope_freqs.weight":
            continue  # already folded into the config's rope_scaling
        if n_main is not None and (layer := re.match(r"blk\.(\d+)\.", gname)) and int(layer.group(1)) >= n_main:
            continue  # an MTP (nextn) block the file declares: a speculation aid, not the main model
        if gname.endswith((".attn_k_b.weight", ".attn_v_b.weight")):
            if gname.endswith(".attn_k_b.weight"):
                out[gname.replace("blk.", "layers.", 1).replace(".attn_k_b.weight", ".attn.wkv_b.weight")] = \
                    _join_kv_b(g, gname, c)
            continue
        hit = param_name(gname, inverse)
        if hit is None:
            raise CheckpointError(f"{g.path}: tensor '{gname}' is not part of r1kit's {g.arch} model")
        pname, stacked = hit
        x = g.values(gname)
        if stacked:  # (E, out, in) → one (out, in) per expert
            for e in range(x.shape[0]):
                out[pname.replace("{e}", str(e))] = x[e]
            continue
        heads = gguf_out._rotary_heads(gname, c) if spec.permute_qk else None
        out[pname] = deinterleave_rope_rows(x, heads) if heads else x
    return out


def _join_kv_b(g: GGUFFile, k_name: str, c) -> np.ndarray:
    """attn_k_b (H, r, d_nope) + attn_v_b (H, d_v, r) → wkv_b (H·(d_nope + d_v), r), the export's inverse."""
    v_name = k_name.replace(".attn_k_b.", ".attn_v_b.")
    if v_name not in g.tensors:
        raise CheckpointError(f"{g.path}: tensor '{k_name}' has no matching '{v_name}'")
    k_b, v_b = g.values(k_name), g.values(v_name)
    H, r = c.num_attention_heads, c.kv_lora_rank
    want_k, want_v = (H, r, c.qk_nope_head_dim), (H, c.v_head_dim, r)
    for name, x, want in ((k_name, k_b, want_k), (v_name, v_b, want_v)):
        if x.shape != want:
            raise CheckpointError(f"{g.path}: tensor '{name}' has shape {list(x.shape)}, the header implies "
                                  f"{list(want)}")
    per_head = np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1)  # (H, d_nope + d_v, r)
    return per_head.reshape(H * (c.qk_nope_head_dim + c.v_head_dim), r)


def load_model(path, device="cpu", dtype: torch.dtype = torch.float32):
    """Build the model a GGUF (a path or an open GGUFFile) describes and fill it with its dequantized weights."""
    from r1kit.formats import hf
    g = open_gguf(path)
    arch, cfg = read_config(g)
    fam = hf.family_for(arch, str(g.path))
    with torch.device("meta"):
        model = fam.model_cls(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.reset_buffers()
    if getattr(cfg, "tie_word_embeddings", False):
        model.head.weight = model.embed.weight
    state, sd = read_state(g, model), model.state_dict()
    tied = {"head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    for name, dst in sd.items():
        if name in tied:
            continue
        if name not in state:
            raise CheckpointError(f"{g.path}: missing tensor '{_gguf_name_of(name, model)}' "
                                  f"(r1kit parameter {name})")
        x = state[name]
        if tuple(x.shape) != tuple(dst.shape):
            raise CheckpointError(f"{g.path}: tensor '{_gguf_name_of(name, model)}' has shape {list(x.shape)}, "
                                  f"the header implies {list(dst.shape)}")
        with torch.no_grad():
            dst.copy_(torch.from_numpy(np.array(x, dtype=np.float32)))  # a copy: the file's map is read-only
    return model.eval()


def _gguf_name_of(pname: str, model) -> str:
    try:
        return gguf_out.map_name(pname, gguf_out.ARCHS[model.config.architecture])[0]
    except gguf_out.GGUFExportError:
        return pname
