"""Model backends behind the server and the terminal chat.

Both speak one small, synchronous protocol that the scheduler drives from a single worker
thread (so only one model forward ever runs at a time):

    prompt(messages) → (ids, starts_in_reasoning)      decode(ids) → text (special tokens skipped)
    tick(admit, cancel) → [(tag, token, finish_reason | None)]   one decoding step for every row;
        a row that failed on its own (its prefill raised, its stop check raised) comes back as
        (tag, None, RowFailed) and the others carry on; an exception out of tick() means the step
        itself failed (every running row is lost) and the caller calls reset()
    free_slots, active, capacity, context_len, name, defaults

- `TorchBackend`: an r1kit / Hugging Face checkpoint directory on r1kit's engine. Its `Batch`
  holds `capacity` rows; new rows are prefilled into free slots while others decode
  (continuous batching).
- `LlamaCppBackend`: a `.gguf` file through llama.cpp (`pip install llama-cpp-python`). It has
  one sequence slot, so requests (and the n choices of one request) are served one at a time.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from r1kit.engine import Batch, SamplingParams

Event = tuple  # (tag, token id, finish reason or None), or (tag, None, RowFailed) for a failed row


class BackendError(ValueError):
    """A model that cannot be served (missing file, no chat template, backend not installed)."""


class RowFailed(RuntimeError):
    """One row's own failure (its prefill or its stop check raised): only its request fails."""


@dataclass
class Admission:
    tag: tuple  # (request id, choice index)
    prompt: list[int]
    params: SamplingParams


_GENERATION_KEYS = {  # key → (check, what it must be)
    "temperature": (lambda v: v >= 0, "a number ≥ 0"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: v >= 0 and float(v).is_integer(), "an integer ≥ 0"),
}


def generation_defaults(cfg: dict | None, f) -> dict:
    """The sampling defaults a checkpoint was published with: its own generation_config.json `f`
    (temperature, top_p, top_k; read and parsed once, by the checkpoint loader: `model.generation_config`),
    as vLLM adopts them; `do_sample: false` means greedy. A request's own values win. No file → {}
    (the API's defaults). A value the engine cannot use → BackendError naming it.
    """
    if cfg is None:
        return {}
    defaults = {}
    for key, (ok, what) in _GENERATION_KEYS.items():
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise BackendError(f"{f}: '{key}' must be {what}, got {v!r}")
        defaults[key] = int(v) if key == "top_k" else float(v)
    if cfg.get("do_sample") is False:  # published as greedy
        defaults["temperature"] = 0.0
    return defaults


def _starts_in_reasoning(prompt_text: str) -> bool:
    """A template that ends the prompt with an open <think> makes the completion reasoning."""
    return prompt_text.rstrip().endswith("<think>")


class TorchBackend:
    concurrent = True

    def __init__(self, model, tok, name: str, capacity: int, max_len: int, defaults: dict | None = None):
        model.eval().requires_grad_(False)
        self.model, self.tok, self.name = model, tok, name
        self.capacity, self.context_len = capacity, max_len
        self.defaults = defaults or {}
        self.batch = Batch(model, tok, capacity, max_len)
        self.prompt([{"role": "user", "content": "hi"}])  # fail at start-up, not per request

    @classmethod
    def load(cls, path, name: str, capacity: int, max_len: int | None, device=None, dtype=None):
        import r1kit
        model, tok = r1kit.load(path, device=device, dtype=dtype)
        limit = model.max_seq_len
        if max_len is not None and max_len > limit:
            raise BackendError(f"--max-len {max_len} exceeds the model's {limit} positions")
        defaults = generation_defaults(getattr(model, "generation_config", None), Path(path) / "generation_config.json")
        return cls(model, tok, name, capacity, max_len or min(limit, 4096), defaults)

    def kv_cache_bytes(self) -> int:
        return self.batch.cache.nbytes()

    def prompt(self, messages: list[dict]) -> tuple[list[int], bool]:
        ids = self.tok.chat_prompt(messages)
        tail = self.tok.decode(ids[-8:], skip_special_tokens=False)
        return ids, _starts_in_reasoning(tail)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @property
    def free_slots(self) -> int:
        return len(self.batch.free_slots)

    @property
    def active(self) -> int:
        return self.batch.active

    def tick(self, admit: list[Admission], cancel: list[tuple]) -> list[Event]:
        with torch.no_grad():
            for tag in cancel:
                self.batch.cancel(tag)
            events = self._admit(admit) if admit else []
            if self.batch.active:
                events += [_event(tag, tok, reason, self.batch) for tag, tok, _, reason in self.batch.step()]
        self.batch.pop_finished()  # the events carry everything; finished rows need not pile up
        return events

    def _admit(self, admit: list[Admission]) -> list[Event]:
        """Prefill new rows together; their first token is sampled by the prefill itself. When that
        fails, each row is tried alone, so one bad request (a prompt the model cannot take) fails alone."""
        try:
            return self._add(admit)
        except Exception as e:  # noqa: BLE001 — find the culprit below
            if len(admit) == 1:
                return [(admit[0].tag, None, RowFailed(_describe(e)))]
        events = []
        for a in admit:
            try:
                events += self._add([a])
            except Exception as e:  # noqa: BLE001 — this request's own failure
                events.append((a.tag, None, RowFailed(_describe(e))))
        return events

    def _add(self, admit: list[Admission]) -> list[Event]:
        slots = self.batch.add([a.prompt for a in admit], [a.params for a in admit], [a.tag for a in admit])
        ended = {r.tag: r for r in self.batch.finished}  # rows whose first token already ended them
        events = []
        for slot, a in zip(slots, admit):
            row = self.batch.rows[slot]
            row = row if row is not None and row.tag == a.tag else ended[a.tag]
            events.append(_event(a.tag, row.tokens[0], row.finish_reason, self.batch))  # None while it runs
        return events

    def reset(self) -> None:
        """After a failed step: drop every row and start again from an empty batch, same KV cache."""
        self.batch.clear()


def _event(tag, token: int, reason: str | None, batch: Batch) -> Event:
    if reason != "error":
        return tag, token, reason
    row = next(r for r in batch.finished if r.tag == tag)
    return tag, None, RowFailed(_describe(row.error))


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass
class _Seq:
    tag: tuple
    params: SamplingParams
    prompt_len: int
    gen: object  # llama_cpp's token generator
    tokens: list


class LlamaCppBackend:
    """One sequence at a time through llama.cpp; stop rules mirror r1kit's engine."""
    concurrent = False
    capacity = 1

    def __init__(self, path, name: str, n_ctx: int | None = None, threads: int | None = None):
        try:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError:
            raise BackendError("serving a .gguf file needs llama.cpp's Python binding: "
                               "pip install llama-cpp-python") from None
        if not Path(path).is_file():
            raise BackendError(f"{path}: no such file")
        self._lib = llama_cpp
        try:
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx or 0, n_threads=threads, verbose=False)
        except ValueError as e:
            raise BackendError(f"{path}: llama.cpp cannot load it ({e})") from None
        self.name, self.context_len, self.defaults = name, self.llm.n_ctx(), {}
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendError(f"{path}: the GGUF has no tokenizer.chat_template to build prompts with")
        text = self.llm._model.token_get_text
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        self._format = Jinja2ChatFormatter(template, text(eos) if eos >= 0 else "", text(bos) if bos >= 0 else "")
        self._vocab = self.llm._model.vocab
        self.seq: _Seq | None = None

    def prompt(self, messages: list[dict]) -> tuple[list[int], bool]:
        try:
            rendered = self._format(messages=messages).prompt
        except Exception as e:  # the GGUF's Jinja template may refuse a conversation (e.g. two user turns)
            raise ValueError(f"the chat template rejected the messages: {e}") from None
        ids = self.llm.tokenize(rendered.encode(), add_bos=False, special=True)
        return ids, _starts_in_reasoning(rendered)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=False).decode("utf-8", errors="replace")

    @property
    def free_slots(self) -> int:
        return 0 if self.seq else 1

    @property
    def active(self) -> int:
        return 1 if self.seq else 0

    def tick(self, admit: list[Admission], cancel: list[tuple]) -> list[Event]:
        if self.seq is not None and self.seq.tag in cancel:
            self._end()
        if admit:
            try:
                self._start(admit[0])
            except Exception as e:  # noqa: BLE001 — this request's own failure
                return [(admit[0].tag, None, RowFailed(_describe(e)))]
        if self.seq is None:
            return []
        seq = self.seq
        token = next(seq.gen)
        seq.tokens.append(token)
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self._end()
        return [(seq.tag, token, reason)]

    def _start(self, a: Admission) -> None:
        sp = a.params
        self.llm.set_seed(sp.seed if sp.seed is not None else random.getrandbits(31))
        gen = self.llm.generate(a.prompt, top_k=sp.top_k, top_p=sp.top_p, min_p=0.0, temp=sp.temperature,
                                repeat_penalty=1.0)
        self.seq = _Seq(a.tag, sp, len(a.prompt), gen, [])

    def _end(self) -> None:
        self.seq.gen.close()
        self.seq = None

    def _finish_reason(self, seq: _Seq, token: int) -> str | None:
        sp = seq.params
        if not sp.ignore_eos and self._lib.llama_vocab_is_eog(self._vocab, token):
            return "stop"
        if sp.stop:
            width = 4 * max(len(s) for s in sp.stop) + 8  # tokens, enough for any stop string
            tail = self.decode(seq.tokens[-width:])
            if any(s in tail for s in sp.stop):
                return "stop"
        if len(seq.tokens) >= sp.max_new_tokens or seq.prompt_len + len(seq.tokens) >= self.context_len:
            return "length"
        return None

    def reset(self) -> None:
        if self.seq is not None:
            self._end()


def load_backend(path: str, *, name: str | None = None, max_batch: int = 16, max_len: int | None = None,
                 device=None, dtype=None, threads: int | None = None):
    """A `.gguf` file → llama.cpp; a directory → r1kit's engine."""
    p = Path(path)
    name = name or (p.stem if p.suffix == ".gguf" else p.resolve().name)
    if p.suffix == ".gguf":
        return LlamaCppBackend(p, name, n_ctx=max_len, threads=threads)
    if not p.is_dir():
        raise BackendError(f"{path}: expected a checkpoint directory or a .gguf file")
    if max_batch < 1:
        raise BackendError(f"--max-batch must be at least 1, got {max_batch}")
    return TorchBackend.load(p, name, max_batch, max_len, device=device, dtype=dtype)
