"""Group-relative advantages (GRPO and its 2025 relatives), dynamic-sampling masks, and the
per-token advantages of on-policy distillation. Shapes and conventions: r1kit/rl/__init__.py."""
from __future__ import annotations

import torch
from torch import Tensor

from r1kit.rl.losses import _upcast


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
