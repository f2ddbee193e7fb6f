"""Supervised fine-tuning on chat JSONL — R1's cold start, and the student side of distillation.

Data: one JSON object per line, either
    {"messages": [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}, …]}
or  {"prompt": "…", "response": "…"}  (also "completion"; TRL's prompt/completion message lists too;
an optional "system" string). Loss is on assistant tokens only (the tokenizer's loss mask).

Sequence packing: conversations are packed several to a row, up to `max_len` tokens. With
`packing = "document"` (default) each packed conversation gets its own RoPE positions from 0
and a block-diagonal causal mask, passed to the model as `positions` and `attn_mask` (every
layer honours them, DeepSeek's MTP blocks included), so attention never crosses documents and a
packed row computes exactly what the separate conversations would. `packing = "concat"` is plain
concatenation (positions run on, attention crosses documents, the end-of-turn token separates
them); `"none"`: one per row.

    r1kit sft --config recipe.toml [--set sft.data=traces.jsonl] [--out DIR]
    torchrun --nproc-per-node N -m r1kit sft ...   (data parallel: each rank takes batch_size/N rows)
writes DIR/model (checkpoint + trainer_state), DIR/metrics.jsonl, DIR/summary.json; killed at any
point, the same command resumes from the last checkpoint (the data order is seeded per epoch).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from r1kit import checkpoint, dist
from r1kit.common import autocast, print0, resolve_device, resolve_dtype, seed_everything
from r1kit.config import ConfigError, add_config_args, load_config
from r1kit.models import lora
from r1kit.models.llama import IGNORE_INDEX, document_mask
from r1kit.tokenizer import Tokenizer, TokenizerError
from r1kit.training import (MemoryOptions, MetricsLog, ModelSpec, Progress, adamw, apply_memory_options, build_model,
                            clip_grad_norm, is_checkpoint, lr_at, resolve_ckpt, set_lr)

PACKING = ("document", "concat", "none")


class DataError(ConfigError):
    """A training file is malformed or empty; the message names the file (and line)."""


@dataclass
class SFTConfig(MemoryOptions):
    data: list[str] | str = field(default_factory=list)  # chat JSONL file(s): {"messages": [...]} per line
    base: str = ""  # checkpoint (or stage dir) to fine-tune; "" → a fresh model from `model`
    tokenizer: str = ""  # fresh model: checkpoint whose tokenizer it uses (e.g. the teacher's)
    model: ModelSpec = field(default_factory=ModelSpec)  # fresh model only
    out_dir: str = "runs/sft"  # where the fine-tuned model and metrics.jsonl go
    epochs: float = 2.0  # passes over the data (fractions allowed)
    steps: int = 0  # > 0: overrides epochs
    batch_size: int = 8  # packed rows per step
    max_len: int = 256  # tokens per packed row
    packing: str = "document"  # document (packed, no attention across conversations) | concat | none
    lr: float = 1e-3  # AdamW peak learning rate
    warmup: int = 10  # linear learning-rate warm-up steps
    schedule: str = "cosine"  # learning rate after warm-up: cosine | constant
    min_lr_ratio: float = 0.1  # the cosine ends at lr × this
    weight_decay: float = 0.0  # AdamW weight decay (matrices only)
    grad_clip: float = 1.0  # clip the gradient's global norm to this (0: off)
    seed: int = 0  # seeds the data order and a fresh model's weights
    save_every: int = 50  # checkpoint (resumable) every this many steps
    task: str = ""  # held-out greedy accuracy at the end when set
    task_args: dict = field(default_factory=dict)  # that task's options
    eval_problems: int = 200  # held-out problems for that accuracy (0: skip it)
    max_new_tokens: int = 96  # most tokens per answer in that evaluation
    device: str = "auto"  # cuda | mps | cpu | auto (cuda → mps → cpu)
    dtype: str = "auto"  # compute (autocast) dtype; weights and AdamW stay fp32
    generation_config: str = "source"  # saved sampling defaults: source (the base's own) | r1 (T 0.6, top-p 0.95)
    parallel: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (FSDP2, sharded weights and optimizer)
    dist_timeout_s: float = 600.0  # under torchrun: a missing or dead peer ends the run after this long

    def __post_init__(self):
        if self.parallel not in dist.PARALLEL:
            raise ConfigError(f"sft.parallel = {self.parallel!r}; choose one of {list(dist.PARALLEL)}")
        if self.parallel == "fsdp" and self.lora_rank:
            raise ConfigError("sft.parallel = 'fsdp' with lora_rank is not supported yet (adapters are merged and "
                              "saved outside the forward, where FSDP2 holds only shards): use parallel = 'ddp'")
        try:
            resolve_dtype(self.dtype, resolve_device(self.device))
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"sft.dtype / sft.device: {e}") from None
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.packing not in PACKING:
            raise ConfigError(f"sft.packing = {self.packing!r}; choose one of {list(PACKING)}")
        if self.batch_size < 1 or self.max_len < 2:
            raise ConfigError("sft.batch_size must be ≥ 1 and sft.max_len ≥ 2")
        self.check_memory_options("sft")
        if self.generation_config not in checkpoint.GENERATION_PRESETS:
            raise ConfigError(f"sft.generation_config = {self.generation_config!r}; "
                              f"choose one of {sorted(checkpoint.GENERATION_PRESETS)}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def row_messages(row, where: str) -> list[dict]:
    """One JSONL row → chat messages; `where` is "file:line" for the error message."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        return msgs
    reply = next((row[k] for k in ("response", "completion", "answer_text") if k in row), None)
    if "prompt" not in row or reply is None:
        raise DataError(f"{where}: expected a 'messages' list, or 'prompt' and 'response' (or 'completion') "
                        f"fields; got keys {sorted(row)}")
    prompt = row["prompt"]
    msgs = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
    # TRL's conversational prompt-completion rows hold message lists instead of strings
    msgs += prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    msgs += reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]
    return msgs


def read_jsonl(path) -> list[tuple[dict, str]]:
    """→ [(row, "file:line")], blank lines skipped; bad JSON names its file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: training data not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
    return out


def encode_examples(tok: Tokenizer, paths: list[str]) -> list[tuple[list[int], list[int]]]:
    """Every conversation of every file → (ids, loss_mask); refuses an empty set."""
    if not paths:
        raise DataError("sft.data: no training files given")
    out = []
    for path in paths:
        for row, where in read_jsonl(path):
            try:
                ids, mask = tok.render_chat(row_messages(row, where))
            except TokenizerError as e:
                raise DataError(f"{where}: {e}") from None
            if not any(mask[1:]):
                raise DataError(f"{where}: no assistant message to train on")
            out.append((ids, mask))
    if not out:
        raise DataError(f"{', '.join(map(str, paths))}: no training examples (the file is empty); "
                        "nothing to fine-tune on")
    return out


def data_digest(examples) -> str:
    """A fingerprint of the tokenized data: resuming on different data is refused."""
    h = hashlib.sha256()
    for ids, mask in examples:
        h.update(json.dumps([ids, mask]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
def pack(lengths: list[int], order: list[int], max_len: int, packing: str) -> list[list[int]]:
    """Example indices (taken in `order`) → rows, each a list of indices whose lengths fit max_len.

    Greedy in order (no bin-packing search): the order is the epoch's shuffle, so resuming
    recomputes the same rows, and a longer example than max_len gets a row of its own (cut).

    >>> pack([5, 3, 4, 2], [0, 1, 2, 3], 8, "document")
    [[0, 1], [2, 3]]
    >>> pack([5, 3], [1, 0], 8, "none")
    [[1], [0]]
    """
    rows, cur, used = [], [], 0
    for i in order:
        n = min(lengths[i], max_len)
        if cur and (packing == "none" or used + n > max_len):
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def plan_rows(cfg: SFTConfig, lengths: list[int], n_rows_needed: int) -> list[list[int]]:
    """Packed rows of as many seeded epochs as the run needs, in training order."""
    rows, epoch = [], 0
    while len(rows) < n_rows_needed:
        order = list(range(len(lengths)))
        random.Random(cfg.seed * 1_000_033 + epoch).shuffle(order)
        rows += pack(lengths, order, cfg.max_len, cfg.packing)
        epoch += 1
    return rows


def make_batch(examples, rows: list[list[int]], cfg: SFTConfig, pad_id: int, device=None):
    """Packed rows → idx, targets (B, T) and the model's keyword arguments: for document packing
    positions (B, T) from 0 in each document and its block-diagonal attn_mask (B, 1, T, T); none else.

    Targets are computed per document, so no document predicts the first token of the next.
    """
    T = max(sum(min(len(examples[i][0]), cfg.max_len) for i in row) for row in rows)
    B = len(rows)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)  # padding is a "document" of its own
    pos = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            ids, mask = examples[i][0][: cfg.max_len], examples[i][1][: cfg.max_len]
            n = len(ids)
            idx[b, at: at + n] = torch.tensor(ids)
            tgt = torch.tensor(ids[1:] + [IGNORE_INDEX])
            keep = torch.tensor(mask[1:] + [0], dtype=torch.bool)
            targets[b, at: at + n] = torch.where(keep, tgt, IGNORE_INDEX)
            doc[b, at: at + n] = d
            pos[b, at: at + n] = torch.arange(n)
            at += n
        pos[b, at:] = torch.arange(T - at)
    idx, targets, doc, pos = (t.to(device) for t in (idx, targets, doc, pos))
    if cfg.packing != "document":
        return idx, targets, {}
    return idx, targets, {"positions": pos, "attn_mask": document_mask(doc)}  # padding: a "document" of its own


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def run(cfg: SFTConfig) -> dict:
    _, device = dist.init(resolve_device(cfg.device), cfg.dist_timeout_s)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    ckpt = out / "model"
    model, tok, opt, start, state = _resume_or_init(cfg, ckpt, device)
    examples = encode_examples(tok, cfg.data)
    digest = data_digest(examples)
    if start and state.get("data_digest") not in (None, digest):
        raise DataError(f"{ckpt}: this run was trained on different data ({cfg.data}); "
                        f"use a new --out directory or delete {ckpt}")
    lengths = [len(ids) for ids, _ in examples]
    rows_per_epoch = len(pack(lengths, list(range(len(lengths))), cfg.max_len, cfg.packing))
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * rows_per_epoch / cfg.batch_size))
    rows = plan_rows(cfg, lengths, steps * cfg.batch_size)
    print0(f"sft: {len(examples)} conversations, {sum(lengths)} tokens, {rows_per_epoch} packed rows/epoch "
           f"(max_len {cfg.max_len}, {cfg.packing} packing), {steps} steps")
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if start else None)
    seconds, loss = state.get("seconds", 0.0), state.get("loss", float("nan"))
    model.train()
    with Progress(steps, "sft", start) as bar:
        for step in range(start, steps):
            t0 = time.perf_counter()
            batch = dist.shard(rows[step * cfg.batch_size: (step + 1) * cfg.batch_size], "sft.batch_size")
            loss, ntok = _train_step(cfg, model, opt, examples, batch, tok.pad_id, step, steps)
            seconds += time.perf_counter() - t0
            log.write({"step": step + 1, "loss": loss, "lr": opt.param_groups[0]["lr"], "tokens": ntok,
                       "seconds": seconds})
            bar.update(step + 1, f"loss {loss:.3f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
                st = {"stage": "sft", "step": step + 1, "seconds": seconds, "loss": loss, "data_digest": digest,
                      "config": asdict(cfg)}
                checkpoint.save(model, tok, ckpt, trainer_state={"optimizer": opt, "state": st},
                                generation=cfg.generation_config)
    summary = {"examples": len(examples), "tokens": sum(lengths), "rows_per_epoch": rows_per_epoch,
               "steps": steps, "final_loss": loss, "train_seconds": round(seconds, 1),
               **_evaluate(cfg, dist.unwrap(model), tok)}
    if dist.is_main_process():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print0(f"sft: done in {seconds:.0f}s of training; final loss {summary['final_loss']:.3f}"
           + (f", held-out greedy accuracy {summary['greedy_accuracy']:.3f}" if "greedy_accuracy" in summary else ""))
    return summary


def _train_step(cfg, model, opt, examples, rows, pad_id, step, steps) -> tuple[float, int]:
    """One update on this rank's `rows` → (the global batch's token-mean loss, its token count)."""
    set_lr(opt, lr_at(step, steps, cfg.lr, cfg.warmup, cfg.schedule, cfg.min_lr_ratio))
    device = dist.unwrap(model).embed.weight.device
    idx, targets, packed = make_batch(examples, rows, cfg, pad_id, device)
    ntok = int((targets != IGNORE_INDEX).sum())
    scale = dist.loss_scale(ntok)  # this rank's share of the global token mean
    with autocast(device, resolve_dtype(cfg.dtype, device)):  # fp32 master weights, bf16 matmuls on a GPU
        loss = model(idx, targets=targets, **packed)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"sft: loss is {loss.item()} at step {step + 1}; lower sft.lr")
    opt.zero_grad(set_to_none=True)
    (loss * scale).backward()
    clip_grad_norm(model.parameters(), cfg.grad_clip)
    opt.step()
    dist.after_optimizer_step(model)  # MoE: aux-loss-free bias update from every rank's loads
    m = dist.all_reduce_sum({"loss": loss.item() * scale / dist.world().world_size, "tokens": ntok})
    return m["loss"], int(m["tokens"])


def _resume_or_init(cfg: SFTConfig, ckpt: Path, device):
    """→ model (wrapped for this run's processes), tokenizer, optimizer, start step, saved state
    (empty when starting fresh)."""
    # fp32 master weights; with LoRA only the fp32 adapters train and the frozen base keeps the compute dtype
    dtype = cfg.dtype if cfg.lora_rank else "float32"
    if checkpoint.has_trainer_state(ckpt):
        model, tok = checkpoint.load(ckpt, device=device, dtype=dtype)
        apply_memory_options(model, cfg)
        model = dist.wrap(model, cfg.parallel, resolve_dtype(cfg.dtype, device))
        opt = adamw(model, cfg.lr, cfg.weight_decay)
        state, _ = checkpoint.load_trainer_state(ckpt, opt, stage="sft", model=model)
        print0(f"sft: resuming {ckpt} at step {state['step']}")
        return model, tok, opt, state["step"], state
    if cfg.base:
        base = resolve_ckpt(cfg.base)
        if not is_checkpoint(base):
            raise ConfigError(f"sft.base: {cfg.base} has no checkpoint (config.json)")
        model, tok = checkpoint.load(base, device=device, dtype=dtype)
        apply_memory_options(model, cfg, base=base, seed=cfg.seed)
        print0(f"sft: fine-tuning {base}" + (f" with LoRA rank {cfg.lora_rank}" if cfg.lora_rank else ""))
    else:
        if not cfg.tokenizer:
            raise ConfigError("sft: set sft.base (a checkpoint to fine-tune) or sft.tokenizer (a checkpoint whose "
                              "tokenizer a fresh sft.model uses)")
        if cfg.lora_rank:
            raise ConfigError("sft.lora_rank: a fresh model has nothing frozen worth adapting; set sft.base")
        tok = Tokenizer.load(resolve_ckpt(cfg.tokenizer))
        model = build_model(cfg.model, tok.vocab_size, cfg.seed).to(device)
        apply_memory_options(model, cfg)
        n = sum(p.numel() for p in model.parameters())
        print0(f"sft: fresh {cfg.model.arch} model, {n / 1e6:.2f}M parameters, tokenizer of {cfg.tokenizer}")
    w = dist.world()
    if w.distributed:
        print0(f"sft: {w.world_size} processes ({cfg.parallel}), {cfg.batch_size // w.world_size} rows each per step")
    model = dist.wrap(model, cfg.parallel, resolve_dtype(cfg.dtype, device))
    return model, tok, adamw(model, cfg.lr, cfg.weight_decay), 0, {}


def _evaluate(cfg: SFTConfig, model, tok) -> dict:
    if not cfg.task or cfg.eval_problems <= 0:
        return {}
    from r1kit.rollout import greedy_accuracy
    from r1kit.tasks import get_task
    task = get_task(cfg.task, **cfg.task_args)
    model.eval()
    with lora.merged(model):
        acc = greedy_accuracy(model, tok, task, task.problems("test", cfg.eval_problems), cfg.max_new_tokens)
    return {"greedy_accuracy": acc, "eval_problems": cfg.eval_problems}


def add_args(p) -> None:
    add_config_args(p, SFTConfig, "sft")
    p.add_argument("--data", action="append", help="chat JSONL file (repeatable; replaces sft.data)")


def main(args) -> int:
    cfg = load_config(SFTConfig, args.config, args.overrides, section="sft")
    if args.out:
        cfg.out_dir = args.out
    if args.data:
        cfg.data = list(args.data)
    run(cfg)
    return 0
