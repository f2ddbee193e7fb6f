"""Dense decoder for the Llama 3 / 3.1, Qwen2 / 2.5 and Qwen3 families, in one file.

The three families differ only in switches, so one model covers them:
  Llama 3.x : RoPE with `llama3` frequency scaling, GQA, SwiGLU, RMSNorm, optional tied embeddings
  Qwen2/2.5 : + bias on the q/k/v projections, tied embeddings on the small sizes
  Qwen3     : + RMSNorm on each head's query and key before RoPE (QK-norm), explicit head_dim

Names follow DeepSeek-V3's inference/model.py (`embed`, `attn.wq`, `ffn.w1`, `head`); the
mapping to Hugging Face names lives in formats/hf.py. Config field names are Hugging Face's, so a
`config.json` translates one to one.

The contract every r1kit model keeps:
    forward(idx, targets=None, kv_cache=None, loss_reduction="mean", logit_pos=None,
            positions=None, attn_mask=None, token_mask=None, attn_rows=None)
idx (B, T) → logits (B, T, V); with targets → loss ("mean", "sum") or per-token NLL (B, T)
("none", 0 where targets == -100). With a kv_cache, the new tokens of row b sit at positions
cache.lens[b] + 0..T-1 and may attend to everything the row has cached before them. Without one,
`positions` (B, T) are the RoPE positions (default 0..T-1) and `attn_mask` (B, 1, T, T) bool says
which keys each query may attend (True = may; default causal) — packed documents pass
document_mask(doc) and per-document positions, and every sub-module honours both. Padding-free
packing goes one step further: `attn_rows` (an AttnRows) with idx (1, N) runs every token-wise layer
on the N real tokens and only attention over rows gathered from them. `token_mask`
(B, T) bool marks the tokens a training forward learns from (default targets != -100); only the
MoE family reads it (its load statistics), the dense family accepts it so call sites stay shared.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from r1kit.models import kernels
from r1kit.models.kernels import Linear, attention
from r1kit.models.logprobs import chunked_logprobs

IGNORE_INDEX = -100


@dataclass
class LlamaConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None → num_attention_heads (plain MHA)
    head_dim: int | None = None  # None → hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always; Llama/Qwen3 when configured)
    o_bias: bool = False  # bias on the output projection (Llama with attention_bias=True)
    qk_norm: bool = False  # Qwen3
    tie_word_embeddings: bool = False
    architecture: str = "LlamaForCausalLM"
    extra: dict = field(default_factory=dict)  # HF keys we carry but do not use (bos_token_id …)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("extra", "architecture")]


# -- RoPE -------------------------------------------------------------------------------------
def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with the config's long-context scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling).float()
    raise ValueError(f"rope_scaling.rope_type={kind!r} is not supported for the dense family "
                     "(supported: default, linear, llama3)")


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend the band between.

    Wavelengths longer than the original context would see positions never trained on, so
    they are stretched; short ones already cycle many times and are left alone.
    """
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / lo, inv_freq / factor, blended)
    return torch.where(wavelen < old_ctx / hi, inv_freq, out)


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (...,) → cos, sin (..., D) for apply_rope, in HF's half-split layout.

    `sin` carries the rotation's sign, [−sin θ, sin θ], so apply_rope needs no negation.
    """
    freqs = pos.to(inv_freq.dtype)[..., None] * inv_freq  # (..., D/2)
    s = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-s, s), dim=-1).to(dtype)


class RopeTable:
    """cos/sin of every position below a bound, computed once and looked up per forward.

    Decode asks for one position per row per step; indexing a table is one op where computing the
    angles is six. Grows (doubling) when a forward needs a longer one; follows `inv_freq` (a new
    buffer after .to() or reset_buffers() is a new tensor) and the activation dtype.
    """

    def __init__(self):
        self.src, self.table = None, None  # inv_freq it was built from; (n, 2, D) cos | sin

    def lookup(self, inv_freq: torch.Tensor, pos: torch.Tensor, bound: int, dtype):
        """pos (T,) or (B, T), all < bound → cos, sin (T, 1, D) or (B, T, 1, D): broadcast over heads."""
        t = self.table
        if t is None or self.src is not inv_freq or t.dtype != dtype or t.shape[0] < bound:
            n = max(bound, 64) if t is None or t.shape[0] >= bound else max(bound, 2 * t.shape[0])
            cos, sin = rope_cos_sin(inv_freq, torch.arange(n, device=inv_freq.device), dtype)
            self.src, self.table = inv_freq, torch.stack((cos, sin), dim=-2)  # (n, 2, D)
            t = self.table
        cs = t[pos]  # (..., T, 2, D)
        return cs[..., :1, :], cs[..., 1:, :]  # (..., T, 1, D) each


def document_mask(doc: torch.Tensor, branch: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token document ids (B, T) → block-diagonal causal mask (B, 1, T, T), True = may attend.

    A token sees the tokens before it (and itself) in its own document only. With `branch` (B, T), a
    document is a shared prefix (branch 0) followed by several continuations (branch 1, 2, …, each after
    the one before): a continuation's token sees the prefix and its own continuation, never a sibling's —
    what it would see as prefix + continuation alone (GRPO's prompt, written once for several samples).

    >>> document_mask(torch.tensor([[0, 0, 1]]))[0, 0].int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [0, 0, 1]], dtype=torch.int32)
    >>> document_mask(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 1, 2, 2]]))[0, 0].int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 0, 1, 0],
            [1, 0, 1, 1]], dtype=torch.int32)
    """
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()  # (T, T)
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)
    if branch is not None:  # key k: the shared prefix, or the query's own continuation
        allowed &= (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    return allowed[:, None]  # (B, 1, T, T)


@dataclass
class AttnRows:
    """Attention over rows gathered from one flat sequence of tokens: the padding-free training forward.

    The forward's tokens are idx (1, N), every document's own tokens once (a prompt shared by several
    samples once for all of them): embeddings, norms, projections and MLPs run on those N tokens and
    nothing else. Only attention needs rows — cell (r, c) holds token index[r, c], so a token may sit in
    several rows (the shared prompt at the head of each row of its samples: every copy is the same
    token's keys and values, and autograd sums what each row sends back) — and attends as `mask`
    allows ((R, 1, W, W) bool, True = may; None: causal in every row). Each token's output is read back
    from one cell, home[t] (flat r·W + c); its other copies compute the same output, unused.

    >>> rows = AttnRows(torch.tensor([[0, 1, 2], [0, 3, 0]]), torch.tensor([0, 1, 2, 4]), None)
    >>> rows.gather(torch.tensor([[10, 11, 12, 13]])).tolist(), rows.back(torch.arange(6).view(2, 3)).tolist()
    ([[10, 11, 12], [10, 13, 10]], [[0, 1, 2, 4]])
    """
    index: torch.Tensor  # (R, W) long: the token in each cell; padding cells hold any token (never read back)
    home: torch.Tensor  # (N,) long: the cell each token's output is read from
    mask: torch.Tensor | None  # (R, 1, W, W) bool, or None: causal

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, N, …) → (R, W, …): each cell's token (index_select: its backward adds the copies' gradients)."""
        return x[0].index_select(0, self.index.flatten()).view(*self.index.shape, *x.shape[2:])

    def back(self, y: torch.Tensor) -> torch.Tensor:
        """y (R, W, …) → (1, N, …): each token's own cell."""
        return y.flatten(0, 1).index_select(0, self.home)[None]

    def check(self, B: int, T: int) -> None:
        """Refuse a layout that does not describe a (1, T) forward's tokens, naming what is wrong."""
        R, W = self.index.shape if self.index.dim() == 2 else (0, 0)
        if B != 1 or self.index.dim() != 2 or tuple(self.home.shape) != (T,):
            raise ValueError(f"attn_rows: idx must be (1, N) with home (N,) and index (R, W); got idx ({B}, {T}), "
                             f"home {tuple(self.home.shape)}, index {tuple(self.index.shape)}")
        if self.mask is not None and (self.mask.dtype != torch.bool or tuple(self.mask.shape) != (R, 1, W, W)):
            raise ValueError(f"attn_rows.mask must be a bool tensor of shape (R, 1, W, W) = {(R, 1, W, W)}, "
                             f"got {self.mask.dtype} {tuple(self.mask.shape)}")


def positions_and_mask(B: int, T: int, device, kv_cache, positions, attn_mask, attn_rows: AttnRows | None = None):
    """The RoPE positions ((T,) or (B, T)) and the attention mask ((B, 1, T, Tk) bool, or None for
    plain causal) of a forward over T new tokens — the one place both families decide them. With
    attn_rows the mask is the rows' ((R, 1, W, W), see AttnRows) and positions (1, T) are required.

    A cache decides both itself (a row's new tokens follow what it holds), so passing either
    with one is refused rather than silently ignored.
    """
    if kv_cache is not None:
        if positions is not None or attn_mask is not None or attn_rows is not None:
            raise ValueError("positions / attn_mask / attn_rows cannot be combined with a kv_cache: the cache "
                             "places new tokens after what each row holds")
        pos = kv_cache.positions(T)  # (B, T)
        return pos, kv_cache.attn_mask(pos)  # (B, 1, T, Tk)
    if attn_rows is not None:
        if attn_mask is not None or positions is None:
            raise ValueError("attn_rows carries the attention mask itself and needs the tokens' positions (1, N)")
        attn_rows.check(B, T)
    elif attn_mask is not None and (attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (B, 1, T, T)):
        raise ValueError(f"attn_mask must be a bool tensor of shape (B, 1, T, T) = {(B, 1, T, T)}, "
                         f"got {attn_mask.dtype} {tuple(attn_mask.shape)}")
    if positions is None:
        return torch.arange(T, device=device), attn_mask
    if tuple(positions.shape) != (B, T):
        raise ValueError(f"positions must have shape (B, T) = {(B, T)}, got {tuple(positions.shape)}")
    return positions, attn_mask if attn_rows is None else attn_rows.mask


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2), the layout Hugging Face checkpoints are stored in:
    x·cos + [x2, x1]·[−sin, sin] (rope_cos_sin folds the sign into sin). x (..., D)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


# -- KV cache ---------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys and values for every layer, plus each row's filled length.

    k, v: (L, B, n_kv_heads, max_len, head_dim). Rows fill independently (`lens` (B,)), so
    ragged prompts need no left padding: a row's tokens always sit at positions 0..len-1,
    and RoPE positions equal cache columns.

    The protocol every r1kit cache keeps — the engine and the server ask nothing else of a cache:
      lens (B,), max_len, batch_size          filled length of each row, capacity, rows
      positions(T), attn_mask(pos), advance(T) what a cached forward needs
      nbytes(), bytes_per_token_per_layer()   memory, measured from the cache's own tensors
      leading_rows(n, span)                   the first n rows as a view whose writes land here
      select(rows), insert(slots, other)      shrink to rows; copy a prefilled batch into slots
    A subclass with other storage only names its tensors in `BUFFERS`: attribute → token axis,
    each tensor laid out (layers, batch, …); the row operations above are written once, here.
    """
    BUFFERS = {"k": 3, "v": 3}
    span: int | None = None  # fixed key span of forwards through this cache (see leading_rows), else None

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self._rows = None  # (pos, cache rows to write) of the forward in progress: see write()

    @property
    def batch_size(self) -> int:
        return self.lens.shape[0]

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the T tokens about to be written."""
        pos = self.lens[:, None] + torch.arange(T, device=self.lens.device)
        if self.span is None and int(pos.max()) >= self.max_len:  # a fixed span: the caller keeps rows below it
            raise ValueError(f"KV cache full: position {int(pos.max())} ≥ max_len {self.max_len}")
        return pos

    def attn_mask(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, Tk) boolean: query at position p sees cache columns 0..p of its own row."""
        Tk = int(pos.max()) + 1 if self.span is None else self.span
        return (torch.arange(Tk, device=pos.device) <= pos[:, :, None])[:, None]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, Tk: int):
        """k, v (B, H, T, D) → store at each row's positions pos (B, T); return the (B, H, Tk, D) views."""
        # index_copy_ into the layer's (B·H·max_len, D) rows: one op per tensor where advanced indexing
        # (rows, :, pos) costs several — 8 µs against 23 per write at decode (16 rows, 4 KV heads, one
        # thread); the row numbers depend on pos only, so every layer of a forward reuses them
        if self._rows is None or self._rows[0] is not pos:
            B, H, T = k.shape[:3]
            heads = torch.arange(B * H, device=pos.device).view(B, H, 1) * self.max_len  # (B, H, 1)
            self._rows = (pos, (heads + pos[:, None, :]).flatten())  # (B·H·T,)
        rows = self._rows[1]
        for cache, new in ((self.k, k), (self.v, v)):
            cache[layer].view(-1, new.shape[-1]).index_copy_(0, rows, new.reshape(-1, new.shape[-1]))
        return self.k[layer, :, :, :Tk], self.v[layer, :, :, :Tk]

    def advance(self, T: int) -> None:
        self.lens += T

    # -- the row operations of the protocol, over BUFFERS ------------------------------------------
    def buffers(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.BUFFERS]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def bytes_per_token_per_layer(self) -> float:
        """total bytes / (layers × rows × token slots)."""
        L, B = self.buffers()[0].shape[:2]
        return self.nbytes() / (L * B * self.max_len)

    def leading_rows(self, n: int, span: int | None = None) -> "KVCache":
        """The first `n` rows as a cache of the same type sharing storage (basic slices are views),
        so a forward through it writes into this cache and advances these rows' lens.

        span: forwards through the view attend over exactly `span` cache columns (the mask hides the
        unfilled ones) and read no length back to the host: no device sync in the engine's decode steps,
        and static shapes for a CUDA graph. The caller keeps every row's new tokens below `span`
        (nothing checks it on the device)."""
        if span is not None and not 0 < span <= self.max_len:
            raise ValueError(f"span {span} is outside the cache's 1..{self.max_len} columns")
        view = copy.copy(self)
        view.span = span
        for name in self.BUFFERS:
            setattr(view, name, getattr(self, name)[:, :n])
        view.lens = self.lens[:n]
        return view

    def select(self, rows: torch.Tensor, columns: int | None = None) -> None:
        """Keep only `rows` (e.g. copy a prefilled prompt to the G rows that sample it); columns: keep only the
        first `columns` token slots too (the filled ones, when the rest are never read)."""
        for name, axis in self.BUFFERS.items():  # index_select: ≈ 10× advanced indexing's speed on the batch axis
            t = getattr(self, name)
            setattr(self, name, (t if columns is None else t.narrow(axis, 0, columns)).index_select(1, rows))
        self.lens = self.lens[rows]

    def insert(self, slots: torch.Tensor | slice, other: "KVCache") -> None:
        """Copy `other`'s rows (a freshly prefilled batch, same type) into rows `slots` of this cache (a slice
        when they are consecutive: a plain copy, where an index tensor takes the slower indexed write)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot insert a {type(other).__name__} into a {type(self).__name__}")
        for name, axis in self.BUFFERS.items():
            src = getattr(other, name)
            cols = (slice(None),) * (axis - 2) + (slice(0, src.shape[axis]),)  # the other's token slots
            getattr(self, name)[(slice(None), slots, *cols)] = src
        self.lens[slots] = other.lens


# -- Blocks -----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one fused call: no casts to make
            return kernels.rms_norm(x, self.weight, self.eps)
        # normalise in fp32 even for bf16 activations, then scale — as the checkpoints expect
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.wq = Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.wk = Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.wv = Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.wo = Linear(self.n_heads * hd, d, bias=cfg.o_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, pos, mask, rows: AttnRows | None = None):
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv
        q = self.wq(x).view(B, T, H, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, Hkv, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(B, T, Hkv, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalises each head before rotating it
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # cos, sin (…, T, 1, D): shared by the heads
        if rows is not None:  # padding-free: the N tokens laid out in rows for attention alone
            q, k, v = rows.gather(q), rows.gather(k), rows.gather(v)  # (1, N, ·, D) → (R, W, ·, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.write(layer, k, v, pos, mask.shape[-1])  # (B, Hkv, Tk, D)
        # one path for training, packing, prefill and decode: SDPA's contract with the forward's mask, or
        # causal without one (kernels.attention: SDPA itself, or its CPU decode kernel inside a decode step)
        y = attention(q, k, v, mask).transpose(1, 2)  # (B, H, T, D) → (B, T, H, D)
        if rows is not None:
            y = rows.back(y)  # (R, W, H, D) → (1, N, H, D)
        return self.wo(y.reshape(B, T, -1))  # (B, T, H*D) → (B, T, d)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = Linear(dim, inter, bias=False)  # gate
        self.w2 = Linear(inter, dim, bias=False)  # down
        self.w3 = Linear(dim, inter, bias=False)  # up

    def forward(self, x):
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache, layer, pos, mask, rows=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, pos, mask, rows)
        return x + self.ffn(self.ffn_norm(x))


# -- Model ------------------------------------------------------------------------------------
class Llama(nn.Module):
    cuda_graphs_safe = True  # a cached forward reads nothing back to the host: a decode step can be a CUDA graph

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.rope = RopeTable()  # cos/sin by position, built from inv_freq on first use
        self.grad_checkpointing = False  # training forwards keep only each block's input (see checkpointed)
        self.logprob_chunk = 0  # > 0: losses project this many tokens onto the vocabulary at a time (logprobs.py)

    def _fused_decode(self, x, cos, sin, kv_cache, pos, mask):
        """The decode step's layers in one kernel call (kernels.decode_layers: the same maths as Block, with
        the per-op cost gone), or None — then the layers run as modules. Only for plain layers: exactly this
        file's modules (no LoRA wrappers), no hooks on them, a plain KVCache. Read through `_modules` and
        `_parameters` (nn.Module's __getattr__ costs a µs a call, and this runs every decode step)."""
        mod = nn.modules.module
        if (type(kv_cache) is not KVCache or not kernels.layers_apply(x, kv_cache.k) or mod._global_forward_hooks
                or mod._global_forward_pre_hooks):
            return None
        weights = []
        for b in self.layers:
            bm = b._modules
            a, f = bm["attn"], bm["ffn"]
            am, fm = a._modules, f._modules
            qn, kn = am.get("q_norm"), am.get("k_norm")  # Qwen3 (None is no submodule)
            parts = ((b, Block), (a, Attention), (f, MLP), (bm["attn_norm"], RMSNorm), (bm["ffn_norm"], RMSNorm),
                     *((am[k], Linear) for k in ("wq", "wk", "wv", "wo")), *((fm[k], Linear) for k in ("w1", "w2", "w3")),
                     *((n, RMSNorm) for n in (qn, kn) if n is not None))
            if any(type(m) is not t or m._forward_hooks or m._forward_pre_hooks for m, t in parts):
                return None
            slot = {k: am[k]._parameters["weight"] for k in ("wq", "wk", "wv", "wo")}
            slot.update({"b" + k[1]: am[k]._parameters["bias"] for k in ("wq", "wk", "wv", "wo")})
            slot.update({k: fm[k]._parameters["weight"] for k in ("w1", "w2", "w3")})
            slot.update({k: None if n is None else n._parameters["weight"] for k, n in (("q_norm", qn), ("k_norm", kn))})
            slot.update(attn_norm=bm["attn_norm"]._parameters["weight"], ffn_norm=bm["ffn_norm"]._parameters["weight"])
            weights += [slot[k] for k in kernels.LAYER_SLOTS]  # the kernel's order, named once
        c = self.config
        return kernels.decode_layers(x, weights, kv_cache.k, kv_cache.v, pos, cos, sin, mask,
                                     (c.num_attention_heads, c.num_key_value_heads), c.rms_norm_eps, c.head_dim ** -0.5)

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.embed.weight.device)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> "Llama":
        init_weights_(self, self.config.num_hidden_layers, seed, std)
        return self

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        c, w = self.config, self.embed.weight
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                       dtype or w.dtype, device or w.device)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_position_embeddings

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean", logit_pos: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None, return_hidden: bool = False,
                attn_rows: AttnRows | None = None):
        """idx (B, T) → logits (B, T, V), or loss (see module docstring).

        logit_pos (B,) or (B, T'): compute logits only at these positions of each row → (B, 1, V)
        or (B, T', V); prefill and GRPO use it to skip the vocabulary projection of prompt tokens.
        positions (B, T), attn_mask (B, 1, T, T) bool: see the module docstring (no kv_cache then).
        attn_rows: idx (1, N) is a flat sequence of tokens attending in rows gathered from it (AttnRows).
        token_mask: unused by the dense family (no load statistics).
        return_hidden: the final normed hidden states (at logit_pos) instead of logits, for
        trainers that project onto the vocabulary a chunk at a time (r1kit/logprobs.py).
        """
        B, T = idx.shape
        x = self.embed(idx)  # (B, T, d)
        pos, mask = positions_and_mask(B, T, idx.device, kv_cache, positions, attn_mask, attn_rows)
        # every position is below the cache's capacity, or T (the default 0..T-1), or given
        bound = kv_cache.max_len if kv_cache is not None else T if positions is None else int(pos.max()) + 1
        cos, sin = self.rope.lookup(self.inv_freq, pos, bound, x.dtype)  # (…, T, 1, D)
        if mask is not None:  # SDPA adds a float mask as it is, and converts a boolean one in every layer
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        fused = self._fused_decode(x, cos, sin, kv_cache, pos, mask) if T == 1 and kv_cache is not None else None
        if fused is not None:  # a CPU decode step: every layer in one kernel call
            x = fused
        else:
            for i, layer in enumerate(self.layers):
                args = (x, cos, sin, kv_cache, i, pos, mask, attn_rows)
                x = checkpointed(layer, *args) if ckpt else layer(*args)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.norm(x)
        if logit_pos is not None:
            x = select_positions(x, logit_pos)
        if return_hidden:
            return x
        if targets is None:
            return self.head(x)
        return head_loss(x, self.head, targets, loss_reduction, self.logprob_chunk)


def checkpointed(block: nn.Module, *args, on_recompute=None):
    """block(*args) under activation checkpointing: autograd keeps only the inputs, and backward
    runs the block again to get its activations — one more forward for ~L× less activation memory.

    on_recompute: a context manager entered for that second run, for blocks with side effects a
    repeat must not double (MoE load counting).
    """
    calls = 0

    def run(*a):
        nonlocal calls
        calls += 1
        if calls > 1 and on_recompute is not None:
            with on_recompute():
                return block(*a)
        return block(*a)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def select_positions(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, T, d) at pos (B,) → (B, 1, d), or at pos (B, T') → (B, T', d)."""
    if pos.dim() == 1:
        return x[torch.arange(x.shape[0], device=x.device), pos][:, None]
    return x.gather(1, pos[:, :, None].expand(-1, -1, x.shape[-1]))


def init_weights_(model: nn.Module, n_layers: int, seed: int, std: float) -> None:
    """Fresh weights for training from scratch: N(0, std), norms 1, biases 0, and the projections
    that write into the residual stream (wo, w2) scaled by 1/sqrt(2·layers) as in GPT-2, so the
    residual's variance does not grow with depth. Seeded: the same seed gives the same model."""
    g = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            else:
                s = out_std if name.endswith(("wo.weight", "w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)


def head_loss(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor, reduction: str, chunk: int = 0):
    """Next-token loss from final hidden states h (B, T, d): through full logits, or (chunk > 0)
    a chunk of tokens at a time so (B, T, V) logits never exist (models/logprobs.py)."""
    if not chunk:
        return token_loss(head(h), targets, reduction)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logp, _ = chunked_logprobs(h, head.weight, targets, bias=head.bias, chunk=chunk)
    nll = -logp  # (B, T), 0 where targets == -100
    if reduction == "none":
        return nll
    return nll.sum() if reduction == "sum" else nll.sum() / (targets != IGNORE_INDEX).sum()


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy in fp32; -100 targets are ignored. "none" → (B, T) NLL with zeros there."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction=reduction)
    return nll.view(targets.shape) if reduction == "none" else nll
