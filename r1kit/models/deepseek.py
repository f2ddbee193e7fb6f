"""DeepSeek-V3 in one file: MLA, DeepSeekMoE with aux-loss-free balancing, multi-token prediction.

Names follow the paper and DeepSeek-V3's inference/model.py (`MLA`, `Gate`, `MoE`, `wq_a`, `wkv_b`,
`kv_norm`, …); the map to Hugging Face tensor names is NAME_MAP in formats/hf_deepseek.py. Config fields are
Hugging Face's, so config.json translates one to one; a few r1kit training knobs ride along.

  MLA  queries go through a low-rank bottleneck (wq_a → q_norm → wq_b, or plain wq); keys and values
       are compressed jointly into c_kv (kv_lora_rank) plus one RoPE key k_pe shared by all heads
       (wkv_a), and expanded per head by wkv_b. Two ways to run it (`model.attn_impl`):
         "naive"  expand K/V per head and cache them: H·(d_nope + d_rope + d_v) numbers per token
         "absorb" fold W_UK (wkv_b's key half) into the query and W_UV (its value half) into the
                  output, so attention runs in latent space over a cache of only [c_kv | k_pe]:
                  kv_lora_rank + qk_rope_head_dim numbers per token (576 for V3 against 32,768 for MHA)
  MoE  shared experts + routed experts; sigmoid affinities, group-limited top-k chosen with a per-expert
       bias that only steers *selection* (gate weights come from the unbiased scores); the bias is
       nudged after each optimizer step toward balance (`model.after_optimizer_step()`).
  MTP  depth k combines RMSNorm(embedding of token i+k) with RMSNorm(depth k-1's hidden state at i),
       projects (eh_proj), runs one transformer block and the shared head to predict token i+k+1.
       The MTP blocks live at layers[N:], so their names match DeepSeek's checkpoint (model.layers.61
       for V3). r1kit/speculative.py uses depth 1 as a draft model.

Uncached forwards (training) run the `attn_impl` path; a cached forward runs the path of its cache,
and new_cache builds the cache `attn_impl` names. The model keeps the r1kit contract (see llama.py):
    forward(idx, targets=None, kv_cache=None, loss_reduction="mean", logit_pos=None,
            positions=None, attn_mask=None, token_mask=None, attn_rows=None)
With targets, in training mode and reduction "mean"/"sum": main loss + mtp_lambda · mean MTP loss +
sequence-wise balance loss; the parts are kept in `model.last_losses`. In eval mode, or with
reduction "none" (per-token NLL for SFT/GRPO), only the main next-token loss. Packed documents
(positions + a block-diagonal attn_mask) are honoured by every layer, the MTP blocks included; an
MTP target whose input token lies in another document than its hidden state is ignored. Only the
tokens of `token_mask` (default targets != -100) count in the MoE load statistics (the
aux-loss-free bias) and the sequence-wise balance loss: padding and prompts steer neither.
`attn_rows` (llama.AttnRows: a flat token sequence attending in rows) serves forwards without targets —
GRPO's log-probs; the MTP and balance losses read documents as rows and refuse it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from r1kit.models.kernels import Linear, attention
from r1kit.models.llama import (IGNORE_INDEX, MLP, KVCache, RMSNorm, checkpointed, head_loss, init_weights_,
                                positions_and_mask, select_positions)
from r1kit.models.lora import weight_of

BALANCE_MODES = ("aux_free", "none", "aux_loss")
LATENT_NORM_EPS = 1e-6  # q_norm / kv_norm: DeepSeek's and HF's code use the RMSNorm default, not rms_norm_eps


@dataclass
class DeepseekConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 688  # dense layers (the first `first_k_dense_replace`)
    moe_intermediate_size: int = 128  # each routed / shared expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int | None = None  # None → plain wq (V2-Lite style); V3: 1536
    kv_lora_rank: int = 64  # d_c; V3: 512
    qk_rope_head_dim: int = 16  # d_h^R; V3: 64
    qk_nope_head_dim: int = 32  # V3: 128
    v_head_dim: int = 32  # V3: 128
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"rope_type": "yarn", "factor", "original_max_position_embeddings", …}
    rope_interleave: bool = True  # DeepSeek checkpoints store RoPE dims as interleaved pairs
    num_nextn_predict_layers: int = 1  # MTP depth D
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    architecture: str = "DeepseekV3ForCausalLM"
    # r1kit training knobs (saved in config.json's "r1kit" block)
    bias_update_speed: float = 1e-3  # γ of the aux-loss-free bias update
    seq_aux_alpha: float = 1e-4  # α of the sequence-wise balance loss; 0 = off
    mtp_lambda: float = 0.3  # λ weighting the mean MTP loss
    balance: str = "aux_free"  # "aux_free" (bias updates) | "none" | "aux_loss" (balance loss only)
    extra: dict = field(default_factory=dict)  # HF keys we carry but do not use

    def __post_init__(self):
        if self.q_lora_rank == 0:  # DeepSeek's own configs spell "no query compression" as 0
            self.q_lora_rank = None
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            self.rope_scaling.setdefault("rope_type", self.rope_scaling.get("type", "default"))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                     "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"):
            _check(self, name, getattr(self, name) >= 1, "must be ≥ 1")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers", "bias_update_speed",
                     "seq_aux_alpha", "mtp_lambda"):
            _check(self, name, getattr(self, name) >= 0, "must be ≥ 0")
        _check(self, "q_lora_rank", self.q_lora_rank is None or self.q_lora_rank >= 1, "must be ≥ 1 or None")
        _check(self, "qk_rope_head_dim", self.qk_rope_head_dim % 2 == 0, "must be even (RoPE rotates pairs)")
        E, G = self.n_routed_experts, self.n_group
        _check(self, "num_experts_per_tok", self.num_experts_per_tok <= E, f"exceeds n_routed_experts={E}")
        _check(self, "n_group", E % G == 0, f"must divide n_routed_experts={E}")
        _check(self, "topk_group", self.topk_group <= G, f"exceeds n_group={G}")
        _check(self, "n_group", G == 1 or E // G >= 2, "leaves < 2 experts per group (groups score by their top 2)")
        _check(self, "num_experts_per_tok", self.num_experts_per_tok <= self.topk_group * (E // G),
               f"exceeds topk_group × experts per group = {self.topk_group * (E // G)}")
        _check(self, "scoring_func", self.scoring_func == "sigmoid", "only 'sigmoid' (DeepSeek-V3) is supported")
        _check(self, "topk_method", self.topk_method == "noaux_tc", "only 'noaux_tc' (DeepSeek-V3) is supported")
        _check(self, "balance", self.balance in BALANCE_MODES, f"must be one of {BALANCE_MODES}")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        _check(self, "rope_scaling", kind in ("default", "yarn"), f"rope_type {kind!r}: only 'default' and 'yarn'")
        if kind == "yarn":
            _check(self, "rope_scaling", "original_max_position_embeddings" in self.rope_scaling,
                   "yarn needs 'original_max_position_embeddings'")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def _check(cfg, name: str, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"DeepseekConfig.{name}={getattr(cfg, name)!r} {why}")


# -- RoPE with YaRN (only the qk_rope_head_dim slice of each head is rotated) -----------------
def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_params(cfg: DeepseekConfig) -> tuple[torch.Tensor, float, float]:
    """→ inv_freq (rope_dim/2,), cos/sin factor, softmax scale — the numbers HF's DeepseekV3 uses."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    softmax_scale = cfg.qk_head_dim ** -0.5
    s = cfg.rope_scaling or {}
    if s.get("rope_type", "default") == "default":
        return inv_freq, 1.0, softmax_scale
    old_ctx = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.max_position_embeddings / old_ctx
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    # cos/sin are scaled by mscale/mscale_all_dim (1.0 for V3) …
    attn_factor = s.get("attention_factor") or (
        _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
        else _yarn_mscale(factor))
    # … and the softmax temperature by mscale_all_dim², since long contexts flatten attention
    if mscale_all_dim:
        softmax_scale *= _yarn_mscale(factor, mscale_all_dim) ** 2

    # dims that turn fewer than beta_slow times over the old context are interpolated (÷ factor),
    # those turning more than beta_fast times are kept, with a linear ramp between
    def dim_at(rotations: float) -> float:
        return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_at(s.get("beta_fast") or 32), dim_at(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, float(attn_factor), softmax_scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate pairs of the last dim by cos/sin (..., D/2). Pairs are (2j, 2j+1) in DeepSeek's
    interleaved layout, (j, j + D/2) otherwise. The result comes out in the half-split layout
    either way: queries and keys share the permutation, so q·k is unchanged."""
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# -- KV caches — the llama.KVCache protocol; each names its storage in BUFFERS ----------------
class NaiveMLACache(KVCache):
    """Per-head keys (L, B, H, T, d_nope + d_rope) and values (L, B, H, T, d_v): what MHA would cache."""

    def __init__(self, n_layers, batch, n_heads, max_len, qk_head_dim, v_head_dim, dtype, device):
        super().__init__(n_layers, batch, n_heads, max_len, qk_head_dim, dtype, device)
        self.v = torch.zeros(n_layers, batch, n_heads, max_len, v_head_dim, dtype=dtype, device=device)


class MLACache(KVCache):
    """The latent cache: per token and layer only [c_kv | k_pe], kv_lora_rank + qk_rope_head_dim numbers.

    One buffer kv (L, B, T, kv_lora_rank + rope_dim) with `c_kv` and `k_pe` as views of it, so the
    absorbed attention's key [c_kv | k_pe] is read in place instead of concatenated every step.
    Positions/attn_mask/advance and the row operations are llama.KVCache's; storage is our own.
    """
    BUFFERS = {"kv": 2}

    def __init__(self, n_layers, batch, max_len, kv_lora_rank, rope_dim, dtype, device):  # own storage: no super()
        self.kv = torch.zeros(n_layers, batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
        self.kv_lora_rank = kv_lora_rank
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def c_kv(self) -> torch.Tensor:  # (L, B, T, kv_lora_rank)
        return self.kv[..., : self.kv_lora_rank]

    @property
    def k_pe(self) -> torch.Tensor:  # (L, B, T, rope_dim)
        return self.kv[..., self.kv_lora_rank:]

    def write(self, layer: int, latent: torch.Tensor, pos: torch.Tensor, Tk: int) -> torch.Tensor:
        """latent (B, T, r + rope) → stored at each row's positions; returns the (B, Tk, r + rope) view."""
        rows = torch.arange(latent.shape[0], device=latent.device)[:, None].expand_as(pos)  # (B, T)
        self.kv[layer][rows, pos] = latent
        return self.kv[layer, :, :Tk]


# -- Multi-head Latent Attention --------------------------------------------------------------
def latent_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale where mask) · v in plain matmuls: (B, Tq, D) × (B, Tk, D) → (B, Tq, Dv).

    The absorbed path's single-head attention over the latent (D = r + rope, Dv = r): here SDPA
    with a mask is no faster on CPU (bench/attention.py, torch 2.13, one thread: 1.0–1.1× at prefill,
    1.3–1.6× slower at decode, the engine's hot loop); the naive path uses SDPA.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (…, Tq, Tk)
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


class MLA(nn.Module):
    def __init__(self, cfg: DeepseekConfig, softmax_scale: float):
        super().__init__()
        d, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.interleaved, self.softmax_scale = H, cfg.rope_interleave, softmax_scale
        self.nope, self.rope, self.v_dim, self.rank = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                      cfg.v_head_dim, cfg.kv_lora_rank)
        if cfg.q_lora_rank is None:
            self.wq = Linear(d, H * cfg.qk_head_dim, bias=False)
        else:  # query compression only saves activation memory in training; the cache never holds q
            self.wq_a = Linear(d, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.wkv_a = Linear(d, self.rank + self.rope, bias=False)  # → [c_kv | k_pe]
        self.kv_norm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.wkv_b = Linear(self.rank, H * (self.nope + self.v_dim), bias=False)  # W_UK and W_UV, per head
        self.wo = Linear(H * self.v_dim, d, bias=False)

    def forward(self, x, cos, sin, cache, layer: int, pos, mask, absorb: bool, rows=None):
        B, T, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope)  # (B, T, H, d_nope + d_rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos[..., None, :], sin[..., None, :], self.interleaved)  # cos (…, T, 1, rope/2)
        c_kv, k_pe = self.wkv_a(x).split([self.rank, self.rope], dim=-1)  # (B, T, r), (B, T, rope)
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rope(k_pe, cos, sin, self.interleaved)  # one RoPE key per token, shared by all heads
        # rows (llama.AttnRows, padding-free training): each path's per-token work runs on the N flat tokens,
        # only its attention in rows gathered from them
        attend = self._absorbed if absorb else self._naive
        y = attend(q_nope, q_pe, c_kv, k_pe, cache, layer, pos, mask, rows)  # (B, T, H, d_v)
        return self.wo(y.flatten(2))  # (B, T, H·d_v) → (B, T, d)

    def _naive(self, q_nope, q_pe, c_kv, k_pe, cache, layer, pos, mask, rows=None):
        """Expand every token's latent into per-head K/V (what MHA would cache)."""
        B, T, H, _ = q_nope.shape
        kv = self.wkv_b(c_kv).view(B, T, H, self.nope + self.v_dim)  # (B, T, H, d_nope + d_v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(B, T, H, self.rope)), dim=-1)  # (B, T, H, d_qk)
        q = torch.cat((q_nope, q_pe), dim=-1)
        if rows is not None:
            q, k, v = rows.gather(q), rows.gather(k), rows.gather(v)  # (1, N, H, ·) → (R, W, H, ·)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, ·)
        if cache is not None:
            k, v = cache.write(layer, k, v, pos, mask.shape[-1])  # (B, H, Tk, ·)
        # mask (B, 1, T, Tk) broadcasts over heads; None: plain causal
        y = attention(q, k, v, mask, scale=self.softmax_scale).transpose(1, 2)  # (B, H, T, d_v) → (B, T, H, d_v)
        return y if rows is None else rows.back(y)  # (R, W, H, d_v) → (1, N, H, d_v)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, cache, layer, pos, mask, rows=None):
        """Attend in latent space: q_nope·(W_UK c) = (W_UKᵀ q_nope)·c, and W_UV moves after the softmax."""
        H = q_nope.shape[2]
        w = weight_of(self.wkv_b).view(H, self.nope + self.v_dim, self.rank)  # (H, d_nope + d_v, r), adapter included
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w[:, : self.nope])  # (B, T, H, r): W_UK folded in
        query, latent = torch.cat((q_lat, q_pe), dim=-1), torch.cat((c_kv, k_pe), dim=-1)  # (B, T, H, ·), (B, T, ·)
        if rows is not None:
            query, latent = rows.gather(query), rows.gather(latent)  # (1, N, …) → (R, W, …)
        B, T = latent.shape[:2]
        # every head attends to the same latent key, so heads become extra query rows of one
        # single-head attention: (B, T·H, r + rope) against (B, Tk, r + rope), with no K/V copies
        query = query.reshape(B, T * H, self.rank + self.rope)
        if cache is not None:
            latent = cache.write(layer, latent, pos, mask.shape[-1])  # (B, Tk, r + rope)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=q_nope.device).tril()[None]  # (1, T, T)
        else:
            mask = mask[:, 0]  # (B, T, Tk): a cache's, or a packed forward's document mask
        Tk = latent.shape[1]
        mask = mask[:, :, None].expand(mask.shape[0], T, H, Tk).reshape(-1, T * H, Tk)  # a row per (t, h)
        o = latent_attention(query, latent, latent[..., : self.rank], mask, self.softmax_scale)  # value = c_kv
        o = o.view(B, T, H, self.rank)  # (B, T·H, r) → (B, T, H, r)
        if rows is not None:
            o = rows.back(o)  # (R, W, H, r) → (1, N, H, r)
        return torch.einsum("bthc,hdc->bthd", o, w[:, self.nope:])  # W_UV: (B, T, H, d_v)


# -- DeepSeekMoE ------------------------------------------------------------------------------
class Gate(nn.Module):
    """Sigmoid affinities → group-limited top-k over bias-adjusted scores → weights from unbiased scores."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg  # shared with the model, so changing model.config.balance takes effect
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E))  # b_i: steers selection only
        self.register_buffer("load", torch.zeros(E, dtype=torch.long), persistent=False)  # tokens since last step
        self.counting = True  # off while activation checkpointing recomputes a block: a token counts once
        # routing replay (R2/R3, see models/routing.py): expert ids recorded from another forward of the
        # same tokens; when set, each forward measures how often its own top-k differs from them, and
        # with `replay_on` routes by them instead (the weights still come from this forward's scores)
        self.replay: torch.Tensor | None = None  # (N, k)
        self.replay_on = False
        self.disagreement: torch.Tensor | None = None  # 0-d: share of (token, expert) picks not in `replay`
        self.recorded: list[torch.Tensor] | None = None  # set to [] to collect each forward's (N, k) ids

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the bias stays fp32 whatever the model dtype (HF keeps it fp32 too): γ = 1e-3 steps vanish in bf16
        self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None):
        """x (N, d) → weights (N, k) fp32, expert indices (N, k), affinities (N, E).

        token_mask (N,) bool: the tokens whose routing counts in `load` (None: all of them).
        """
        c, N = self.cfg, x.shape[0]
        E, G = c.n_routed_experts, c.n_group
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E): s_{i,t}, routing in fp32
        choice = scores.detach() + self.e_score_correction_bias  # (N, E): the bias only picks experts
        if G > 1:  # keep the topk_group groups whose two best experts score highest (bounds all-to-all traffic)
            group_score = choice.view(N, G, E // G).topk(2, dim=-1).values.sum(-1)  # (N, G)
            keep = group_score.topk(c.topk_group, dim=-1).indices  # (N, topk_group)
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
            choice = choice.masked_fill(~group_mask.repeat_interleave(E // G, dim=1), float("-inf"))  # (N, E)
        idx = choice.topk(c.num_experts_per_tok, dim=-1).indices  # (N, k)
        if self.replay is not None:
            idx = self._replayed(idx)
        if self.recorded is not None and self.counting:  # a checkpointed recompute records nothing twice
            self.recorded.append(idx.detach())
        weights = scores.gather(1, idx)  # (N, k): unbiased, so the bias never scales an expert's output
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.training and torch.is_grad_enabled() and self.counting:  # only forwards that will take a step
            counted = idx if token_mask is None else idx[token_mask]  # (n, k): padding and prompts never steer b
            self.load += torch.bincount(counted.flatten(), minlength=E)
        return weights * c.routed_scaling_factor, idx, scores

    def _replayed(self, idx: torch.Tensor) -> torch.Tensor:
        """Measure the disagreement of this forward's ids (N, k) with the recorded ones; route by those if on.

        Rows of `replay` that are -1 have no record (padding, a token the recorder never ran): they
        keep this forward's own choice and do not count in the disagreement.
        """
        if self.replay.shape != idx.shape:
            raise ValueError(f"routing replay: recorded expert ids {tuple(self.replay.shape)} do not match this "
                             f"forward's {tuple(idx.shape)} (replay needs the same tokens in the same layout)")
        ref = self.replay.to(idx.device)
        has = ref[:, 0] >= 0  # (N,)
        same = (idx[:, :, None] == ref[:, None, :]).any(-1)  # (N, k): each own pick is among the recorded ones
        self.disagreement = 1.0 - same[has].float().mean() if bool(has.any()) else idx.new_zeros((), dtype=torch.float)
        return torch.where(has[:, None], ref, idx) if self.replay_on else idx

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += γ·sign(mean load − load_i): overloaded experts become less attractive, idle ones more."""
        load = self.load.float()
        self.e_score_correction_bias += self.cfg.bias_update_speed * torch.sign(load.mean() - load)

    def balance_loss(self, scores: torch.Tensor, idx: torch.Tensor, batch: int,
                     token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's sequence-wise loss α Σ_i f_i P_i, averaged over sequences.

        f_i = E/(k·T) · (times expert i is picked in the sequence), P_i = mean over the sequence of
        the normalised affinity s_i / Σ_j s_j, with T the sequence's real tokens (token_mask (N,),
        None: all): padding neither counts nor dilutes. Sequences with no real token are left out of
        the mean. Only P carries gradient (to the gate weights).
        """
        E, k = scores.shape[1], idx.shape[1]
        T = scores.shape[0] // batch
        real = (torch.ones(batch, T, device=scores.device) if token_mask is None
                else token_mask.view(batch, T).to(scores.dtype))  # (B, T)
        n = real.sum(1)  # (B,) real tokens per sequence
        share = (scores / scores.sum(-1, keepdim=True)).view(batch, T, E)  # (B, T, E)
        P = (share * real[..., None]).sum(1) / n.clamp(min=1)[:, None]  # (B, E)
        hits = torch.zeros(batch, E, device=scores.device).scatter_add_(
            1, idx.view(batch, T * k), real[:, :, None].expand(batch, T, k).reshape(batch, T * k))  # (B, E)
        per_seq = (hits * E / (k * n.clamp(min=1)[:, None]) * P).sum(-1)  # (B,)
        used = n > 0
        return self.cfg.seq_aux_alpha * (per_seq * used).sum() / used.sum().clamp(min=1)


class MoE(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)  # always on: common knowledge lives here
        self.balance_loss: torch.Tensor | None = None  # set by each training forward, summed by the model

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) → (B, T, d); token_mask (B, T) bool: the tokens that steer load balancing."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)  # (N, d)
        real = None if token_mask is None else token_mask.reshape(B * T)  # (N,)
        weights, idx, scores = self.gate(flat, real)
        y = self.dispatch(flat, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        c = self.cfg
        on = self.training and c.balance != "none" and c.seq_aux_alpha > 0
        self.balance_loss = self.gate.balance_loss(scores, idx, B, real) if on else None
        return y.view(B, T, d)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sort the N·k (token, expert) pairs by expert, run each expert once on its batch, scatter back."""
        k = idx.shape[1]
        expert_of = idx.flatten()  # (N·k,)
        order = expert_of.argsort(stable=True)  # (N·k,): pairs grouped by expert
        counts = torch.bincount(expert_of, minlength=len(self.experts)).tolist()
        token = order // k  # (N·k,) token of each sorted pair
        batches = x[token].split(counts)  # per expert: (n_e, d)
        out = torch.cat([self.experts[e](b) for e, b in enumerate(batches) if len(b)])  # (N·k, d), in order
        out = (out * weights.flatten()[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, out)  # sum each token's k expert outputs


# -- Blocks -----------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: DeepseekConfig, dense: bool, softmax_scale: float):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, softmax_scale)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size) if dense else MoE(cfg)

    def forward(self, x, cos, sin, cache, layer, pos, mask, absorb, token_mask=None, rows=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, pos, mask, absorb, rows)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, token_mask) if isinstance(self.ffn, MoE) else self.ffn(h))


class SharedWeight(nn.Module):
    """A second name for another module's weight, for checkpoint layouts that store it twice.

    DeepSeek's checkpoint repeats the embedding and output head inside each MTP layer
    (model.layers.61.embed_tokens / shared_head.head). The model has one copy; this module writes a
    clone under its own name when saving (safetensors refuses tensors that share memory) and
    ignores that name when loading, since the owner loads the same tensor under its main name.
    """

    def __init__(self, owner: nn.Module):
        super().__init__()
        self._owner = (owner,)  # a tuple, so nn.Module does not register it twice

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self._owner[0].weight
        destination[prefix + "weight"] = w if keep_vars else w.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        pass  # the owner's own entry is authoritative


class MTPLayer(Block):
    """MTP depth k: h_k = TRM(eh_proj([RMSNorm(Emb(t_{i+k})); RMSNorm(h_{k-1,i})])), normed for the head.

    The projection input puts the embedding first, as DeepSeek's checkpoint (eh_proj), transformers
    and vLLM do (the paper writes the hidden state first). The returned state is post-norm, the
    form transformers and vLLM pass on — both from the main model and between depths.
    """

    def __init__(self, cfg: DeepseekConfig, softmax_scale: float, embed: nn.Module, head: nn.Module):
        super().__init__(cfg, dense=False, softmax_scale=softmax_scale)  # MTP blocks are MoE, as in V3
        d = cfg.hidden_size
        self.enorm, self.hnorm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d, bias=False)
        self.head_norm = RMSNorm(d, cfg.rms_norm_eps)  # shared_head.norm
        self.embed, self.head = SharedWeight(embed), SharedWeight(head)

    def forward(self, h_prev, emb, cos, sin, cache, layer, pos, mask, absorb, token_mask=None):
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))  # (B, T, 2d) → (B, T, d)
        return self.head_norm(super().forward(x, cos, sin, cache, layer, pos, mask, absorb, token_mask))


# -- Model ------------------------------------------------------------------------------------
class DeepseekV3(nn.Module):
    cuda_graphs_safe = False  # MoE dispatch reads each expert's token count on the host (no CUDA graph)

    def __init__(self, cfg: DeepseekConfig, attn_impl: str = "absorb"):
        super().__init__()
        self.config = cfg
        self.attn_impl = attn_impl
        inv_freq, self.rope_factor, scale = rope_params(cfg)
        N, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # layers[:N] is the main model; layers[N:N+D] the MTP depths, where DeepSeek's checkpoint keeps them
        self.layers = nn.ModuleList([Block(cfg, i < cfg.first_k_dense_replace, scale) for i in range(N)]
                                    + [MTPLayer(cfg, scale, self.embed, self.head) for _ in range(D)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.last_losses: dict[str, torch.Tensor] = {}  # parts of the last training loss, detached
        self.grad_checkpointing = False  # training forwards keep only each block's input (llama.checkpointed)
        self.logprob_chunk = 0  # > 0: losses project this many tokens onto the vocabulary at a time (llama.head_loss)
        self.last_expert_load: torch.Tensor | None = None  # (MoE layers, E) tokens per expert, last step

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, value: str) -> None:
        if value not in ("naive", "absorb"):
            raise ValueError(f"attn_impl must be 'naive' or 'absorb', got {value!r}")
        self._attn_impl = value

    @property
    def max_seq_len(self) -> int:
        return self.config.max_position_embeddings

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device)."""
        dev = self.embed.weight.device
        self.inv_freq = rope_params(self.config)[0].to(dev)
        for gate in self.gates():
            gate.load = torch.zeros_like(gate.load, device=dev)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "DeepseekV3":
        """Fresh weights as for the dense family (llama.init_weights_), router biases and loads at 0."""
        init_weights_(self, self.config.num_hidden_layers, seed, std)
        for gate in self.gates():
            gate.e_score_correction_bias.zero_()
            gate.load.zero_()
        return self

    def gates(self) -> list[Gate]:
        return [m for m in self.modules() if isinstance(m, Gate)]

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None, mtp: bool = False) -> KVCache:
        """A cache for the main layers, or (mtp=True) for the D MTP blocks; its type follows attn_impl."""
        c, w = self.config, self.embed.weight
        L = c.num_nextn_predict_layers if mtp else c.num_hidden_layers
        dtype, device = dtype or w.dtype, device or w.device
        if self.attn_impl == "absorb":
            return MLACache(L, batch, max_len, c.kv_lora_rank, c.qk_rope_head_dim, dtype, device)
        return NaiveMLACache(L, batch, c.num_attention_heads, max_len, c.qk_head_dim, c.v_head_dim, dtype, device)

    def _prepare(self, tokens: torch.Tensor, cache, positions=None, attn_mask=None, attn_rows=None):
        """→ (cos, sin, positions, mask, absorb) for tokens (B, T); a cache decides the path by its type."""
        B, T = tokens.shape
        pos, mask = positions_and_mask(B, T, tokens.device, cache, positions, attn_mask, attn_rows)
        absorb = isinstance(cache, MLACache) if cache is not None else self.attn_impl == "absorb"
        freqs = pos.float()[..., None] * self.inv_freq  # (…, T, rope/2)
        dtype = self.embed.weight.dtype
        cos = (freqs.cos() * self.rope_factor).to(dtype)
        sin = (freqs.sin() * self.rope_factor).to(dtype)
        return cos, sin, pos, mask, absorb

    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None, positions=None, attn_mask=None,
               token_mask=None, attn_rows=None) -> torch.Tensor:
        """idx (B, T) → the main model's final, normed hidden states (B, T, d). Arguments as forward's."""
        x = self.embed(idx)  # (B, T, d)
        cos, sin, pos, mask, absorb = self._prepare(idx, kv_cache, positions, attn_mask, attn_rows)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            args = (x, cos, sin, kv_cache, i, pos, mask, absorb, token_mask, attn_rows)
            x = checkpointed(layer, *args, on_recompute=self._not_counting) if ckpt else layer(*args)
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        return self.norm(x)

    @contextlib.contextmanager
    def _not_counting(self):
        gates = self.gates()
        for g in gates:
            g.counting = False
        try:
            yield
        finally:
            for g in gates:
                g.counting = True

    def mtp(self, depth: int, h_prev: torch.Tensor, tokens: torch.Tensor, kv_cache: KVCache | None = None,
            positions=None, attn_mask=None, token_mask=None) -> torch.Tensor:
        """MTP depth `depth` (1-based): h_prev (B, T, d) at positions i, tokens (B, T) = t_{i+depth}
        → normed hidden (B, T, d), whose head logits predict t_{i+depth+1}.

        Without a cache the T entries take RoPE positions 0..T-1 (transformers counts from `depth`;
        RoPE is relative, so the scores agree), or `positions` (B, T), attending as `attn_mask`
        (B, 1, T, T) allows (default causal). A cache from new_cache(..., mtp=True) holds the depth's
        block at layer depth-1.
        """
        layer = self.layers[self.config.num_hidden_layers + depth - 1]
        cos, sin, pos, mask, absorb = self._prepare(tokens, kv_cache, positions, attn_mask)
        h = layer(h_prev, self.embed(tokens), cos, sin, kv_cache, depth - 1, pos, mask, absorb, token_mask)
        if kv_cache is not None:
            kv_cache.advance(tokens.shape[1])
        return h

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean", logit_pos: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None, return_hidden: bool = False, attn_rows=None):
        """idx (B, T) → logits (B, T, V), or a loss (see the module docstring).

        logit_pos (B,) or (B, T'): logits only at these positions of each row (see llama.select_positions).
        positions (B, T), attn_mask (B, 1, T, T) bool: packed documents (see llama.py's docstring).
        token_mask (B, T) bool: the tokens that steer MoE balancing; default targets != -100, else all.
        attn_rows: idx (1, N) is a flat token sequence attending in rows (llama.AttnRows); no targets then.
        """
        if attn_rows is not None and targets is not None:
            raise ValueError("attn_rows: the MTP and balance losses read each document as a row; pass targets with "
                             "rows of documents (positions + attn_mask) instead")
        if token_mask is None and targets is not None and logit_pos is None:
            token_mask = targets != IGNORE_INDEX
        h = self.hidden(idx, kv_cache, positions, attn_mask, token_mask, attn_rows)  # (B, T, d)
        out = h if logit_pos is None else select_positions(h, logit_pos)
        if return_hidden:  # normed hidden states for a chunked vocabulary projection (llama.py's forward)
            return out
        if targets is None:
            return self.head(out)
        main = head_loss(out, self.head, targets, loss_reduction, self.logprob_chunk)
        self.last_losses = {"main": main.detach()}
        if loss_reduction == "none" or not self.training:
            return main
        return self._training_loss(main, h, idx, targets, loss_reduction, positions, attn_mask)

    def _training_loss(self, main, h, idx, targets, reduction: str, positions, attn_mask) -> torch.Tensor:
        """main + λ · mean over depths of the MTP losses + the MoE layers' balance losses."""
        c, T = self.config, idx.shape[1]
        total, mtp_losses = main, []
        if c.mtp_lambda > 0:
            for k in range(1, c.num_nextn_predict_layers + 1):
                if T - k < 1:
                    break
                # depth k at position i: h_{k-1,i} and token t_{i+k} = idx[i+k] → predict t_{i+k+1} = targets[i+k]
                tgt = targets[:, k:]  # (B, T-k)
                pos = None if positions is None else positions[:, : T - k]
                mask = None if attn_mask is None else attn_mask[:, :, : T - k, : T - k]
                if attn_mask is not None:  # token i+k must share i's document: mask[i+k, i] (causal, same doc)
                    same_doc = attn_mask[:, 0].diagonal(offset=-k, dim1=1, dim2=2)  # (B, T-k)
                    tgt = tgt.masked_fill(~same_doc, IGNORE_INDEX)
                h = self.mtp(k, h[:, : T - k], idx[:, k:], positions=pos, attn_mask=mask,
                             token_mask=tgt != IGNORE_INDEX)  # (B, T-k, d)
                mtp = head_loss(h, self.head, tgt, "sum" if reduction == "mean" else reduction, self.logprob_chunk)
                if reduction == "mean":  # a depth with no target left (tiny documents) adds 0, not NaN
                    mtp = mtp / (tgt != IGNORE_INDEX).sum().clamp(min=1)
                mtp_losses.append(mtp)
            if mtp_losses:
                total = total + c.mtp_lambda * torch.stack(mtp_losses).mean()
        balance = [m.balance_loss for m in self.modules() if isinstance(m, MoE) and m.balance_loss is not None]
        if balance:
            bal = torch.stack(balance).sum()
            if reduction == "sum":  # keep sum / n_tokens equal to the "mean" loss
                bal = bal * (targets != -100).sum()
            total = total + bal
            self.last_losses["balance"] = bal.detach()
        if mtp_losses:
            self.last_losses["mtp"] = torch.stack(mtp_losses).detach()
        self.last_losses["total"] = total.detach()
        return total

    @torch.no_grad()
    def after_optimizer_step(self) -> torch.Tensor | None:
        """Call after each optimizer.step(): aux-loss-free balancing (balance == "aux_free") moves every
        gate's bias by γ·sign(mean load − load), using the tokens routed since the previous call.

        Returns (and keeps in `last_expert_load`) the per-expert load (MoE layers incl. MTP, E); None
        for a model without MoE layers.
        """
        gates = self.gates()
        if not gates:
            return None
        load = torch.stack([g.load.clone() for g in gates])  # (n_moe_layers, E)
        for g in gates:
            if self.config.balance == "aux_free":
                g.update_bias()
            g.load.zero_()
        self.last_expert_load = load
        return load

