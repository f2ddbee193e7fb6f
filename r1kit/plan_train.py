"""`r1kit fit MODEL --train sft|grpo`: peak training memory and what a run costs.

    r1kit fit qwen2.5-1.5b --train grpo --lora 16 --seq 1024 --rows 8 --prompts 4 --group 16 --vram 24
    r1kit fit deepseek-v3 --train pretrain --tokens 14.8e12 --gpus 2048 --gpu h800 --mfu 0.33 --price 2

Memory is the sum of what one optimizer step keeps alive at its peak, counted from the model's own
parameters (built on PyTorch's meta device, LoRA adapters included, so counts are exact):

  weights      every parameter at its storage dtype (fp32 master weights for full fine-tuning;
               with LoRA the frozen base at --base-dtype and fp32 adapters)
  grads        fp32, trainable parameters only
  optimizer    AdamW: two fp32 moments per trainable parameter
  activations  what autograd saves per token and layer (below) × rows × seq; with activation
               checkpointing only each block's input is kept ("recompute": one block at a time)
  logits       full (rows, seq, V) fp32 logits × 3 live copies (logits, log-softmax, its gradient);
               vocabulary-chunked log-probs keep two (chunk, V) fp32 buffers instead
  reference    GRPO with β > 0: a frozen copy of the weights (none with LoRA: adapters switched off)
  rollout KV   GRPO: the engine's cache for prompts × G sequences of seq tokens

The peak is weights + grads + optimizer + reference + the larger of the training buffers and the
rollout KV cache (generation and the training forward/backward of a step never overlap); training
holds activations + logits, or with checkpointing the block inputs + the larger of one recomputed
block and the logits (the blocks are recomputed after the vocabulary projection's backward).

Saved activations per token and layer of the dense block (fp32, our modules; d hidden, f ffn,
q = heads·head_dim, kv = kv_heads·head_dim): two RMSNorms save input, normalised input and output
(3d each) → 6d; q, k, v and SDPA's output and its transposed copy → 3q + 2kv (plus a q-sized
expansion of k and v for grouped-query attention); SwiGLU saves w1's and w3's outputs, silu(w1 x) and
the product → 4f. MoE layers count the same per activated expert (k routed + shared) plus the
router's (E) scores; MLA counts its latent (kv_lora_rank + rope) and decompressed q/k/v.

Cost: FLOPs = 6 · N_active · D (forward 2ND + backward 4ND; N without the embedding table, MoE
counting only activated experts), time = FLOPs / (GPUs · peak · MFU).
"""
from __future__ import annotations

from dataclasses import dataclass, field

GiB = float(1 << 30)

# dense BF16 tensor-core peak, TFLOP/s (no sparsity). H800 = H100 SXM compute with less NVLink bandwidth.
GPU_PEAK_TFLOPS = {"h800": 989.0, "h100": 989.0, "h200": 989.0, "a100": 312.0, "a800": 312.0, "b200": 2250.0,
                   "rtx3090": 71.0, "rtx4090": 165.0, "l40s": 362.0}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STAGES = ("sft", "grpo", "pretrain", "distill")
TRAIN_PARTS, ROLLOUT_PARTS = ("activations", "recompute", "logits"), ("rollout KV",)


class PlanError(ValueError):
    """A planner input that cannot be used; the message names the option."""


@dataclass
class Counts:
    total: int  # every parameter (tied weights once)
    trainable: int
    embedding: int  # the input embedding table
    active: int  # parameters one token uses (MoE: activated experts only), embedding excluded
    lora: int = 0


@dataclass
class TrainPlan:
    name: str
    stage: str
    counts: Counts
    parts: dict[str, float] = field(default_factory=dict)  # component → bytes
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        """Weights, gradients, optimizer and reference live throughout; a step's activations and logits
        (training) and the rollout KV cache (generation) are never alive at the same time."""
        p = self.parts
        # with checkpointing, a block is recomputed only after the vocabulary projection's backward is done
        train = p.get("activations", 0.0) + max(p.get("recompute", 0.0), p.get("logits", 0.0))
        rollout = sum(v for k, v in p.items() if k in ROLLOUT_PARTS)
        rest = sum(v for k, v in p.items() if k not in TRAIN_PARTS + ROLLOUT_PARTS)
        return rest + max(train, rollout)


def build_meta(cfg: dict, where: str, sample_layers: bool = True):
    """The r1kit model a config.json describes, on the meta device (no memory).

    With `sample_layers`, only the layers that differ are built (the dense lead and one more): a
    671 B DeepSeek-V3 has ~15k expert modules and takes half a minute to construct even on meta;
    count_params extrapolates the repeated layer. Returns (model, number of main layers in the config).
    """
    import torch

    from r1kit.formats import hf
    fam = hf.family_for(hf.field(cfg, "architectures", list, where=where)[0], where)
    c = fam.config_from_hf(cfg, where)
    n_layers = c.num_hidden_layers
    if sample_layers:
        c.num_hidden_layers = min(n_layers, getattr(c, "first_k_dense_replace", 0) + 1)
    with torch.device("meta"):
        return fam.model_cls(c), n_layers


def count_params(model, n_layers: int | None = None) -> Counts:
    """Exact counts; when the model was built with fewer main layers than `n_layers`, its last main
    layer stands for the missing ones (they are identical in shape)."""
    c = model.config
    built = c.num_hidden_layers
    n_layers = n_layers or built
    weight = {id(p): 1 for p in model.parameters()}
    for p in model.layers[built - 1].parameters():
        weight[id(p)] = 1 + n_layers - built  # the repeated layer, counted once per real layer
    seen, total, trainable, lora = set(), 0, 0, 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * weight[id(p)]
        total += n
        trainable += n if p.requires_grad else 0
        lora += n if name.endswith(("lora_A", "lora_B")) else 0
    emb = model.embed.weight.numel()
    inactive = 0
    if getattr(c, "n_routed_experts", 0):  # only k of E routed experts run per token
        per_expert = 3 * c.hidden_size * c.moe_intermediate_size
        moe_layers = n_layers - c.first_k_dense_replace
        inactive = moe_layers * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
        mtp = sum(p.numel() for layer in model.layers[built:] for p in layer.parameters()
                  if p is not model.embed.weight and p is not model.head.weight)
        inactive += mtp  # MTP depths are a training add-on, not part of the 6ND of the main model
    tied = model.head.weight is model.embed.weight
    active = total - emb - inactive + (emb if tied else 0)  # a tied table is still the output head
    return Counts(total, trainable, emb, active, lora)


def activation_floats(cfg, lora_rank: int = 0, n_lora_targets: int = 0) -> float:
    """Floats autograd saves per token per layer (see the module docstring), averaged over layers."""
    d = cfg.hidden_size
    if hasattr(cfg, "kv_lora_rank"):  # MLA + MoE
        H, nope, rope, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = H * (nope + rope)
        attn = (cfg.q_lora_rank or 0) * 2 + (cfg.kv_lora_rank + rope) * 2 + 3 * q + 2 * H * vd
        L, dense_n = cfg.num_hidden_layers, cfg.first_k_dense_replace
        moe = (cfg.num_experts_per_tok + cfg.n_shared_experts) * 4 * cfg.moe_intermediate_size \
            + 2 * cfg.n_routed_experts + 2 * d * cfg.num_experts_per_tok
        ffn = (dense_n * 4 * cfg.intermediate_size + (L - dense_n) * moe) / L
    else:
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        attn = 3 * q + 2 * kv  # SDPA saves K/V unexpanded (enable_gqa): measured 11,756 floats vs 11,712 here

        ffn = 4 * cfg.intermediate_size
    per_layer_targets = n_lora_targets / max(cfg.num_hidden_layers, 1)
    return 6 * d + attn + ffn + per_layer_targets * lora_rank


@dataclass
class TrainSetup:
    stage: str = "grpo"
    lora_rank: int = 0
    lora_targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")
    seq: int = 1024  # tokens per row (prompt + completion)
    rows: int = 8  # sequences per training micro-batch
    prompts: int = 1  # GRPO: prompts per step; the engine holds prompts × group sequences at once
    group: int = 16  # GRPO: G completions per prompt
    grad_checkpointing: bool = False
    chunk: int = 0  # vocabulary-chunked log-probs: tokens per chunk; 0 = full logits
    base_dtype: str = "fp32"  # storage of frozen weights (LoRA base, reference)
    kl: bool = False  # GRPO with β > 0 keeps a reference
    kv_dtype: str = "fp32"
    rollout_dtype: str = ""  # GRPO: a copy of the weights rollouts sample from (grpo.rollout_dtype); "" = none


def plan_training(name: str, cfg: dict, where: str, s: TrainSetup) -> TrainPlan:
    if s.stage not in STAGES:
        raise PlanError(f"--train must be one of {', '.join(STAGES)}, got {s.stage!r}")
    for what, v in (("--seq", s.seq), ("--rows", s.rows), ("--prompts", s.prompts), ("--group", s.group)):
        if v < 1:
            raise PlanError(f"{what} must be ≥ 1, got {v}")
    for what, v in (("--base-dtype", s.base_dtype), ("--kv-dtype", s.kv_dtype), ("--rollout-dtype", s.rollout_dtype)):
        if v not in BYTES and not (what == "--rollout-dtype" and v == ""):
            raise PlanError(f"{what} must be one of {', '.join(BYTES)}, got {v!r}")
    model, n_layers = build_meta(cfg, where)
    n_targets = 0
    if s.lora_rank:
        from r1kit.models import lora
        wrapped = lora.apply_lora(model, rank=s.lora_rank, targets=s.lora_targets)
        last = f"layers.{model.config.num_hidden_layers - 1}."
        n_targets = len(wrapped) + sum(w.startswith(last) for w in wrapped) * (n_layers - model.config.num_hidden_layers)
    c, mc = count_params(model, n_layers), model.config
    mc.num_hidden_layers = n_layers  # the sampled model stands for the whole one from here on
    tokens = s.rows * s.seq
    frozen_bytes = BYTES[s.base_dtype] if s.lora_rank else 4
    parts = {"weights": (c.total - c.lora) * frozen_bytes + c.lora * 4, "grads": 4 * c.trainable,
             "optimizer": 8 * c.trainable}
    per_tok = activation_floats(mc, s.lora_rank, n_targets) * 4
    L = mc.num_hidden_layers
    if s.grad_checkpointing:  # block inputs kept; one block at a time recomputed with its full activations
        parts["activations"] = tokens * L * mc.hidden_size * 4
        parts["recompute"] = tokens * per_tok
    else:
        parts["activations"] = tokens * L * per_tok
    V = mc.vocab_size
    # full logits: the (N, T, V) logits, their temperature-scaled fp32 copy and the log-softmax's gradient;
    # chunked (models/logprobs.py): two (chunk, V) fp32 buffers at any time
    parts["logits"] = 2 * 4 * V * min(s.chunk, tokens) if s.chunk else 3 * 4 * V * tokens
    plan = TrainPlan(name, s.stage, c, parts)
    if s.stage == "grpo":
        if s.kl and not s.lora_rank:
            parts["reference"] = c.total * BYTES[s.base_dtype]
        probe = model.new_cache(1, 1, dtype=_torch_dtype(s.kv_dtype), device="meta")
        per_slot = sum(t.numel() * t.element_size() for t in _cache_tensors(probe))
        parts["rollout KV"] = per_slot * s.prompts * s.group * s.seq
        if s.rollout_dtype and not s.lora_rank:  # kept for the whole run, refreshed before each draw
            parts["rollout weights"] = c.total * BYTES[s.rollout_dtype]
    if s.stage == "pretrain" and s.lora_rank:
        plan.notes.append("LoRA while pretraining from scratch trains almost nothing")
    return plan


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _cache_tensors(cache):
    return [v for v in vars(cache).values() if hasattr(v, "element_size") and v.dim() > 1]


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------
@dataclass
class Cost:
    flops: float
    gpu_hours: float
    days: float
    dollars: float
    assumptions: str


def train_cost(active_params: float, tokens: float, gpus: int, gpu: str, mfu: float, price: float) -> Cost:
    """6·N·D FLOPs at `mfu` of the GPU's dense BF16 peak → GPU-hours, wall days, dollars."""
    key = gpu.lower().replace("-", "").replace(" ", "")
    if key not in GPU_PEAK_TFLOPS:
        raise PlanError(f"--gpu {gpu!r} is unknown; choose one of {', '.join(GPU_PEAK_TFLOPS)}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    if gpus < 1 or tokens <= 0 or price < 0:
        raise PlanError("--gpus must be ≥ 1, --tokens > 0 and --price ≥ 0")
    flops = 6.0 * active_params * tokens
    peak = GPU_PEAK_TFLOPS[key] * 1e12
    gpu_hours = flops / (peak * mfu) / 3600
    why = (f"6·N·D with N = {active_params / 1e9:.1f} B active parameters and D = {tokens:.3g} tokens; "
           f"{gpu} dense BF16 peak {GPU_PEAK_TFLOPS[key]:g} TFLOP/s at MFU {mfu:g}; attention FLOPs and "
           "failed/restarted work not counted")
    return Cost(flops, gpu_hours, gpu_hours / gpus / 24, gpu_hours * price, why)


def format_plan(p: TrainPlan, vram_gib: float) -> str:
    c = p.counts
    lines = [f"{p.name}: {p.stage} — {c.total / 1e9:.3f} B parameters ({c.active / 1e9:.3f} B active per token), "
             f"{c.trainable / 1e6:.2f} M trainable" + (f" (LoRA {c.lora / 1e6:.2f} M)" if c.lora else "")]
    for k, v in p.parts.items():
        lines.append(f"  {k:15s} {v / GiB:9.2f} GiB")
    lines.append(f"  {'peak':15s} {p.peak / GiB:9.2f} GiB  (training and rollout buffers are not alive together)")
    if vram_gib > 0:
        verdict = "fits" if p.peak <= vram_gib * GiB else "does NOT fit"
        lines.append(f"{verdict} in {vram_gib:g} GiB")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def format_cost(k: Cost, gpus: int) -> str:
    return (f"cost: {k.flops:.3g} FLOPs = {k.gpu_hours / 1e6:.3f} M GPU-hours = {k.days:.1f} days on {gpus} GPUs"
            f" = ${k.dollars / 1e6:.3f} M\n  assumptions: {k.assumptions}")
