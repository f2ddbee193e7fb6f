"""GRPO maths as small pure tensor functions.

Nothing here touches a model, an optimizer or a device: every function maps tensors to tensors,
so each piece can be unit-tested against hand arithmetic and swapped from a recipe through the
small name -> function registries at the bottom (``ADVANTAGES``, ``POLICY_LOSSES``,
``AGGREGATIONS``, ``KL_ESTIMATORS``).

Shape letters used throughout:
    B  prompts (groups) in a batch        G  completions per prompt (group size)
    N  = B*G sequences                    T  completion tokens (padded)        V  vocabulary

Conventions
-----------
* Losses are things to *minimise*: ``loss = -objective``.
* Per-token losses come back as ``(N, T)`` with exact zeros at padding (``mask == 0``) and a
  dict of detached 0-d statistic tensors (no ``.item()``, so nothing forces a GPU sync).
* ``old_logp`` is the log-prob under the policy that sampled the rollout. For a single update per
  rollout pass ``old_logp = logp.detach()``: the ratio is then exactly 1, nothing clips, and
  the gradient is the plain policy gradient ``-A * grad(logp)``.
* Log-ratios are clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` before ``exp`` so a stale or
  garbage log-prob can never overflow to ``inf`` (``exp(20) ~ 4.9e8`` is finite in fp32 and
  bf16). A token that far out is far past every clip range, so the zero gradient the clamp gives
  it is what the clip would give anyway (for a negative advantage it acts as a very loose dual
  clip).
* bf16/fp16 log-probs are upcast to fp32 before any ratio is formed: bf16 steps by 2^-7 ~ 8e-3
  just above 1, far coarser than GSPO's 4e-4 clip range, and token sums lose precision in it.
* Padding is handled with ``torch.where`` rather than multiplication so that NaN/inf values at
  padded positions (``0 * nan = nan``) cannot leak into a policy loss, an aggregate or their
  gradients. The KL estimators take no mask: aggregate them with one of the functions here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0

Stats = dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# Group advantages and dynamic sampling
# --------------------------------------------------------------------------------------------


def _as_groups(rewards: Tensor, group_size: int) -> Tensor:
    """View rewards ``(B*G,)`` or ``(B, G)`` as float ``(B, G)``."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    if r.dim() == 2:
        if r.shape[1] != group_size:
            raise ValueError(f"rewards shape {tuple(r.shape)} does not match group_size {group_size}")
        return r
    if r.dim() != 1 or r.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(r.shape)} do not split into groups of {group_size}")
    return r.view(-1, group_size)


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4,
                    unbiased: bool = True) -> Tensor:
    """GRPO outcome advantages: ``(r - mean_group) / (std_group + eps)``.

    Args:
        rewards: ``(B*G,)`` (groups contiguous: rows ``g*G .. g*G+G-1`` share a prompt) or ``(B, G)``.
        group_size: G.
        eps: added to the std so zero-variance groups give advantage 0 instead of 0/0.
        unbiased: sample std with Bessel's correction (divide by G-1). This is the default because
            TRL and verl both use ``torch.std`` (unbiased); ``False`` gives the population std.

    Returns:
        Advantages with the same shape as ``rewards`` (float).

    >>> grpo_advantages(torch.tensor([1., 0., 1., 0.]), group_size=2, eps=0.0)
    tensor([ 0.7071, -0.7071,  0.7071, -0.7071])
    """
    if unbiased and group_size < 2:
        raise ValueError("the unbiased std needs group_size >= 2")
    r = _as_groups(rewards, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, correction=1 if unbiased else 0)
    return ((r - mean) / (std + eps)).view(rewards.shape)


def drgrpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO advantages: ``r - mean_group``, no std division.

    Liu et al. 2025 ("Understanding R1-Zero-Like Training") drop the std because it up-weights
    groups that are nearly all right or all wrong (tiny std), a question-difficulty bias.

    Args:
        rewards: ``(B*G,)`` or ``(B, G)``.  Returns: same shape.

    >>> drgrpo_advantages(torch.tensor([1., 0., 0., 0.]), group_size=4)
    tensor([ 0.7500, -0.2500, -0.2500, -0.2500])
    """
    r = _as_groups(rewards, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(rewards.shape)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): ``r_i - mean_{j != i} r_j``.

    The baseline leaves the sample itself out, so it is independent of that sample and the
    estimator is unbiased. Algebraically ``r_i - (sum - r_i)/(G-1) = G/(G-1) * (r_i - mean)``.

    Args:
        rewards: ``(B*G,)`` or ``(B, G)``, G >= 2.  Returns: same shape.

    >>> rloo_advantages(torch.tensor([1., 0., 0., 0.]), group_size=4)
    tensor([ 1.0000, -0.3333, -0.3333, -0.3333])
    """
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs group_size >= 2")
    r = _as_groups(rewards, group_size)
    loo_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)  # (B, G): the others' mean
    return (r - loo_mean).view(rewards.shape)


def _batch_whiten(a: Tensor, eps: float) -> Tensor:
    """``(a - mean) / (std + eps)`` over every element (population std: a batch is not a sample of it)."""
    return (a - a.mean()) / (a.std(correction=0) + eps)


def reinforce_pp_baseline_advantages(rewards: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): group mean subtracted, then whitened over the batch.

    ``a = r - mean_group``; ``A = (a - mean_batch(a)) / (std_batch(a) + eps)``. The group mean
    removes prompt difficulty; the *global* std (not each group's) keeps GRPO's per-group scaling
    from inflating nearly-uniform groups.

    >>> reinforce_pp_baseline_advantages(torch.tensor([1., 0., 0., 0.]), group_size=2, eps=0.0)
    tensor([ 1.4142, -1.4142,  0.0000,  0.0000])
    """
    a = _as_groups(rewards, group_size)
    a = a - a.mean(dim=1, keepdim=True)
    return _batch_whiten(a, eps).view(rewards.shape)


def liteppo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """LitePPO (Liu et al. 2025, "Tricks or Traps?"): group mean, batch std of the rewards.

    ``A = (r - mean_group) / (std_batch(r) + eps)`` — the mean is local (per prompt), the scale
    global, which the paper finds more robust than either alone under sparse rewards.

    >>> liteppo_advantages(torch.tensor([1., 0., 0., 0.]), group_size=2, eps=0.0)
    tensor([ 1., -1.,  0.,  0.])
    """
    r = _as_groups(rewards, group_size)
    # sample std over the batch, as torch.std (the same convention grpo_advantages uses)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std() + eps)).view(rewards.shape)


def maxrl_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """MaxRL ("Maximum Likelihood Reinforcement Learning", 2026): ``(r - mean_group) / (mean_group + eps)``.

    For 0/1 rewards, dividing by the group's success rate makes the update an estimate of the
    gradient of ``log pass@k``-style likelihood rather than of the pass rate itself: rarely solved
    prompts weigh more. A group with mean 0 has ``r = mean`` everywhere, so it gives 0 (not 0/0);
    rewards must be >= 0 for the mean to be a likelihood.

    >>> maxrl_advantages(torch.tensor([1., 0., 0., 0.]), group_size=4, eps=0.0)
    tensor([ 3., -1., -1., -1.])
    """
    r = _as_groups(rewards, group_size)
    if bool((r < 0).any()):
        raise ValueError("maxrl advantages need non-negative rewards (the group mean is a success rate)")
    mean = r.mean(dim=1, keepdim=True)
    return ((r - mean) / (mean + eps)).view(rewards.shape)


def gdpo_advantages(reward_parts: Tensor, group_size: int, eps: float = 1e-4,
                    weights: Tensor | None = None) -> Tensor:
    """GDPO (NVIDIA 2026, group reward-decoupled normalisation): normalise each reward component within its group, sum, whiten the batch.

    ``A = whiten_batch( sum_k w_k (r_k - mean_group(r_k)) / (std_group(r_k) + eps) )``. Normalising the
    summed reward (GRPO) lets the component with the widest spread decide every advantage; apart,
    each component keeps its own resolution. Group std is the sample std, as in ``grpo_advantages``.

    Args:
        reward_parts: ``(B*G, K)``, one column per reward component (groups contiguous in rows).
        group_size: G >= 2.
        weights: ``(K,)`` component weights ``w_k``, applied after the normalisation (which would
            otherwise erase them); None = all 1.

    Returns:
        ``(B*G,)`` advantages.

    >>> gdpo_advantages(torch.tensor([[1., 1.], [0., 1.], [1., 0.], [1., 1.]]), 2, eps=0.0)
    tensor([ 1., -1., -1.,  1.])
    """
    if reward_parts.dim() != 2:
        raise ValueError(f"gdpo needs reward parts of shape (N, K), got {tuple(reward_parts.shape)}")
    if group_size < 2:
        raise ValueError("gdpo's per-group std needs group_size >= 2")
    N, K = reward_parts.shape
    if N % group_size != 0:
        raise ValueError(f"{N} reward rows do not split into groups of {group_size}")
    r = (reward_parts if reward_parts.is_floating_point() else reward_parts.float()).view(N // group_size, group_size, K)  # (B, G, K)
    dev = r - r.mean(dim=1, keepdim=True)  # (B, G, K)
    # a component constant in its group (every sample well formed, say) has dev == 0 exactly: it
    # adds 0, whatever eps is, instead of 0/0
    per_part = torch.where(dev == 0, torch.zeros_like(dev), dev / (r.std(dim=1, keepdim=True) + eps))
    if weights is not None:
        if weights.shape != (K,):
            raise ValueError(f"gdpo weights of shape {tuple(weights.shape)} do not match {K} reward parts")
        per_part = per_part * weights.to(per_part)
    return _batch_whiten(per_part.sum(dim=-1).view(N), eps)


def zero_variance_groups(rewards: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """Which groups have (numerically) identical rewards: ``(B,)`` bool.

    Such groups have zero advantage for every member, so they contribute no policy gradient (only
    KL). ``max - min <= atol`` is used instead of ``std == 0`` because it is exact for equal floats
    and does not depend on the std's rounding.

    >>> zero_variance_groups(torch.tensor([1., 1., 0., 1.]), group_size=2)
    tensor([ True, False])
    """
    r = _as_groups(rewards, group_size)
    return (r.amax(dim=1) - r.amin(dim=1)) <= atol


def groups_to_keep(rewards: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """DAPO dynamic sampling: keep only groups whose rewards are not all equal. ``(B,)`` bool.

    DAPO (Yu et al. 2025) over-samples prompts and drops groups with accuracy 0 or 1 so every
    kept sequence carries gradient; ``zero_variance_groups`` generalises that to graded rewards.
    """
    return ~zero_variance_groups(rewards, group_size, atol)


def expand_group_mask(group_mask: Tensor, group_size: int) -> Tensor:
    """Per-group ``(B,)`` mask -> per-sequence ``(B*G,)`` mask (groups contiguous).

    >>> expand_group_mask(torch.tensor([True, False]), 2)
    tensor([ True,  True, False, False])
    """
    return group_mask.repeat_interleave(group_size)


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


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` per position: ``(N, T, V) -> (N, T)`` (float32, nats).

    ``H = -sum p log p`` with ``log p`` from ``log_softmax`` (max-shifted, so no overflow).
    ``-inf`` logits (banned tokens) have ``p = 0``; their ``log p = -inf`` is replaced by 0 before
    the product, so they add 0 to H and NaN cannot appear in the value or the gradient.

    >>> entropy_from_logits(torch.zeros(1, 1, 4))  # uniform over 4 -> log 4
    tensor([[1.3863]])
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    logp = logp.masked_fill(torch.isinf(logp), 0.0)
    return -(p * logp).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# On-policy distillation (per-token advantages from a teacher)
# --------------------------------------------------------------------------------------------


def reverse_kl_advantages(teacher_logp: Tensor, student_logp: Tensor, mask: Tensor) -> Tensor:
    """On-policy distillation's per-token advantage ``A_t = log pi_teacher(y_t) - log pi_student(y_t)``.

    The student samples ``y``; the teacher scores every sampled token. ``-A_t`` is the one-sample
    estimate of the per-token reverse KL ``KL(pi_student || pi_teacher)`` (Thinking Machines,
    "On-Policy Distillation", Oct 2025; GKD with lambda = 1), so the policy gradient with these
    advantages (discount 0) pushes the student toward the teacher on the student's own states:
    tokens the teacher likes more than the student gain, tokens it likes less lose.

    Args:
        teacher_logp: ``(N, T)`` log pi_teacher of the sampled tokens.
        student_logp: ``(N, T)`` log pi_student of the same tokens (detached here).
        mask: ``(N, T)`` true on completion tokens.

    Returns:
        ``(N, T)`` advantages, exactly 0 at padding (NaN there cannot leak).

    >>> t = torch.tensor([[-0.1, -2.0, 0.0]]); s = torch.tensor([[-1.0, -0.5, float("nan")]])
    >>> reverse_kl_advantages(t, s, torch.tensor([[1, 1, 0]]))
    tensor([[ 0.9000, -1.5000,  0.0000]])
    """
    mask = mask.bool()
    adv = _upcast(teacher_logp).detach() - _upcast(student_logp).detach()
    return torch.where(mask, adv, torch.zeros_like(adv))


# --------------------------------------------------------------------------------------------
# Registries: recipe names -> functions (configs pick by name; call sites stay branch-free)
# --------------------------------------------------------------------------------------------

ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
    "liteppo": liteppo_advantages,
    "maxrl": maxrl_advantages,
    "gdpo": gdpo_advantages,  # takes reward parts (N, K), not totals
}

# advantages per token from (teacher_logp, student_logp, mask): on-policy distillation
TOKEN_ADVANTAGES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "teacher_logprob": reverse_kl_advantages,
}

POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, Stats]]] = {
    "clipped": clipped_token_loss,
    "dual_clip": dual_clip_token_loss,
    "gspo": gspo_sequence_loss,
    "cispo": cispo_token_loss,
    "sapo": sapo_token_loss,
    "dppo_tv": dppo_tv_token_loss,
    "clip_cov": clip_cov_token_loss,
    "kl_cov": kl_cov_token_loss,
}

# The aggregation each policy loss's paper defines, used when a recipe says aggregation = "auto".
# PPO's surrogate (and DAPO's clip-higher form of it, and dual clip) is an expectation over tokens;
# GSPO's objective is a mean over sequences of a sequence-level term: 1/G sum_i, each sequence
# weighing the same, which token_mean would silently turn into a token-weighted mean.
LOSS_AGGREGATION: dict[str, str] = {
    "clipped": "token_mean",
    "dual_clip": "token_mean",
    "gspo": "seq_mean_token_mean",
    "cispo": "token_mean",  # MiniMax-M1 normalises by all tokens of the batch
    "sapo": "seq_mean_token_mean",  # SAPO writes GRPO's 1/G Σ_i 1/|y_i| Σ_t
    "dppo_tv": "token_mean",
    "clip_cov": "token_mean",  # Cui et al.'s objective (and their verl code) is token-mean
    "kl_cov": "token_mean",
}

# seq_mean_token_sum_norm needs its constant: bind it with functools.partial(..., norm=L).
AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "seq_mean_token_mean": seq_mean_token_mean,
    "token_mean": token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}

KL_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "k3_iw": kl_k3_iw,
}
