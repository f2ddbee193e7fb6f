"""GRPO on verifiable rewards — R1-Zero.

One step: draw prompts → G samples each from the engine → rule-based rewards → group-relative
advantages → μ inner updates of a clipped policy loss against the rollout's own log-probs
(+ optional KL to the frozen reference) → AdamW with gradient clipping and a schedule.

    r1kit grpo --config recipes/r1_zero_tiny.toml [--set grpo.lr=1e-4 ...] [--out DIR]
writes DIR/model (latest checkpoint + trainer_state), DIR/metrics.jsonl (one line per step),
DIR/rollouts.jsonl (samples), DIR/summary.json. Killed at any point, the same command resumes
from the last checkpoint and reproduces the uninterrupted run exactly (CPU, fixed seed): the group
of the j-th prompt of the data stream, drawn at step s, is seeded by (seed, s, j), the prompt order by
the seed alone, and the checkpoint keeps the data cursor and the number of updates taken.

    torchrun --nproc-per-node N -m r1kit grpo ...   (each rank generates and trains whole groups for
    its share of every step's prompts; the update is the one-process one — see sample_groups)

A step with no learning signal — β = 0 and no group whose rewards vary, or (dynamic sampling) no
group left — costs generation only: its update would be exactly zero, so the forward, backward and
optimizer step are skipped (`update_skipped` in metrics.jsonl, a warning from the first one), the
data cursor moves on, and the LR schedule, indexed by updates taken, waits for the next real update.

With `async = true` (one process) step s+1's rollouts are drawn in a second thread, from a snapshot of
the weights before step s's update, while step s trains: grpo_async.py says what π_old is then and how
the staleness is corrected (`corrections`), checkpointed and kept deterministic.
"""
from __future__ import annotations

import contextlib
import functools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from r1kit import checkpoint, dist, offpolicy, rl
from r1kit.common import autocast, print0, resolve_device, resolve_dtype, seed_everything
from r1kit.config import ConfigError, add_config_args, load_config, read_toml
from r1kit.engine import Engine, SamplingParams
from r1kit.models import lora
from r1kit.models.routing import replay_routing
from r1kit.rewards import overlong_penalty
from r1kit.rollout import Rollout, greedy_accuracy, rollout
from r1kit.tasks import get_task
from r1kit.stages.grpo_async import Drawn, OneStepAhead, PolicyCopy
from r1kit.stages.grpo_batch import (ROUTING_REPLAY, MicroBatch, completion_logprobs, engine_routes,  # noqa: F401
                                     load_teacher, micro_batch_bounds, micro_batches, plan_micro_batches,
                                     rollout_batch, teacher_advantages)
from r1kit.training import (MemoryOptions, MetricsLog, Progress, adamw, apply_memory_options, clip_grad_norm,
                            is_checkpoint, lr_at, resolve_ckpt, set_lr)


@dataclass
class GRPOConfig(MemoryOptions):
    base: str = "runs/r1_zero_tiny/base"  # checkpoint (or stage dir) to start from
    out_dir: str = "runs/r1_zero_tiny/grpo"  # where the policy, metrics.jsonl and rollouts.jsonl go
    task: str = "arithmetic"  # verifiable task: arithmetic | countdown | math_file
    task_args: dict = field(default_factory=dict)  # the task's options, e.g. { digits = 3 } or { path = "train.jsonl" }
    system: str | None = None  # optional system prompt
    steps: int = 100  # RL steps (one batch of prompts × G samples each)
    time_budget_s: float = 0.0  # > 0: stop after this much RL wall time
    target_accuracy: float = 0.0  # > 0: stop at the first evaluation whose held-out greedy accuracy reaches it
    prompts_per_step: int = 16  # training problems per step, each sampled group_size times
    group_size: int = 8  # G: samples per prompt; advantages are relative to the group
    max_new_tokens: int = 96  # most tokens per sampled completion
    temperature: float = 1.0  # rollout sampling temperature (1.0: the policy's own distribution)
    top_p: float = 1.0  # rollout nucleus sampling (1.0: off)
    lr: float = 1e-4  # AdamW peak learning rate
    warmup: int = 0  # linear learning-rate warm-up steps
    schedule: str = "constant"  # learning rate after warm-up: constant | cosine (down to 10%)
    weight_decay: float = 0.0  # AdamW weight decay (matrices only)
    grad_clip: float = 1.0  # clip the gradient's global norm to this (0: off)
    micro_batch: int = 0  # rows per forward/backward (gradient accumulation); 0 = the whole batch
    max_tokens_per_micro_batch: int = 0  # > 0: micro-batches also hold at most this many (padded) tokens
    # training forwards run their token-wise layers on the real tokens only (packing.py); attention's rows:
    packing: bool = True  # several rollouts side by side in a row (block-diagonal mask); false: a row each
    share_prompts: bool = True  # with packing: each distinct prompt computed once, and a row holds it once for
    #                             several of its samples (each sees it)
    device: str = "auto"  # cuda | mps | cpu | auto (cuda → mps → cpu)
    dtype: str = "auto"  # compute (autocast) dtype; auto = bf16 on a GPU that has it, else fp32
    mu: int = 1  # inner updates per batch; > 1 is where the ratio and the clip matter
    # grpo: (r − mean)/(std + adv_eps) | drgrpo: r − mean (Dr. GRPO) | rloo | reinforce_pp_baseline | liteppo | maxrl
    # | gdpo (README: RL options) | teacher_logprob (on-policy distillation from `teacher`)
    advantage: str = "grpo"
    teacher: str = ""  # advantage = "teacher_logprob": a checkpoint with the policy's tokenizer that scores each sampled token
    adv_eps: float = 1e-4  # ε in (r − mean) / (std + ε)
    # policy loss: clipped (PPO) | dual_clip | gspo (sequence-level ratio) | cispo | sapo | dppo_tv | clip_cov | kl_cov
    loss: str = "clipped"
    eps_low: float = 0.2  # PPO clip: the ratio is kept above 1 − eps_low
    eps_high: float = 0.2  # PPO clip: the ratio is kept below 1 + eps_high (DAPO clip-higher: 0.28)
    dual_clip_c: float = 3.0  # dual-clip bound c on negative-advantage tokens (loss = dual_clip)
    gspo_eps_low: float = 3e-4  # GSPO clips a sequence-level ratio: a much narrower range
    gspo_eps_high: float = 4e-4  # GSPO's upper clip of the sequence-level ratio
    cispo_eps_low: float = 1.0  # CISPO clips the importance weight to [1 - low, 1 + high]; 1 = no lower bound
    cispo_eps_high: float = 5.0  # CISPO: upper bound 1 + high of the clipped importance weight
    sapo_tau_pos: float = 1.0  # SAPO gate temperatures for A > 0 and A < 0
    sapo_tau_neg: float = 1.05  # SAPO gate temperature for A < 0 (sharper: negative updates fade faster)
    dppo_delta: float = 0.15  # DPPO-TV: mask tokens whose probability moved more than this (advantage's way)
    clip_cov_ratio: float = 2e-4  # Clip-Cov: share of tokens in the covariance band to detach
    clip_cov_low: float = 1.0  # Clip-Cov: lower covariance bound of the band tokens are drawn from
    clip_cov_high: float = 5.0  # Clip-Cov: upper covariance bound of that band
    kl_cov_ratio: float = 2e-3  # KL-Cov: share of top-covariance tokens to penalise
    kl_cov_coef: float = 1.0  # KL-Cov: weight of the KL penalty on the selected tokens
    corrections: list[str] = field(default_factory=list)  # train–inference mismatch: tis | icepop | offpolicy_seq_mask
    tis_cap: float = 2.0  # TIS: weight min(pi_train / pi_rollout, cap)
    icepop_low: float = 0.5  # IcePop: drop tokens with pi_train / pi_rollout outside [low, high]
    icepop_high: float = 5.0  # IcePop: upper bound of the kept ratio band
    offpolicy_delta: float = 0.1  # V3.2: drop A < 0 sequences whose mean log(pi_rollout / pi_train) > delta
    entropy_top_frac: float = 0.0  # > 0: policy gradient only on this share of highest-entropy tokens (0.2), per micro-batch
    routing_replay: str = "off"  # MoE: off | trainer (R2: route like the pre-update forward) | rollout (R3: like the engine)
    # auto = the loss's own (rl.LOSS_AGGREGATION: token_mean for clipped/dual_clip, seq_mean_token_mean for
    # gspo) | seq_mean_token_mean (GRPO) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr. GRPO)
    aggregation: str = "auto"
    kl_coef: float = 0.0  # β, the KL penalty to the start model: 0.001 (R1), 0.04 (DeepSeekMath); 0 = none
    kl_estimator: str = "k3"  # k1 | k2 | k3 | k3_iw (DeepSeek-V3.2); rl.py documents the gradient each gives
    # DAPO dynamic sampling: drop groups whose rewards are all equal; the batch place a dropped group held tries
    # the next prompt it owns, started at once while the others decode, up to dynamic_sampling_max_rounds tries
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3  # tries per place, the first included (1 = drop without resampling)
    # one-step off-policy: step s+1's rollouts are drawn, in a second thread from the weights before step s's
    # update, while step s trains; correct the staleness with corrections = ["tis"] or ["icepop"] (grpo_async.py)
    async_: bool = False
    # the weights rollouts sample from: auto = the compute dtype (`dtype`: bf16 on a GPU that has it), from a copy
    # of the fp32 master weights refreshed before each draw (they stay in the trainer), as vLLM-backed trainers
    # sample | float32 | bfloat16. The engine's log-probs are then a bf16 policy's: mismatch_abs_logp measures
    # the gap, corrections = ["tis"] corrects it. No copy with LoRA (its frozen base already sits in `dtype`)
    # or FSDP (the shards are gathered to sample), where auto samples from the policy itself.
    rollout_dtype: str = "auto"
    # rollouts decode at a few fixed shapes, each step replayed as a CUDA graph on a GPU (engine.StaticDecode);
    # the same tokens as the dynamic step, which it beats where launches, not FLOPs, bound a step (small batches)
    static_decode: bool = False
    parallel: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (FSDP2: policy and reference sharded)
    dist_timeout_s: float = 600.0  # under torchrun: a missing or dead peer ends the run after this long
    overlong_cache: int = 0  # > 0: DAPO soft overlong punishment over the last N tokens
    eval_every: int = 10  # held-out greedy accuracy every this many steps (and at the end)
    eval_problems: int = 200  # held-out (test split) problems for that accuracy
    save_every: int = 10  # checkpoint (resumable) every this many steps
    seed: int = 0  # seeds the prompt order, the sampling and the model
    alarm_equal_steps: int = 10  # warn when every reward was equal this many steps in a row
    alarm_truncation: float = 0.5  # warn when more completions than this hit max_new_tokens
    generation_config: str = "source"  # saved sampling defaults: source (the base's own) | r1 (T 0.6, top-p 0.95)

    def __post_init__(self):
        for key, table in (("advantage", {**rl.ADVANTAGES, **rl.TOKEN_ADVANTAGES}), ("loss", rl.POLICY_LOSSES),
                           ("aggregation", {"auto": None, **rl.AGGREGATIONS}), ("kl_estimator", rl.KL_ESTIMATORS)):
            if getattr(self, key) not in table:
                raise ConfigError(f"grpo.{key} = {getattr(self, key)!r}; choose one of {sorted(table)}")
        if self.aggregation == "auto" and self.loss not in rl.LOSS_AGGREGATION:
            raise ConfigError(f"grpo.loss = {self.loss!r} names no aggregation of its own (rl.LOSS_AGGREGATION); "
                              f"set grpo.aggregation to one of {sorted(rl.AGGREGATIONS)}")
        if self.dynamic_sampling_max_rounds < 1:
            raise ConfigError("grpo.dynamic_sampling_max_rounds must be ≥ 1 (the first round counts)")
        for name in self.corrections:
            if name not in offpolicy.CORRECTIONS:
                raise ConfigError(f"grpo.corrections: {name!r}; choose from {sorted(offpolicy.CORRECTIONS)}")
        if self.routing_replay not in ROUTING_REPLAY:
            raise ConfigError(f"grpo.routing_replay = {self.routing_replay!r}; choose one of {sorted(ROUTING_REPLAY)}")
        if not 0 <= self.entropy_top_frac <= 1:
            raise ConfigError(f"grpo.entropy_top_frac = {self.entropy_top_frac}; use 0 (off) or a share in (0, 1]")
        if self.advantage in rl.TOKEN_ADVANTAGES:
            if not self.teacher:
                raise ConfigError(f"grpo.advantage = {self.advantage!r} needs grpo.teacher: the checkpoint that scores "
                                  "the student's tokens")
            if self.dynamic_sampling:
                raise ConfigError("grpo.dynamic_sampling drops groups by reward variance; on-policy distillation "
                                  "(advantage = teacher_logprob) is not reward-driven: turn one of them off")
        elif self.group_size < 2:
            raise ConfigError("grpo.group_size must be ≥ 2: advantages are relative to the group")
        self.check_memory_options("grpo")
        if self.parallel not in dist.PARALLEL:
            raise ConfigError(f"grpo.parallel = {self.parallel!r}; choose one of {list(dist.PARALLEL)}")
        if self.parallel == "fsdp" and (self.lora_rank or self.logprob_chunk):
            raise ConfigError("grpo.parallel = 'fsdp' with lora_rank / logprob_chunk is not supported yet (both read "
                              "weights outside the forward, where FSDP2 holds only shards): use parallel = 'ddp'")
        if self.rollout_dtype != "auto":
            if self.rollout_dtype not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"grpo.rollout_dtype = {self.rollout_dtype!r}; choose auto, float32, bfloat16 "
                                  "or float16")
            if self.lora_rank or self.parallel == "fsdp":
                raise ConfigError("grpo.rollout_dtype: with lora_rank (the frozen base sits in grpo.dtype) or "
                                  "parallel = 'fsdp' (shards gathered to sample) rollouts use the policy's own "
                                  "weights; leave rollout_dtype = \"auto\"")
        if self.parallel == "fsdp" and self.static_decode:
            raise ConfigError("grpo.static_decode with parallel = 'fsdp': a CUDA graph cannot hold FSDP2's all-gathers "
                              "of the sharded weights; use parallel = 'ddp' or static_decode = false")
        if self.generation_config not in checkpoint.GENERATION_PRESETS:
            raise ConfigError(f"grpo.generation_config = {self.generation_config!r}; "
                              f"choose one of {sorted(checkpoint.GENERATION_PRESETS)}")
        try:
            resolve_dtype(self.dtype, resolve_device(self.device))
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"grpo.dtype / grpo.device: {e}") from None


# Each registered function's keyword arguments, by the config field that sets them: the trainer calls
# every option the same way, and a new registry entry needs one line here (a test checks coverage).
LOSS_ARGS = {
    "clipped": {"eps_low": "eps_low", "eps_high": "eps_high"},
    "dual_clip": {"eps_low": "eps_low", "eps_high": "eps_high", "clip_c": "dual_clip_c"},
    "gspo": {"eps_low": "gspo_eps_low", "eps_high": "gspo_eps_high"},
    "cispo": {"eps_low": "cispo_eps_low", "eps_high": "cispo_eps_high"},
    "sapo": {"tau_pos": "sapo_tau_pos", "tau_neg": "sapo_tau_neg"},
    "dppo_tv": {"delta": "dppo_delta"},
    "clip_cov": {"ratio": "clip_cov_ratio", "cov_low": "clip_cov_low", "cov_high": "clip_cov_high"},
    "kl_cov": {"ratio": "kl_cov_ratio", "coef": "kl_cov_coef"},
}
ADVANTAGE_ARGS = {"grpo": {"eps": "adv_eps"}, "gdpo": {"eps": "adv_eps"}, "drgrpo": {}, "rloo": {},
                  "reinforce_pp_baseline": {}, "liteppo": {}, "maxrl": {}}
CORRECTION_ARGS = {"tis": {"cap": "tis_cap"}, "icepop": {"low": "icepop_low", "high": "icepop_high"},
                   "offpolicy_seq_mask": {"delta": "offpolicy_delta"}}


def option_kwargs(cfg, table: dict, name: str) -> dict:
    """The keyword arguments `table` says option `name` takes, read from cfg."""
    return {arg: getattr(cfg, key) for arg, key in table[name].items()}


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------
def _overlong(cfg: GRPOConfig, rollouts: list[Rollout]) -> torch.Tensor:
    return torch.tensor([overlong_penalty(len(x.sample.tokens), cfg.max_new_tokens, cfg.overlong_cache)
                         for x in rollouts])


def rewards_of(cfg: GRPOConfig, rollouts: list[Rollout]) -> torch.Tensor:
    r = torch.tensor([x.reward["total"] for x in rollouts])
    return r + _overlong(cfg, rollouts) if cfg.overlong_cache > 0 else r


def reward_parts_of(cfg: GRPOConfig, task, rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted reward components (N, K) and their weights (K,), for advantages that normalise each.

    The components are the ones the task's total sums (its `weights`), plus the overlong penalty as
    a component of weight 1 when it is on.
    """
    names = [k for k, w in task.weights.items() if w != 0]
    parts = torch.tensor([[x.reward[k] for k in names] for x in rollouts], dtype=torch.float32)  # (N, K)
    weights = torch.tensor([float(task.weights[k]) for k in names])
    if cfg.overlong_cache > 0:
        parts = torch.cat([parts, _overlong(cfg, rollouts)[:, None].float()], dim=1)
        weights = torch.cat([weights, torch.ones(1)])
    return parts, weights


def advantages_of(cfg: GRPOConfig, task, rollouts: list[Rollout], rewards: torch.Tensor) -> torch.Tensor:
    fn, kw = rl.ADVANTAGES[cfg.advantage], option_kwargs(cfg, ADVANTAGE_ARGS, cfg.advantage)
    if fn is rl.gdpo_advantages:  # the one estimator that reads the components, not their sum
        parts, weights = reward_parts_of(cfg, task, rollouts)
        return fn(parts, cfg.group_size, weights=weights, **kw)
    return fn(rewards, cfg.group_size, **kw)


def aggregation_of(cfg: GRPOConfig) -> str:
    """The aggregation in force: the recipe's, or ("auto") the one the loss's paper defines."""
    return rl.LOSS_AGGREGATION[cfg.loss] if cfg.aggregation == "auto" else cfg.aggregation


def _loss_setup(cfg: GRPOConfig):
    """The configured policy loss (with its keyword arguments) and aggregation."""
    kw = option_kwargs(cfg, LOSS_ARGS, cfg.loss)
    agg = rl.AGGREGATIONS[aggregation_of(cfg)]
    if aggregation_of(cfg) == "seq_mean_token_sum_norm":
        agg = functools.partial(agg, norm=cfg.max_new_tokens)
    return rl.POLICY_LOSSES[cfg.loss], kw, agg


def chunk_weight(aggregation: str, mb: MicroBatch, n_tokens: float, n_seqs: int) -> float:
    """Share of the whole batch's loss a micro-batch carries, so accumulation equals one big batch."""
    if aggregation == "token_mean":
        return float(mb.mask.sum()) / n_tokens
    return mb.mask.shape[0] / n_seqs  # per-sequence means: weight by sequences


def token_weights(cfg: GRPOConfig, mb: MicroBatch, logp_old, entropy) -> tuple[torch.Tensor | None, dict]:
    """The product of the configured per-token weights (mismatch corrections, entropy selection), or None.

    The corrections compare the trainer's pi_old with the sampler's log-probs: the loss's ratio is
    formed against the former, the samples came from the latter. The mismatch is logged always.
    """
    mask = mb.mask.bool()
    stats = offpolicy.mismatch_stats(logp_old, mb.rollout_logp, mask)
    w = None
    for name in cfg.corrections:
        wi, si = offpolicy.CORRECTIONS[name](logp_old, mb.rollout_logp, mb.adv, mask,
                                              **option_kwargs(cfg, CORRECTION_ARGS, name))
        w, stats = (wi if w is None else w * wi), {**stats, **si}
    if cfg.entropy_top_frac > 0:
        wi, si = offpolicy.high_entropy_weights(entropy, mask, cfg.entropy_top_frac)
        w, stats = (wi if w is None else w * wi), {**stats, **si}
    return w, stats


def micro_step(cfg, model, mb: MicroBatch, loss_fn, kw, agg, weight: float) -> dict:
    """Forward + backward of one micro-batch, its loss scaled by `weight`."""
    replay = ROUTING_REPLAY[cfg.routing_replay][0]
    with replay_routing(model, mb.routes, replay) if mb.routes is not None else contextlib.nullcontext() as routing:
        logp, entropy = completion_logprobs(model, mb.batch, cfg.temperature)
    old = logp.detach() if mb.old is None else mb.old
    per_tok, s = loss_fn(logp, old, mb.adv, mb.mask, **kw)
    w, ws = token_weights(cfg, mb, old, entropy)
    per_tok = per_tok if w is None else per_tok * w  # per_tok is exactly 0 (finite) at padding, w too
    s.update(ws, **(routing or {}))
    loss = agg(per_tok, mb.mask)
    if mb.ref_logp is not None:
        kl = agg(rl.KL_ESTIMATORS[cfg.kl_estimator](logp, mb.ref_logp, mb.old), mb.mask)
        loss = loss + cfg.kl_coef * kl
        s["kl"] = kl.detach()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    (loss * weight).backward()
    s["entropy"] = rl.token_mean(entropy, mb.mask)
    s["loss"] = loss.detach()
    return {k: float(v) * weight for k, v in s.items()}


def policy_update(cfg: GRPOConfig, model, ref, opt, rollouts, adv, share: float = 1.0) -> dict:
    """μ inner updates on one batch (accumulated over micro-batches). Returns mean statistics.

    Under torchrun `rollouts` are this rank's whole groups (share 0: a placeholder row for a rank
    that got none): the token and sequence counts of the aggregation are the global batch's, every
    rank runs as many micro-batches as the busiest one (collectives must pair up), and weights carry
    the factor world that the gradient average takes back, so the update is the one-process one.
    """
    device = dist.unwrap(model).embed.weight.device
    amp = resolve_dtype(cfg.dtype, device)  # fp32 master weights and AdamW; bf16 matmuls on a GPU
    with autocast(device, amp):
        mbs = micro_batches(cfg, model, rollouts, adv, ref, device)
    counts = dist.all_reduce_sum({"tokens": share * float(sum(mb.mask.sum() for mb in mbs)),
                                  "seqs": share * len(rollouts)}, "summing the batch's token counts")
    n_mb = int(dist.all_reduce_max({"n": len(mbs)})["n"])
    world = dist.world().world_size
    loss_fn, kw, agg = _loss_setup(cfg)
    stats: dict[str, float] = {}
    for _ in range(cfg.mu):
        opt.zero_grad(set_to_none=True)
        for i in range(n_mb):
            mb = mbs[min(i, len(mbs) - 1)]
            w = share * (i < len(mbs)) * world * chunk_weight(aggregation_of(cfg), mb, counts["tokens"], counts["seqs"])
            with autocast(device, amp):
                step_stats = micro_step(cfg, model, mb, loss_fn, kw, agg, w)
            for k, v in step_stats.items():
                stats[k] = stats.get(k, 0.0) + v / cfg.mu
        gn = clip_grad_norm(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(gn):
            raise FloatingPointError(f"gradient norm is {gn.item()}")
        opt.step()
        stats["grad_norm"] = stats.get("grad_norm", 0.0) + float(gn) / cfg.mu  # the same on every rank
    return dist.all_reduce_mean(stats, "averaging the update's statistics")


def step_metrics(cfg, rollouts: list[Rollout], rewards, zero_var) -> dict:
    n = len(rollouts)
    parts = {}
    for k in rollouts[0].reward:
        parts[f"reward_{k}"] = sum(r.reward[k] for r in rollouts) / n
    lengths = [len(r.sample.tokens) for r in rollouts]
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(), **parts,
            "accuracy": sum(r.correct for r in rollouts) / n,
            "think_rate": sum(r.reward.get("think", 0.0) for r in rollouts) / n,
            "response_length": sum(lengths) / n,
            "truncation_rate": sum(r.sample.finish_reason == "length" for r in rollouts) / n,
            "zero_variance_frac": zero_var.float().mean().item()}


class Alarms:
    """Health checks that say what is wrong instead of letting a run silently go nowhere."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg, self.equal_run, self.skipped = cfg, 0, 0

    def check(self, step: int, m: dict) -> list[str]:
        out = []
        self.equal_run = self.equal_run + 1 if m["reward_std"] == 0 else 0
        self.skipped += m["update_skipped"]
        if m["update_skipped"] and self.skipped == 1:  # from the first one: a run of these costs only generation
            why = ("every group was dropped by dynamic sampling" if self.cfg.dynamic_sampling
                   else "no group's rewards varied and β = 0")
            out.append(f"step {step}: {why} (reward {m['reward_mean']:.3f}), so there is no learning signal; "
                       "the update was skipped (the LR schedule waits). If this persists, the task is too hard "
                       "or too easy for this model, or the answer format does not match")
        if self.equal_run == self.cfg.alarm_equal_steps:
            out.append(f"step {step}: every reward was equal for {self.equal_run} steps — no learning signal "
                       f"(reward {m['reward_mean']:.3f}); the task may be too hard or too easy for this model")
        if m["truncation_rate"] > self.cfg.alarm_truncation:
            out.append(f"step {step}: {m['truncation_rate']:.0%} of completions hit max_new_tokens="
                       f"{self.cfg.max_new_tokens}; raise grpo.max_new_tokens or add overlong shaping")
        return out


@dataclass
class Cursor:
    """What a run advances besides its step number, saved with every checkpoint.

    prompts: prompts drawn so far (the data cursor; dynamic sampling draws more than one batch's worth).
    updates: optimizer updates taken. The LR schedule is indexed by updates, not steps: a step that
    trains nothing (no reward variance with β = 0, or every group dropped) is a zero update, so it
    consumes neither warm-up nor decay.
    """
    prompts: int = 0
    updates: int = 0


def batch_problems(cfg: GRPOConfig, problems: list, start: int, count: int) -> list:
    """Prompts start .. start+count-1 of the data stream (problems_at over a range)."""
    return problems_at(cfg, problems, range(start, start + count))


def problems_at(cfg: GRPOConfig, problems: list, indices) -> list:
    """The data stream's prompts at `indices`: the stream is one seeded permutation per epoch, back to back."""
    n = len(problems)
    orders: dict[int, list[int]] = {}
    out = []
    for j in indices:
        epoch, pos = divmod(j, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(cfg.seed * 7919 + epoch).shuffle(orders[epoch])
        out.append(problems[orders[epoch][pos]])
    return out


def sample_groups(cfg: GRPOConfig, step: int, model, tok, task, problems, engine, cursor: Cursor):
    """→ (groups to train on, every group sampled, generation rounds); advances cursor.prompts.

    The batch has prompts_per_step places. Without dynamic sampling each place holds one group, the
    data stream's prompt cursor + i for place i, and every group is trained. With it (DAPO), a group
    whose rewards are all equal carries no policy gradient: it is dropped, and its place tries the next
    prompt it owns — place i's k-th try is the stream's prompt cursor + k·prompts_per_step + i — for at
    most dynamic_sampling_max_rounds tries; a place whose tries are spent stays empty. The retries
    stream: a place's next group starts the moment its dropped group finishes, in the slots that rows
    leave free, while the rest of the batch decodes (no second round waits for the first one's longest
    row). What a place ends with depends only on its own prompts' samples — the group of the j-th prompt
    of the stream, drawn at step s, is seeded by (seed, s, j) — so neither the timing nor the number of
    processes changes the batch. "Rounds" is the most tries any place took; the cursor moves on by that
    many slices of prompts_per_step (the prompts past a place's last try wait for the next epoch).

    Under torchrun each rank generates the places shard_range gives it and the groups are gathered,
    so every rank holds the same global lists (the ones a single process samples); policy_update then
    trains each rank on its share of them.
    """
    want, G = cfg.prompts_per_step, cfg.group_size
    tries = cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 1
    mine = list(dist.shard_range(want))
    tried = [(k, i) for i in mine for k in range(tries)]  # (try, place) of every prompt this rank may draw
    at = {t: n for n, t in enumerate(tried)}
    stream = [cursor.prompts + k * want + i for k, i in tried]
    seeds = [(cfg.seed * 100_003 + step) * 1_000_003 + j for j in stream]

    def next_try(n: int, group: list[Rollout]) -> list[int]:  # a dropped group hands its place on
        k, i = tried[n]
        varied = bool(rl.groups_to_keep(rewards_of(cfg, group), G)[0])
        return [at[(k + 1, i)]] if cfg.dynamic_sampling and not varied and k + 1 < tries else []

    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=G)
    groups = rollout(model, tok, task, problems_at(cfg, problems, stream), params, engine, cfg.system, seeds=seeds,
                     begin=[at[(0, i)] for i in mine], on_group=next_try) if mine else []
    local = [(tried[n], g) for n, g in enumerate(groups) if g]  # ((try, place), group) of every group begun
    drawn = sorted((x for part in dist.all_gather(local, "gathering the rollouts") for x in part), key=lambda x: x[0])
    sampled = [g for _, g in drawn]
    rounds = 1 + max(k for (k, _), _ in drawn)
    cursor.prompts += rounds * want
    if not cfg.dynamic_sampling:
        return sampled, sampled, 1
    varied = rl.groups_to_keep(rewards_of(cfg, [r for g in sampled for r in g]), G).tolist()
    kept = sorted(((i, g) for ((_, i), g), v in zip(drawn, varied) if v), key=lambda x: x[0])  # ≤ 1 a place
    return [g for _, g in kept], sampled, rounds


def draw(cfg, step: int, model, tok, task, problems, engine, prompts: int) -> Drawn:
    """Step `step`'s rollouts sampled from `model` with the data cursor at `prompts`, timed."""
    t0 = time.perf_counter()
    cursor = Cursor(prompts=prompts)
    with lora.merged(model):  # LoRA: sample with the adapters folded in (the base comes back bit for bit)
        trained, sampled, rounds = sample_groups(cfg, step, model, tok, task, problems, engine, cursor)
    gen_s = time.perf_counter() - t0
    return Drawn(step, trained, sampled, rounds, cursor.prompts, gen_s, wait_seconds=gen_s)


def train_step(cfg, step, model, ref, tok, task, problems, opt, engine,
               cursor: Cursor, teacher=None, drawn: Drawn | None = None) -> tuple[dict, list[Rollout]]:
    """One step: sample (unless `drawn` holds the step's rollouts, drawn ahead by async mode), score, update."""
    drawn = drawn or draw(cfg, step, model, tok, task, problems, engine, cursor.prompts)
    trained, sampled, rounds, gen_s = drawn.trained, drawn.sampled, drawn.rounds, drawn.gen_seconds
    cursor.prompts = drawn.prompts
    rollouts = [r for g in sampled for r in g]
    rewards = rewards_of(cfg, rollouts)
    zero_var = rl.zero_variance_groups(rewards, cfg.group_size)
    m = step_metrics(cfg, rollouts, rewards, zero_var)  # over everything sampled: the policy's own statistics
    batch = [r for g in trained for r in g]
    b_rewards = rewards_of(cfg, batch) if batch else rewards[:0]
    if teacher is not None and batch:  # on-policy distillation: the teacher's per-token verdict, not the reward
        adv, m["reverse_kl"] = teacher_advantages(cfg, model, teacher, batch)
    else:
        adv = advantages_of(cfg, task, batch, b_rewards) if batch else b_rewards
    # every advantage exactly 0 (no group with reward variance, for every estimator here; GDPO looks at the
    # reward parts) and no KL term: the update would be exactly zero — skip its forward, backward and
    # optimizer step (and the schedule: see Cursor)
    skip = not batch or (cfg.kl_coef == 0 and bool((adv == 0).all()))
    t1 = time.perf_counter()
    if not skip:
        set_lr(opt, lr_at(cursor.updates, cfg.steps, cfg.lr, cfg.warmup, cfg.schedule))
        mine = dist.shard_range(len(trained))  # whole groups per rank; a rank left without one trains a placeholder
        rows = slice(mine.start * cfg.group_size, mine.stop * cfg.group_size) if len(mine) else slice(0, 1)
        m.update(policy_update(cfg, model, ref, opt, batch[rows], adv[rows], float(len(mine) > 0)))
        dist.after_optimizer_step(model)  # MoE: aux-loss-free bias update from every rank's loads
        cursor.updates += 1
    train_s = time.perf_counter() - t1
    if dist.world().distributed:  # stragglers show: every rank's generation and training time
        times = dist.all_gather((gen_s, train_s), "gathering step times")
        m.update(gen_seconds_ranks=[t[0] for t in times], train_seconds_ranks=[t[1] for t in times])
    ntok = sum(len(r.sample.tokens) for r in rollouts)
    # lr: the update's, or (skipped) the one the schedule stands at for the next update
    m.update(step=step + 1, lr=lr_at(max(cursor.updates - (not skip), 0), cfg.steps, cfg.lr, cfg.warmup,
                                     cfg.schedule),
             gen_seconds=gen_s, train_seconds=train_s, tokens_per_second=ntok / max(gen_s, 1e-9),
             update_skipped=skip, trained_groups=0 if skip else len(trained), sampled_groups=len(sampled),
             sampling_rounds=rounds, updates=cursor.updates, gen_wait_seconds=drawn.wait_seconds,
             rollout_lag=drawn.lag)
    return m, rollouts


def run(cfg: GRPOConfig, pretrain_cfg=None) -> dict:
    _, device = dist.init(resolve_device(cfg.device), cfg.dist_timeout_s)
    if cfg.async_ and dist.world().distributed:  # each rank's rollout thread would run collectives beside training's
        raise ConfigError("grpo.async = true runs in one process: launch it without torchrun, "
                          "or set grpo.async = false")
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task, **cfg.task_args)
    problems, test = task.problems("train"), task.problems("test", cfg.eval_problems)
    if not problems:  # batch_problems would divide by zero; say what is empty instead
        raise ConfigError(f"grpo.task = {cfg.task!r} (task_args {cfg.task_args}): the train split is empty, "
                          "nothing to sample prompts from")
    model, ref, tok, opt, start, summary, cursor, drawn_ahead = _setup(cfg, out, task, test, pretrain_cfg, device)
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if start else None)
    rollout_log = MetricsLog(out / "rollouts.jsonl", resume_step=start if start else None)
    cast = rollout_dtype(cfg, model, device)  # None: rollouts sample the policy's own weights
    sampler = PolicyCopy(model, cast) if cast is not None and not cfg.async_ else None
    engine = Engine(sampler.module if sampler else dist.unwrap(model), tok, static_decode=cfg.static_decode,
                    record_routing=ROUTING_REPLAY[cfg.routing_replay][1])
    ahead = None
    if cfg.async_:
        if not cfg.corrections:
            print0("grpo: warning: async = true without corrections trains on one-step-stale samples as if they "
                   "were on-policy; add corrections = [\"tis\"] (or [\"icepop\"])")
        ahead = OneStepAhead(model, engine, functools.partial(_draw_for, cfg, tok, task, problems), cfg.steps,
                             torch.get_num_threads(), drawn_ahead, dtype=cast)
    alarms = Alarms(cfg)
    teacher = load_teacher(cfg, tok)
    rl_seconds = summary.get("rl_seconds", 0.0)
    # a resumed run with nothing left to do (all steps, or the time budget, spent) finishes at once
    spent = cfg.time_budget_s > 0 and rl_seconds >= cfg.time_budget_s
    step = start - 1
    with ahead or contextlib.nullcontext(), Progress(cfg.steps, "grpo", start) as bar:
        for step in range(start, start if spent else cfg.steps):
            t0 = time.perf_counter()
            try:
                if sampler is not None:
                    sampler.sync()  # the rollouts' copy of the weights this step starts from
                drawn = ahead.take(step, cursor.prompts) if ahead else None
                m, rollouts = train_step(cfg, step, model, ref, tok, task, problems, opt, engine, cursor, teacher,
                                         drawn)
            except FloatingPointError as e:
                print0(f"grpo: stopping at step {step + 1}: {e}; the last good checkpoint is {out / 'model'}")
                return _finish(cfg, out, model, tok, task, test, summary, rl_seconds, step, failed=str(e))
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                t_eval = time.perf_counter()
                with lora.merged(model):
                    m["eval_greedy_accuracy"] = greedy_accuracy(model, tok, task, test, cfg.max_new_tokens)
                m["eval_seconds"] = time.perf_counter() - t_eval
            if ahead and (step + 1) % cfg.save_every == 0:
                ahead.pending()  # the checkpoint keeps the batch drawn ahead: wait for it within this step's time
            rl_seconds += time.perf_counter() - t0
            m["rl_seconds"] = rl_seconds
            log.write(m)
            for r in rollouts[:: cfg.group_size]:  # one sample per group keeps the file small
                rollout_log.write(r.record(step + 1))
            for warning in alarms.check(step + 1, m):
                print0(f"grpo: warning: {warning}")
            bar.update(step + 1, _info(m))
            done = (step + 1 == cfg.steps or (cfg.time_budget_s > 0 and rl_seconds >= cfg.time_budget_s)
                    or 0 < cfg.target_accuracy <= m.get("eval_greedy_accuracy", -1.0))
            if (step + 1) % cfg.save_every == 0 or done:
                summary["rl_seconds"] = rl_seconds
                if done and ahead:
                    ahead.close()  # the run stops: no step trains on the batch drawn ahead, so none is saved
                _save(cfg, out, model, tok, opt, step + 1, summary, cursor, ahead.pending() if ahead else None)
            if done:
                break
    return _finish(cfg, out, model, tok, task, test, summary, rl_seconds, step + 1)


def rollout_dtype(cfg: GRPOConfig, model, device: torch.device) -> torch.dtype | None:
    """The dtype rollouts sample in when it is not the policy's own (they then sample a PolicyCopy), else None."""
    if cfg.rollout_dtype == "auto" and (cfg.lora_rank or cfg.parallel == "fsdp"):
        return None
    want = resolve_dtype(cfg.dtype if cfg.rollout_dtype == "auto" else cfg.rollout_dtype, device)
    return None if want == dist.unwrap(model).embed.weight.dtype else want


def _info(m: dict) -> str:
    s = f"reward {m['reward_mean']:.2f} acc {m['accuracy']:.2f} think {m['think_rate']:.2f} len {m['response_length']:.0f}"
    return s + (f" eval {m['eval_greedy_accuracy']:.2f}" if "eval_greedy_accuracy" in m else "")


def _draw_for(cfg, tok, task, problems, model, engine, step: int, prompts: int) -> Drawn:
    """draw() in the argument order OneStepAhead calls it."""
    return draw(cfg, step, model, tok, task, problems, engine, prompts)


def _save(cfg, out: Path, model, tok, opt, step: int, summary: dict, cursor: Cursor,
          drawn_ahead: Drawn | None = None) -> None:
    """`drawn_ahead`: async mode's batch for step `step` + 1, drawn from weights this checkpoint no longer holds."""
    state = {"stage": "grpo", "step": step, "summary": summary, "cursor": asdict(cursor), "config": asdict(cfg)}
    extra = {"drawn_ahead": drawn_ahead} if drawn_ahead is not None else None
    checkpoint.save(model, tok, out / "model", trainer_state={"optimizer": opt, "state": state, "extra": extra},
                    generation=cfg.generation_config)


def _setup(cfg: GRPOConfig, out: Path, task, test, pretrain_cfg, device):
    """Resume from DIR/model, or start from the base (pretraining it first when the recipe says how)."""
    ckpt = out / "model"
    resuming = checkpoint.has_trainer_state(ckpt)
    base = resolve_ckpt(cfg.base)
    if not resuming and not is_checkpoint(base):
        if pretrain_cfg is None:
            raise ConfigError(f"grpo.base: {cfg.base} has no checkpoint, and the recipe has no [pretrain] section")
        from r1kit.stages import pretrain
        print0(f"grpo: base {cfg.base} is missing — pretraining it first (recipe's [pretrain] section)")
        pretrain_cfg.out_dir = str(cfg.base)
        pretrain_cfg.parallel, pretrain_cfg.dist_timeout_s = cfg.parallel, cfg.dist_timeout_s
        pretrain.run(pretrain_cfg)
        base = resolve_ckpt(cfg.base)
    # the policy stays fp32: AdamW steps of ~lr·1 would round away on bf16 weights (lr 1e-6 ≪ bf16's
    # spacing at 0.02); `dtype` is the autocast compute dtype. The frozen reference can be bf16.
    # With LoRA only the fp32 adapters train: the frozen base can sit in the compute dtype (bf16 on a GPU).
    model, tok = checkpoint.load(ckpt if resuming else base, device=device,
                                 dtype=cfg.dtype if cfg.lora_rank else "float32")
    apply_memory_options(model, cfg, base=base, seed=cfg.seed)
    amp = resolve_dtype(cfg.dtype, device)
    model = dist.wrap(model, cfg.parallel, amp)
    ref = None
    if cfg.kl_coef > 0 and cfg.lora_rank:
        ref = model  # the base is the policy with its adapters switched off: no second model in memory
    elif cfg.kl_coef > 0:  # frozen: FSDP2 shards it like the policy; DDP keeps a plain replica (no gradients)
        ref, _ = checkpoint.load(base, device=device, dtype=cfg.dtype)
        ref.eval().requires_grad_(False)
        ref = dist.wrap(ref, cfg.parallel, amp) if cfg.parallel == "fsdp" else ref
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    if resuming:
        state, extra = checkpoint.load_trainer_state(ckpt, opt, stage="grpo", model=model)
        print0(f"grpo: resuming {ckpt} at step {state['step']}")
        # a checkpoint from before the cursor existed: one batch per step, one update per step
        cursor = Cursor(**state.get("cursor", {"prompts": state["step"] * cfg.prompts_per_step,
                                               "updates": state["step"]}))
        return model, ref, tok, opt, state["step"], state["summary"], cursor, extra.get("drawn_ahead")
    with lora.merged(model):
        base_acc = greedy_accuracy(model, tok, task, test, cfg.max_new_tokens)
    print0(f"grpo: base {base} held-out greedy accuracy {base_acc:.3f}")
    return model, ref, tok, opt, 0, {"base": str(base), "base_accuracy": base_acc}, Cursor(), None


def _finish(cfg, out, model, tok, task, test, summary, rl_seconds, steps, failed=None) -> dict:
    # a run stopped by NaN/inf holds broken weights: its final accuracy is the checkpoint's to tell
    with lora.merged(model):
        final = None if failed else greedy_accuracy(model, tok, task, test, cfg.max_new_tokens)
    summary.update(final_accuracy=final, rl_seconds=round(rl_seconds, 1), steps=steps, task=task.name,
                   eval_problems=len(test))
    if failed:
        summary["stopped"] = failed
    if dist.is_main_process():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if final is not None:
        print0(f"grpo: held-out greedy accuracy {summary['base_accuracy']:.3f} → {final:.3f} "
               f"in {rl_seconds:.0f}s of RL ({steps} steps); summary in {out / 'summary.json'}")
    return summary


def add_args(p) -> None:
    add_config_args(p, GRPOConfig, "grpo")


def main(args) -> int:
    from r1kit.stages.pretrain import PretrainConfig
    cfg = load_config(GRPOConfig, args.config, args.overrides, section="grpo")
    if args.out:
        cfg.out_dir = args.out
    pre = None
    if args.config and "pretrain" in read_toml(args.config):  # the recipe can make its own base
        pre = load_config(PretrainConfig, args.config, args.overrides, section="pretrain", bare_keys=False)
    return 1 if "stopped" in run(cfg, pre) else 0
