"""From a stream of token ids to what a client sees: reasoning and answer, stop strings honoured.

A reasoning model writes `<think>…</think>` before its answer. As DeepSeek's API does, the
server returns the inside of the think block as `reasoning_content` and the rest as `content`,
both stripped of surrounding whitespace. When the chat template already opened `<think>` in
the prompt (R1's templates do), the completion starts inside the reasoning.

Streaming must send exactly what the non-streamed answer would hold, in order, never taking
text back. So text that might still change meaning is held back until the next token decides:
an incomplete UTF-8 character, the start of a stop string, the start of a think tag, and
whitespace at either end of a part (a part is sent stripped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str, starts_in_reasoning: bool) -> tuple[str | None, str]:
    """Completion text → (reasoning or None when the model did not think, content).

    >>> split_reasoning("<think>\\n2+3 is 5\\n</think>\\n\\nThe answer is 5.", False)
    ('2+3 is 5', 'The answer is 5.')
    >>> split_reasoning("2+3 is 5\\n</think>\\n5", True)  # the template opened <think>
    ('2+3 is 5', '5')
    >>> split_reasoning("still thinking", True)  # cut off before </think>
    ('still thinking', '')
    >>> split_reasoning("Just an answer.", False)
    (None, 'Just an answer.')
    """
    if not starts_in_reasoning:
        head = text.lstrip()
        if not head.startswith(THINK_OPEN):
            return None, text.strip()
        text = head[len(THINK_OPEN):]
    end = text.find(THINK_CLOSE)
    if end < 0:
        return text.strip(), ""
    return text[:end].strip(), text[end + len(THINK_CLOSE):].strip()


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """Text before the first stop string (OpenAI semantics: the stop string is not returned)."""
    return text[: min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))]


def unsettled_tail(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `markers`.

    >>> unsettled_tail("the answer</th", ("</think>",))
    4
    >>> unsettled_tail("no marker here", ("</think>", "STOP"))
    0
    """
    hold = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), hold, -1):
            if text.endswith(m[:k]):
                hold = k
                break
    return hold


class Detokenizer:
    """Incremental decoding: text grows only by whole characters.

    Each step decodes a short window of recent tokens instead of the whole completion, and a
    window is committed only once it no longer ends in a partial UTF-8 character (U+FFFD).
    Keeping the previous token as left context makes tokenizers that drop a leading space at
    the start of a decode (SentencePiece) produce the same text as one whole decode.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: context tokens, already committed
        self._read = 0  # tokens before this index are committed to self.text

    def push(self, token: int) -> str:
        self.tokens.append(token)
        window = self.decode(self.tokens[self._prefix:])
        if window.endswith("\ufffd"):
            return ""
        done = self.decode(self.tokens[self._prefix:self._read])
        new = window[len(done):]
        self.text += new
        self._prefix, self._read = self._read, len(self.tokens)
        return new

    def flush(self) -> str:
        """At the end: commit whatever is left, replacement characters and all."""
        if self._read == len(self.tokens):
            return ""
        window = self.decode(self.tokens[self._prefix:])
        new = window[len(self.decode(self.tokens[self._prefix:self._read])):]
        self.text += new
        self._read = len(self.tokens)
        return new


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class ChoiceText:
    """One completion's text as the client sees it, updated one token at a time.

    push(token) returns the new reasoning/content text that is settled; finish() returns the
    rest. `reasoning` and `content` then hold the final strings (`reasoning` is None when the
    model did not think), and `reasoning_tokens` counts tokens up to and including `</think>`.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = (),
                 starts_in_reasoning: bool = False):
        self.detok = Detokenizer(decode)
        self.stops = tuple(s for s in stops if s)
        self.starts_in_reasoning = starts_in_reasoning
        self._markers = self.stops + (THINK_OPEN, THINK_CLOSE)
        self.reasoning: str | None = None
        self.content = ""
        self.reasoning_tokens = 0
        self._closed = False  # the raw text already contains </think>

    @property
    def n_tokens(self) -> int:
        return len(self.detok.tokens)

    def push(self, token: int) -> Delta:
        self.detok.push(token)
        self._count_reasoning()
        text = cut_at_stop(self.detok.text, self.stops)
        if len(text) == len(self.detok.text):  # no stop string yet: hold back what may begin one
            text = text[: len(text) - unsettled_tail(text, self._markers)]
        return self._advance(text)

    def finish(self) -> Delta:
        self.detok.flush()
        return self._advance(cut_at_stop(self.detok.text, self.stops))

    def _count_reasoning(self) -> None:
        if self._closed:
            return
        raw = self.detok.text
        thinking = self.starts_in_reasoning or raw.lstrip().startswith(THINK_OPEN) \
            or THINK_OPEN.startswith(raw.lstrip())  # undecided yet: count it as thinking
        if thinking:
            self.reasoning_tokens += 1
            self._closed = THINK_CLOSE in raw
        else:
            self.reasoning_tokens = 0
            self._closed = True  # an answer without a think block: nothing more to count

    def _advance(self, settled: str) -> Delta:
        reasoning, content = split_reasoning(settled, self.starts_in_reasoning)
        old_r = self.reasoning or ""
        delta = Delta((reasoning or "")[len(old_r):], content[len(self.content):])
        if reasoning is not None:
            self.reasoning = reasoning
        self.content = content
        return delta
