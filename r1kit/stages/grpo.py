"""GRPO on verifiable rewards — R1-Zero.

One step: draw prompts → G samples each from the engine → rule-based rewards → group-relative
advantages → μ inner updates of a clipped policy loss against the rollout's own log-probs
(+ optional KL to the frozen reference) → AdamW with gradient clipping and a schedule.

    r1kit grpo --config recipes/r1_zero_tiny.toml [--set grpo.lr=1e-4 ...] [--out DIR]
writes DIR/model (latest checkpoint + trainer_state), DIR/metrics.jsonl (one line per step),
DIR/rollouts.jsonl (samples), DIR/summary.json. Killed at any point, the same command resumes
from the last checkpoint and reproduces the uninterrupted run exactly (CPU, fixed seed): the
rollouts of step s are seeded by (seed, s) and the prompt order by the seed alone.
"""
from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from r1kit import checkpoint, rl
from r1kit.common import autocast, print0, resolve_device, resolve_dtype, seed_everything
from r1kit.config import ConfigError, add_config_args, load_config, read_toml
from r1kit.engine import Engine, SamplingParams
from r1kit.rewards import overlong_penalty
from r1kit.rollout import Rollout, greedy_accuracy, rollout
from r1kit.tasks import get_task
from r1kit.training import MetricsLog, Progress, adamw, lr_at, resolve_ckpt, set_lr


@dataclass
class GRPOConfig:
    base: str = "runs/r1_zero_tiny/base"  # checkpoint (or stage dir) to start from
    out_dir: str = "runs/r1_zero_tiny/grpo"
    task: str = "arithmetic"
    task_args: dict = field(default_factory=dict)
    system: str | None = None  # optional system prompt
    steps: int = 100
    time_budget_s: float = 0.0  # > 0: stop after this much RL wall time
    prompts_per_step: int = 16
    group_size: int = 8  # G
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 0  # rows per forward/backward (gradient accumulation); 0 = the whole batch
    device: str = "auto"  # auto = cuda → mps → cpu
    dtype: str = "auto"  # compute (autocast) dtype; auto = bf16 on a GPU that has it, else fp32
    mu: int = 1  # inner updates per batch; > 1 is where the ratio and the clip matter
    advantage: str = "grpo"  # grpo | drgrpo | teacher_logprob (on-policy distillation from `teacher`)
    teacher: str = ""  # advantage = "teacher_logprob": a checkpoint with the policy's tokenizer that scores each sampled token
    adv_eps: float = 1e-4
    loss: str = "clipped"  # clipped | dual_clip | gspo
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO clip-higher: 0.28
    dual_clip_c: float = 3.0
    gspo_eps_low: float = 3e-4  # GSPO clips a sequence-level ratio: a much narrower range
    gspo_eps_high: float = 4e-4
    aggregation: str = "token_mean"  # seq_mean_token_mean (GRPO) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr. GRPO)
    kl_coef: float = 0.0  # β: 0.001 (R1), 0.04 (DeepSeekMath)
    kl_estimator: str = "k3"
    dynamic_sampling: bool = False  # drop zero-variance groups from the batch (DAPO)
    overlong_cache: int = 0  # > 0: DAPO soft overlong punishment over the last N tokens
    eval_every: int = 10
    eval_problems: int = 200
    save_every: int = 10
    seed: int = 0
    alarm_equal_steps: int = 10  # warn when every reward was equal this many steps in a row
    alarm_truncation: float = 0.5  # warn when more completions than this hit max_new_tokens

    def __post_init__(self):
        for key, table in (("advantage", {**rl.ADVANTAGES, **rl.TOKEN_ADVANTAGES}), ("loss", rl.POLICY_LOSSES),
                           ("aggregation", rl.AGGREGATIONS), ("kl_estimator", rl.KL_ESTIMATORS)):
            if getattr(self, key) not in table:
                raise ConfigError(f"grpo.{key} = {getattr(self, key)!r}; choose one of {sorted(table)}")
        if self.advantage in rl.TOKEN_ADVANTAGES:
            if not self.teacher:
                raise ConfigError(f"grpo.advantage = {self.advantage!r} needs grpo.teacher: the checkpoint that scores "
                                  "the student's tokens")
        elif self.group_size < 2:
            raise ConfigError("grpo.group_size must be ≥ 2: advantages are relative to the group")
        try:
            resolve_dtype(self.dtype, resolve_device(self.device))
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"grpo.dtype / grpo.device: {e}") from None


# ---------------------------------------------------------------------------------------------
# Batch → tensors
# ---------------------------------------------------------------------------------------------
def to_tensors(rollouts: list[Rollout], pad_id: int):
    """→ idx (N, P+T), completion mask (N, T), completion start P per row.

    Rows are right-padded; completions start at different offsets when prompts are ragged, so
    log-probs are gathered per row at its own completion positions.
    """
    N = len(rollouts)
    L = max(len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts)
    T = max(len(r.sample.tokens) for r in rollouts)
    idx = torch.full((N, L), pad_id, dtype=torch.long)
    mask = torch.zeros(N, T)
    starts = torch.tensor([len(r.prompt_ids) for r in rollouts])
    for i, r in enumerate(rollouts):
        seq = r.prompt_ids + r.sample.tokens
        idx[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(r.sample.tokens)] = 1
    return idx, mask, starts


def completion_logits(model, idx, starts, T: int, temperature: float):
    """Logits (N, T, V) that predict each completion token, scaled like the rollout's sampler."""
    pos = starts[:, None] - 1 + torch.arange(T, device=idx.device)  # (N, T): predicts completion token t
    logits = model(idx, logit_pos=pos.clamp(max=idx.shape[1] - 1))  # (N, T, V): no logits for the prompt
    return logits / temperature if temperature > 0 else logits


def completion_targets(idx, starts, T: int):
    pos = (starts[:, None] + torch.arange(T, device=idx.device)).clamp(max=idx.shape[1] - 1)  # (N, T)
    return idx.gather(1, pos)


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------
def rewards_of(cfg: GRPOConfig, rollouts: list[Rollout]) -> torch.Tensor:
    r = torch.tensor([x.reward["total"] for x in rollouts])
    if cfg.overlong_cache > 0:
        pen = [overlong_penalty(len(x.sample.tokens), cfg.max_new_tokens, cfg.overlong_cache) for x in rollouts]
        r = r + torch.tensor(pen)
    return r


@dataclass
class MicroBatch:
    idx: torch.Tensor  # (n, L)
    mask: torch.Tensor  # (n, T)
    old: torch.Tensor | None  # (n, T) log-probs before the update; None: μ = 1, the current ones
    starts: torch.Tensor  # (n,)
    targets: torch.Tensor  # (n, T)
    adv: torch.Tensor  # (n,)
    ref_logp: torch.Tensor | None


def micro_batches(cfg: GRPOConfig, model, rollouts, adv, ref, pad_id, device) -> list[MicroBatch]:
    """Split the batch into micro-batches of at most cfg.micro_batch rows (0 = one batch).

    Old log-probs come from a training-style forward, not from the sampler: in bf16 the two
    differ by a few hundredths per token, and that noise alone would trip the clip. With μ = 1
    the policy has not moved yet, so the current log-probs (detached) are the old ones.
    """
    size = cfg.micro_batch or len(rollouts)
    out = []
    for a in range(0, len(rollouts), size):
        idx, mask, starts = (t.to(device) for t in to_tensors(rollouts[a:a + size], pad_id))
        T = mask.shape[1]
        targets = completion_targets(idx, starts, T)
        logp = {}
        with torch.no_grad():
            for name, m in (("ref", ref), ("old", model if cfg.mu > 1 else None)):
                if m is not None:
                    logp[name] = rl.token_logprobs(completion_logits(m, idx, starts, T, cfg.temperature), targets)
        rows = adv[a:a + size] if adv.dim() == 1 else adv[a:a + size, :T]  # per-token advantages: this chunk's width
        out.append(MicroBatch(idx, mask, logp.get("old"), starts, targets, rows.to(device),
                              logp.get("ref")))
    return out


def _loss_setup(cfg: GRPOConfig):
    """The configured policy loss (with its keyword arguments) and aggregation."""
    kw = {"eps_low": cfg.eps_low, "eps_high": cfg.eps_high}
    if cfg.loss == "gspo":
        kw = {"eps_low": cfg.gspo_eps_low, "eps_high": cfg.gspo_eps_high}
    if cfg.loss == "dual_clip":
        kw["clip_c"] = cfg.dual_clip_c
    agg = rl.AGGREGATIONS[cfg.aggregation]
    if cfg.aggregation == "seq_mean_token_sum_norm":
        agg = functools.partial(agg, norm=cfg.max_new_tokens)
    return rl.POLICY_LOSSES[cfg.loss], kw, agg


def chunk_weight(aggregation: str, mb: MicroBatch, n_tokens: float, n_seqs: int) -> float:
    """Share of the whole batch's loss a micro-batch carries, so accumulation equals one big batch."""
    if aggregation == "token_mean":
        return float(mb.mask.sum()) / n_tokens
    return mb.mask.shape[0] / n_seqs  # per-sequence means: weight by sequences


def micro_step(cfg, model, mb: MicroBatch, loss_fn, kw, agg, weight: float) -> dict:
    """Forward + backward of one micro-batch, its loss scaled by `weight`."""
    T = mb.mask.shape[1]
    logits = completion_logits(model, mb.idx, mb.starts, T, cfg.temperature)
    logp = rl.token_logprobs(logits, mb.targets)
    per_tok, s = loss_fn(logp, logp.detach() if mb.old is None else mb.old, mb.adv, mb.mask, **kw)
    loss = agg(per_tok, mb.mask)
    if mb.ref_logp is not None:
        kl = agg(rl.KL_ESTIMATORS[cfg.kl_estimator](logp, mb.ref_logp), mb.mask)
        loss = loss + cfg.kl_coef * kl
        s["kl"] = kl.detach()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    (loss * weight).backward()
    with torch.no_grad():
        s["entropy"] = rl.token_mean(rl.entropy_from_logits(logits.detach()), mb.mask)
    s["loss"] = loss.detach()
    return {k: float(v) * weight for k, v in s.items()}


def policy_update(cfg: GRPOConfig, model, ref, opt, rollouts, adv, pad_id) -> dict:
    """μ inner updates on one batch (accumulated over micro-batches). Returns mean statistics."""
    device = model.embed.weight.device
    amp = resolve_dtype(cfg.dtype, device)  # fp32 master weights and AdamW; bf16 matmuls on a GPU
    with autocast(device, amp):
        mbs = micro_batches(cfg, model, rollouts, adv, ref, pad_id, device)
    n_tokens = float(sum(mb.mask.sum() for mb in mbs))
    loss_fn, kw, agg = _loss_setup(cfg)
    stats: dict[str, float] = {}
    for _ in range(cfg.mu):
        opt.zero_grad(set_to_none=True)
        for mb in mbs:
            w = chunk_weight(cfg.aggregation, mb, n_tokens, len(rollouts))
            with autocast(device, amp):
                step_stats = micro_step(cfg, model, mb, loss_fn, kw, agg, w)
            for k, v in step_stats.items():
                stats[k] = stats.get(k, 0.0) + v / cfg.mu
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(gn):
            raise FloatingPointError(f"gradient norm is {gn.item()}")
        opt.step()
        stats["grad_norm"] = stats.get("grad_norm", 0.0) + float(gn) / cfg.mu
    return stats


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
        self.cfg, self.equal_run = cfg, 0

    def check(self, step: int, m: dict) -> list[str]:
        out = []
        self.equal_run = self.equal_run + 1 if m["reward_std"] == 0 else 0
        if self.equal_run == self.cfg.alarm_equal_steps:
            out.append(f"step {step}: every reward was equal for {self.equal_run} steps — no learning signal "
                       f"(reward {m['reward_mean']:.3f}); the task may be too hard or too easy for this model")
        if m["truncation_rate"] > self.cfg.alarm_truncation:
            out.append(f"step {step}: {m['truncation_rate']:.0%} of completions hit max_new_tokens="
                       f"{self.cfg.max_new_tokens}; raise grpo.max_new_tokens or add overlong shaping")
        return out


def batch_problems(cfg: GRPOConfig, problems: list, step: int) -> list:
    """Prompts of `step`: consecutive slices of one seeded permutation per epoch (the data cursor)."""
    per, n = cfg.prompts_per_step, len(problems)
    orders: dict[int, list[int]] = {}
    out = []
    for j in range(step * per, (step + 1) * per):
        epoch, pos = divmod(j, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(cfg.seed * 7919 + epoch).shuffle(orders[epoch])
        out.append(problems[orders[epoch][pos]])
    return out


@torch.no_grad()
def teacher_advantages(cfg: GRPOConfig, model, teacher, rollouts: list[Rollout], pad_id: int) -> tuple[torch.Tensor, float]:
    """On-policy distillation: the teacher scores every sampled token → (advantages (N, T), mean reverse KL)."""
    device = model.embed.weight.device
    size, T = cfg.micro_batch or len(rollouts), max(len(r.sample.tokens) for r in rollouts)
    adv, kl, n = torch.zeros(len(rollouts), T), 0.0, 0.0
    for a in range(0, len(rollouts), size):
        idx, mask, starts = (t.to(device) for t in to_tensors(rollouts[a:a + size], pad_id))
        t = mask.shape[1]
        targets = completion_targets(idx, starts, t)
        with autocast(device, resolve_dtype(cfg.dtype, device)):
            student = rl.token_logprobs(completion_logits(model, idx, starts, t, cfg.temperature), targets)
            scored = rl.token_logprobs(completion_logits(teacher, idx, starts, t, cfg.temperature), targets)
        chunk = rl.TOKEN_ADVANTAGES[cfg.advantage](scored, student, mask)  # (n, t)
        adv[a:a + size, :t] = chunk.cpu()
        kl, n = kl - float(chunk.sum()), n + float(mask.sum())
    return adv, kl / max(n, 1.0)


def load_teacher(cfg: GRPOConfig, tok):
    """The frozen teacher of on-policy distillation; it must read and write the policy's tokens."""
    if cfg.advantage not in rl.TOKEN_ADVANTAGES:
        return None
    path = resolve_ckpt(cfg.teacher)
    if not (path / "config.json").exists():
        raise ConfigError(f"grpo.teacher: {cfg.teacher} has no checkpoint (config.json)")
    teacher, ttok = checkpoint.load(path, device=cfg.device, dtype=cfg.dtype)
    if ttok.tk.get_vocab(with_added_tokens=True) != tok.tk.get_vocab(with_added_tokens=True):
        raise ConfigError(f"grpo.teacher: {cfg.teacher} has another tokenizer than the policy; on-policy "
                          "distillation scores the student's own tokens, so both must share one")
    return teacher.eval().requires_grad_(False)


def train_step(cfg, step, model, ref, tok, task, problems, opt, engine, teacher=None) -> tuple[dict, list[Rollout]]:
    t0 = time.perf_counter()
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            n=cfg.group_size, seed=cfg.seed * 100_003 + step)
    groups = rollout(model, tok, task, batch_problems(cfg, problems, step), params, engine, cfg.system)
    gen_s = time.perf_counter() - t0
    rollouts = [r for g in groups for r in g]
    rewards = rewards_of(cfg, rollouts)
    m_extra = {}
    if teacher is not None:  # on-policy distillation: the teacher's per-token verdict, not the reward
        adv, m_extra["reverse_kl"] = teacher_advantages(cfg, model, teacher, rollouts, tok.pad_id)
    else:
        adv = rl.ADVANTAGES[cfg.advantage](rewards, cfg.group_size, **({"eps": cfg.adv_eps} if cfg.advantage == "grpo" else {}))
    zero_var = rl.zero_variance_groups(rewards, cfg.group_size)
    # groups whose rewards are all equal have zero advantage: dynamic sampling (DAPO) drops them,
    # so they neither dilute the loss normaliser nor cost a backward pass; otherwise they stay
    # (their only gradient is then the KL term, and they count in the aggregation, as in GRPO)
    keep = ~rl.expand_group_mask(zero_var, cfg.group_size) if cfg.dynamic_sampling and teacher is None \
        else torch.ones_like(rewards, dtype=torch.bool)
    m = {**step_metrics(cfg, rollouts, rewards, zero_var), **m_extra}
    t1 = time.perf_counter()
    set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.schedule))
    if keep.any():
        kept = [r for r, k in zip(rollouts, keep.tolist()) if k]
        m.update(policy_update(cfg, model, ref, opt, kept, adv[keep], tok.pad_id))
        if hasattr(model, "after_optimizer_step"):  # MoE: aux-loss-free bias update
            model.after_optimizer_step()
    train_s = time.perf_counter() - t1
    ntok = sum(len(r.sample.tokens) for r in rollouts)
    m.update(step=step + 1, lr=opt.param_groups[0]["lr"], gen_seconds=gen_s, train_seconds=train_s,
             tokens_per_second=ntok / max(gen_s, 1e-9), trained_groups=int((~zero_var).sum()))
    return m, rollouts


def run(cfg: GRPOConfig, pretrain_cfg=None) -> dict:
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task, **cfg.task_args)
    problems, test = task.problems("train"), task.problems("test", cfg.eval_problems)
    model, ref, tok, opt, start, summary = _setup(cfg, out, task, test, pretrain_cfg)
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if start else None)
    rollout_log = MetricsLog(out / "rollouts.jsonl", resume_step=start if start else None)
    engine, alarms, teacher = Engine(model, tok), Alarms(cfg), load_teacher(cfg, tok)
    rl_seconds = summary.get("rl_seconds", 0.0)
    # a resumed run with nothing left to do (all steps, or the time budget, spent) finishes at once
    spent = cfg.time_budget_s > 0 and rl_seconds >= cfg.time_budget_s
    step = start - 1
    with Progress(cfg.steps, "grpo", start) as bar:
        for step in range(start, start if spent else cfg.steps):
            t0 = time.perf_counter()
            try:
                m, rollouts = train_step(cfg, step, model, ref, tok, task, problems, opt, engine, teacher)
            except FloatingPointError as e:
                print0(f"grpo: stopping at step {step + 1}: {e}; the last good checkpoint is {out / 'model'}")
                return _finish(cfg, out, model, tok, task, test, summary, rl_seconds, step, failed=str(e))
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                m["eval_greedy_accuracy"] = greedy_accuracy(model, tok, task, test, cfg.max_new_tokens)
            rl_seconds += time.perf_counter() - t0
            m["rl_seconds"] = rl_seconds
            log.write(m)
            for r in rollouts[:: cfg.group_size]:  # one sample per group keeps the file small
                rollout_log.write(r.record(step + 1))
            for warning in alarms.check(step + 1, m):
                print0(f"grpo: warning: {warning}")
            bar.update(step + 1, _info(m))
            done = step + 1 == cfg.steps or (cfg.time_budget_s > 0 and rl_seconds >= cfg.time_budget_s)
            if (step + 1) % cfg.save_every == 0 or done:
                summary["rl_seconds"] = rl_seconds
                _save(cfg, out, model, tok, opt, step + 1, summary)
            if done:
                break
    return _finish(cfg, out, model, tok, task, test, summary, rl_seconds, step + 1)


def _info(m: dict) -> str:
    s = f"reward {m['reward_mean']:.2f} acc {m['accuracy']:.2f} think {m['think_rate']:.2f} len {m['response_length']:.0f}"
    return s + (f" eval {m['eval_greedy_accuracy']:.2f}" if "eval_greedy_accuracy" in m else "")


def _save(cfg, out: Path, model, tok, opt, step: int, summary: dict) -> None:
    state = {"stage": "grpo", "step": step, "summary": summary, "config": asdict(cfg)}
    checkpoint.save(model, tok, out / "model", trainer_state={"optimizer": opt, "state": state})


def _setup(cfg: GRPOConfig, out: Path, task, test, pretrain_cfg):
    """Resume from DIR/model, or start from the base (pretraining it first when the recipe says how)."""
    ckpt = out / "model"
    resuming = checkpoint.has_trainer_state(ckpt)
    base = resolve_ckpt(cfg.base)
    if not resuming and not (base / "config.json").exists():
        if pretrain_cfg is None:
            raise ConfigError(f"grpo.base: {cfg.base} has no checkpoint, and the recipe has no [pretrain] section")
        from r1kit.stages import pretrain
        print0(f"grpo: base {cfg.base} is missing — pretraining it first (recipe's [pretrain] section)")
        pretrain_cfg.out_dir = str(cfg.base)
        pretrain.run(pretrain_cfg)
        base = resolve_ckpt(cfg.base)
    # the policy stays fp32: AdamW steps of ~lr·1 would round away on bf16 weights (lr 1e-6 ≪ bf16's
    # spacing at 0.02); `dtype` is the autocast compute dtype. The frozen reference can be bf16.
    model, tok = checkpoint.load(ckpt if resuming else base, device=cfg.device, dtype="float32")
    ref = None
    if cfg.kl_coef > 0:
        ref, _ = checkpoint.load(base, device=cfg.device, dtype=cfg.dtype)
        ref.eval().requires_grad_(False)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    if resuming:
        state, _ = checkpoint.load_trainer_state(ckpt, opt, stage="grpo")
        print0(f"grpo: resuming {ckpt} at step {state['step']}")
        return model, ref, tok, opt, state["step"], state["summary"]
    base_acc = greedy_accuracy(model, tok, task, test, cfg.max_new_tokens)
    print0(f"grpo: base {base} held-out greedy accuracy {base_acc:.3f}")
    return model, ref, tok, opt, 0, {"base": str(base), "base_accuracy": base_acc}


def _finish(cfg, out, model, tok, task, test, summary, rl_seconds, steps, failed=None) -> dict:
    # a run stopped by NaN/inf holds broken weights: its final accuracy is the checkpoint's to tell
    final = None if failed else greedy_accuracy(model, tok, task, test, cfg.max_new_tokens)
    summary.update(final_accuracy=final, rl_seconds=round(rl_seconds, 1), steps=steps, task=task.name,
                   eval_problems=len(test))
    if failed:
        summary["stopped"] = failed
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if final is not None:
        print0(f"grpo: held-out greedy accuracy {summary['base_accuracy']:.3f} → {final:.3f} "
               f"in {rl_seconds:.0f}s of RL ({steps} steps); summary in {out / 'summary.json'}")
    return summary


def add_args(p) -> None:
    add_config_args(p)


def main(args) -> int:
    from r1kit.stages.pretrain import PretrainConfig
    cfg = load_config(GRPOConfig, args.config, args.overrides, section="grpo")
    if args.out:
        cfg.out_dir = args.out
    pre = None
    if args.config and "pretrain" in read_toml(args.config):  # the recipe can make its own base
        pre = load_config(PretrainConfig, args.config, args.overrides, section="pretrain", bare_keys=False)
    return 1 if "stopped" in run(cfg, pre) else 0
