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

The maths lives in three modules — advantages.py, losses.py, kl.py — and every name is importable
from here (``from r1kit import rl; rl.grpo_advantages``).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from r1kit.rl.advantages import *  # noqa: F401,F403  (every public name, so rl.NAME works)
from r1kit.rl.kl import *  # noqa: F401,F403
from r1kit.rl.losses import *  # noqa: F401,F403


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
