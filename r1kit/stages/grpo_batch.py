"""GRPO's batches: rollouts → padded tensors → micro-batches with their reference and pre-update
log-probs, the routing replay records of MoE policies, and the teacher's per-token scores of on-policy
distillation. The step itself (losses, updates, the run loop) is stages/grpo.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from r1kit import checkpoint, dist, rl
from r1kit.common import autocast, resolve_dtype
from r1kit.config import ConfigError
from r1kit.models import lora
from r1kit.models.logprobs import chunked_logprobs
from r1kit.models.routing import record_routing, replay_routing
from r1kit.rollout import Rollout
from r1kit.training import is_checkpoint, resolve_ckpt

if TYPE_CHECKING:  # annotations only: grpo.py imports this module
    from r1kit.stages.grpo import GRPOConfig


# routing_replay -> (training forwards route by the recorded experts, the engine records them
# rather than the pre-update training forward). With "off", an MoE policy still logs the
# disagreement with the pre-update forward when μ > 1.
ROUTING_REPLAY = {"off": (False, False), "trainer": (True, False), "rollout": (True, True)}


# ---------------------------------------------------------------------------------------------
# Batch → tensors
# ---------------------------------------------------------------------------------------------
def to_tensors(rollouts: list[Rollout], pad_id: int):
    """→ idx (N, P+T), completion mask (N, T), completion start P per row, the sampler's log-probs (N, T).

    Rows are right-padded; completions start at different offsets when prompts are ragged, so
    log-probs are gathered per row at its own completion positions.
    """
    N = len(rollouts)
    L = max(len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts)
    T = max(len(r.sample.tokens) for r in rollouts)
    idx = torch.full((N, L), pad_id, dtype=torch.long)
    mask = torch.zeros(N, T)
    starts = torch.tensor([len(r.prompt_ids) for r in rollouts])
    rollout_logp = torch.zeros(N, T)
    for i, r in enumerate(rollouts):
        seq = r.prompt_ids + r.sample.tokens
        idx[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(r.sample.tokens)] = 1
        rollout_logp[i, : len(r.sample.logprobs)] = torch.tensor(r.sample.logprobs, dtype=torch.float32)
    return idx, mask, starts, rollout_logp


def completion_logprobs(model, idx, starts, mask, targets, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (N, T) of the completion tokens under the policy scaled like the rollout's sampler, and
    the entropy (N, T, detached) of that distribution at each position.

    Only the positions that predict a real completion token (mask (N, T)) are the forward's
    `token_mask`: prompts and padding never steer an MoE model's load balancing. With the model's
    `logprob_chunk` > 0 the forward returns hidden states and the vocabulary projection runs a chunk
    of tokens at a time (models/logprobs.py): no (N, T, V) logits are ever held.
    """
    T = mask.shape[1]
    pos = (starts[:, None] - 1 + torch.arange(T, device=idx.device)).clamp(max=idx.shape[1] - 1)  # (N, T)
    real = mask.bool()
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(pos)  # (N, T)
    learn = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)  # (N, L)
    learn[rows[real], pos[real]] = True
    inner = dist.unwrap(model)  # DDP: the forward goes through the wrapper, attributes live on the model
    chunk = getattr(inner, "logprob_chunk", 0)
    if chunk:
        h = model(idx, logit_pos=pos, token_mask=learn, return_hidden=True)  # (N, T, d)
        logp, ent = chunked_logprobs(h, inner.head.weight, targets, temperature, bias=inner.head.bias, chunk=chunk)
        return logp, ent.detach()
    logits = model(idx, logit_pos=pos, token_mask=learn)  # (N, T, V): no logits for the prompt
    logits = logits / temperature if temperature > 0 else logits
    with torch.no_grad():
        ent = rl.entropy_from_logits(logits.detach())
    return rl.token_logprobs(logits, targets), ent


def completion_targets(idx, starts, T: int):
    pos = (starts[:, None] + torch.arange(T, device=idx.device)).clamp(max=idx.shape[1] - 1)  # (N, T)
    return idx.gather(1, pos)


@dataclass
class MicroBatch:
    idx: torch.Tensor  # (n, L)
    mask: torch.Tensor  # (n, T)
    old: torch.Tensor | None  # (n, T) log-probs before the update; None: μ = 1, the current ones
    starts: torch.Tensor  # (n,)
    targets: torch.Tensor  # (n, T)
    adv: torch.Tensor  # (n,)
    ref_logp: torch.Tensor | None
    rollout_logp: torch.Tensor  # (n, T) log-probs under the sampler's distribution (Sample.logprobs)
    routes: list | None = None  # MoE: per gate, expert ids of the pre-update forward or the engine (routing replay)


def micro_batches(cfg: GRPOConfig, model, rollouts, adv, ref, pad_id, device) -> list[MicroBatch]:
    """Split the batch into micro-batches of at most cfg.micro_batch rows (0 = one batch).

    Old log-probs come from a training-style forward, not from the sampler: in bf16 the two
    differ by a few hundredths per token, and that noise alone would trip the clip. With μ = 1
    the policy has not moved yet, so the current log-probs (detached) are the old ones.
    """
    out = []
    replay, from_engine = ROUTING_REPLAY[cfg.routing_replay]
    moe = bool(getattr(dist.unwrap(model), "gates", lambda: [])())
    with contextlib.ExitStack() as stack:
        # full weights once for the whole batch: no collective per forward, so ranks holding different
        # numbers of micro-batches stay in step (FSDP2); a plain model is used as it is
        scores_old = cfg.mu > 1 or (moe and replay)  # the pre-update forward runs only then
        scorer = {m: stack.enter_context(dist.generating(m)) for m in {ref, model if scores_old else None}
                  if m is not None}
        out = _score_micro_batches(cfg, model, ref, scorer, rollouts, adv, pad_id, device, replay, from_engine, moe)
    return out


def _score_micro_batches(cfg, model, ref, scorer, rollouts, adv, pad_id, device, replay, from_engine, moe):
    """The micro-batches of micro_batches(), with their reference and pre-update log-probs."""
    out = []
    for a, b in micro_batch_bounds(rollouts, cfg.micro_batch, cfg.max_tokens_per_micro_batch):
        rows = rollouts[a:b]
        idx, mask, starts, rollout_logp = (t.to(device) for t in to_tensors(rows, pad_id))
        targets = completion_targets(idx, starts, mask.shape[1])
        logp = {}
        routes = engine_routes(rows, idx.shape[1]) if moe and from_engine else None
        with torch.no_grad():
            if ref is not None:  # a LoRA run's reference is the policy itself with its adapters off
                with lora.adapters_off(ref) if ref is model else contextlib.nullcontext():
                    logp["ref"] = completion_logprobs(scorer[ref], idx, starts, mask, targets, cfg.temperature)[0]
            if cfg.mu > 1 or (moe and replay and routes is None):
                # the pre-update forward: routed like the engine (R3), or recording its own routing (R2)
                inner = dist.unwrap(model)
                with replay_routing(inner, routes) if routes is not None else record_routing(inner) as rec:
                    logp["old"] = completion_logprobs(scorer[model], idx, starts, mask, targets, cfg.temperature)[0]
                routes = rec if routes is None else routes
        rows_adv = adv[a:b] if adv.dim() == 1 else adv[a:b, : mask.shape[1]]  # per-token advantages: this width
        out.append(MicroBatch(idx, mask, logp.get("old") if cfg.mu > 1 else None, starts, targets,
                              rows_adv.to(device), logp.get("ref"), rollout_logp, routes if moe else None))
    return out


def engine_routes(rollouts: list[Rollout], L: int) -> list:
    """The engine's expert ids (Sample.routes) laid out like a training forward of width L.

    Per gate (n·L, k), rows in the order of `to_tensors`; -1 where the engine fed no token (the
    last completion token, padding), so those positions keep the trainer's own routing.
    """
    first = rollouts[0].sample.routes
    if first is None:
        raise ConfigError("grpo.routing_replay = 'rollout': the rollouts carry no routing (engine not recording)")
    out = []
    for g, r0 in enumerate(first):
        if r0 is None:
            out.append(None)
            continue
        ids = torch.full((len(rollouts), L, r0.shape[-1]), -1, dtype=torch.long)  # (n, L, k)
        for i, r in enumerate(rollouts):
            ids[i, : len(r.sample.routes[g])] = r.sample.routes[g]
        out.append(ids.view(-1, r0.shape[-1]))  # (n·L, k): the gate sees the batch flattened
    return out


def micro_batch_bounds(rollouts: list[Rollout], max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) slices with at most max_rows rows and (padded) rows × longest row ≤ max_tokens
    (0 = no limit). A single row longer than max_tokens gets a micro-batch of its own.

    >>> class R:  # noqa
    ...     def __init__(self, n): self.prompt_ids, self.sample = [0] * 2, type("S", (), {"tokens": [0] * n})
    >>> micro_batch_bounds([R(2), R(2), R(6), R(1)], 0, 8)
    [(0, 2), (2, 3), (3, 4)]
    """
    bounds, a, longest = [], 0, 0
    for i, r in enumerate(rollouts):
        n = len(r.prompt_ids) + len(r.sample.tokens)
        grown = max(longest, n)
        if i > a and ((max_rows and i - a >= max_rows) or (max_tokens and (i - a + 1) * grown > max_tokens)):
            bounds.append((a, i))
            a, grown = i, n
        longest = grown
    return bounds + [(a, len(rollouts))] if rollouts else bounds


@torch.no_grad()
def teacher_advantages(cfg: GRPOConfig, model, teacher, rollouts: list[Rollout], pad_id: int) -> tuple[torch.Tensor, float]:
    """On-policy distillation: the teacher scores every sampled token → (advantages (N, T), mean reverse KL)."""
    device = dist.unwrap(model).embed.weight.device
    T = max(len(r.sample.tokens) for r in rollouts)
    adv, kl, n = torch.zeros(len(rollouts), T), 0.0, 0.0
    for a, b in micro_batch_bounds(rollouts, cfg.micro_batch, cfg.max_tokens_per_micro_batch):
        idx, mask, starts, _ = (t.to(device) for t in to_tensors(rollouts[a:b], pad_id))
        t = mask.shape[1]
        targets = completion_targets(idx, starts, t)
        with autocast(device, resolve_dtype(cfg.dtype, device)):
            student = completion_logprobs(model, idx, starts, mask, targets, cfg.temperature)[0]
            scored = completion_logprobs(teacher, idx, starts, mask, targets, cfg.temperature)[0]
        chunk = rl.TOKEN_ADVANTAGES[cfg.advantage](scored, student, mask)  # (n, t)
        adv[a:b, :t] = chunk.cpu()
        kl, n = kl - float(chunk.sum()), n + float(mask.sum())
    return adv, kl / max(n, 1.0)


def load_teacher(cfg: GRPOConfig, tok):
    """The frozen teacher of on-policy distillation; it must read and write the policy's tokens."""
    if cfg.advantage not in rl.TOKEN_ADVANTAGES:
        return None
    path = resolve_ckpt(cfg.teacher)
    if not is_checkpoint(path):
        raise ConfigError(f"grpo.teacher: {cfg.teacher} has no checkpoint (config.json)")
    teacher, ttok = checkpoint.load(path, device=cfg.device, dtype=cfg.dtype)
    if ttok.tk.get_vocab(with_added_tokens=True) != tok.tk.get_vocab(with_added_tokens=True):
        raise ConfigError(f"grpo.teacher: {cfg.teacher} has another tokenizer than the policy; on-policy "
                          "distillation scores the student's own tokens, so both must share one")
    return teacher.eval().requires_grad_(False)
