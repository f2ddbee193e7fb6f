"""Pretrain a tiny base model from scratch on a synthetic task — R1-Zero's starting point in miniature.

The corpus mixes imperfect completions: full scratch work (`think`), scratch work with a slip
carried into a wrong answer (`slip`), answers with no thinking (`direct`, often wrong) and bare
answers without tags (`bare`). The base has seen the format but usually skips the reasoning, so
its sampled accuracy is mediocre: GRPO then has something to elicit.

    r1kit pretrain --config recipes/r1_zero_tiny.toml [--set pretrain.steps=300] [--out DIR]
    torchrun --nproc-per-node N -m r1kit pretrain ...   (data parallel: each rank takes batch_size/N)
writes DIR/model (checkpoint), DIR/metrics.jsonl, DIR/summary.json.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from r1kit import checkpoint, dist
from r1kit.common import print0, seed_everything
from r1kit.config import ConfigError, add_config_args, load_config
from r1kit.engine import SamplingParams
from r1kit.rollout import greedy_accuracy, rollout
from r1kit.tasks import get_task
from r1kit.tokenizer import Tokenizer, build_bpe_tokenizer
from r1kit.models.llama import IGNORE_INDEX
from r1kit.training import MetricsLog, ModelSpec, Progress, adamw, build_model, lr_at, pad_batch, resolve_ckpt, set_lr


@dataclass
class PretrainConfig:
    out_dir: str = "runs/base"  # where the base model and metrics.jsonl go
    task: str = "arithmetic"  # synthetic task whose traces make the corpus: arithmetic | countdown
    task_args: dict = field(default_factory=dict)  # the task's options, e.g. { digits = 3 }
    model: ModelSpec = field(default_factory=ModelSpec)  # the model to build from scratch
    vocab_size: int = 64  # BPE over the corpus's own characters (+ specials): a tiny vocabulary
    tokenizer: str = ""  # a checkpoint whose tokenizer to use instead (a student that shares its teacher's)
    steps: int = 400  # optimizer steps
    batch_size: int = 64  # sequences per step
    lr: float = 2e-3  # AdamW peak learning rate (cosine decay after warm-up)
    warmup: int = 50  # linear learning-rate warm-up steps
    min_lr_ratio: float = 0.1  # the cosine ends at lr × this
    weight_decay: float = 0.0  # AdamW weight decay (matrices only)
    # corpus styles and their weights: think (scratch work), slip (a slipped digit carried into the
    # answer), direct (an answer with no thinking), bare (the number alone, no tags)
    mix: dict = field(default_factory=lambda: {"think": 0.32, "slip": 0.08, "direct": 0.5, "bare": 0.1})
    seed: int = 0  # seeds the corpus, the initial weights and the sampling
    save_every: int = 100  # checkpoint (resumable) every this many steps
    eval_problems: int = 200  # held-out (test split) problems graded at the end
    max_new_tokens: int = 96  # most tokens per answer in that evaluation
    parallel: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (FSDP2, sharded weights and optimizer)
    dist_timeout_s: float = 600.0  # under torchrun: a missing or dead peer ends the run after this long

    def __post_init__(self):
        if self.parallel not in dist.PARALLEL:
            raise ConfigError(f"pretrain.parallel = {self.parallel!r}; choose one of {list(dist.PARALLEL)}")


def completion_for(task, problem, rng: random.Random, mix: dict) -> str:
    """One corpus completion, its style drawn from `mix`."""
    style = rng.choices(list(mix), weights=list(mix.values()))[0]
    if style == "bare":  # no tags at all: the format reward has something to reward
        return problem.answer
    return task.trace(problem, rng, style)


def make_batch(cfg: PretrainConfig, task, tok, problems, step: int):
    """This rank's share of the batch of `step` — drawn from an RNG seeded by (seed, step), so
    resuming is exact and the global batch is the same whatever the number of processes."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    seqs, masks = [], []
    for _ in range(cfg.batch_size):
        p = problems[rng.randrange(len(problems))]
        msgs = [{"role": "user", "content": p.prompt},
                {"role": "assistant", "content": completion_for(task, p, rng, cfg.mix)}]
        ids, mask = tok.render_chat(msgs)
        seqs.append(ids)
        masks.append(mask)
    return pad_batch(dist.shard(seqs, "pretrain.batch_size"), dist.shard(masks), tok.pad_id)


def build_tokenizer(cfg: PretrainConfig, task, problems):
    rng = random.Random(cfg.seed)
    corpus = [p.prompt + completion_for(task, p, rng, cfg.mix) for p in problems[:2000]]
    return build_bpe_tokenizer(corpus, vocab_size=cfg.vocab_size, all_bytes=False)


def run(cfg: PretrainConfig) -> dict:
    for style in cfg.mix:
        if style not in ("think", "slip", "direct", "bare"):
            raise ConfigError(f"pretrain.mix: unknown style {style!r} (think, slip, direct, bare)")
    dist.init(torch.device("cpu"), cfg.dist_timeout_s)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    task = get_task(cfg.task, **cfg.task_args)
    problems = task.problems("train")
    ckpt = out / "model"
    start, model, tok, opt = _resume_or_init(cfg, ckpt, task, problems)
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if start else None)
    t0 = time.perf_counter()
    model.train()
    with Progress(cfg.steps, "pretrain", start) as bar:
        for step in range(start, cfg.steps):
            loss = _train_step(cfg, model, tok, task, problems, opt, step)
            log.write({"step": step + 1, "loss": loss, "lr": opt.param_groups[0]["lr"]})
            bar.update(step + 1, f"loss {loss:.3f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                state = {"optimizer": opt, "state": {"stage": "pretrain", "step": step + 1, "config": asdict(cfg)}}
                checkpoint.save(model, tok, ckpt, trainer_state=state)
    summary = _summarize(cfg, dist.unwrap(model), tok, task, time.perf_counter() - t0)
    if dist.is_main_process():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _resume_or_init(cfg, ckpt: Path, task, problems):
    if checkpoint.has_trainer_state(ckpt):
        model, tok = checkpoint.load(ckpt, device="cpu", dtype="float32")
        model = dist.wrap(model, cfg.parallel)
        opt = adamw(model, cfg.lr, cfg.weight_decay)
        state, _ = checkpoint.load_trainer_state(ckpt, opt, stage="pretrain", model=model)
        print0(f"pretrain: resuming {ckpt} at step {state['step']}")
        return state["step"], model, tok, opt
    tok = Tokenizer.load(resolve_ckpt(cfg.tokenizer)) if cfg.tokenizer else build_tokenizer(cfg, task, problems)
    model = build_model(cfg.model, tok.vocab_size, cfg.seed)
    n = sum(p.numel() for p in model.parameters())
    w = dist.world()
    print0(f"pretrain: {cfg.model.arch} model, {n / 1e6:.2f}M parameters, vocab {tok.vocab_size}, task {task.name}"
           + (f", {w.world_size} processes ({cfg.parallel})" if w.distributed else ""))
    model = dist.wrap(model, cfg.parallel)
    return 0, model, tok, adamw(model, cfg.lr, cfg.weight_decay)


def _train_step(cfg, model, tok, task, problems, opt, step: int) -> float:
    set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup, "cosine", cfg.min_lr_ratio))
    idx, targets = make_batch(cfg, task, tok, problems, step)
    scale = dist.loss_scale(int((targets != IGNORE_INDEX).sum()))  # this rank's share of the global token mean
    loss = model(idx, targets=targets)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretrain: loss is {loss.item()} at step {step + 1}; lower pretrain.lr")
    opt.zero_grad(set_to_none=True)
    (loss * scale).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    dist.after_optimizer_step(model)  # MoE: aux-loss-free bias update from every rank's loads
    return dist.all_reduce_mean({"loss": loss.item() * scale})["loss"]


def _summarize(cfg, model, tok, task, seconds: float) -> dict:
    """Held-out greedy and sampled accuracy and think rate of the new base."""
    model.eval()
    test = task.problems("test", cfg.eval_problems)
    greedy = greedy_accuracy(model, tok, task, test, cfg.max_new_tokens)
    groups = rollout(model, tok, task, test, SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                                            n=4, seed=cfg.seed))
    flat = [r for g in groups for r in g]
    summary = {"greedy_accuracy": greedy, "sampled_accuracy": sum(r.correct for r in flat) / len(flat),
               "think_rate": sum(r.reward.get("think", 0) for r in flat) / len(flat),
               "seconds": round(seconds, 1), "steps": cfg.steps}
    print0("pretrain: base " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in summary.items()))
    return summary


def add_args(p) -> None:
    add_config_args(p, PretrainConfig, "pretrain")


def main(args) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides, section="pretrain")
    if args.out:
        cfg.out_dir = args.out
    run(cfg)
    return 0
