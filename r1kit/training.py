"""Pieces every training stage shares: model specs, batching, optimizer, schedule, metrics log."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r1kit.common import is_main_process
from r1kit.config import ConfigError
from r1kit.models.llama import IGNORE_INDEX


@dataclass
class ModelSpec:
    """A from-scratch model: the family and its config fields (HF names), vocab from the tokenizer."""
    arch: str = "llama"  # "llama" (dense) | "deepseek" (MLA + MoE + MTP)
    # the family's config fields, by their Hugging Face names (vocab_size comes from the tokenizer)
    config: dict = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=256))


def build_model(spec: ModelSpec, vocab_size: int, seed: int):
    """Instantiate and initialise a model with exactly the tokenizer's vocabulary."""
    vocab = vocab_size
    try:
        if spec.arch == "llama":
            from r1kit.models.llama import Llama, LlamaConfig
            return Llama(LlamaConfig(vocab_size=vocab, **spec.config)).init_weights(seed)
        if spec.arch == "deepseek":
            from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
            return DeepseekV3(DeepseekConfig(vocab_size=vocab, **spec.config)).init_weights(seed)
    except TypeError as e:  # an unknown config field
        raise ConfigError(f"model.config: {e}") from None
    raise ConfigError(f"model.arch must be 'llama' or 'deepseek', got {spec.arch!r}")


def pad_batch(seqs: list[list[int]], masks: list[list[int]], pad_id: int, device=None):
    """Right-pad token lists → (idx, targets) (B, T); targets are next tokens where mask=1, else -100."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        idx[i, : len(s)] = torch.tensor(s)
        tgt = torch.tensor(s[1:], dtype=torch.long)
        keep = torch.tensor(m[1:], dtype=torch.bool)  # predict token t+1 where it is trained on
        targets[i, : len(s) - 1] = torch.where(keep, tgt, IGNORE_INDEX)
    return idx.to(device), targets.to(device)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` and return the norm before clipping; 0 = off
    (torch's clip_grad_norm_ with 0 would zero every gradient instead)."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)


def adamw(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with decay only on matrices (not norms, biases or expert-balance biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    # the fused kernel updates every tensor in one pass per parameter (SmolLM2-135M on one CPU thread:
    # 0.22 s a step against 1.38 s for the per-tensor loop); it takes plain CPU/CUDA tensors, not the
    # DTensors of FSDP2, which keep the loop
    fused = all(p.device.type in ("cpu", "cuda") and not hasattr(p, "device_mesh") for p in decay + other)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=False if not fused else None)


def lr_at(step: int, total: int, lr: float, warmup: int = 0, schedule: str = "cosine",
          min_ratio: float = 0.1) -> float:
    """Linear warm-up, then constant or cosine decay to lr·min_ratio."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ConfigError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint are dropped.

    Under torchrun only rank 0 writes (its records hold the metrics reduced over all ranks).
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.main = is_main_process()
        if not self.main:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if (rec := _parse(ln)) is not None and rec.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [rec for ln in self.path.read_text().splitlines() if (rec := _parse(ln)) is not None]


def _parse(line: str) -> dict | None:
    """One metrics line; None for a blank one or the half-written last line a kill can leave."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def resolve_ckpt(path) -> Path:
    """A stage directory (holding model/) or a checkpoint directory itself → the checkpoint dir."""
    p = Path(path)
    return p / "model" if is_checkpoint(p / "model") else p


def is_checkpoint(path) -> bool:
    """A full checkpoint (config.json) or a LoRA adapter directory (adapter_config.json)."""
    return (Path(path) / "config.json").exists() or (Path(path) / "adapter_config.json").exists()


@dataclass
class MemoryOptions:
    """What trades compute for memory, the same keys in every training stage (GRPO, SFT, distill)."""
    lora_rank: int = 0  # LoRA adapter rank; 0 = full fine-tuning (with LoRA the KL reference is the base, adapters off)
    lora_alpha: float = 0.0  # LoRA scale α: the update is (α / rank)·BA; 0 → 2·rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    # modules to adapt: q k v o gate up down (both families; MLA's wq_a/wq_b/wkv_a/wkv_b through q, k, v), or r1kit /
    # Hugging Face module names (wkv_b, kv_b_proj, ...)
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    grad_checkpointing: bool = False  # activation checkpointing per block: keep block inputs, recompute in backward
    logprob_chunk: int = 0  # > 0: losses and log-probs project this many tokens onto the vocabulary at a time

    def check_memory_options(self, section: str) -> None:
        if self.lora_rank < 0 or self.logprob_chunk < 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"{section}.lora_rank and {section}.logprob_chunk must be ≥ 0, "
                              f"{section}.lora_dropout in [0, 1)")
        if self.lora_rank:
            from r1kit.models.lora import resolve_targets
            try:
                resolve_targets(self.lora_targets)
            except ValueError as e:
                raise ConfigError(f"{section}.{e}") from None


def apply_memory_options(model, opts: MemoryOptions, base: Path | None = None, seed: int = 0) -> None:
    """Switch on checkpointing / chunked log-probs, and wrap LoRA adapters unless the model has them
    already (a resumed adapter checkpoint). `base`: the checkpoint the adapters sit on, saved with them."""
    from r1kit.models import lora
    model.grad_checkpointing = opts.grad_checkpointing
    model.logprob_chunk = opts.logprob_chunk
    if opts.lora_rank and not lora.has_lora(model):
        lora.apply_lora(model, rank=opts.lora_rank, alpha=opts.lora_alpha or None, dropout=opts.lora_dropout,
                        targets=opts.lora_targets, seed=seed)
        if base is not None:
            model.lora["base"] = str(Path(base).resolve())


class Progress:
    """A live progress bar (rich) with a line of metrics; plain log lines when not on a terminal.
    Silent on every rank but 0 under torchrun."""

    def __init__(self, total: int, desc: str, start: int = 0, every: int = 10):
        import sys

        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress
        self.main = is_main_process()
        self.tty, self.every, self.desc = sys.stdout.isatty() and self.main, every, desc
        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), disable=not self.tty)
        self.task = self.bar.add_task(desc, total=total, completed=start, info="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def update(self, step: int, info: str) -> None:
        self.bar.update(self.task, completed=step, info=info)
        if self.main and not self.tty and (step % self.every == 0 or step == self.bar.tasks[0].total):
            print(f"{self.desc} {step}/{self.bar.tasks[0].total} {info}", flush=True)
