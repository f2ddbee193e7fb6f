"""`r1kit fit`: will a model run in llama.cpp on this machine, and how fast at best?

    r1kit fit llama-3.1-70b --quant Q5_K_M --vram 24 --ctx 8192

The planner lists the GGUF tensors the export would write (for dense models by building the
model on PyTorch's meta device and asking r1kit/formats/gguf.py for its tensors, so planner and
exporter cannot disagree), types each one with llama.cpp's own per-tensor mix rules
(quants.plan_types) and sums the exact block sizes. Then:

  * KV cache. Dense (GQA): 2 · layers · kv_heads · head_dim · bytes per token (K and V).
    MLA (llama.cpp's deepseek2 with split attn_k_b/attn_v_b): layers · (kv_lora_rank + rope_dim)
    · bytes per token — only the compressed latent and the shared rope key are cached, and V is
    read out of the same latent, so there is no separate V cache.
  * Compute buffer: llama.cpp's scratch memory for one micro-batch (n_ubatch tokens); the
    largest live tensors are the logits (vocab · n_ubatch floats) and, without flash attention,
    one layer's attention scores (heads · ctx · n_ubatch floats).
  * GPU layers (`-ngl N` puts the last N layers on the GPU; N = layers + 1 adds the output
    matrix): layers are added from the last one while weights + their KV cache fit.
  * Speed bound: decoding reads every weight a token uses once (for MoE only the routed and
    shared experts it activates) plus the KV cache; time ≥ GPU bytes / GPU bandwidth + CPU bytes /
    CPU bandwidth. Real speed is lower: this is a roofline, not a benchmark.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from r1kit.common import require
require("gguf", "the fit planner (GGUF tensor types)")  # one line naming the extra when it is missing
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from r1kit.formats import quants
from r1kit.formats import hf

GiB = float(1 << 30)
GB = 1e9


class FitError(ValueError):
    """Unknown model name or unusable input; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Known shapes, written as the Hugging Face config.json fields that matter
# ---------------------------------------------------------------------------------------------
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def _llama31(hidden: int, ffn: int, layers: int, heads: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE, "tie_word_embeddings": False}


def _qwen25(hidden: int, ffn: int, layers: int, heads: int, kv: int, vocab: int = 152064,
            tied: bool = False, ctx: int = 32768) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "max_position_embeddings": ctx, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": tied}


DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "max_position_embeddings": 163840,
    "tie_word_embeddings": False,
}

KNOWN: dict[str, dict] = {
    "llama-3.1-8b": _llama31(4096, 14336, 32, 32),
    "llama-3.1-70b": _llama31(8192, 28672, 80, 64),
    "llama-3.1-405b": _llama31(16384, 53248, 126, 128),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, vocab=151936, tied=True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8),
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8),
    # the R1 distills keep their base's shape (Qwen2.5-Math for 1.5B/7B: untied, 128K positions)
    "deepseek-r1-distill-qwen-1.5b": _qwen25(1536, 8960, 28, 12, 2, vocab=151936, ctx=131072),
    "deepseek-r1-distill-qwen-7b": _qwen25(3584, 18944, 28, 28, 4, ctx=131072),
    "deepseek-r1-distill-qwen-14b": _qwen25(5120, 13824, 48, 40, 8, ctx=131072),
    "deepseek-r1-distill-qwen-32b": _qwen25(5120, 27648, 64, 40, 8, ctx=131072),
    "deepseek-r1-distill-llama-8b": _llama31(4096, 14336, 32, 32),
    "deepseek-r1-distill-llama-70b": _llama31(8192, 28672, 80, 64),  # Llama-3.3-70B's shape
    "deepseek-v3": DEEPSEEK_V3,
    "deepseek-r1": DEEPSEEK_V3,
}


def _known_key(name: str) -> str:
    """'deepseek-ai/DeepSeek-R1-Distill-Llama-70B' → 'deepseek-r1-distill-llama-70b'."""
    key = name.strip().lower().rsplit("/", 1)[-1]
    for suffix in ("-instruct", "-chat", "-base"):
        key = key.removesuffix(suffix)
    return key.replace("llama3", "llama-3").replace("qwen-2.5", "qwen2.5")


def resolve_config(model: str) -> tuple[str, dict, str]:
    """MODEL (a checkpoint dir, a config.json, or a known name) → (display name, HF config, where from)."""
    path = Path(model)
    if path.is_dir():
        return path.resolve().name, hf.read_json(path / "config.json"), str(path / "config.json")
    if path.is_file():
        return path.resolve().parent.name or path.name, hf.read_json(path), str(path)
    if model.endswith(".json") or "/" in model and model.startswith((".", "/", "~")):
        raise FitError(f"{model}: no such file or directory")
    key = _known_key(model)
    if key in KNOWN:
        return key, KNOWN[key], f"built-in {key}"
    near = difflib.get_close_matches(key, list(KNOWN), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    raise FitError(f"{model!r} is not a checkpoint directory, a config.json or a known model{hint} "
                   f"(known: {', '.join(KNOWN)})")


# ---------------------------------------------------------------------------------------------
# Model shapes → GGUF tensors
# ---------------------------------------------------------------------------------------------
@dataclass
class Shape:
    """What sizes depend on, in llama.cpp terms."""
    arch: str  # llama.cpp architecture
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    max_ctx: int
    tensors: list[tuple[str, tuple[int, ...]]]  # GGUF name, NumPy shape
    kv_lora_rank: int = 0  # MLA only
    rope_dim: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    expert_ffn: int = 0
    mha_kv_dims: int = 0  # MLA: K + V dims per head once decompressed (for comparison only)
    mtp_layers: int = 0  # DeepSeek MTP depths in the config: not exported, not counted

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def kind(self) -> str:
        return "MoE + MLA" if self.mla else "dense"


def shape_from_config(d: dict, where: str = "config.json") -> Shape:
    archs = hf.field(d, "architectures", list, where=where)
    if not archs or not isinstance(archs[0], str):
        raise hf.CheckpointError(f"{where}: field 'architectures' must be a non-empty list of names")
    if archs[0] == "DeepseekV3ForCausalLM":
        return _deepseek_shape(d, where)
    return _dense_shape(d, where)


def _dense_shape(d: dict, where: str) -> Shape:
    import torch

    from r1kit.formats import gguf
    fam = hf.family_for(d["architectures"][0], where)
    if fam.config_from_hf is not hf.dense_config_from_hf:
        raise FitError(f"{where}: {fam.arch} is not a dense Llama/Qwen model; the planner knows "
                       "dense Llama/Qwen2/Qwen3 and DeepseekV3ForCausalLM")
    c = fam.config_from_hf(d, where)
    with torch.device("meta"):  # shapes only: a 405B model costs no memory here
        model = fam.model_cls(c)
    try:
        spec, tensors = gguf.model_tensors(model)
    except gguf.GGUFExportError as e:
        raise FitError(f"{where}: {e}") from None
    return Shape(spec.gguf_arch, c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                 c.num_key_value_heads, c.head_dim, c.intermediate_size, c.max_position_embeddings,
                 [(t.name, t.shape) for t in tensors])


def _deepseek_shape(d: dict, where: str) -> Shape:
    f = lambda k, default=hf.REQUIRED: hf.field(d, k, int, default, where)  # noqa: E731
    h, v, n_layer, heads = f("hidden_size"), f("vocab_size"), f("num_hidden_layers"), f("num_attention_heads")
    q_lora, kv_lora, nope, rope, vdim = (f("q_lora_rank", 0), f("kv_lora_rank"), f("qk_nope_head_dim"),
                                         f("qk_rope_head_dim"), f("v_head_dim"))
    ffn, eff, n_exp, n_shared = f("intermediate_size"), f("moe_intermediate_size"), f("n_routed_experts"), \
        f("n_shared_experts", 0)
    dense_lead, used = f("first_k_dense_replace", 0), f("num_experts_per_tok")
    tied = hf.field(d, "tie_word_embeddings", bool, False, where)
    t = [("token_embd.weight", (v, h)), ("output_norm.weight", (h,))] + ([] if tied else [("output.weight", (v, h))])
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", (h,)), (p + "ffn_norm.weight", (h,)), (p + "attn_kv_a_norm.weight", (kv_lora,)),
              (p + "attn_kv_a_mqa.weight", (kv_lora + rope, h)), (p + "attn_k_b.weight", (heads, kv_lora, nope)),
              (p + "attn_v_b.weight", (heads, vdim, kv_lora)), (p + "attn_output.weight", (h, heads * vdim))]
        if q_lora:
            t += [(p + "attn_q_a_norm.weight", (q_lora,)), (p + "attn_q_a.weight", (q_lora, h)),
                  (p + "attn_q_b.weight", (heads * (nope + rope), q_lora))]
        else:
            t += [(p + "attn_q.weight", (heads * (nope + rope), h))]
        if i < dense_lead:
            t += [(p + "ffn_gate.weight", (ffn, h)), (p + "ffn_up.weight", (ffn, h)), (p + "ffn_down.weight", (h, ffn))]
        else:
            t += [(p + "ffn_gate_inp.weight", (n_exp, h)), (p + "exp_probs_b.bias", (n_exp,)),
                  (p + "ffn_gate_exps.weight", (n_exp, eff, h)), (p + "ffn_up_exps.weight", (n_exp, eff, h)),
                  (p + "ffn_down_exps.weight", (n_exp, h, eff))]
            if n_shared:
                sh = eff * n_shared
                t += [(p + "ffn_gate_shexp.weight", (sh, h)), (p + "ffn_up_shexp.weight", (sh, h)),
                      (p + "ffn_down_shexp.weight", (h, sh))]
    return Shape("deepseek2", v, h, n_layer, heads, 1, kv_lora + rope, ffn, f("max_position_embeddings", 4096), t,
                 kv_lora_rank=kv_lora, rope_dim=rope, n_expert=n_exp, n_expert_used=used, expert_ffn=eff,
                 mha_kv_dims=nope + rope + vdim, mtp_layers=f("num_nextn_predict_layers", 0))


def shape_from_gguf(path) -> tuple[str, Shape, dict[str, QT], int, str]:
    """A GGUF's header → (name, Shape, {tensor: stored type}, exact file bytes, file-type label).

    Only the header is read: tensor shapes and types from the tensor infos, the KV-cache shape
    from the metadata (the same keys llama.cpp sizes its cache by).
    """
    from gguf import LlamaFileType

    from r1kit.formats import gguf_read
    g = gguf_read.open_gguf(path)
    _, c = gguf_read.read_config(g, rope_table=False)
    # MTP (nextn) blocks a deepseek2 file appends are counted in the file size, not as layers
    main = [t for t in g.tensors.values() if _layer_of(t.name) is None or _layer_of(t.name) < c.num_hidden_layers]
    tensors = [(t.name, t.shape) for t in main]
    if c.architecture == "DeepseekV3ForCausalLM":
        shape = Shape("deepseek2", c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, 1,
                      c.kv_lora_rank + c.qk_rope_head_dim, c.intermediate_size, c.max_position_embeddings, tensors,
                      kv_lora_rank=c.kv_lora_rank, rope_dim=c.qk_rope_head_dim, n_expert=c.n_routed_experts,
                      n_expert_used=c.num_experts_per_tok, expert_ffn=c.moe_intermediate_size,
                      mha_kv_dims=c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    else:
        shape = Shape(g.arch, c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                      c.num_key_value_heads, c.head_dim, c.intermediate_size, c.max_position_embeddings, tensors)
    ftype = g.get("general.file_type", int, None)
    try:
        label = LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else "as stored"
    except ValueError:
        label = f"file type {ftype}"
    return g.path.name, shape, {t.name: t.qtype for t in main}, g.path.stat().st_size, label


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------
def tensor_bytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows * (shape[-1] // block) * size


def type_bytes_per_value(name: str) -> float:
    """KV-cache element size: 'f16' → 2, 'q8_0' → 34/32 …"""
    try:
        block, size = GGML_QUANT_SIZES[QT[name.upper()]]
    except KeyError:
        raise FitError(f"unknown KV-cache type {name!r}; choose one of {', '.join(KV_TYPES)}") from None
    return size / block


KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


@dataclass
class Sizes:
    params: int
    file_bytes: int
    types: dict[str, int]  # type name → tensor count
    layer_bytes: list[int]  # stored bytes per layer
    layer_active: list[float]  # bytes one token reads per layer (MoE: active experts only)
    output_bytes: int  # output matrix (+ output_norm): on the GPU only when -ngl > layers
    embd_bytes: int  # token_embd: always in RAM, one row read per token
    measured: bool = False  # file_bytes is a real file's size, not a prediction


def model_sizes(s: Shape, mix: str, stored: dict[str, QT] | None = None, stored_bytes: int | None = None) -> Sizes:
    """Sizes at `mix` (llama.cpp's per-tensor rules), or of a GGUF as it is: its own types and file size."""
    info = quants.ArchInfo(arch=s.arch, n_layer=s.layers, n_expert=s.n_expert, n_head=s.heads,
                           n_head_kv=s.kv_heads, tied_embeddings=not any(n == "output.weight" for n, _ in s.tensors))
    plan = stored if stored is not None else \
        quants.plan_types(((n, shp, QT.F32) for n, shp in s.tensors), quants.get_mix(mix), info)
    shapes = dict(s.tensors)
    layer_bytes, active = [0] * s.layers, [0.0] * s.layers
    types: dict[str, int] = {}
    params = out = embd = 0
    for name, qtype in plan.items():
        nb, shp = tensor_bytes(shapes[name], qtype), shapes[name]
        types[qtype.name] = types.get(qtype.name, 0) + 1
        params += _numel(shp)
        i = _layer_of(name)
        if i is not None:
            layer_bytes[i] += nb
            active[i] += nb * s.n_expert_used / s.n_expert if "_exps." in name else nb
        elif name == "token_embd.weight":
            embd += nb
        else:
            out += nb
    if info.tied_embeddings:  # llama.cpp gives the output layer its own copy of token_embd
        out += embd
    metadata = 40 * s.vocab + 4096  # tokens, types and merges strings: ~40 bytes a token
    file_bytes = stored_bytes if stored_bytes is not None else \
        metadata + sum(tensor_bytes(shapes[n], t) + 31 for n, t in plan.items())
    return Sizes(params, file_bytes, types, layer_bytes, active, out, embd, measured=stored_bytes is not None)


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def kv_bytes_per_token_layer(s: Shape, kv_type: str) -> float:
    per = type_bytes_per_value(kv_type)
    if s.mla:  # latent c_kv + shared rope key; V is read from the same latent
        return (s.kv_lora_rank + s.rope_dim) * per
    return 2 * s.kv_heads * s.head_dim * per


def compute_buffer_bytes(s: Shape, ctx: int, ubatch: int, flash_attn: bool) -> float:
    logits = 4.0 * s.vocab * ubatch
    scores = 0.0 if flash_attn else 4.0 * s.heads * ctx * ubatch
    ffn = max(s.ffn, s.n_expert_used * s.expert_ffn)
    return max(logits, scores) + 4.0 * ubatch * (ffn + 2 * s.hidden)


# ---------------------------------------------------------------------------------------------
# Placement and speed
# ---------------------------------------------------------------------------------------------
@dataclass
class FitReport:
    name: str
    shape: Shape
    mix: str
    ctx: int
    kv_type: str
    sizes: Sizes
    kv_per_token: float  # bytes, all layers
    compute_bytes: float
    vram_bytes: float
    overhead_bytes: float
    gpu_layers: int
    output_on_gpu: bool
    gpu_bytes: float  # VRAM in use: weights + KV + compute + overhead
    ram_bytes: float  # RAM for what stays on the CPU (weights + KV + compute)
    gpu_read: float  # bytes read per token from VRAM / RAM
    cpu_read: float
    gpu_bw: float  # GB/s
    cpu_bw: float
    ubatch: int = 512
    flash_attn: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def ngl(self) -> int:
        """llama.cpp's -ngl: offloaded layers, +1 when the output layer is on the GPU too."""
        return self.gpu_layers + int(self.output_on_gpu)

    @property
    def kv_bytes(self) -> float:
        return self.kv_per_token * self.ctx

    @property
    def tokens_per_s(self) -> float:
        seconds = self.gpu_read / (self.gpu_bw * GB) + self.cpu_read / (self.cpu_bw * GB)
        return 1.0 / seconds


def place_layers(sizes: Sizes, kv_layer: float, budget: float) -> tuple[int, bool]:
    """(layers on the GPU, output matrix on the GPU): llama.cpp offloads the last layers first."""
    used, n = 0.0, 0
    for i in reversed(range(len(sizes.layer_bytes))):
        cost = sizes.layer_bytes[i] + kv_layer
        if used + cost > budget:
            break
        used, n = used + cost, n + 1
    return n, n == len(sizes.layer_bytes) and used + sizes.output_bytes <= budget


def plan_fit(model: str, quant: str = "Q4_K_M", vram_gib: float = 24.0, ctx: int = 8192, kv_type: str = "f16",
             gpu_bw: float = 1000.0, cpu_bw: float = 60.0, ubatch: int = 512, flash_attn: bool = True,
             overhead_gib: float = 0.5) -> FitReport:
    """Sizes, GPU layers and a bandwidth bound on decoding speed for MODEL at `quant`."""
    for what, v in (("--vram", vram_gib), ("--overhead", overhead_gib)):
        if v < 0:
            raise FitError(f"{what} must be ≥ 0 GiB, got {v}")
    for what, v in (("--ctx", ctx), ("--ubatch", ubatch), ("--gpu-bandwidth", gpu_bw), ("--cpu-bandwidth", cpu_bw)):
        if v <= 0:
            raise FitError(f"{what} must be > 0, got {v}")
    if Path(model).suffix.lower() == ".gguf":  # the file as it is: its tensors, types, size and metadata
        name, shape, stored, n_bytes, label = shape_from_gguf(model)
        sizes = model_sizes(shape, label, stored, n_bytes)
    else:
        try:
            quants.get_mix(quant)
        except ValueError as e:
            raise FitError(str(e)) from None
        name, cfg, where = resolve_config(model)
        shape = shape_from_config(cfg, where)
        sizes, label = model_sizes(shape, quant), quant.upper()
    kv_tok_layer = kv_bytes_per_token_layer(shape, kv_type)
    kv_layer = kv_tok_layer * ctx
    compute = compute_buffer_bytes(shape, ctx, ubatch, flash_attn)
    vram, overhead = vram_gib * GiB, overhead_gib * GiB if vram_gib > 0 else 0.0
    budget = vram - overhead - compute if vram_gib > 0 else 0.0
    n_gpu, out_gpu = place_layers(sizes, kv_layer, budget)
    gpu_ids = range(shape.layers - n_gpu, shape.layers)
    cpu_ids = range(0, shape.layers - n_gpu)
    gpu_w = sum(sizes.layer_bytes[i] for i in gpu_ids) + (sizes.output_bytes if out_gpu else 0)
    cpu_w = sum(sizes.layer_bytes[i] for i in cpu_ids) + sizes.embd_bytes + (0 if out_gpu else sizes.output_bytes)
    gpu_read = sum(sizes.layer_active[i] for i in gpu_ids) + n_gpu * kv_layer + (sizes.output_bytes if out_gpu else 0)
    cpu_read = sum(sizes.layer_active[i] for i in cpu_ids) + len(cpu_ids) * kv_layer \
        + (0 if out_gpu else sizes.output_bytes)
    report = FitReport(name, shape, label, ctx, kv_type, sizes, kv_tok_layer * shape.layers, compute,
                       vram, overhead, n_gpu, out_gpu,
                       gpu_bytes=(gpu_w + n_gpu * kv_layer + compute + overhead) if vram_gib > 0 else 0.0,
                       ram_bytes=cpu_w + len(cpu_ids) * kv_layer + compute,
                       gpu_read=gpu_read, cpu_read=cpu_read, gpu_bw=gpu_bw, cpu_bw=cpu_bw, ubatch=ubatch,
                       flash_attn=flash_attn)
    report.notes = _notes(report)
    return report


def _notes(r: FitReport) -> list[str]:
    s, notes = r.shape, []
    if r.ctx > s.max_ctx:
        notes.append(f"ctx {r.ctx} exceeds the model's {s.max_ctx} positions")
    if r.kv_type.startswith("q") and not r.flash_attn:
        notes.append("a quantized V cache needs flash attention in llama.cpp (-fa on)")
    if s.mtp_layers:
        notes.append(f"{s.mtp_layers} MTP layer(s) not counted: r1kit's export (like most deepseek2 GGUFs) "
                     "leaves them out")
    if s.n_expert and 0 < r.gpu_layers < s.layers:
        notes.append("MoE: keeping attention on the GPU and experts in RAM (-ngl 99 with --n-cpu-moe or "
                      "-ot exps=CPU) often beats whole-layer offload")
    if r.vram_bytes > 0 and r.gpu_layers == 0:
        notes.append("not even one layer fits next to the compute buffer: runs on the CPU")
    return notes


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _kv_line(r: FitReport) -> str:
    s, per = r.shape, type_bytes_per_value(r.kv_type)
    head = f"KV cache ({r.kv_type}, ctx {r.ctx}): {_gib(r.kv_bytes)} = "
    if s.mla:
        mha = s.layers * s.heads * s.mha_kv_dims * per * r.ctx
        return (head + f"{s.layers} layers · ({s.kv_lora_rank} kv_lora + {s.rope_dim} rope) · {per:g} B "
                f"= {r.kv_per_token / 1024:.1f} KiB/token — MLA latent cache, llama.cpp's deepseek2 layout "
                f"(K only; V is read from the latent). Decompressed per-head K/V would be {_gib(mha)}")
    return (head + f"2 · {s.layers} layers · {s.kv_heads} KV heads · {s.head_dim} · {per:g} B "
            f"= {r.kv_per_token / 1024:.1f} KiB/token (GQA)")


def format_report(r: FitReport) -> str:
    s, z = r.shape, r.sizes
    counts = ", ".join(f"{t} ×{n}" for t, n in sorted(z.types.items(), key=lambda kv: -kv[1]))
    kv_desc = f"{s.heads} heads ({s.kv_heads} KV) × {s.head_dim}" if not s.mla else \
        f"{s.heads} heads, MLA kv_lora_rank {s.kv_lora_rank}, {s.n_expert} experts ({s.n_expert_used} active)"
    lines = [
        f"{r.name}: {s.arch}, {s.kind}, {z.params / 1e9:.2f} B parameters, {s.layers} layers, {kv_desc}, "
        f"vocab {s.vocab}",
        f"file ({r.mix}{', as stored' if z.measured else ''}): "
        + (f"{z.file_bytes:,} bytes = " if z.measured else "") + f"{z.file_bytes / GB:.2f} GB = {_gib(z.file_bytes)}, "
        f"{8 * z.file_bytes / z.params:.2f} bits/weight  [{counts}]",
        _kv_line(r),
        f"compute buffer (n_ubatch {r.ubatch}, flash attention {'on' if r.flash_attn else 'off'}): "
        f"≈ {_gib(r.compute_bytes)}",
    ]
    lines += _placement_lines(r)
    lines.append(f"speed bound: ≤ {r.tokens_per_s:.1f} tokens/s — per token {r.gpu_read / GB:.1f} GB from VRAM at "
                 f"{r.gpu_bw:g} GB/s + {r.cpu_read / GB:.1f} GB from RAM at {r.cpu_bw:g} GB/s"
                 + (" (active experts only; " if s.n_expert else " (") + "KV cache read at full context)")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _placement_lines(r: FitReport) -> list[str]:
    s = r.shape
    if r.vram_bytes == 0:
        return [f"CPU only: -ngl 0, RAM ≈ {_gib(r.ram_bytes)}"]
    room = max(r.vram_bytes - r.overhead_bytes - r.compute_bytes, 0.0)
    head = (f"GPU {_gib(r.vram_bytes)} = {_gib(r.overhead_bytes)} driver + {_gib(r.compute_bytes)} compute + "
            f"{_gib(room)} for layers at ≤ {_gib(max(r.sizes.layer_bytes) + r.kv_bytes / s.layers)} each "
            "(weights + KV cache)")
    if r.gpu_layers == s.layers and r.output_on_gpu:
        where = f"fits entirely: -ngl {r.ngl} (all {s.layers} layers + output), VRAM ≈ {_gib(r.gpu_bytes)}"
    else:
        first = s.layers - r.gpu_layers
        gpu_part = f"layers {first}..{s.layers - 1} on the GPU" if r.gpu_layers else "no layer on the GPU"
        where = (f"partial offload: -ngl {r.ngl} of {s.layers + 1} ({gpu_part}, VRAM ≈ {_gib(r.gpu_bytes)}); "
                 f"{first} layers{'' if r.output_on_gpu else ' + output'} in RAM ≈ {_gib(r.ram_bytes)}")
    return [head, where]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_args(p) -> None:
    p.add_argument("model", nargs="?", help="a .gguf file (sized as stored), a checkpoint directory, a config.json, "
                   "or a known name "
                   "(e.g. llama-3.1-70b, qwen2.5-7b, deepseek-r1; --list shows them)")
    p.add_argument("--quant", default="Q4_K_M", type=str.upper, choices=list(quants.MIXES),
                   help="GGUF mix (default Q4_K_M); sizes use llama.cpp's per-tensor rules (a .gguf MODEL is "
                   "sized with its own types)")
    p.add_argument("--vram", type=float, default=24.0, help="GPU memory in GiB (a '24 GB' card has 24 GiB); "
                   "0 = CPU only (default 24)")
    p.add_argument("--ctx", type=int, default=8192, help="context length to hold in the KV cache (default 8192)")
    p.add_argument("--kv-type", default="f16", choices=KV_TYPES,
                   help="KV-cache type (llama.cpp -ctk/-ctv; default f16)")
    p.add_argument("--gpu-bandwidth", type=float, default=1000.0, metavar="GB/s",
                   help="GPU memory bandwidth (default 1000, an RTX 3090/4090)")
    p.add_argument("--cpu-bandwidth", type=float, default=60.0, metavar="GB/s",
                   help="RAM bandwidth (default 60, dual-channel DDR5)")
    p.add_argument("--ubatch", type=int, default=512, help="llama.cpp micro-batch (-ub) for the compute buffer")
    p.add_argument("--no-flash-attn", action="store_true", help="size the compute buffer for attention "
                   "without flash attention (scores for the whole context)")
    p.add_argument("--overhead", type=float, default=0.5, metavar="GiB",
                   help="VRAM the driver and CUDA context take (default 0.5)")
    p.add_argument("--list", action="store_true", help="list the known model names and exit")
    t = p.add_argument_group("training (with --train): peak memory of one step and, with --tokens, the cost")
    t.add_argument("--train", choices=["sft", "grpo", "distill", "pretrain"], default=None,
                   help="plan a training stage instead of llama.cpp inference")
    t.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank (0 = full fine-tuning)")
    t.add_argument("--seq", type=int, default=1024, help="tokens per sequence, prompt + completion (default 1024)")
    t.add_argument("--rows", type=int, default=8, help="sequences per training micro-batch (default 8)")
    t.add_argument("--prompts", type=int, default=1, help="GRPO: prompts per step held by the engine (default 1)")
    t.add_argument("--group", type=int, default=16, help="GRPO: completions per prompt G (default 16)")
    t.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per block")
    t.add_argument("--chunk", type=int, default=0, help="vocabulary-chunked log-probs: tokens per chunk (0 = off)")
    t.add_argument("--base-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="storage of frozen weights (LoRA base, reference); default fp32")
    t.add_argument("--rollout-dtype", default="", choices=["", "fp32", "bf16", "fp16"],
                   help="GRPO: rollouts sample a copy of the weights in this dtype (grpo.rollout_dtype; auto is bf16 "
                        "on a GPU for full fine-tuning); default none")
    t.add_argument("--kl", action="store_true", help="GRPO with β > 0: a reference model (none with LoRA)")
    t.add_argument("--tokens", type=float, default=0.0, help="training tokens D for the cost line (e.g. 14.8e12)")
    t.add_argument("--gpus", type=int, default=1, help="GPUs for the cost line (default 1)")
    t.add_argument("--gpu", default="h100", help="GPU kind for the peak FLOP/s: h800 h100 h200 a100 b200 rtx4090 …")
    t.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed (default 0.4)")
    t.add_argument("--price", type=float, default=2.0, help="dollars per GPU-hour (default 2)")


def main(args) -> int:
    if args.list:
        print("\n".join(KNOWN))
        return 0
    if not args.model:
        print("r1kit fit: error: give MODEL (a checkpoint dir, config.json or known name; --list)", file=sys.stderr)
        return 2
    if args.train:
        return _train_main(args)
    try:
        r = plan_fit(args.model, args.quant, args.vram, args.ctx, args.kv_type, args.gpu_bandwidth,
                     args.cpu_bandwidth, args.ubatch, not args.no_flash_attn, args.overhead)
    except (FitError, hf.CheckpointError) as e:
        print(f"r1kit fit: error: {e}", file=sys.stderr)
        return 2
    print(format_report(r))
    return 0


def _train_main(args) -> int:
    from r1kit import plan_train as pt
    try:
        name, cfg, where = resolve_config(args.model)
        setup = pt.TrainSetup(stage=args.train, lora_rank=args.lora, seq=args.seq, rows=args.rows, prompts=args.prompts,
                              group=args.group, grad_checkpointing=args.grad_checkpointing, chunk=args.chunk,
                              base_dtype=args.base_dtype, kl=args.kl, rollout_dtype=args.rollout_dtype)
        p = pt.plan_training(name, cfg, where, setup)
        print(pt.format_plan(p, args.vram))
        if args.tokens:
            print(pt.format_cost(pt.train_cost(p.counts.active, args.tokens, args.gpus, args.gpu, args.mfu,
                                               args.price), args.gpus))
    except (FitError, pt.PlanError, hf.CheckpointError) as e:
        print(f"r1kit fit: error: {e}", file=sys.stderr)
        return 2
    return 0
