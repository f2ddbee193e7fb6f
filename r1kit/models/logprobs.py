"""Token log-probs and entropy straight from hidden states, a chunk of tokens at a time.

GRPO, SFT and distillation need log π(token) (and for logging, the entropy) at completion
positions only. Materialising logits for them costs N·V floats, several times over once autograd
keeps the softmax for backward: at V = 152k, 8 rows × 4k tokens that is ≈ 20 GB per copy in fp32.
`chunked_logprobs` projects `chunk` tokens at a time onto the vocabulary, keeps only the (N,)
results, and in backward recomputes each chunk's logits to form the gradient — peak memory
O(chunk · V) — two (chunk, V) fp32 buffers, in forward and in backward — instead of O(N · V),
for one extra head matmul.

Gradients (z = h Wᵀ / τ, p = softmax z, log p = z − lse z):
    ∂ log p_y / ∂z = onehot(y) − p
    ∂ H / ∂z      = −p ⊙ (log p + H)                       (H = −Σ p log p)
so with upstream g_lp, g_H (N,):  ∂L/∂z = g_lp (onehot − p) − g_H p (log p + H),
and ∂L/∂h = (∂L/∂z) W / τ,  ∂L/∂W = (∂L/∂z)ᵀ h / τ.
"""
from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK = 1024


def _logits(h: Tensor, w: Tensor, b: Tensor | None, inv_t: float) -> Tensor:
    """z = h Wᵀ / τ for one chunk (n, V), in fp32 (bf16 in, fp32 maths) or wider."""
    z = torch.nn.functional.linear(h, w, b)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z.mul_(inv_t) if inv_t != 1.0 else z


def _stats(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """z (n, V) → p = softmax z (n, V), lse (n,), log p_y (n,), H (n,): two (n, V) buffers in all.

    H = lse − Σ p z, the dot product taken as a batched matmul so no third (n, V) product exists.
    """
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    p = (z - lse[:, None]).exp_()  # (n, V)
    picked = z.gather(1, y.clamp(min=0)[:, None])[:, 0] - lse
    ent = lse - (p[:, None, :] @ z[:, :, None])[:, 0, 0]  # (n,): Σ_v p_v z_v
    return p, lse, picked, ent


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, y, inv_t: float, chunk: int):
        acc = torch.promote_types(h.dtype, torch.float32)
        lp = torch.empty(h.shape[0], dtype=acc, device=h.device)
        ent = torch.empty_like(lp)
        with torch.no_grad():
            for a in range(0, h.shape[0], chunk):
                _, _, lp[a:a + chunk], ent[a:a + chunk] = _stats(_logits(h[a:a + chunk], w, b, inv_t), y[a:a + chunk])
        ctx.save_for_backward(h, w, b, y, ent)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, b, y, ent = ctx.saved_tensors
        inv_t, chunk = ctx.inv_t, ctx.chunk
        acc = ent.dtype
        gh = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) \
            if b is not None and ctx.needs_input_grad[2] else None
        g_lp = torch.zeros_like(ent) if g_lp is None else g_lp
        for a in range(0, h.shape[0], chunk):
            hc, yc, gl = h[a:a + chunk], y[a:a + chunk], g_lp[a:a + chunk, None]
            z = _logits(hc, w, b, inv_t)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            p = (z - lse).exp_()
            # ∂L/∂z = g_lp (onehot − p) − g_H p (log p + H), built in z's buffer: z ← log p + H …
            if g_ent is not None:
                gz = z.sub_(lse).add_(ent[a:a + chunk, None]).mul_(g_ent[a:a + chunk, None]).add_(gl).mul_(p).neg_()
            else:
                gz = p.mul_(gl).neg_()
            del p
            gz.scatter_add_(1, yc.clamp(min=0)[:, None], gl)  # … + g_lp·onehot(y)
            if inv_t != 1.0:
                gz.mul_(inv_t)
            if gh is not None:
                gh[a:a + chunk] = (gz.to(w.dtype) @ w).to(h.dtype)
            if gw is not None:
                gw += gz.t() @ hc.to(acc)
            if gb is not None:
                gb += gz.sum(0)
        gw = gw.to(w.dtype) if gw is not None else None
        gb = gb.to(b.dtype) if gb is not None else None
        return gh, gw, gb, None, None, None


def chunked_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                     bias: Tensor | None = None, chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """log softmax(h Wᵀ/τ)[target] and the entropy, per token, without holding (…, V) logits.

    hidden (..., d), weight (V, d), targets (...) → (log-probs (...), entropy (...)) in fp32 (fp64 for fp64 input).
    Negative targets (an ignore index) give log-prob 0 and carry no gradient through it; their
    entropy is still computed (mask it like any per-token statistic). `temperature` 0 is read as 1
    (greedy rows are scored on raw logits, as the engine does).

    >>> h, w = torch.randn(5, 8), torch.randn(11, 8)
    >>> y = torch.tensor([1, 0, 10, -100, 3])
    >>> lp, ent = chunked_logprobs(h, w, y, chunk=2)
    >>> full = torch.log_softmax(h @ w.T, -1)
    >>> bool(torch.allclose(lp[[0, 1, 2, 4]], full[[0, 1, 2, 4], y[[0, 1, 2, 4]]], atol=1e-5)), float(lp[3])
    (True, 0.0)
    """
    shape = targets.shape
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(shape)} disagree on the token count")
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    lp, ent = _ChunkedLogprobs.apply(h, weight, bias, y, inv_t, max(1, int(chunk)))
    lp = torch.where(y >= 0, lp, torch.zeros_like(lp))
    return lp.view(shape), ent.view(shape)
