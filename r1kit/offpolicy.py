"""Per-token weights applied on top of any policy loss: train–inference mismatch corrections and
high-entropy token selection. Pure tensor functions, like ``rl.py``.

The sampler (the engine) and the trainer compute the "same" policy differently (KV cache vs a
full forward, other kernels, bf16, MoE routing), so the rollout's log-probs ``logp_rollout`` and
the trainer's ``logp_train`` of the sampled tokens differ. The loss's ratio is formed against
the trainer's ``pi_old``; these corrections reweight or drop tokens whose two computations
disagree. Each returns a detached weight ``(N, T)`` (0 = dropped, exactly 0 at padding) and
statistics; the trainer multiplies the per-token loss by the product of the weights it was
asked for. A dropped token still counts in the aggregation's denominator (as a clipped token
does), so switching a correction on does not rescale the loss of the tokens it keeps.

Shapes: N sequences, T completion tokens (padded); ``mask`` is true on completion tokens.
Padding positions may hold garbage or NaN log-probs: everything is selected with
``torch.where``, never multiplied by the mask.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from r1kit.rl.losses import LOG_RATIO_CLAMP, Stats, _masked_mean, _upcast


def _log_ratio(logp_train: Tensor, logp_rollout: Tensor, mask: Tensor) -> Tensor:
    """``log(pi_train / pi_rollout)`` per token, 0 at padding, clamped, detached: ``(N, T)``."""
    lr = _upcast(logp_train).detach() - _upcast(logp_rollout).detach()
    return torch.where(mask, lr, torch.zeros_like(lr)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def mismatch_stats(logp_train: Tensor, logp_rollout: Tensor, mask: Tensor) -> Stats:
    """``mismatch_abs_logp``: mean ``|log pi_train - log pi_rollout|`` over valid tokens (0-d, detached).

    >>> mismatch_stats(torch.tensor([[-1., -2.]]), torch.tensor([[-1.5, float('nan')]]), torch.tensor([[1, 0]]))
    {'mismatch_abs_logp': tensor(0.5000)}
    """
    mask = mask.bool()
    return {"mismatch_abs_logp": _masked_mean(_log_ratio(logp_train, logp_rollout, mask).abs(), mask)}


def tis_weights(logp_train: Tensor, logp_rollout: Tensor, advantages: Tensor, mask: Tensor,
                cap: float = 2.0) -> tuple[Tensor, Stats]:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL").

    ``w_t = min(pi_train / pi_rollout, C)``: the samples came from the rollout policy, so the
    policy gradient of the trainer's policy needs this ratio; truncating at C bounds its variance.
    ``advantages`` is unused (one signature for every correction). Stat ``tis_clip_frac``.

    >>> w, s = tis_weights(torch.tensor([[0., 0.]]), torch.log(torch.tensor([[0.25, 2.]])), None, torch.tensor([[1, 1]]))
    >>> w, s["tis_clip_frac"]
    (tensor([[2.0000, 0.5000]]), tensor(0.5000))
    """
    if cap <= 0:
        raise ValueError(f"the TIS cap must be positive, got {cap}")
    mask = mask.bool()
    ratio = _log_ratio(logp_train, logp_rollout, mask).exp()
    w = torch.where(mask, ratio.clamp(max=cap), torch.zeros_like(ratio))
    return w, {"tis_clip_frac": _masked_mean((ratio > cap).to(w.dtype), mask)}


def icepop_weights(logp_train: Tensor, logp_rollout: Tensor, advantages: Tensor, mask: Tensor,
                   low: float = 0.5, high: float = 5.0) -> tuple[Tensor, Stats]:
    """MIS / IcePop (Ling team, Ring-1T 2025): drop tokens whose ``pi_train / pi_rollout`` leaves ``[low, high]``.

    Masked importance sampling: a token the two engines disagree on that much carries noise, not
    signal, and is dropped outright (weight 0) instead of reweighted. Stat ``icepop_mask_frac``.

    >>> w, s = icepop_weights(torch.tensor([[0., 0., 0.]]), torch.log(torch.tensor([[0.1, 1., 3.]])), None,
    ...                       torch.tensor([[1, 1, 1]]))
    >>> w
    tensor([[0., 1., 0.]])
    """
    if not 0 <= low < 1 < high:
        raise ValueError(f"icepop needs 0 <= low < 1 < high, got low={low}, high={high}")
    mask = mask.bool()
    ratio = _log_ratio(logp_train, logp_rollout, mask).exp()
    keep = (ratio >= low) & (ratio <= high) & mask
    return keep.to(ratio.dtype), {"icepop_mask_frac": _masked_mean((~keep & mask).to(ratio.dtype), mask)}


def offpolicy_sequence_weights(logp_train: Tensor, logp_rollout: Tensor, advantages: Tensor, mask: Tensor,
                               delta: float = 0.1) -> tuple[Tensor, Stats]:
    """DeepSeek-V3.2's off-policy sequence masking: drop negative-advantage sequences that drifted too far.

    ``M_i = 0`` if ``A_i < 0`` and ``(1/|o_i|) sum_t log(pi_rollout(o_t) / pi_train(o_t)) > delta``,
    else 1, broadcast to the sequence's tokens. A negative sample the trainer no longer believes
    in mostly pushes mass onto arbitrary tokens; positive ones are always kept.
    ``advantages``: ``(N,)`` (or ``(N, T)``: its first column is used). Stat ``seqmask_frac`` (sequences).

    >>> w, s = offpolicy_sequence_weights(torch.zeros(3, 2), torch.tensor([[.5, .5], [.5, .5], [0., 0.]]),
    ...                                   torch.tensor([-1., 1., -1.]), torch.ones(3, 2))
    >>> w[:, 0], s["seqmask_frac"]
    (tensor([0., 1., 1.]), tensor(0.3333))
    """
    mask = mask.bool()
    kl = -_log_ratio(logp_train, logp_rollout, mask)  # (N, T): log pi_rollout - log pi_train
    seq_kl = kl.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(kl.dtype)  # (N,)
    adv = advantages if advantages.dim() == 1 else advantages[:, 0]
    drop = (adv.to(seq_kl.device) < 0) & (seq_kl > delta)  # (N,)
    w = torch.where(mask & ~drop[:, None], torch.ones_like(kl), torch.zeros_like(kl))
    return w, {"seqmask_frac": drop.to(kl.dtype).mean()}


def high_entropy_weights(entropy: Tensor, mask: Tensor, top_frac: float = 0.2) -> tuple[Tensor, Stats]:
    """Train only on the ``top_frac`` highest-entropy tokens (Wang et al. 2025, "Beyond the 80/20 rule").

    The few high-entropy "forking" tokens decide where a reasoning path goes; the paper keeps the
    policy gradient on the top 20% of each batch's tokens by entropy and drops the rest.
    ``entropy``: ``(N, T)`` per-token entropy of the policy; ``ceil(top_frac * n_valid)`` valid
    tokens are kept (ties broken by position). Returns weights 0/1 and ``entropy_threshold``.

    >>> w, s = high_entropy_weights(torch.tensor([[.1, .9, .5], [.3, float('nan'), .7]]),
    ...                             torch.tensor([[1, 1, 1], [1, 0, 1]]), top_frac=0.4)
    >>> w
    tensor([[0., 1., 0.],
            [0., 0., 1.]])
    """
    if not 0 < top_frac <= 1:
        raise ValueError(f"entropy top fraction must be in (0, 1], got {top_frac}")
    mask = mask.bool()
    n_valid = int(mask.sum())
    h = torch.where(mask, entropy.detach().float(), torch.full_like(entropy, float("-inf"), dtype=torch.float32))
    k = min(n_valid, max(1, math.ceil(top_frac * n_valid - 1e-9))) if n_valid else 0  # 1e-9: 0.2*5 is 1.0000000000000002
    keep = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    top = h.flatten().topk(k)
    keep[top.indices] = True
    thr = top.values[-1] if k else torch.tensor(0.0)
    return keep.view_as(mask).to(torch.float32), {"entropy_threshold": thr.detach()}


# recipe names -> corrections; each: (logp_train, logp_rollout, advantages, mask, **kw) -> (weight, stats)
CORRECTIONS: dict[str, Callable[..., tuple[Tensor, Stats]]] = {
    "tis": tis_weights,
    "icepop": icepop_weights,
    "offpolicy_seq_mask": offpolicy_sequence_weights,
}
