"""Batched sampling with a preallocated KV cache: the rollout engine of GRPO, eval and serving.

A `Batch` owns a fixed number of slots (rows of the model's KV cache). Prompts are prefilled
together — ragged lengths right-padded, each row's logits read at its own last token — and
copied into free slots; then every `step()` decodes one token for all slots at once. Slots
free up as rows finish and new prompts can join at any time (continuous batching).

Each row carries its own sampling settings (temperature, top-p, top-k, stop strings, stop
tokens, max tokens, seed). Log-probs are those of the distribution the token was drawn from,
softmax(logits / temperature) before top-p/top-k truncation (raw logits when greedy) — the
same quantity a trainer recomputes with a forward pass, so GRPO can use them as old log-probs.

Works with any model that keeps the r1kit contract and has `new_cache(batch, max_len)`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    n: int = 1  # samples per prompt (generate() only)
    stop: tuple[str, ...] = ()  # stop strings: generation ends once the text contains one
    stop_token_ids: tuple[int, ...] | None = None  # None → the tokenizer's end-of-turn tokens
    ignore_eos: bool = False  # run exactly max_new_tokens (benchmarks)
    seed: int | None = None

    def __post_init__(self):
        checks = [("max_new_tokens", self.max_new_tokens >= 1), ("temperature", self.temperature >= 0),
                  ("top_p", 0 < self.top_p <= 1), ("top_k", self.top_k >= 0), ("n", self.n >= 1)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is out of range")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)


@dataclass
class Sample:
    """One finished completion."""
    prompt_index: int
    tokens: list[int]  # generated ids, the stop token included when one ended the row
    logprobs: list[float]
    finish_reason: str  # "stop" (end token or stop string) | "length"
    text: str = ""  # decoded, end tokens skipped, cut before a matched stop string


@dataclass
class _Row:
    tag: object
    params: SamplingParams
    stop_ids: frozenset
    prompt_len: int
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: str | None = None


class Batch:
    """Slots of a KV cache, each holding one running sequence (or free)."""

    def __init__(self, model, tokenizer, capacity: int, max_len: int):
        self.model, self.tok = model, tokenizer
        self.device = model.embed.weight.device
        self.cache = model.new_cache(capacity, max_len)
        self.max_len = max_len
        self.rows: list[_Row | None] = [None] * capacity
        self.finished: list[_Row] = []  # rows that ended since the last pop_finished()
        self.last = torch.zeros(capacity, dtype=torch.long, device=self.device)  # next input token per slot
        self.temp = torch.ones(capacity, device=self.device)
        self.top_p = torch.ones(capacity, device=self.device)
        self.top_k = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.shared_gen = torch.Generator(self.device)
        self.shared_gen.seed()

    # -- admission ------------------------------------------------------------------------------
    @property
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is None]

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def add(self, prompts: list[list[int]], params: list[SamplingParams], tags: list) -> list[int]:
        """Prefill `prompts` together and place them in free slots; returns the slots used.

        The first token of each row is sampled here, so a row may finish at once.
        """
        free = self.free_slots
        if len(prompts) > len(free):
            raise RuntimeError(f"{len(prompts)} prompts but only {len(free)} free slots")
        for i, (p, sp) in enumerate(zip(prompts, params)):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + sp.max_new_tokens > self.max_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {sp.max_new_tokens} "
                                 f"exceed the context of {self.max_len}")
        slots = free[: len(prompts)]
        # GRPO asks for G samples of each prompt: prefill each distinct prompt once, copy its cache
        first: dict[tuple, int] = {}
        which = torch.tensor([first.setdefault(tuple(p), len(first)) for p in prompts], device=self.device)
        unique = list(first)
        lens = torch.tensor([len(p) for p in unique], device=self.device)
        ids = torch.full((len(unique), int(lens.max())), self.tok.pad_id if self.tok else 0,
                         dtype=torch.long, device=self.device)
        for i, p in enumerate(unique):
            ids[i, : len(p)] = torch.tensor(p, device=self.device)
        tmp = self.model.new_cache(len(unique), ids.shape[1])
        logits = self.model(ids, kv_cache=tmp, logit_pos=lens - 1)[:, -1][which]  # (n, V)
        tmp.lens = lens  # padding past each row's end is garbage; decoding overwrites it
        if len(unique) < len(prompts):
            tmp.select(which)
        slot_t = torch.tensor(slots, device=self.device)
        self.cache.insert(slot_t, tmp)
        for s, p, sp, tag in zip(slots, prompts, params, tags):
            self._open_row(s, p, sp, tag)
        tokens, logp = self._sample(logits, slots)
        self.last[slot_t] = tokens
        self._record(slots, tokens.tolist(), logp.tolist())
        return slots

    def _open_row(self, slot: int, prompt: list[int], sp: SamplingParams, tag) -> None:
        stop_ids = sp.stop_token_ids if sp.stop_token_ids is not None else (self.tok.stop_ids if self.tok else ())
        gen = None
        if sp.seed is not None:
            gen = torch.Generator(self.device)
            gen.manual_seed(sp.seed)
        self.rows[slot] = _Row(tag, sp, frozenset(() if sp.ignore_eos else stop_ids), len(prompt), generator=gen)
        self.temp[slot], self.top_p[slot], self.top_k[slot] = sp.temperature, sp.top_p, sp.top_k

    # -- decoding -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[tuple[object, int, float, str | None]]:
        """Decode one token for every slot. Returns events (tag, token, logprob, finish_reason|None)."""
        slots = [i for i, r in enumerate(self.rows) if r is not None]
        if not slots:
            return []
        self.cache.lens[[i for i, r in enumerate(self.rows) if r is None]] = 0  # idle slots stay empty
        # slots fill lowest first, so a lightly loaded batch only runs the rows up to its last busy one
        n = slots[-1] + 1
        cache = self.cache if n == len(self.rows) else _leading_rows(self.cache, n)
        if cache is None:
            cache, n = self.cache, len(self.rows)
        logits = self.model(self.last[:n, None], kv_cache=cache)[:, -1]  # (n, V)
        tokens, logp = self._sample(logits[slots], slots)
        self.last[slots] = tokens
        return self._record(slots, tokens.tolist(), logp.tolist())

    def _sample(self, logits: torch.Tensor, slots: list[int]):
        """logits (n, V) for `slots` → (tokens (n,), logprobs (n,))."""
        logits = logits.float()
        temp = self.temp[slots][:, None]  # (n, 1)
        greedy = temp == 0
        logp_all = torch.log_softmax(logits / torch.where(greedy, 1.0, temp), dim=-1)  # (n, V)
        probs = logp_all.exp()
        top_p, top_k = self.top_p[slots], self.top_k[slots]
        if bool((top_p < 1).any()) or bool((top_k > 0).any()):
            probs = _truncate(probs, top_p, top_k)
        uniform = torch.rand(probs.shape, generator=self.shared_gen, device=probs.device)
        for j, s in enumerate(slots):  # rows with their own seed draw their own noise
            if self.rows[s].generator is not None:
                uniform[j] = torch.rand(probs.shape[-1], generator=self.rows[s].generator, device=probs.device)
        noise = -torch.log(uniform)  # Exp(1); several times cheaper than exponential_() on CPU
        # argmax(p / E), E ~ Exp(1), is an exact draw from p (the exponential race)
        sampled = torch.argmax(probs / noise, dim=-1)
        tokens = torch.where(greedy[:, 0], logits.argmax(-1), sampled)
        return tokens, logp_all.gather(1, tokens[:, None])[:, 0]

    def _record(self, slots, tokens, logps):
        events = []
        for s, t, lp in zip(slots, tokens, logps):
            row = self.rows[s]
            row.tokens.append(t)
            row.logprobs.append(lp)
            reason = self._finish_reason(row, t)
            events.append((row.tag, t, lp, reason))
            if reason is not None:
                row.finish_reason = reason
                self.finished.append(row)
                self.rows[s] = None
        return events

    def pop_finished(self) -> list[_Row]:
        out, self.finished = self.finished, []
        return out

    def _finish_reason(self, row: _Row, token: int) -> str | None:
        if token in row.stop_ids:
            return "stop"
        if row.params.stop and self.tok is not None:
            width = 4 * max(len(s) for s in row.params.stop) + 8  # tokens, enough chars for any stop
            tail = self.tok.decode(row.tokens[-width:])
            if any(s in tail for s in row.params.stop):
                return "stop"
        if len(row.tokens) >= row.params.max_new_tokens or row.prompt_len + len(row.tokens) >= self.max_len:
            return "length"
        return None

    def cancel(self, tag) -> bool:
        """Free the slot of the row tagged `tag` (e.g. a client went away)."""
        for i, r in enumerate(self.rows):
            if r is not None and r.tag == tag:
                self.rows[i] = None
                return True
        return False


def _leading_rows(cache, n: int):
    """The first `n` rows of a KV cache as a view whose writes land in `cache`, or None when the
    cache is not laid out as k, v (layers, batch, ...) and lens (batch,) (then step runs full width)."""
    k, v, lens = (getattr(cache, a, None) for a in ("k", "v", "lens"))
    if not all(isinstance(t, torch.Tensor) for t in (k, v, lens)):
        return None
    view = copy.copy(cache)
    view.k, view.v, view.lens = k[:, :n], v[:, :n], lens[:n]  # basic slices share storage
    return view


def _truncate(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each row: keep the k most likely tokens and the smallest set with mass ≥ p."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (n, V)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
    drop = mass_before >= top_p[:, None]
    drop |= (top_k[:, None] > 0) & (rank >= top_k[:, None])
    drop[:, 0] = False  # always keep the most likely token
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def stop_text(text: str, stops: tuple[str, ...]) -> str:
    """Cut `text` before the first stop string it contains (OpenAI semantics)."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class Engine:
    """generate(): many prompts × n samples, returned grouped per prompt.

    At most `max_batch` rows decode at once; the rest wait and take slots as rows finish, so a
    whole evaluation set (thousands of prompts × k) never needs one giant KV cache.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 256):
        self.model, self.tok, self.max_batch = model, tokenizer, max_batch

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 seeds: list[int] | None = None, **overrides) -> list[list[Sample]]:
        """`seeds` (one per prompt): sample j of prompt i draws from its own generator seeded by
        (seeds[i], j), so a group's samples do not depend on which other prompts share the batch
        (data-parallel GRPO splits a step's prompts over ranks); else params.seed seeds the call."""
        params = replace(params or SamplingParams(), **overrides)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]
        if not rows:
            return []
        max_len = max(len(p) for _, p in rows) + params.max_new_tokens
        limit = getattr(self.model, "max_seq_len", None)
        if limit is not None and max_len > limit:
            raise ValueError(f"the longest prompt + max_new_tokens = {max_len} tokens exceeds the model's "
                             f"context (max_position_embeddings = {limit})")
        batch = Batch(self.model, self.tok, min(len(rows), self.max_batch), max_len)
        if params.seed is not None:  # one seed makes the whole call reproducible
            batch.shared_gen.manual_seed(params.seed)
        row_params = [replace(params, seed=None if seeds is None else seeds[i] * 1_000_003 + t % params.n)
                      for t, (i, _) in enumerate(rows)]
        was_training = self.model.training
        self.model.eval()
        try:
            waiting = list(range(len(rows)))
            while waiting or batch.active:
                free = len(batch.free_slots)
                if waiting and free:  # admit waiting rows into the slots finished ones left
                    take, waiting = waiting[:free], waiting[free:]
                    batch.add([rows[t][1] for t in take], [row_params[t] for t in take], take)
                if batch.active:
                    batch.step()
        finally:
            self.model.train(was_training)
        out: list[list[Sample]] = [[] for _ in prompts]
        for r in sorted(batch.pop_finished(), key=lambda r: r.tag):
            out[rows[r.tag][0]].append(self.to_sample(rows[r.tag][0], r))
        return out

    def to_sample(self, prompt_index: int, row: _Row) -> Sample:
        text = ""
        if self.tok is not None:
            text = stop_text(self.tok.decode(row.tokens), row.params.stop)
        return Sample(prompt_index, row.tokens, row.logprobs, row.finish_reason, text)
