"""Next-token sampling for the rollout engine: temperature, then top-k, then top-p — pure tensor functions.

The order and the cut rules are transformers' `TemperatureLogitsWarper` → `TopKLogitsWarper` →
`TopPLogitsWarper` (min_tokens_to_keep = 1), the order vLLM uses too:
  top-k  keep every token whose probability is ≥ that of the k-th most likely one (ties at the
         k-th value are all kept, as `scores < topk(scores, k)[..., -1]` removes only smaller ones);
  top-p  on the distribution *renormalised after top-k*: drop a token when the tokens more likely
         than it already hold mass ≥ p (transformers' "ascending cumulative mass ≤ 1 − p"); the most
         likely token is always kept.
One deliberate difference at exact ties: where transformers' unstable sort keeps an arbitrary part
of a group of equally likely tokens at the top-p boundary, the whole group is kept here, so the
result never depends on sort order (and the prefiltered path below equals the full sort exactly).

The sampled token's log-prob is log π_rollout(token): its log-probability under the distribution it
was actually drawn from — after temperature *and* truncation, renormalised. That is the behaviour
policy an importance-sampling correction needs (TIS/MIS divide by it). Greedy rows (temperature 0)
report the log-softmax of the raw logits. A trainer that wants log π_θ recomputes it with a forward
pass (stages/grpo.py does), so it never depends on this choice.

Speed: sorting a 49k vocabulary per row per step is most of a small model's decode step, so the
truncated rows first take `torch.topk` of `PREFILTER` (or top_k, when larger) tokens, and only
the rows whose kept set could reach past that window fall back to the full sort. Every quantity is
a prefix sum over the descending order, identical in both paths, so the results are too.

Draws are by inverse CDF: one uniform per row (`u`) picks the token whose cumulative mass interval
holds u·mass. So each row consumes exactly one number of its own generator per token, which is
what makes seeded rows independent of batch size and admission order.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from r1kit.models import kernels

PREFILTER = 1024  # tokens kept by the top-k prefilter before a full sort is needed


def sample(logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor, u: Tensor,
           prefilter: int = PREFILTER) -> tuple[Tensor, Tensor]:
    """Draw one token per row.

    logits (n, V); temperature, top_p (n,) float (temperature 0 → greedy); top_k (n,) long (0 → off);
    u (n,) uniform in [0, 1). Returns tokens (n,) long and their log π_rollout (n,) float32.
    """
    logits = logits.float()
    fast = kernels.sample_untruncated(logits, temperature, top_p, top_k, u)  # no truncated row, on a CPU: one call
    if fast is not None:  # (the same draws as below)
        return fast
    greedy = temperature == 0
    truncated = ~greedy & ((top_p < 1) | (top_k > 0))
    logp = torch.log_softmax(logits / torch.where(greedy, 1.0, temperature)[:, None], dim=-1)  # (n, V)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    out_logp = torch.empty(logits.shape[0], device=logits.device)
    kinds = ((greedy, lambda r: _draw_greedy(logp[r])),  # greedy rows: argmax of the raw logits
             (~greedy & ~truncated, lambda r: _draw_full(logp[r], u[r])),
             (truncated, lambda r: draw_truncated(logp[r], top_p[r], top_k[r], u[r], prefilter)))
    for kind, draw in kinds:
        if bool(kind.all()):  # the usual case: one kind of row, no gather of (n, V)
            return draw(slice(None))
        if bool(kind.any()):
            rows = kind.nonzero()[:, 0]
            tokens[rows], out_logp[rows] = draw(rows)
    return tokens, out_logp


def _draw_greedy(logp: Tensor) -> tuple[Tensor, Tensor]:
    tokens = logp.argmax(-1)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def _draw_full(logp: Tensor, u: Tensor, block: int = 256) -> tuple[Tensor, Tensor]:
    """Untruncated rows: inverse CDF over the vocabulary in id order (no sort). logp (n, V), u (n,).

    In two levels, since a cumulative sum over a whole 49k vocabulary is a slow sequential scan on
    CPU: pick the block of `block` ids whose cumulative mass interval holds u·mass (block sums are
    a vectorised reduction), then the token inside that block alone.
    """
    n, V = logp.shape
    p = logp.exp()
    if V % block:
        p = F.pad(p, (0, block - V % block))  # zero mass past the vocabulary
    blocks = p.view(n, -1, block)  # (n, V/block, block)
    cb = blocks.sum(-1).cumsum(-1)  # (n, V/block) mass up to the end of each block
    target = u.to(p.dtype)[:, None] * cb[:, -1:]  # (n, 1)
    j = torch.searchsorted(cb, target, right=True).clamp_(max=cb.shape[-1] - 1)  # (n, 1) the block
    rest = target - torch.where(j > 0, cb.gather(1, (j - 1).clamp(min=0)), 0.0)  # mass left inside it
    inner = blocks.gather(1, j[:, :, None].expand(n, 1, block))[:, 0].cumsum(-1)  # (n, block)
    # past the block's last nonzero token only by rounding: stay on it
    last = (inner < inner[:, -1:]).sum(-1, keepdim=True).clamp(max=block - 1)
    pos = j * block + torch.searchsorted(inner, rest, right=True).minimum(last)  # (n, 1)
    return pos[:, 0], logp.gather(1, pos)[:, 0]


def draw_truncated(logp: Tensor, top_p: Tensor, top_k: Tensor, u: Tensor,
                   prefilter: int = PREFILTER) -> tuple[Tensor, Tensor]:
    """Top-k then top-p rows. logp (n, V) tempered log-probs; top_p, top_k, u (n,) → tokens, log-probs (n,).

    prefilter 0 (or ≥ V) means the full sort for every row.
    """
    V = logp.shape[-1]
    window = min(V, max(prefilter, int(top_k.max()))) if prefilter else V
    t = truncation(logp, top_p, top_k, window)
    tokens, out = _draw_sorted(t, u)
    if window < V and bool(t.spill.any()):
        rows = t.spill.nonzero()[:, 0]
        tokens[rows], out[rows] = draw_truncated(logp[rows], top_p[rows], top_k[rows], u[rows], prefilter=0)
    return tokens, out


class Truncation(NamedTuple):
    vals: Tensor  # (n, W) log-probs of each row's W most likely tokens, descending
    idx: Tensor  # (n, W) their token ids
    keep: Tensor  # (n, W) bool, a prefix of each row: the tokens sampling may draw
    c: Tensor  # (n, W) cumulative mass of the top-k-renormalised distribution along that order
    log_z: Tensor  # (n, 1) log of the mass top-k kept (0 without top-k)
    spill: Tensor  # (n,) bool: the kept set or the top-k set may reach past the window (full sort needed)


def truncation(logp: Tensor, top_p: Tensor, top_k: Tensor, window: int) -> Truncation:
    """The kept set of each row within its `window` most likely tokens (the whole set when it fits)."""
    if window < logp.shape[-1]:
        vals, idx = logp.topk(window, dim=-1)
        # topk orders equal values arbitrarily: put ties in id order, as the stable full sort does,
        # so both paths map a cumulative position to the same token
        idx, perm = idx.sort(-1)
        vals, perm = vals.gather(1, perm).sort(dim=-1, descending=True, stable=True)
        idx = idx.gather(1, perm)
    else:
        vals, idx = logp.sort(dim=-1, descending=True, stable=True)
    has_k = top_k > 0
    kth = vals.gather(1, (top_k.clamp(1, window) - 1)[:, None])  # (n, 1) log-prob of the k-th token
    keep_k = ~has_k[:, None] | (vals >= kth)  # ties with the k-th are kept, as in transformers
    p = vals.exp() * keep_k  # (n, W), zero past the top-k cut
    # renormalise after top-k by the kept mass — a prefix sum, so the same in any window that holds
    # the kept set; rows without top-k keep the whole vocabulary, whose mass is 1
    z = torch.where(has_k, p.cumsum(-1)[:, -1], 1.0)[:, None]  # (n, 1)
    q = p / z
    c = q.cumsum(-1)
    keep = keep_k & (((c - q) < top_p[:, None]) | (top_p[:, None] >= 1))  # more likely tokens hold < p
    keep[:, 0] = True
    # a tie group straddling the cut is kept whole: everything as likely as the last kept token
    last = keep.sum(-1, keepdim=True) - 1  # (n, 1)
    keep = keep_k & (vals >= vals.gather(1, last))
    spill = keep[:, -1] | (has_k & keep_k[:, -1])  # with top-k, a wrong z would move the top-p cut too
    return Truncation(vals, idx, keep, c, z.log(), spill)


def _draw_sorted(t: Truncation, u: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse CDF within each row's kept prefix → token ids (n,), log π_rollout (n,)."""
    last = t.keep.sum(-1, keepdim=True) - 1  # (n, 1) index of the last kept token
    mass = t.c.gather(1, last)  # (n, 1) kept mass, in top-k-renormalised units
    pos = torch.searchsorted(t.c, u[:, None].to(t.c.dtype) * mass, right=True).minimum(last)  # (n, 1)
    logq = t.vals.gather(1, pos) - t.log_z  # the token's log-prob after top-k renormalisation
    return t.idx.gather(1, pos)[:, 0], (logq - mass.log())[:, 0]
