"""GRPO's batches: rollouts → packed rows (r1kit/packing.py) → micro-batches with their reference and pre-update
log-probs, the routing replay records of MoE policies, and the teacher's per-token scores of on-policy
distillation. The step itself (losses, updates, the run loop) is stages/grpo.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from r1kit import checkpoint, dist, packing, rl
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
# Batch → packed rows → micro-batches
# ---------------------------------------------------------------------------------------------
def plan_micro_batches(cfg: GRPOConfig, rollouts: list[Rollout]) -> list[list[list[int]]]:
    """The micro-batches of a batch, each a list of rows, each row the rollout indices packed into it.

    With cfg.packing the sequences (prompt + completion) go into rows by first-fit-decreasing, whose
    capacity is the longest sequence (or max_tokens_per_micro_batch, if smaller): no row is longer than
    the padded batch's, so its W × W attention never costs more than padding saved. Without it, one
    sequence per row in batch order (the right-padded layout). Rows are then cut into micro-batches by
    micro_batch_bounds: both switches keep their meaning — rows per forward, tokens of the (rows, W) tensor.
    """
    lengths = [len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts]
    if cfg.packing and lengths:
        cap = max(lengths)
        cap = min(cap, cfg.max_tokens_per_micro_batch) if cfg.max_tokens_per_micro_batch else cap
        if shares_prompts(cfg):
            rows = packing.shared_prompt_rows([tuple(r.prompt_ids) for r in rollouts],
                                              [len(r.prompt_ids) for r in rollouts],
                                              [len(r.sample.tokens) for r in rollouts], cap)
        else:
            rows = packing.first_fit_decreasing(lengths, cap)
    else:
        rows = [[i] for i in range(len(rollouts))]
    widths = [sum(lengths[i] for i in row) for row in rows]  # an upper bound where rows share prompts
    return [rows[a:b] for a, b in micro_batch_bounds(widths, cfg.micro_batch, cfg.max_tokens_per_micro_batch)]


def shares_prompts(cfg: GRPOConfig) -> bool:
    """Whether packed rows write a prompt once for several of its samples (cfg.share_prompts). Not with routing
    replay: the engine's records (R3) are laid out per whole document (engine_routes), and the disagreement
    statistic of R2 counts every document's prompt tokens, as the unshared layouts do."""
    return cfg.packing and cfg.share_prompts and cfg.routing_replay == "off"


def rollout_batch(rollouts: list[Rollout], rows: list[list[int]], device=None, share: bool = False):
    """Rows of rollout indices → (the PackedBatch of their prompt + completion, the sampler's log-probs (n, T)).

    The completion is each document's scored suffix; n and T follow the batch's order (`order`). share: a
    rollout right after one of its prompt in a row shares that prompt's copy (pack_documents' prefix).
    """
    batch = packing.pack_documents([r.prompt_ids + r.sample.tokens for r in rollouts],
                                   [len(r.sample.tokens) for r in rollouts], rows, device,
                                   prefix=[len(r.prompt_ids) for r in rollouts] if share else None)
    rollout_logp = torch.zeros(batch.mask.shape)
    for k, i in enumerate(batch.order):
        lp = rollouts[i].sample.logprobs
        rollout_logp[k, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return batch, rollout_logp.to(device)


def completion_logprobs(model, batch: packing.PackedBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (n, T) of the completion tokens under the policy scaled like the rollout's sampler, and
    the entropy (n, T, detached) of that distribution at each position; exact zeros at padding.

    The forward runs on the batch's flat tokens (no padding, each shared prompt once), attention over its
    rows (per-document positions, block-diagonal mask when a row holds several documents). Only the outputs
    that predict a completion token go on to the vocabulary: the prompts' never do, and those outputs are
    the forward's `token_mask` (so prompts never steer an MoE model's load balancing). With the model's
    `logprob_chunk` > 0 the projection runs a chunk of tokens at a time (models/logprobs.py): no (M, V)
    logits are ever held.
    """
    inner = dist.unwrap(model)  # DDP: the forward goes through the wrapper, attributes live on the model
    chunk = getattr(inner, "logprob_chunk", 0)
    if chunk:
        h = batch.gather(model(batch.idx, return_hidden=True, **batch.forward_kwargs()))  # (1, M, d) → (M, d)
        logp, ent = chunked_logprobs(h, inner.head.weight, batch.targets[batch.mask.bool()], temperature,
                                     bias=inner.head.bias, chunk=chunk)
        return batch.scatter(logp), batch.scatter(ent.detach())
    logits = batch.gather(model(batch.idx, **batch.forward_kwargs()))  # (1, M, V) → (M, V): none for prompts
    logits = logits / temperature if temperature > 0 else logits
    with torch.no_grad():
        ent = rl.entropy_from_logits(logits.detach())  # (M,)
    logp = rl.token_logprobs(logits, batch.targets[batch.mask.bool()])  # (M,)
    return batch.scatter(logp), batch.scatter(ent)


@dataclass
class MicroBatch:
    batch: packing.PackedBatch  # the forward's rows of documents and where each completion token sits
    old: torch.Tensor | None  # (n, T) log-probs before the update; None: μ = 1, the current ones
    adv: torch.Tensor  # (n,) or (n, T)
    ref_logp: torch.Tensor | None
    rollout_logp: torch.Tensor  # (n, T) log-probs under the sampler's distribution (Sample.logprobs)
    routes: list | None = None  # MoE: per gate, expert ids of the pre-update forward or the engine (routing replay)

    @property
    def mask(self) -> torch.Tensor:
        """(n, T) float: 1 at a real completion token."""
        return self.batch.mask


def micro_batches(cfg: GRPOConfig, model, rollouts, adv, ref, device) -> list[MicroBatch]:
    """Split the batch into micro-batches of packed rows (plan_micro_batches).

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
        out = _score_micro_batches(cfg, model, ref, scorer, rollouts, adv, device, replay, from_engine, moe)
    return out


def _score_micro_batches(cfg, model, ref, scorer, rollouts, adv, device, replay, from_engine, moe):
    """The micro-batches of micro_batches(), with their reference and pre-update log-probs."""
    out = []
    for rows in plan_micro_batches(cfg, rollouts):
        batch, rollout_logp = rollout_batch(rollouts, rows, device, shares_prompts(cfg))
        logp = {}
        routes = engine_routes(rollouts, batch) if moe and from_engine else None
        with torch.no_grad():
            if ref is not None:  # a LoRA run's reference is the policy itself with its adapters off
                with lora.adapters_off(ref) if ref is model else contextlib.nullcontext():
                    logp["ref"] = completion_logprobs(scorer[ref], batch, cfg.temperature)[0]
            if cfg.mu > 1 or (moe and replay and routes is None):
                # the pre-update forward: routed like the engine (R3), or recording its own routing (R2),
                # over the same packed rows the policy forward will run, so the records line up token by token
                inner = dist.unwrap(model)
                with replay_routing(inner, routes) if routes is not None else record_routing(inner) as rec:
                    logp["old"] = completion_logprobs(scorer[model], batch, cfg.temperature)[0]
                if routes is None:  # R2: the forward's own experts, one record per flat token (none is padding)
                    routes = list(rec)
        T = batch.mask.shape[1]
        rows_adv = adv[batch.order] if adv.dim() == 1 else adv[batch.order, :T]  # per-token advantages: this width
        out.append(MicroBatch(batch, logp.get("old") if cfg.mu > 1 else None, rows_adv.to(device), logp.get("ref"),
                              rollout_logp, routes if moe else None))
    return out


def engine_routes(rollouts: list[Rollout], batch: packing.PackedBatch) -> list:
    """The engine's expert ids (Sample.routes) laid out like the training forward over `batch`'s flat tokens.

    Per gate (N, k), each document's ids at its tokens; -1 where the engine fed no token (a completion's
    last), so that token keeps the trainer's own routing.
    """
    first = rollouts[batch.order[0]].sample.routes
    if first is None:
        raise ConfigError("grpo.routing_replay = 'rollout': the rollouts carry no routing (engine not recording)")
    out = []
    for g, r0 in enumerate(first):
        if r0 is None:
            out.append(None)
            continue
        ids = torch.full((batch.tokens, r0.shape[-1]), -1, dtype=torch.long)  # (N, k)
        for i, where in zip(batch.order, batch.token_index):
            rec = rollouts[i].sample.routes[g]
            ids[where[:len(rec)]] = rec
        out.append(ids.to(batch.idx.device))
    return out


def micro_batch_bounds(widths: list[int], max_rows: int, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) slices of rows (of these widths) with at most max_rows rows and rows × widest
    row ≤ max_tokens (0 = no limit): the (rows, W) tensor of each forward. A single row wider than
    max_tokens gets a micro-batch of its own.

    >>> micro_batch_bounds([4, 4, 8, 3], 0, 8)
    [(0, 2), (2, 3), (3, 4)]
    """
    bounds, a, widest = [], 0, 0
    for i, n in enumerate(widths):
        grown = max(widest, n)
        if i > a and ((max_rows and i - a >= max_rows) or (max_tokens and (i - a + 1) * grown > max_tokens)):
            bounds.append((a, i))
            a, grown = i, n
        widest = grown
    return bounds + [(a, len(widths))] if widths else bounds


@torch.no_grad()
def teacher_advantages(cfg: GRPOConfig, model, teacher, rollouts: list[Rollout]) -> tuple[torch.Tensor, float]:
    """On-policy distillation: the teacher scores every sampled token → (advantages (N, T), mean reverse KL)."""
    device = dist.unwrap(model).embed.weight.device
    T = max(len(r.sample.tokens) for r in rollouts)
    adv, kl, n = torch.zeros(len(rollouts), T), 0.0, 0.0
    for rows in plan_micro_batches(cfg, rollouts):
        batch, _ = rollout_batch(rollouts, rows, device, shares_prompts(cfg))
        with autocast(device, resolve_dtype(cfg.dtype, device)):
            student = completion_logprobs(model, batch, cfg.temperature)[0]
            scored = completion_logprobs(teacher, batch, cfg.temperature)[0]
        chunk = rl.TOKEN_ADVANTAGES[cfg.advantage](scored, student, batch.mask)  # (n, t)
        adv[batch.order, : chunk.shape[1]] = chunk.cpu()
        kl, n = kl - float(chunk.sum()), n + float(batch.mask.sum())
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
