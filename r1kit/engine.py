"""Batched sampling with a preallocated KV cache: the rollout engine of GRPO, eval and serving.

A `Batch` owns a fixed number of slots (rows of the model's KV cache). Prompts are prefilled
together — ragged lengths right-padded, each row's logits read at its own last token — and
copied into free slots; then every `step()` decodes one token for all slots at once. Slots
free up as rows finish and new prompts can join at any time (continuous batching). When most of
the slots up to the last busy one are idle, the busy rows move down, so the long tail of a batch
decodes at its own size rather than at the batch's.

Each row carries its own sampling settings (temperature, top-p, top-k, stop strings, stop
tokens, max tokens, seed); sampling.py draws the tokens (transformers' temperature → top-k →
top-p order). Log-probs are log π_rollout: the log-probability of each token under the
distribution it was drawn from, after temperature and truncation (log-softmax of the raw logits
when greedy) — what an importance-sampling correction divides by. With top-p/top-k they differ
from what a trainer's forward gives (log π_θ of the untruncated distribution), so GRPO
recomputes its old log-probs with a forward pass rather than reading these.

A seeded row draws from its own generator, one number per token, so its tokens do not depend on
which other rows share the batch; `Engine.generate(seed=s)` seeds row r (sample j of prompt i,
r = i·n + j) with `row_seed(s, r)`, whatever `max_batch` and however rows are admitted.

`static_decode=True` runs every decode step at a few fixed shapes and, on CUDA, replays each as a CUDA
graph (StaticDecode): the same tokens as the dynamic step, for a GPU's launch-bound small batches.

Works with any model that keeps the r1kit contract and has `new_cache(batch, max_len)` returning a
cache that keeps the protocol of models/llama.py's `KVCache` (lens, leading_rows, select, insert, nbytes).
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from r1kit import sampling
from r1kit.models.kernels import WeightPacks, decode_kernels
from r1kit.models.routing import record_routing


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
        self.stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"SamplingParams.stop={self.stop!r}: stop strings must be non-empty strings")


@dataclass
class Sample:
    """One finished completion."""
    prompt_index: int
    tokens: list[int]  # generated ids: up to the stop token, or the token that completed a stop string
    logprobs: list[float]  # log π_rollout of each token (see the module docstring)
    finish_reason: str  # "stop" (end token or stop string) | "length"
    text: str = ""  # decode(tokens), end tokens skipped, cut before a matched stop string
    # MoE routing replay (R3), when the engine records it: per gate, the (P + T - 1, k) expert ids of
    # every token the sampler fed (prompt, then all generated tokens but the last); None per gate that never ran
    routes: list | None = None

    # With a stop string, `tokens` is the shortest prefix whose text contains it: it ends with the
    # token that completed the stop string (whose text may run past the cut), never a token wholly
    # after it — so a trainer sees the tokens the reward judged, and only those.


UNIFORM_BLOCK = 64  # numbers a seeded row draws from its generator at a time (_Row.next_uniform)


@dataclass
class _Row:
    tag: object
    params: SamplingParams
    stop_ids: frozenset
    prompt_len: int
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    generator: torch.Generator | None = None  # a CPU generator: a seed draws the same numbers on any device
    uniforms: list = field(default_factory=list)  # the next numbers of `generator`, last first (see next_uniform)
    finish_reason: str | None = None  # "stop" | "length" | "error" (then `error` holds the exception)
    error: Exception | None = None
    routes: list | None = None  # per gate: (n_i, k) chunks of expert ids, when the batch records routing

    def next_uniform(self) -> float:
        """The next number of this row's stream. Drawn UNIFORM_BLOCK at a time — on a CPU generator the same
        numbers as one call per token — so a step costs a list pop per row, not a torch call (≈ 2 µs each,
        0.28 ms a step at 128 rows)."""
        if not self.uniforms:
            self.uniforms = torch.rand(UNIFORM_BLOCK, generator=self.generator).tolist()[::-1]
        return self.uniforms.pop()


class Batch:
    """Slots of a KV cache, each holding one running sequence (or free)."""

    def __init__(self, model, tokenizer, capacity: int, max_len: int, record_routing: bool = False,
                 static_decode: bool = False):
        self.model, self.tok = model, tokenizer
        self.record_routing = record_routing  # keep each row's MoE expert ids (routing replay, R3)
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
        self.static = StaticDecode(self) if static_decode else None  # decode at fixed shapes (CUDA graphs)
        self.packs = WeightPacks()  # the decode matmul kernel's packed weights, for this batch's life (CPU)

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
        with self._routing() as routes, decode_kernels(self.packs):
            logits = self.model(ids, kv_cache=tmp, logit_pos=lens - 1)[:, -1][which]  # (n, V)
        tmp.lens = lens  # padding past each row's end is garbage; decoding overwrites it
        if len(unique) < len(prompts):
            tmp.select(which)
        slot_t = torch.tensor(slots, device=self.device)
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        self.cache.insert(slice(slots[0], slots[0] + len(slots)) if consecutive else slot_t, tmp)
        try:
            for j, (s, p, sp, tag) in enumerate(zip(slots, prompts, params, tags)):
                self._open_row(s, p, sp, tag)
                if routes is not None:  # (U*L, k) per gate → this row's prompt tokens
                    self.rows[s].routes = [[] if r is None else [r.view(*ids.shape, -1)[which[j], : len(p)]]
                                           for r in routes]
            tokens, logp = self._sample(logits, slots)
        except BaseException:
            for s in slots:  # all or nothing: no half-opened row stays behind
                self.rows[s] = None
            raise
        self.last[slot_t] = tokens
        self._record(slots, tokens, logp)
        return slots

    def _open_row(self, slot: int, prompt: list[int], sp: SamplingParams, tag) -> None:
        stop_ids = sp.stop_token_ids if sp.stop_token_ids is not None else (self.tok.stop_ids if self.tok else ())
        gen = None
        if sp.seed is not None:
            gen = torch.Generator()
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
        # slots fill lowest first, so a lightly loaded batch only runs the rows up to its last busy one; once
        # finished rows leave most of those idle, the busy ones move down, so the long tail of a batch (a few
        # rows still writing after the rest stopped) decodes at its own size
        n = slots[-1] + 1
        if n >= 8 and 2 * len(slots) <= n:
            slots = self._compact(slots)
            n = len(slots)
        if len(slots) < len(self.rows):  # idle slots stay empty (an index op per step only when some are)
            self.cache.lens[[i for i, r in enumerate(self.rows) if r is None]] = 0
        # the cache columns this step reads: each row's prompt, its tokens so far and the one it feeds now —
        # known here, so the forward reads no length back from the device (a sync per step on a GPU)
        columns = max(self.rows[s].prompt_len + len(self.rows[s].tokens) for s in slots)
        if self.static is None:
            logits, routes = self.decode_logits(n, columns)
        else:
            n, span = self.static.shapes(n, columns)
            logits, routes = self.static.logits(n, span)
        if routes is not None:  # one fed token per slot: (n, k) per gate
            for s in slots:
                for chunks, r in zip(self.rows[s].routes, routes):
                    if r is not None:
                        chunks.append(r[s: s + 1])
        if len(slots) < n:  # a hole among the leading rows: only busy ones sample (a full batch copies nothing)
            logits = logits[slots]
        tokens, logp = self._sample(logits, slots)
        self.last[slots if len(slots) < n else slice(0, n)] = tokens
        return self._record(slots, tokens, logp)

    @torch.no_grad()
    def decode_logits(self, n: int, span: int | None = None):
        """The decode forward of slots 0..n-1, each fed its last token → (logits (n, V), routes or None);
        span: the key span, which covers every row's columns (see KVCache.leading_rows); None: read from lens."""
        cache = self.cache if n == len(self.rows) and span is None else self.cache.leading_rows(n, span)
        with self._routing() as routes, decode_kernels(self.packs):
            logits = self.model(self.last[:n, None], kv_cache=cache)[:, -1]  # (n, V)
        return logits, routes

    def _compact(self, slots: list[int]) -> list[int]:
        """Move the rows in `slots` to slots 0..k-1 (cache rows, next tokens, sampling settings and row
        state travel together, so each row decodes as before); returns the new slots."""
        k = len(slots)
        src, dst = torch.tensor(slots, device=self.device), torch.arange(k, device=self.device)
        # only the columns a busy row has filled (and the one it feeds next) move: the rest are never read
        filled = max(self.rows[s].prompt_len + len(self.rows[s].tokens) for s in slots)
        moved = self.cache.leading_rows(slots[-1] + 1)
        moved.select(src, filled)  # a copy of those columns of the busy rows (new tensors), written back in place
        self.cache.insert(dst, moved)
        for t in (self.last, self.temp, self.top_p, self.top_k):
            t[:k] = t[src]
        self.rows = [self.rows[s] for s in slots] + [None] * (len(self.rows) - k)
        return list(range(k))

    def _routing(self):
        return record_routing(self.model) if self.record_routing else contextlib.nullcontext()

    def _sample(self, logits: torch.Tensor, slots: list[int]):
        """logits (n, V) for `slots` → (tokens (n,), log π_rollout (n,))."""
        seeded = [(j, self.rows[s]) for j, s in enumerate(slots) if self.rows[s].generator is not None]
        # rows with their own seed draw from their own generator, one number per token; the others share one call
        own = [r.next_uniform() for _, r in seeded]
        if len(seeded) == len(slots):  # all seeded (GRPO, benchmarks): nothing to merge
            u = torch.tensor(own, device=self.device)
        else:
            u = torch.rand(len(slots), generator=self.shared_gen, device=self.device)
            if seeded:
                u[[j for j, _ in seeded]] = torch.tensor(own, device=self.device)
        at = slots if slots[-1] + 1 > len(slots) else slice(0, len(slots))  # leading rows: views, not gathers
        return sampling.sample(logits, self.temp[at], self.top_p[at], self.top_k[at], u)

    def _record(self, slots: list[int], tokens: torch.Tensor, logps: torch.Tensor):
        """Append each slot's new token; end the rows that finished. A row whose own checks raise (a bad
        stop string, say) ends with reason "error" and its exception, and the other rows carry on."""
        # ids are exact in float64: one device → host transfer per step for both
        pairs = torch.stack((tokens.double(), logps.double())).T.tolist()
        events = []
        for s, (t, lp) in zip(slots, pairs):
            row, t = self.rows[s], int(t)
            row.tokens.append(t)
            row.logprobs.append(lp)
            try:
                reason = self._finish_reason(row, t)
            except Exception as e:  # noqa: BLE001 — the row's own failure, reported with it
                reason, row.error = "error", e
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
        if row.params.stop and self.tok is not None and _tail_has_stop(self.tok, row.tokens, row.params.stop):
            return "stop"
        if len(row.tokens) >= row.params.max_new_tokens or row.prompt_len + len(row.tokens) >= self.max_len:
            return "length"
        return None

    def clear(self) -> None:
        """Drop every row (after a failed step), keeping the KV cache: no second allocation."""
        self.rows = [None] * len(self.rows)
        self.finished = []
        self.cache.lens.zero_()

    def cancel(self, tag) -> bool:
        """Free the slot of the row tagged `tag` (e.g. a client went away)."""
        for i, r in enumerate(self.rows):
            if r is not None and r.tag == tag:
                self.rows[i] = None
                return True
        return False


MIN_SPAN = 64  # the shortest key span of a static step: shorter buckets would only add captures


def bucket(n: int, cap: int, least: int = 1) -> int:
    """n rounded up to a power of two, at least `least`, at most `cap`.

    >>> [bucket(n, 48) for n in (1, 3, 16, 17, 40)]
    [1, 4, 16, 32, 48]
    """
    return min(cap, max(least, 1 << (n - 1).bit_length()))


class StaticDecode:
    """A batch's decode step at a few fixed shapes, each captured once as a CUDA graph and replayed.

    At small batch a GPU decode step is launch-bound: a few hundred small kernels, each queued by Python.
    A CUDA graph replays the whole step as one launch, but only at the shapes it was captured with and with
    no value read back to the host. So the step runs on `leading_rows(n, span)` views: rows rounded up to
    a power of two (idle slots hold length 0; their logits are dropped) over a power-of-two span of cache
    columns (the mask hides the unfilled ones) — at most log2(capacity) · log2(max_len) graphs, each
    captured the first time it is needed. Where nothing can be captured — not on CUDA, a model whose
    forward reads device values on the host (`cuda_graphs_safe` false: MoE dispatch counts tokens per
    expert), routing replay's hooks — the same shapes run eagerly (what the CPU tests hold to the dynamic step).
    """

    def __init__(self, batch: "Batch"):
        self.batch = batch
        self.capture = (batch.device.type == "cuda" and getattr(batch.model, "cuda_graphs_safe", False)
                        and not batch.record_routing)
        self.graphs: dict[tuple[int, int], tuple] = {}  # (rows, span) → (graph, its logits tensor)
        self.pool = None  # one memory pool for all of a batch's graphs: they never run at once

    def shapes(self, n: int, columns: int) -> tuple[int, int]:
        """(rows, span) of the step that decodes slots 0..n-1 reading `columns` cache columns."""
        return bucket(n, len(self.batch.rows)), bucket(columns, self.batch.max_len, MIN_SPAN)

    def logits(self, n: int, span: int):
        """batch.decode_logits(n, span), replayed from its graph when one can be captured."""
        if not self.capture:
            return self.batch.decode_logits(n, span)
        if (n, span) not in self.graphs:
            self.graphs[n, span] = self._capture(n, span)
        graph, logits = self.graphs[n, span]
        graph.replay()  # writes this step's keys and values, advances lens, refills `logits`
        return logits, None

    def _capture(self, n: int, span: int):
        b, lens = self.batch, self.batch.cache.lens.clone()
        side = torch.cuda.Stream()  # warm up off the default stream, as capture requires (lazy inits, workspaces)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            b.decode_logits(n, span)
        torch.cuda.current_stream().wait_stream(side)
        b.cache.lens.copy_(lens)  # undo the warm-up's advance; the keys it wrote are the ones the step writes
        graph = torch.cuda.CUDAGraph()
        # recorded, not run: the cache is untouched until replay; thread_local: async mode's trainer thread
        # keeps launching (on its own stream) while the rollout thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits, _ = b.decode_logits(n, span)
        self.pool = graph.pool()
        return graph, logits


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a generate(seed=seed) call: distinct rows, distinct streams."""
    return hash((seed, row)) & (2**63 - 1)  # int tuples hash the same in every process


def _tail_has_stop(tok, tokens: list[int], stops: tuple[str, ...]) -> bool:
    """Whether the text of `tokens` contains a stop string that ends in its last token.

    Decodes only a tail, widened until it holds the last token's text plus the longest stop string
    (tokens that decode to nothing, such as skipped special tokens, would otherwise hide one).
    """
    need = max(len(s) for s in stops) + len(tok.decode(tokens[-1:]))
    width = 2 * max(len(s) for s in stops) + 8
    while True:
        tail = tok.decode(tokens[-width:])
        if len(tail) >= need or width >= len(tokens):
            return any(s in tail for s in stops)
        width *= 4


def stop_prefix(tok, tokens: list[int], stops: tuple[str, ...]) -> int | None:
    """Length of the shortest prefix of `tokens` whose text contains a stop string; None if none does."""
    if not stops or not any(s in tok.decode(tokens) for s in stops):
        return None
    lo, hi = 1, len(tokens)  # a prefix's text grows with its length: binary search the first that holds one
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tok.decode(tokens[:mid]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def stop_text(text: str, stops: tuple[str, ...]) -> str:
    """Cut `text` before the first stop string it contains (OpenAI semantics)."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


class Engine:
    """generate(): many prompts × n samples, returned grouped per prompt.

    At most `max_batch` rows decode at once; the rest wait and take slots as rows finish, so a
    whole evaluation set (thousands of prompts × k) never needs one giant KV cache.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 256, record_routing: bool = False,
                 static_decode: bool = False):
        self.model, self.tok, self.max_batch = model, tokenizer, max_batch
        self.record_routing = record_routing  # MoE: return each sample's expert ids (Sample.routes)
        self.static_decode = static_decode  # decode at fixed shapes, replayed as CUDA graphs (StaticDecode)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 seeds: list[int] | None = None, *, begin: list[int] | None = None,
                 on_group: Callable[[int, list[Sample]], Iterable[int]] | None = None,
                 **overrides) -> list[list[Sample]]:
        """`seeds` (one per prompt): sample j of prompt i draws from its own generator seeded by
        (seeds[i], j), so a group's samples do not depend on which other prompts share the batch
        (data-parallel GRPO splits a step's prompts over ranks); else params.seed seeds the call.

        Streaming (DAPO's replacement groups): only the prompts listed in `begin` start (default: all);
        as soon as every sample of prompt i has finished, `on_group(i, samples)` names prompts not yet
        begun to start next, and their rows take the slots finished rows leave while the rest decode.
        Prompts never begun come back as []."""
        params = replace(params or SamplingParams(), **overrides)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        n, begun = params.n, set()
        waiting: deque[int] = deque()  # row numbers r = i·n + j waiting for a slot

        def start(which, who: str) -> None:
            for i in which:
                if not (isinstance(i, int) and 0 <= i < len(prompts)) or i in begun:
                    raise ValueError(f"generate: {who} named prompt {i!r}, which is "
                                     f"{'already begun' if i in begun else f'not one of the {len(prompts)}'}")
                begun.add(i)
                waiting.extend(range(i * n, (i + 1) * n))

        empty = next((i for i, p in enumerate(prompts) if not p), None)
        if empty is not None:
            raise ValueError(f"generate: prompt {empty} is empty")
        start(range(len(prompts)) if begin is None else begin, "begin")
        if not waiting:
            return [[] for _ in prompts]
        max_len = max(len(p) for p in prompts) + params.max_new_tokens  # every prompt: any may begin later
        limit = getattr(self.model, "max_seq_len", None)
        if limit is not None and max_len > limit:
            raise ValueError(f"the longest prompt + max_new_tokens = {max_len} tokens exceeds the model's "
                             f"context (max_position_embeddings = {limit})")
        batch = Batch(self.model, self.tok, min(len(waiting), self.max_batch), max_len, self.record_routing,
                      self.static_decode)
        # each row draws from its own stream, so samples depend on neither max_batch nor admission order:
        # from (seeds[i], j) with per-prompt seeds (data-parallel GRPO), else from (seed, row)
        seed_of = ((lambda r: seeds[r // n] * 1_000_003 + r % n) if seeds is not None
                   else (lambda r: None) if params.seed is None else (lambda r: row_seed(params.seed, r)))
        out: list[list[Sample]] = [[] for _ in prompts]
        done: dict[int, list[_Row]] = {}  # prompt → its finished rows
        was_training = self.model.training
        self.model.eval()
        try:
            while waiting or batch.active:
                take = [waiting.popleft() for _ in range(min(len(waiting), len(batch.free_slots)))]
                if take:  # admit waiting rows into the slots finished ones left
                    batch.add([prompts[r // n] for r in take], [replace(params, seed=seed_of(r)) for r in take], take)
                if batch.active:
                    batch.step()
                for row in batch.pop_finished():
                    i = row.tag // n
                    if row.error is not None:
                        raise RuntimeError(f"prompt {i}: {row.error}") from row.error
                    done.setdefault(i, []).append(row)
                    if len(done[i]) == n:  # the whole group: its samples in order j = 0..n-1
                        out[i] = [self.to_sample(i, r) for r in sorted(done.pop(i), key=lambda r: r.tag)]
                        if on_group is not None:
                            start(list(on_group(i, out[i])), f"on_group (after prompt {i})")
        finally:
            self.model.train(was_training)
        return out

    def to_sample(self, prompt_index: int, row: _Row) -> Sample:
        routes = None if row.routes is None else [torch.cat(c) if c else None for c in row.routes]
        if self.tok is None:
            return Sample(prompt_index, row.tokens, row.logprobs, row.finish_reason, routes=routes)
        n = stop_prefix(self.tok, row.tokens, row.params.stop)
        reason = row.finish_reason if n is None else "stop"
        tokens = row.tokens[:n]  # [:None] keeps them all
        text = stop_text(self.tok.decode(tokens), row.params.stop)
        if routes is not None and n is not None:  # the fed tokens of the kept prefix: prompt + n - 1
            routes = [None if r is None else r[: row.prompt_len + n - 1] for r in routes]
        return Sample(prompt_index, tokens, row.logprobs[:n], reason, text, routes)
