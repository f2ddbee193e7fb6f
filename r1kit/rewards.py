"""Reward functions for R1-style RL on verifiable problems: pure, small, doctested.

A completion in the R1-Zero format looks like
``<think>1+6+0=07,2+9+0=11</think><answer>8617</answer>``; the think block may be absent
(a "direct" answer). Real instruct models write answers their own way instead ("5 + 7 = 12
apples.", "\\boxed{12}"), so the final answer is read in one of ANSWER_FORMATS:

* ``tags``: the last ``<answer>…</answer>`` (the R1-Zero template; the tiny tasks' default),
* ``boxed``: the last ``\\boxed{…}`` (the MATH / R1 convention),
* ``last_number``: the last number in the text (what "End your reply with 'Answer: ' followed by the number" asks for),
* ``auto``: tags, else ``\\boxed{}``, else the last number.

Every function here takes plain strings/numbers and returns plain values, so the trainer, the
evaluator and user code can call them without any task object.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Mapping

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Model answers longer than this are not handed to sympy: a pathological string can make the
# LaTeX parser run for a long time, and no real final answer is this long.
MAX_ANSWER_CHARS = 1000

_WITH_THINK = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL
)
_OPTIONAL_THINK = re.compile(
    r"\A\s*(?:<think>(?P<think>.*?)</think>\s*)?<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL
)
_THINK_BLOCK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)
# A number as people write it: sign, thousands separators, decimals ("-1,234.5"); a lone
# trailing dot ends a sentence and is not part of the number.
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|(?<![\w.])-?\d+(?:\.\d+)?(?!\d)")
# markdown bold, LaTeX $, quotes or a full stop may follow the final number ('The answer is "12".')
_ENDS_WITH_NUMBER = re.compile(r"\d[\s.!)*$\"'\u201d]*\Z")

ANSWER_FORMATS = ("tags", "boxed", "last_number", "auto")
# What the prompt tells the model, per format. "tags" adds nothing: the tiny tasks' models were
# pretrained on the bare prompt, and their recipes rely on it staying unchanged.
FORMAT_INSTRUCTIONS = {
    "tags": "",
    "boxed": "Put your final answer in \\boxed{}.",
    # measured on SmolLM2-135M-Instruct: "...'Answer: N', where N is the final number" made it
    # answer with the question's last number (greedy 6% on 2-digit + 1-digit sums); this wording did not
    "last_number": "End your reply with 'Answer: ' followed by the number.",
    "auto": "Put your final answer in \\boxed{}.",
}


class RewardError(RuntimeError):
    """A reward function failed on an input; the message names the reward and the input."""


def _clip(text: str, limit: int = 120) -> str:
    """A short repr for error messages, so one bad completion does not flood the log."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def extract_answer(text: str) -> str | None:
    """The stripped text inside the LAST ``<answer>…</answer>``; None if there is none or it is empty.

    >>> extract_answer("<think>2+2=04</think>\\n<answer> 4 </answer>")
    '4'
    >>> extract_answer("<answer>1</answer> then <answer>2</answer>")
    '2'
    >>> extract_answer("<answer>8617") is None   # truncated: no closing tag, no answer
    True
    >>> extract_answer("<answer>  </answer>") is None
    True
    """
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    answer = text[start + len(ANSWER_OPEN) : end].strip()
    return answer or None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), matching nested braces; None if
    there is none, it is empty, or its braces never close (a truncated completion).

    >>> extract_boxed("so $x = \\\\boxed{\\\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> extract_boxed("no box") is None, extract_boxed("\\\\boxed{12") is None, extract_boxed("\\\\boxed{ }") is None
    (True, True, True)
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip() or None
        i += 1
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed; None if there is none.

    >>> extract_last_number("5 + 7 = 12 Apples Mia has now.")
    '12'
    >>> extract_last_number("It costs $1,234.50 in total."), extract_last_number("Answer: -3")
    ('1234.50', '-3')
    >>> extract_last_number("I have 3 pens, 4 books, 12.") , extract_last_number("no digits") is None
    ('12', True)
    """
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_final(text: str, answer_format: str = "tags") -> str | None:
    """The final answer of ``text`` read in ``answer_format`` (one of ANSWER_FORMATS); None if
    the text holds no answer in that format.

    >>> extract_final("5 + 7 = 12 Apples Mia has now.", "tags") is None
    True
    >>> extract_final("5 + 7 = 12 Apples Mia has now.", "last_number")
    '12'
    >>> extract_final("so 3 + 4 = \\\\boxed{7}, not 8", "boxed"), extract_final("so 3 + 4 = \\\\boxed{7}, not 8", "auto")
    ('7', '7')
    >>> extract_final("<answer>7</answer> or 8", "auto"), extract_final("7 or 8", "auto")
    ('7', '8')
    """
    if answer_format not in _EXTRACTORS:
        raise ValueError(f"answer_format {answer_format!r}; choose one of {list(ANSWER_FORMATS)}")
    return _EXTRACTORS[answer_format](text)


def _extract_auto(text: str) -> str | None:
    for extract in (extract_answer, extract_boxed, extract_last_number):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "tags": extract_answer, "boxed": extract_boxed, "last_number": extract_last_number, "auto": _extract_auto,
}


def answer_format_reward(text: str, answer_format: str = "tags", require_think: bool = True) -> float:
    """1.0 if ``text`` gives its answer the way ``answer_format`` asks, else 0.0 — the format
    reward, kept apart from accuracy so a recipe can weigh it (or turn it off with weight 0).

    ``tags``: format_reward (the whole R1-Zero template); ``boxed``: exactly one non-empty
    ``\\boxed{}``; ``last_number``: the text ends with a number (trailing punctuation allowed),
    so the number it states last is the one it means; ``auto``: any of those three.

    >>> answer_format_reward("so the total is \\\\boxed{12}.", "boxed"), answer_format_reward("\\\\boxed{1} \\\\boxed{2}", "boxed")
    (1.0, 0.0)
    >>> answer_format_reward("5 + 7 = 12. Answer: 12", "last_number"), answer_format_reward("Answer: 12 apples", "last_number")
    (1.0, 0.0)
    >>> answer_format_reward("<answer>7</answer>", "auto", require_think=True), answer_format_reward("7 apples", "auto")
    (0.0, 0.0)
    """
    if answer_format == "tags":
        return format_reward(text, require_think)
    if answer_format == "boxed":
        return 1.0 if text.count("\\boxed{") + text.count("\\fbox{") == 1 and extract_boxed(text) else 0.0
    if answer_format == "last_number":
        return 1.0 if _ENDS_WITH_NUMBER.search(text.rstrip()) else 0.0
    if answer_format == "auto":
        return max(answer_format_reward(text, f, require_think) for f in ("tags", "boxed", "last_number"))
    raise ValueError(f"answer_format {answer_format!r}; choose one of {list(ANSWER_FORMATS)}")


def format_reward(text: str, require_think: bool = True) -> float:
    """1.0 if ``text`` is exactly ``<think>…</think><answer>…</answer>`` (whitespace allowed
    around the parts), else 0.0.

    The think block must hold some text when required (an empty one would let the policy
    collect the format reward without reasoning); the answer must never be empty. Any extra,
    nested or duplicated tag fails. With ``require_think=False`` a bare answer also counts.

    >>> format_reward("<think>6+1+0=07</think>\\n<answer>7</answer>\\n")
    1.0
    >>> format_reward("<answer>7</answer>"), format_reward("<answer>7</answer>", require_think=False)
    (0.0, 1.0)
    >>> format_reward("<think> </think><answer>7</answer>")
    0.0
    >>> format_reward("<think>a<think>b</think><answer>7</answer>")
    0.0
    >>> format_reward("<think>a</think><answer>7</answer> trailing words")
    0.0
    """
    match = (_WITH_THINK if require_think else _OPTIONAL_THINK).match(text)
    if match is None:
        return 0.0
    think, answer = match.group("think"), match.group("answer")
    parts = [answer] if think is None else [think, answer]
    if any(tag in part for part in parts for tag in TAGS):
        return 0.0
    if not answer.strip() or (require_think and not think.strip()):
        return 0.0
    return 1.0


def has_think(text: str) -> bool:
    """Whether the completion contains a closed, non-empty think block (the think-rate metric).

    >>> has_think("<think>3*4=12</think><answer>12</answer>"), has_think("<answer>12</answer>")
    (True, False)
    """
    return any(block.strip() for block in re.findall(r"<think>(.*?)</think>", text, re.DOTALL))


def accuracy_reward(text: str, reference, verify: Callable[[str, object], bool],
                    extract: Callable[[str], str | None] = extract_answer) -> float:
    """1.0 if the answer ``extract`` reads from ``text`` passes ``verify(answer, reference)``,
    else 0.0. The default reads ``<answer>`` tags; pass e.g. ``extract_last_number``.

    A missing answer scores 0. A verifier that raises is a bug, not a wrong answer, so it is
    re-raised as a RewardError naming the verifier and the input instead of being hidden as 0.

    >>> accuracy_reward("<answer>12</answer>", "12", lambda a, r: a == r)
    1.0
    >>> accuracy_reward("no answer here", "12", lambda a, r: a == r)
    0.0
    >>> accuracy_reward("5 + 7 = 12 Apples Mia has now.", "12", lambda a, r: a == r, extract_last_number)
    1.0
    >>> accuracy_reward("<answer>x</answer>", "12", lambda a, r: int(a) == int(r))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    r1kit.rewards.RewardError: accuracy reward: verifier <lambda> raised ValueError (...) on answer 'x' ...
    """
    answer = extract(text)
    if answer is None:
        return 0.0
    try:
        ok = verify(answer, reference)
    except Exception as error:
        name = getattr(verify, "__qualname__", None) or type(verify).__name__
        raise RewardError(
            f"accuracy reward: verifier {name} raised {type(error).__name__} ({error}) "
            f"on answer {_clip(answer)} with reference {_clip(str(reference))}"
        ) from error
    return 1.0 if ok else 0.0


def _math_verify():
    """Import math_verify lazily: it pulls in sympy, which costs a second at import time."""
    from r1kit.common import require
    return require("math_verify", "grading math answers (the math_file task)")


def _timeout(seconds: int) -> int | None:
    """math_verify times out with signal.alarm, which only works in the main thread; elsewhere
    we run without its timeout rather than crash (MAX_ANSWER_CHARS bounds the work instead)."""
    return seconds if threading.current_thread() is threading.main_thread() else None


def _parse_math(text: str) -> list:
    """Parse a short math answer with math_verify, choosing the reading that keeps LaTeX intact.

    Text with ``\\boxed`` or ``$`` is already delimited. Bare LaTeX (``2\\sqrt{2}``, ``\\pi``) is
    wrapped in ``\\boxed{}``: parsed raw, math_verify would keep only the leading ``2``. Plain
    text (``5 apples``, ``x=3``, ``1/2``) is parsed raw, and as a last try wrapped.
    """
    parse = _math_verify().parse
    timeout = _timeout(5)
    boxed = "\\boxed{" + text + "}"
    if "\\boxed" in text or "$" in text:
        candidates = [text]
    elif "\\" in text:
        candidates = [boxed, text]
    else:
        candidates = [text, boxed]
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


@functools.lru_cache(maxsize=8192)
def _parse_reference_cached(reference: str) -> tuple:
    return tuple(_parse_math(reference))


def parse_reference(reference: str) -> list:
    """Parse a reference answer for math_verify; raises ValueError if nothing can be parsed.

    Called when a task loads its data, so a bad reference fails loudly there and can never
    turn into a reward of 1 for some lucky garbage answer.

    >>> parse_reference("\\\\frac{1}{2}")[1]
    '\\\\frac{1}{2}'
    >>> parse_reference("}{")
    Traceback (most recent call last):
    ...
    ValueError: cannot parse reference answer '}{' with math_verify
    """
    parsed = _parse_reference_cached(reference.strip())
    if not parsed:
        raise ValueError(f"cannot parse reference answer {_clip(reference)} with math_verify")
    return list(parsed)


def math_verify_equal(answer: str, reference: str | list) -> bool:
    """Whether ``answer`` is mathematically equal to ``reference`` (a string or the result of
    parse_reference). Handles plain numbers, thousands separators, fractions, ``\\boxed{}``
    and LaTeX; an unparseable answer is simply wrong.

    >>> math_verify_equal("72", "72"), math_verify_equal("\\\\boxed{0.5}", "\\\\frac{1}{2}")
    (True, True)
    >>> math_verify_equal("1/2", "0.5"), math_verify_equal("1,234", "1234"), math_verify_equal("73", "72")
    (True, True, False)
    """
    gold = parse_reference(reference) if isinstance(reference, str) else reference
    answer = answer.strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    target = _parse_math(answer)
    if not target:
        return False
    return bool(_math_verify().verify(gold, target, timeout_seconds=_timeout(5)))


def math_verify_extract(text: str, answer_format: str = "auto") -> str | None:
    """extract_final for math answers: with "auto", a completion with no tags and no
    ``\\boxed{}`` is read by math_verify's own extraction (LaTeX or a plain expression, the
    "final answer is" phrasing first, then the last one), which keeps ``$\\frac{1}{2}$`` whole
    where the last number would be ``2``. The other formats read as in extract_final.

    >>> math_verify_extract("so the answer is $\\\\frac{1}{2}$."), extract_final("so the answer is $\\\\frac{1}{2}$.", "auto")
    ('\\\\frac{1}{2}', '2')
    >>> math_verify_extract("5 + 7 = 12 Apples Mia has now."), math_verify_extract("no answer") is None
    ('12', True)
    """
    if answer_format != "auto":
        return extract_final(text, answer_format)
    answer = extract_answer(text) or extract_boxed(text)
    if answer is not None or len(text) > 20 * MAX_ANSWER_CHARS:
        return answer
    parsed = _math_verify().parse(text, parsing_timeout=_timeout(5))
    return parsed[-1] if len(parsed) >= 2 and isinstance(parsed[-1], str) and parsed[-1].strip() else None


# Script of each letter, by Unicode block. CJK counts each ideograph as a word, because Chinese
# is written without spaces; the other scripts count runs of letters.
_LATIN = re.compile(r"[A-Za-z\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u024F\u1E00-\u1EFF]+")
_CJK = re.compile(r"[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF\U00020000-\U0002EBEF]")
_LETTERS = re.compile(r"[^\W\d_]+")  # letter runs in any script; digits/punctuation are neutral
# Greek letters are neutral too: in reasoning they are math symbols (π, θ), not language.
_GREEK = re.compile(r"[\u0370-\u03FF\u1F00-\u1FFF]")
LANGUAGE_SCRIPTS = {"en": "latin", "zh": "cjk", "latin": "latin", "cjk": "cjk"}


def _reasoning_text(text: str) -> str:
    """The think part of a completion (an unclosed block runs to the end); without one, the
    whole text minus tags, since a model that skips the tags still reasons in some language."""
    blocks = _THINK_BLOCK.findall(text)
    if blocks:
        return " ".join(blocks)
    for tag in TAGS:
        text = text.replace(tag, " ")
    return text


def language_consistency(text: str, lang: str = "en") -> float:
    """Share of the reasoning's words written in the target language's script (R1's
    language-consistency reward). Digits, operators and punctuation are neutral; no words → 1.0.

    >>> language_consistency("<think>so 3 plus 4 is 7</think><answer>7</answer>")
    1.0
    >>> language_consistency("<think>so 三加四 is 7</think>", "en")   # 2 Latin words, 3 ideographs
    0.4
    >>> language_consistency("<think>1+6+0=07</think>", "zh")
    1.0
    """
    script = LANGUAGE_SCRIPTS.get(lang)
    if script is None:
        raise ValueError(f"language_consistency: unsupported lang {lang!r}; use one of {sorted(LANGUAGE_SCRIPTS)}")
    reasoning = _reasoning_text(text)
    total = target = 0
    for run in _LETTERS.findall(_GREEK.sub(" ", reasoning)):
        cjk = len(_CJK.findall(run))
        latin = len(_LATIN.findall(_CJK.sub(" ", run)))
        # Letters of other scripts (Cyrillic, kana, …) count as one off-target word per run.
        other = 1 if _LATIN.sub("", _CJK.sub("", run)) else 0
        total += cjk + latin + other
        target += cjk if script == "cjk" else latin
    return 1.0 if total == 0 else target / total


def overlong_penalty(n_tokens: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_tokens - cache_tokens``, then linear down
    to -1 at ``max_tokens``, and -1 beyond.

    >>> [overlong_penalty(n, 100, 20) for n in (50, 80, 90, 100, 120)]
    [0.0, 0.0, -0.5, -1.0, -1.0]
    >>> overlong_penalty(101, 100, 0)
    -1.0
    """
    if not 0 <= cache_tokens <= max_tokens:
        raise ValueError(
            f"overlong_penalty: need 0 <= cache_tokens <= max_tokens, got {cache_tokens} and {max_tokens}"
        )
    free = max_tokens - cache_tokens
    if n_tokens <= free:
        return 0.0
    if n_tokens > max_tokens:
        return -1.0
    return (free - n_tokens) / cache_tokens


def combine(parts: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted sum of reward parts. Parts without a weight are metrics and do not count; a
    weight without a part is a configuration error.

    >>> combine({"accuracy": 1.0, "format": 1.0, "think": 1.0}, {"accuracy": 1.0, "format": 0.1})
    1.1
    >>> combine({"accuracy": 1.0}, {"acuracy": 1.0})
    Traceback (most recent call last):
    ...
    ValueError: reward weight 'acuracy' has no matching reward part; parts are ['accuracy']
    """
    total = 0.0
    for name, weight in weights.items():
        if name not in parts:
            raise ValueError(f"reward weight {name!r} has no matching reward part; parts are {sorted(parts)}")
        total += weight * parts[name]
    return total
