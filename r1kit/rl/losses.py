"""Per-token policy losses (PPO clip, dual clip, GSPO, CISPO, SAPO, DPPO-TV, Clip-Cov, KL-Cov) and the
aggregations of a per-token matrix to a scalar. Shapes and conventions: r1kit/rl/__init__.py."""
from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0

Stats = dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# Policy losses (per token)
# --------------------------------------------------------------------------------------------


def _broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """Advantages ``(N,)`` (one per sequence) or ``(N, T)`` (per token) -> ``(N, T)``."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    return advantages.to(like.dtype).expand_as(like)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is true; 0 if there are none. Detached."""
    m = mask.to(values.dtype)
    return ((values.detach() * m).sum() / m.sum().clamp(min=1.0))


def _clipped_surrogate(log_ratio: Tensor, adv: Tensor, mask: Tensor,
                       eps_low: float, eps_high: float) -> tuple[Tensor, Stats]:
    """Shared PPO clipped surrogate on a given (already masked, clamped) log-ratio ``(N, T)``.

    Returns the per-token loss (padding not yet zeroed) and clip statistics.
    A token counts as clipped when the clipped branch is the active one, i.e. its gradient is
    zero: ``A > 0 and ratio > 1 + eps_high`` or ``A < 0 and ratio < 1 - eps_low`` (strict, so a
    ratio exactly on the boundary is not clipped).
    """
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    low = (adv < 0) & (ratio < 1.0 - eps_low) & mask
    high = (adv > 0) & (ratio > 1.0 + eps_high) & mask
    stats = {
        "clip_frac": _masked_mean((low | high).to(ratio.dtype), mask),
        "clip_frac_low": _masked_mean(low.to(ratio.dtype), mask),
        "clip_frac_high": _masked_mean(high.to(ratio.dtype), mask),
        "ratio_mean": _masked_mean(ratio, mask),
    }
    return loss, stats


def _upcast(x: Tensor) -> Tensor:
    """Half-precision tensors -> fp32 (differentiably); fp32/fp64 pass through unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _token_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``log(pi_theta / pi_old)`` per token, 0 at padding, clamped to +-LOG_RATIO_CLAMP."""
    logp, old_logp = _upcast(logp), _upcast(old_logp)
    log_ratio = torch.where(mask, logp - old_logp.detach(), torch.zeros_like(logp))
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clipped_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                       eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[Tensor, Stats]:
    """PPO/GRPO clipped surrogate per token, with DAPO's decoupled "clip-higher" range.

    ``loss_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A)``, ``r_t = exp(logp - old_logp)``.
    DAPO raises ``eps_high`` (0.28) above ``eps_low`` (0.2) so low-probability tokens with positive
    advantage can grow, which counters entropy collapse.

    Args:
        logp: ``(N, T)`` log pi_theta(token), differentiable.
        old_logp: ``(N, T)`` log pi_old(token) from rollout time; treated as a constant.
        advantages: ``(N,)`` per sequence or ``(N, T)`` per token; treated as a constant.
        mask: ``(N, T)`` bool or 0/1, true on completion tokens.

    Returns:
        ``(loss (N, T), stats)``; loss is 0 at padding; stats: clip_frac, clip_frac_low,
        clip_frac_high, ratio_mean (token means over the mask).
    """
    mask, logp = mask.bool(), _upcast(logp)
    adv = _broadcast_advantages(advantages.detach(), logp)
    log_ratio = _token_log_ratio(logp, old_logp, mask)
    loss, stats = _clipped_surrogate(log_ratio, adv, mask, eps_low, eps_high)
    return torch.where(mask, loss, torch.zeros_like(loss)), stats


def dual_clip_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                         eps_low: float = 0.2, eps_high: float = 0.2,
                         clip_c: float = 3.0) -> tuple[Tensor, Stats]:
    """Dual-clip PPO (Ye et al. 2020): the clipped surrogate, plus for ``A < 0`` a floor ``c * A``.

    With a negative advantage the ordinary clip leaves ``-r * A`` unbounded as ``r`` grows (a
    token the policy now likes far more than when sampled), so one stale token can dominate the
    batch. Dual clip caps that token's loss at ``-c * A`` (and its gradient at zero) once
    ``r > c``. ``clip_c`` must be > 1.

    Shapes as in ``clipped_token_loss``. Extra stat: ``dual_clip_frac`` (tokens where the cap is
    active). ``clip_frac`` counts only the ordinary clip.
    """
    if clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1, got {clip_c}")
    mask, logp = mask.bool(), _upcast(logp)
    adv = _broadcast_advantages(advantages.detach(), logp)
    log_ratio = _token_log_ratio(logp, old_logp, mask)
    loss, stats = _clipped_surrogate(log_ratio, adv, mask, eps_low, eps_high)
    cap = -clip_c * adv
    capped = (adv < 0) & (loss > cap)
    loss = torch.where(capped, cap, loss)
    stats["dual_clip_frac"] = _masked_mean(capped.to(loss.dtype), mask)
    return torch.where(mask, loss, torch.zeros_like(loss)), stats


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's length-normalised sequence log-ratio ``(1/|y|) * sum_t (logp_t - old_logp_t)``: ``(N,)``.

    Sequences with no tokens get 0 (ratio 1).
    """
    mask = mask.bool()
    lr = _token_log_ratio(logp, old_logp, mask)
    return lr.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(lr.dtype)


def gspo_sequence_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                       eps_low: float = 3e-4, eps_high: float = 4e-4) -> tuple[Tensor, Stats]:
    """GSPO (Zheng et al. 2025): clip a sequence-level ratio, broadcast to tokens.

    ``s_i = exp(mean_t(logp - old_logp))`` (the geometric mean of token ratios), loss
    ``-min(s_i * A, clip(s_i, 1 - eps_low, 1 + eps_high) * A)``. Because ``s_i`` is a
    length-normalised quantity near 1, the paper's clip range is tiny: 3e-4 left, 4e-4 right.

    Implemented in the paper's "GSPO-token" form: token ratio ``sg[s_i] * exp(logp_t - sg[logp_t])``,
    whose *value* is ``s_i`` on every token and whose gradient w.r.t. ``logp_t`` is ``s_i`` for that
    token only. With per-sequence advantages this gives exactly the sequence-level GSPO loss and
    gradient under ``seq_mean_token_mean`` (the paper's 1/G mean), and under every aggregation here
    it equals broadcasting the sequence loss to tokens; it also accepts per-token advantages.

    Shapes as in ``clipped_token_loss``. Stats are token-weighted (a clipped sequence clips all
    its tokens), matching the clip fractions reported in the GSPO paper; ``ratio_mean`` is too.
    """
    mask, logp = mask.bool(), _upcast(logp)
    adv = _broadcast_advantages(advantages.detach(), logp)
    seq_lr = sequence_log_ratio(logp, old_logp, mask).detach().unsqueeze(-1)
    # value: seq_lr on every valid token; gradient: d/dlogp_t = 1 for its own token only.
    token_form = seq_lr + (logp - logp.detach())
    log_ratio = torch.where(mask, token_form, torch.zeros_like(token_form))
    loss, stats = _clipped_surrogate(log_ratio, adv, mask, eps_low, eps_high)
    return torch.where(mask, loss, torch.zeros_like(loss)), stats


def _token_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``exp(clamped log-ratio)`` per token ``(N, T)``, exactly 1 at padding, differentiable in ``logp``."""
    return torch.exp(_token_log_ratio(logp, old_logp, mask))


def _zero_pad(loss: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, loss, torch.zeros_like(loss))


def cispo_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                     eps_low: float = 1.0, eps_high: float = 5.0) -> tuple[Tensor, Stats]:
    """CISPO (MiniMax-M1, 2025): clip the importance *weight*, never the token's gradient.

    ``loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A * logp_t``, so
    ``d loss / d logp_t = -clip(r_t) * A`` on every token: PPO's clip zeroes the gradient of the
    rare, high-ratio "fork" tokens that long reasoning depends on; CISPO only bounds their weight.
    The paper sets no lower bound (``eps_low = 1`` makes it 0) and tunes only ``eps_high``.

    Shapes as in ``clipped_token_loss``. ``clip_frac``: tokens whose weight was clipped.
    """
    mask, logp = mask.bool(), _upcast(logp)
    adv = _broadcast_advantages(advantages.detach(), logp)
    ratio = _token_ratio(logp, old_logp, mask).detach()
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    safe_logp = torch.where(mask, logp, torch.zeros_like(logp))  # padding may hold NaN
    clipped = ((ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)) & mask
    stats = {"clip_frac": _masked_mean(clipped.to(ratio.dtype), mask), "ratio_mean": _masked_mean(ratio, mask)}
    return _zero_pad(-weight * adv * safe_logp, mask), stats


def sapo_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                    tau_pos: float = 1.0, tau_neg: float = 1.05) -> tuple[Tensor, Stats]:
    """SAPO (Qwen team 2025, arXiv 2511.20347): a soft sigmoid gate on the ratio instead of a hard clip.

    ``loss_t = -f(r_t) * A`` with ``f(x) = sigmoid(tau * (x - 1)) * 4 / tau`` and ``tau = tau_pos``
    for ``A > 0``, ``tau_neg`` for ``A < 0``. The gradient is
    ``d loss / d logp_t = -4 s (1 - s) r_t A``, ``s = sigmoid(tau (r_t - 1))``: exactly the policy
    gradient at ``r = 1`` (the 4/tau makes the gate's slope 1 there), decaying smoothly as the
    token drifts off-policy. ``tau_neg > tau_pos`` damps negative updates faster (they spread mass
    over many unsampled tokens).

    Shapes as in ``clipped_token_loss``. ``gate_weight_mean``: mean of ``4 s (1 - s)``.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"SAPO temperatures must be positive, got tau_pos={tau_pos}, tau_neg={tau_neg}")
    mask, logp = mask.bool(), _upcast(logp)
    adv = _broadcast_advantages(advantages.detach(), logp)
    ratio = _token_ratio(logp, old_logp, mask)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))  # (N, T)
    s = torch.sigmoid(tau * (ratio - 1.0))
    sd = s.detach()
    stats = {"gate_weight_mean": _masked_mean(4.0 * sd * (1.0 - sd), mask), "ratio_mean": _masked_mean(ratio, mask)}
    return _zero_pad(-s * (4.0 / tau) * adv, mask), stats


def dppo_tv_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                       delta: float = 0.15) -> tuple[Tensor, Stats]:
    """DPPO-Binary-TV (Qi et al. 2026, "Rethinking the Trust Region in LLM RL"): a trust region on probabilities.

    The ratio ``r_t`` is a one-sample proxy for the policy's divergence: a rare token going from
    1e-5 to 1e-3 has ratio 100 but moved no mass, while 0.99 -> 0.8 moves a lot at ratio 0.81.
    DPPO masks instead on the sampled token's total-variation change ``pi - pi_old``, and only in
    the direction the advantage pushes: for ``A > 0`` tokens with ``pi - pi_old > delta``, for
    ``A < 0`` tokens with ``pi - pi_old < -delta``. Kept tokens get the unclipped ``-r_t * A``
    (gradient ``-r_t A``); masked tokens get gradient 0 and keep the surrogate's value.

    Shapes as in ``clipped_token_loss``. ``clip_frac``: tokens masked; ``tv_mean``: mean |pi - pi_old|.
    """
    mask, logp = mask.bool(), _upcast(logp)
    adv = _broadcast_advantages(advantages.detach(), logp)
    ratio = _token_ratio(logp, old_logp, mask)
    lp, old = (torch.where(mask, x, torch.zeros_like(x)) for x in (logp.detach(), _upcast(old_logp).detach()))
    tv = lp.exp() - old.exp()  # (N, T): pi - pi_old of the sampled token
    out = torch.where(adv > 0, tv > delta, tv < -delta) & mask
    surrogate = -adv * ratio
    loss = torch.where(out, surrogate.detach(), surrogate)
    stats = {"clip_frac": _masked_mean(out.to(ratio.dtype), mask), "tv_mean": _masked_mean(tv.abs(), mask),
             "ratio_mean": _masked_mean(ratio, mask)}
    return _zero_pad(loss, mask), stats


def token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Centred ``(logp_t - mean logp) * (A_t - mean A)`` per token ``(N, T)``, means over valid tokens; 0 at padding.

    Cui et al. 2025 ("The Entropy Mechanism of RL for Reasoning LMs") show the entropy change of a
    step is driven by this covariance: tokens that are both likely and advantaged collapse entropy.
    """
    mask = mask.bool()
    lp = torch.where(mask, _upcast(logp).detach(), torch.zeros_like(logp, dtype=torch.float32))
    adv = _broadcast_advantages(advantages.detach(), lp)
    cov = (lp - _masked_mean(lp, mask)) * (adv - _masked_mean(adv, mask))
    return torch.where(mask, cov, torch.zeros_like(cov))


def clip_cov_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        ratio: float = 2e-4, cov_low: float = 1.0, cov_high: float = 5.0,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Stats]:
    """Clip-Cov (Cui et al. 2025): detach a random few high-covariance tokens from the gradient.

    Among valid tokens with ``cov_low <= cov_t <= cov_high`` (``token_covariance``), pick
    ``max(1, int(ratio * n_valid))`` uniformly at random (``generator``) and stop their gradient;
    every other token gets the unclipped ``-r_t * A``. This replaces the ratio clip.

    Shapes as in ``clipped_token_loss``. ``cov_frac``: fraction of tokens detached.
    """
    mask, logp = mask.bool(), _upcast(logp)
    adv = _broadcast_advantages(advantages.detach(), logp)
    r = _token_ratio(logp, old_logp, mask)
    cov = token_covariance(logp, adv, mask)
    band = ((cov >= cov_low) & (cov <= cov_high) & mask).flatten().nonzero().squeeze(-1)  # candidate positions
    n_pick = min(band.numel(), max(1, int(ratio * int(mask.sum()))))
    perm = torch.randperm(band.numel(), generator=generator, device="cpu")[:n_pick].to(band.device)
    picked = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    picked[band[perm]] = True
    picked = picked.view_as(mask)
    surrogate = -adv * r
    loss = torch.where(picked, surrogate.detach(), surrogate)
    stats = {"cov_frac": _masked_mean(picked.to(r.dtype), mask), "ratio_mean": _masked_mean(r, mask)}
    return _zero_pad(loss, mask), stats


def kl_cov_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                      ratio: float = 2e-3, coef: float = 1.0) -> tuple[Tensor, Stats]:
    """KL-Cov (Cui et al. 2025): a KL penalty on the top-``ratio`` tokens by covariance.

    ``loss_t = -r_t A + coef * |logp_t - old_logp_t|`` on the ``max(1, int(ratio * n_valid))``
    valid tokens with the largest ``token_covariance``, ``-r_t A`` elsewhere (no ratio clip). With
    one update per batch ``logp == old_logp``, so the penalty (and its gradient, ``sign(0) = 0``)
    is zero: it acts from the second inner update on.

    Shapes as in ``clipped_token_loss``. ``cov_frac``: fraction of tokens penalised.
    """
    mask, logp = mask.bool(), _upcast(logp)
    adv = _broadcast_advantages(advantages.detach(), logp)
    log_ratio = _token_log_ratio(logp, old_logp, mask)
    r = torch.exp(log_ratio)
    cov = token_covariance(logp, adv, mask).masked_fill(~mask, float("-inf"))
    n_valid = int(mask.sum())
    k = min(n_valid, max(1, int(ratio * n_valid)))
    picked = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    picked[cov.flatten().topk(k).indices] = True
    picked = picked.view_as(mask) & mask
    loss = -adv * r + torch.where(picked, coef * log_ratio.abs(), torch.zeros_like(r))
    stats = {"cov_frac": _masked_mean(picked.to(r.dtype), mask), "ratio_mean": _masked_mean(r, mask)}
    return _zero_pad(loss, mask), stats


# --------------------------------------------------------------------------------------------
# Aggregation of a per-token matrix to a scalar
# --------------------------------------------------------------------------------------------


def seq_mean_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Original GRPO: mean over each sequence's tokens, then mean over sequences. ``(N, T) -> ()``.

    Every sequence weighs the same, so a token in a long completion counts less (the length bias
    DAPO and Dr. GRPO point out). An empty sequence contributes 0 but still counts in the mean.

    >>> seq_mean_token_mean(torch.tensor([[1., 3.], [5., 0.]]), torch.tensor([[1, 1], [1, 0]]))
    tensor(3.5000)
    """
    m = mask.to(values.dtype)
    v = torch.where(mask.bool(), values, torch.zeros_like(values))
    return ((v.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).mean())


def token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """DAPO token-level mean: sum over all valid tokens / their number. ``(N, T) -> ()``.

    >>> token_mean(torch.tensor([[1., 3.], [5., 0.]]), torch.tensor([[1, 1], [1, 0]]))
    tensor(3.)
    """
    m = mask.to(values.dtype)
    v = torch.where(mask.bool(), values, torch.zeros_like(values))
    return v.sum() / m.sum().clamp(min=1.0)


def seq_mean_token_sum_norm(values: Tensor, mask: Tensor, norm: float) -> Tensor:
    """Dr. GRPO: per-sequence token sum / a constant, then mean over sequences. ``(N, T) -> ()``.

    ``norm`` must be a constant of the run (e.g. ``max_completion_length``), not the batch's padded
    width: dividing by anything length-dependent reintroduces the length bias this removes.

    >>> seq_mean_token_sum_norm(torch.tensor([[1., 3.], [5., 0.]]), torch.tensor([[1, 1], [1, 0]]), 4)
    tensor(1.1250)
    """
    if norm <= 0:
        raise ValueError(f"norm must be positive, got {norm}")
    v = torch.where(mask.bool(), values, torch.zeros_like(values))
    return (v.sum(dim=1) / norm).mean()
