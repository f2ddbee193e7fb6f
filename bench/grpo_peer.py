"""What the GRPO benches against TRL share: TRL's GRPOConfig mirrored from an r1kit GRPOConfig, and a
profile of where a training step's time goes (generation, reward, forward, backward, optimizer), taken
with hooks on either trainer so neither library is edited.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
# global hooks: every optimizer's step, whoever built it (TRL does)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from r1kit.stages.grpo import GRPOConfig, aggregation_of
from r1kit.training import adamw

# r1kit's aggregation → TRL's loss_type with the same normaliser (TRL 1.16 GRPOTrainer._compute_loss)
TRL_LOSS_TYPE = {"token_mean": "dapo",  # Σ per-token loss / tokens in the whole batch (DAPO)
                 "seq_mean_token_mean": "grpo",  # mean over sequences of each one's token mean
                 "seq_mean_token_sum_norm": "dr_grpo"}  # Σ / (sequences × max completion length)
TRL_SCALE_REWARDS = {"grpo": "group", "drgrpo": "none"}  # r1kit advantage → TRL scale_rewards


def load_avg() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def check_trl_equivalent(cfg: GRPOConfig) -> None:
    """Raise ValueError naming the first r1kit field whose setting TRL's GRPOTrainer has no equivalent for."""
    agg = aggregation_of(cfg)
    unsupported = [("loss", cfg.loss != "clipped"), ("aggregation", agg not in TRL_LOSS_TYPE),
                   ("advantage", cfg.advantage not in TRL_SCALE_REWARDS), ("schedule", cfg.schedule != "constant"),
                   ("overlong_cache", cfg.overlong_cache > 0), ("corrections", bool(cfg.corrections)),
                   ("lora_rank", cfg.lora_rank > 0)]
    for name, bad in unsupported:
        if bad:
            raise ValueError(f"grpo.{name} = {getattr(cfg, name)!r}: the TRL side of this bench has no equivalent")


def trl_args(cfg: GRPOConfig, out_dir: str, max_steps: int, **extra):
    """TRL's GRPOConfig with r1kit's algorithm: the same batch, sampling, loss, optimizer and schedule.

    Raises ValueError naming the r1kit field TRL has no equivalent for. `extra` adds TRL-only settings
    (e.g. generation_kwargs). CPU friction (FINDINGS.md): bf16 must be off explicitly, and TRL turns
    gradient checkpointing on by default — off here, as r1kit's grad_checkpointing is.
    """
    from trl import GRPOConfig as TRLConfig
    check_trl_equivalent(cfg)
    betas = adamw(torch.nn.Linear(1, 1), cfg.lr).defaults["betas"]  # r1kit's AdamW betas, read, not restated
    return TRLConfig(
        output_dir=out_dir, per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
        gradient_accumulation_steps=1, num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, learning_rate=cfg.lr,
        lr_scheduler_type="constant_with_warmup" if cfg.warmup else "constant", warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay, adam_beta1=betas[0], adam_beta2=betas[1], max_grad_norm=cfg.grad_clip or 1e9,
        beta=cfg.kl_coef, num_iterations=cfg.mu, epsilon=cfg.eps_low, epsilon_high=cfg.eps_high,
        loss_type=TRL_LOSS_TYPE[aggregation_of(cfg)], scale_rewards=TRL_SCALE_REWARDS[cfg.advantage], seed=cfg.seed,
        max_steps=max_steps, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, report_to=[],
        logging_steps=10**9, save_strategy="no", dataloader_num_workers=0, shuffle_dataset=False,
        disable_tqdm=True, log_completions=False, **extra)


PHASES = ("generation", "reward", "forward", "backward", "optimizer", "other")


class Profile:
    """Seconds per training step, by phase. `attach(model)` hooks the model's forwards that build a
    graph (the training forward; generation runs without grad), every autograd backward and every
    optimizer step; generation and reward are timed by the caller with `timing`. "other" is the rest
    of the step (batching, loss maths, gradient clipping, bookkeeping)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget the steps so far (a warm-up step is not counted)."""
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps, self.step_seconds, self.step_cpu, self._t0 = 0, 0.0, 0.0, None

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    @contextlib.contextmanager
    def timing(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def begin_step(self) -> None:
        self._t0 = time.perf_counter(), time.process_time()

    def end_step(self) -> None:
        self.steps += 1
        self.step_seconds += time.perf_counter() - self._t0[0]
        self.step_cpu += time.process_time() - self._t0[1]

    def mean(self) -> tuple[float, float]:
        """(wall, cpu) seconds per step."""
        n = max(self.steps, 1)
        return self.step_seconds / n, self.step_cpu / n

    @contextlib.contextmanager
    def attach(self, model):
        starts: list[float] = []

        def pre(module, args):
            if torch.is_grad_enabled():
                starts.append(time.perf_counter())

        def post(module, args, out):
            if torch.is_grad_enabled() and starts:
                self.add("forward", time.perf_counter() - starts.pop())

        opt_t0 = []
        handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post),
                   register_optimizer_step_pre_hook(lambda *a: opt_t0.append(time.perf_counter())),
                   register_optimizer_step_post_hook(
                       lambda *a: self.add("optimizer", time.perf_counter() - opt_t0.pop()))]
        backward = torch.autograd.backward

        def timed_backward(*a, **k):  # Tensor.backward calls torch.autograd.backward by attribute
            with self.timing("backward"):
                return backward(*a, **k)
        torch.autograd.backward = timed_backward
        try:
            yield self
        finally:
            torch.autograd.backward = backward
            for h in handles:
                h.remove()

    def per_step(self) -> dict[str, float]:
        n = max(self.steps, 1)
        out = {k: v / n for k, v in self.seconds.items() if k != "other"}
        out["other"] = max(self.step_seconds / n - sum(out.values()), 0.0)
        return out

    def line(self) -> str:
        """'0.9 s/step (cpu 0.8 s; generation 0.41 s 52%, reward …)' over the steps profiled (wall time)."""
        parts, (total, cpu) = self.per_step(), self.mean()
        inner = ", ".join(f"{k} {v:.3f} s {100 * v / max(total, 1e-9):.0f}%" for k, v in parts.items())
        return f"{total:6.3f} s/step (cpu {cpu:.3f} s; {inner})"


@contextlib.contextmanager
def timed_attr(owner, name: str, profile: Profile, phase: str):
    """Time every call of `owner.name` as `phase` while the block runs (e.g. r1kit's reward scoring)."""
    original = getattr(owner, name)

    def timed(*a, **k):
        with profile.timing(phase):
            return original(*a, **k)
    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def timed_generate(model, profile: Profile) -> None:
    """Time every `model.generate` call (TRL's rollouts through transformers) as generation."""
    original = model.generate

    def generate(*a, **k):
        with profile.timing("generation"):
            return original(*a, **k)
    model.generate = generate


def step_callback(profile: Profile, on_begin=None, on_end=None):
    """A transformers TrainerCallback that brackets each of TRL's steps for `profile`; `on_begin(state)` runs
    before a step, `on_end(state, control)` after it is counted (the time-to-accuracy race evaluates there)."""
    import transformers

    class StepCallback(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if on_begin is not None:
                on_begin(state)
            profile.begin_step()

        def on_step_end(self, args, state, control, **kw):
            profile.end_step()
            if on_end is not None:
                on_end(state, control)
            return control
    return StepCallback()
