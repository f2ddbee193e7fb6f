"""KL estimators to a frozen reference, and logits → token log-probs / entropy.
Shapes and conventions: r1kit/rl/__init__.py."""
from __future__ import annotations

import torch
from torch import Tensor

from r1kit.rl.losses import LOG_RATIO_CLAMP, _upcast


# --------------------------------------------------------------------------------------------
# KL to a frozen reference (per token)
# --------------------------------------------------------------------------------------------
# Schulman, "Approximating KL Divergence" (2020): for x ~ q and r = p(x)/q(x), the estimators of
# KL(q || p) are k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r. GRPO samples from the
# policy and penalises KL(pi_theta || pi_ref), so q = pi_theta, p = pi_ref and
# r = pi_ref / pi_theta (DeepSeekMath eq. 4 uses k3 with exactly this r).
#
# Used as *losses* (differentiated through log pi_theta), what matters is their expected gradient
# under x ~ pi_theta, per token (pi is the next-token distribution; E[grad log pi] = 0):
#   k1 as a loss:  grad k1 = grad log pi           -> E = 0: pure noise, no pull toward the reference.
#                  So ``kl_k1`` is the score-function form instead: value k1, gradient
#                  sg(k1) * grad log pi, whose expectation is grad KL(pi || ref) (the reverse KL).
#   k2:            grad k2 = (log pi - log ref) grad log pi  -> E = grad KL(pi || ref) (reverse KL).
#   k3:            grad k3 = (1 - r) grad log pi  -> E = -E_ref[grad log pi] = grad KL(ref || pi),
#                  the gradient of the *forward* KL, although k3's value estimates the reverse one.
#   k3_iw:         DeepSeek-V3.2's unbiased estimate (pi_theta / pi_old) * k3. Value: unbiased for
#                  KL(pi || ref) even when the samples come from pi_old; gradient
#                  (pi/pi_old)(log pi - log ref) grad log pi -> E_old = grad KL(pi || ref).
# tests/test_rl.py checks each of these claims by Monte Carlo on a small categorical.
# Every estimator takes ``(logp, ref_logp, old_logp=None)``; ``old_logp=None`` means on-policy
# (pi_old = sg(pi_theta)), which only ``k3_iw`` reads.


def _ref_log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``log r = ref_logp - logp`` in fp32 or wider, clamped to +-LOG_RATIO_CLAMP (no exp overflow)."""
    return (_upcast(ref_logp.detach()) - _upcast(logp)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def kl_k1(logp: Tensor, ref_logp: Tensor, old_logp: Tensor | None = None) -> Tensor:
    """k1 = ``log pi - log ref`` per token ``(N, T)``, in its gradient-correct (score-function) form.

    The value is k1 (unbiased for KL(pi || ref), can be negative); the gradient is
    ``sg(k1) * grad logp``, unbiased for grad KL(pi || ref). Differentiating k1 itself would give
    ``grad logp``, whose expectation on-policy is zero.

    >>> kl_k1(torch.tensor([0.0]), torch.tensor([-1.0]))
    tensor([1.])
    """
    k1 = -_ref_log_ratio(logp, ref_logp)
    lp = _upcast(logp)
    return k1.detach() + k1.detach() * (lp - lp.detach())  # value k1, gradient sg(k1) * grad logp


def kl_k2(logp: Tensor, ref_logp: Tensor, old_logp: Tensor | None = None) -> Tensor:
    """k2 = ``(log r)^2 / 2`` per token ``(N, T)``; >= 0, biased value, gradient of KL(pi || ref) on-policy."""
    return 0.5 * _ref_log_ratio(logp, ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor, old_logp: Tensor | None = None) -> Tensor:
    """k3 = ``r - 1 - log r``, ``r = pi_ref / pi_theta``, per token ``(N, T)``.

    Its value is unbiased for KL(pi || ref) and >= 0, but as a loss its expected gradient is that
    of the forward KL(ref || pi) (see the section comment). ``expm1`` keeps ``r - 1`` accurate
    when the policy is still close to the reference.

    >>> kl_k3(torch.tensor([0.0]), torch.tensor([0.0]))
    tensor([0.])
    """
    log_r = _ref_log_ratio(logp, ref_logp)
    # r - 1 - log r >= 0 mathematically; clamp away the last-ulp negatives rounding can produce.
    return (torch.expm1(log_r) - log_r).clamp(min=0.0)


def kl_k3_iw(logp: Tensor, ref_logp: Tensor, old_logp: Tensor | None = None) -> Tensor:
    """DeepSeek-V3.2's unbiased KL estimate: ``(pi_theta / pi_old) * k3`` per token ``(N, T)``.

    The importance weight corrects for sampling from pi_old (mu > 1 inner updates), and its own
    gradient turns k3's forward-KL gradient into the reverse KL's: the loss's expected gradient is
    grad KL(pi || ref). ``old_logp`` None: on-policy, the weight is 1 in value but still carries
    gradient.

    >>> kl_k3_iw(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([-1.0]))
    tensor([0.])
    """
    lp = _upcast(logp)
    old = lp.detach() if old_logp is None else _upcast(old_logp.detach())
    w = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return w * kl_k3(logp, ref_logp)


# --------------------------------------------------------------------------------------------
# Logits -> log-probs / entropy
# --------------------------------------------------------------------------------------------


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[target]`` per position: ``(N, T, V), (N, T) -> (N, T)`` (float32).

    Computed as ``logit[target] - logsumexp(logits)`` so the full ``(N, T, V)`` log-softmax is
    never kept for backward. Negative targets (an ignore index such as -100) give 0.
    """
    x = logits.float()
    valid = targets >= 0
    picked = x.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(x, dim=-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def entropy_from_logits(logits: Tensor, rows: int = 64) -> Tensor:
    """Entropy of ``softmax(logits)`` per position: ``(N, T, V) -> (N, T)`` (float32, nats; float64 stays).

    ``H = logsumexp(x) - sum_v p_v x_v``: the max-shifted log-sum-exp cannot overflow, and the
    expectation of the logits is one dot product per position. ``-inf`` logits (banned tokens) are
    clamped to the dtype's lowest finite value first: their ``p`` is still exactly 0, and 0 times a
    finite number adds 0 to H, so NaN cannot appear in the value or the gradient. Positions are
    taken ``rows`` at a time so the (rows, V) temporaries stay in cache: over a 49k vocabulary this
    is ~3× faster than whole-tensor log_softmax/exp/product passes (measured).

    >>> entropy_from_logits(torch.zeros(1, 1, 4))  # uniform over 4 -> log 4
    tensor([[1.3863]])
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    flat = x.reshape(-1, x.shape[-1])  # (N*T, V)
    low = torch.finfo(x.dtype).min
    parts = []
    for c in flat.split(rows):
        c = c.clamp(min=low)
        lse = torch.logsumexp(c, dim=-1)  # (r,)
        p = torch.exp(c - lse[:, None])  # (r, V)
        parts.append(lse - (p[:, None, :] @ c[:, :, None]).view(-1))  # (r, 1, V) @ (r, V, 1) → (r,)
    return torch.cat(parts).view(x.shape[:-1]) if parts else x.new_zeros(x.shape[:-1])
