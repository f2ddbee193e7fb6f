"""The Task contract: problems with reference answers, a seeded train/test split, a verifier,
reward parts and (for synthetic tasks) synthetic completions for pretraining/SFT corpora.

Add a task by subclassing Task (file-backed data) or SyntheticTask (generated problems) and
decorating it with ``@register_task`` so ``get_task(name)`` and the CLI can find it.
"""

from __future__ import annotations

import hashlib
import importlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from r1kit.rewards import (
    ANSWER_FORMATS,
    FORMAT_INSTRUCTIONS,
    LANGUAGE_SCRIPTS,
    accuracy_reward,
    answer_format_reward,
    combine,
    extract_final,
    has_think,
    language_consistency,
)

SPLITS = ("train", "test")
TRACE_STYLES = ("think", "slip", "direct")
# R1-Zero rewards accuracy and format; format gets a small weight (as in TinyZero) so a
# well-formed wrong answer never outranks a correct one inside a GRPO group.
DEFAULT_WEIGHTS: Mapping[str, float] = {"accuracy": 1.0, "format": 0.1}


@dataclass(frozen=True)
class Problem:
    """One prompt and its reference answer. ``meta`` holds task data the verifier needs
    (e.g. countdown numbers) and provenance (e.g. ``file:line``); it stays JSON-serialisable
    so rollout records can store it, and is left out of hashing so problems can go in sets."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)


class Task:
    """Base class. Subclasses set ``name`` and implement ``_load_split``, ``verify`` and
    optionally ``trace``; ``problems``, ``render``, ``extract`` and ``reward`` are shared.

    ``answer_format`` (rewards.ANSWER_FORMATS) says where the final answer is read from, and
    ``instruction`` what the prompt tells the model about it (default: the format's own line in
    rewards.FORMAT_INSTRUCTIONS; "" for none). The default, "tags" with no instruction, is the
    R1-Zero template the tiny from-scratch models are pretrained on."""

    name: str = "task"
    reward_parts: tuple[str, ...] = ("accuracy", "format", "language", "think")

    def __init__(
        self,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
        require_think: bool = True,
        lang: str = "en",
        answer_format: str = "tags",
        instruction: str | None = None,
    ):
        self.seed = seed
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        self.require_think = require_think
        self.lang = lang
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"{self.name}: answer_format {answer_format!r}; choose one of {list(ANSWER_FORMATS)}")
        self.answer_format = answer_format
        self.instruction = FORMAT_INSTRUCTIONS[answer_format] if instruction is None else instruction
        # Catch a typo in a recipe at construction, not at the first rollout.
        unknown = sorted(set(self.weights) - set(self.reward_parts))
        if unknown:
            raise ValueError(f"{self.name}: weights for unknown reward parts {unknown}; parts are {self.reward_parts}")
        if lang not in LANGUAGE_SCRIPTS:
            raise ValueError(f"{self.name}: unsupported lang {lang!r}; use one of {sorted(LANGUAGE_SCRIPTS)}")

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({settings})"

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        """The first ``n`` problems of ``split`` ("train" or "test"); all of them when n is None.
        Deterministic given the task's seed; train and test never share a prompt."""
        if split not in SPLITS:
            raise ValueError(f"{self.name}: unknown split {split!r}; use one of {SPLITS}")
        if n is not None and n < 0:
            raise ValueError(f"{self.name}: n must be >= 0, got {n}")
        return self._load_split(split, n)

    def _load_split(self, split: str, n: int | None) -> list[Problem]:
        raise NotImplementedError(f"{type(self).__name__} must implement _load_split(split, n)")

    def render(self, problem: Problem) -> str:
        """The user message for ``problem``: its prompt, then the answer-format instruction.
        Rollouts put it through the checkpoint's chat template (rollout.prompt_ids)."""
        return f"{problem.prompt}\n{self.instruction}" if self.instruction else problem.prompt

    def extract(self, completion: str) -> str | None:
        """The final answer of a completion in this task's answer_format (None: no answer)."""
        return extract_final(completion, self.answer_format)

    def verify(self, answer: str, problem: Problem) -> bool:
        """Whether an extracted answer string is correct for ``problem``. Malformed answers are
        wrong (False); only a bug in the verifier itself may raise."""
        raise NotImplementedError(f"{type(self).__name__} must implement verify(answer, problem)")

    def reward(self, completion: str, problem: Problem) -> dict[str, float]:
        """Reward parts for one completion: accuracy (the answer read in answer_format), format
        (whether it is written that way), language (consistency of the reasoning's script) and
        think (a 0/1 metric), plus ``total`` = weighted sum per ``self.weights`` (a part without a
        weight, e.g. ``weights = {accuracy = 1.0}``, is only a metric). Length penalties need
        token counts, so the trainer adds those."""
        parts = {
            "accuracy": accuracy_reward(completion, problem, self.verify, self.extract),
            "format": answer_format_reward(completion, self.answer_format, self.require_think),
            "language": language_consistency(completion, self.lang),
            "think": 1.0 if has_think(completion) else 0.0,
        }
        parts["total"] = combine(parts, self.weights)
        return parts

    def trace(self, problem: Problem, rng: random.Random, style: str = "think") -> str:
        """A synthetic completion for ``problem`` in one of TRACE_STYLES: "think" (correct scratch
        work then the answer), "slip" (scratch work with one slip carried into a wrong answer),
        "direct" (an answer with no thinking, wrong at the task's ``direct_error_rate``)."""
        raise NotImplementedError(f"{self.name}: this task has no synthetic traces")


def check_style(task_name: str, style: str, allowed: tuple[str, ...] = TRACE_STYLES) -> None:
    if style not in allowed:
        raise ValueError(f"{task_name}: unknown trace style {style!r}; use one of {allowed}")


def completion(think: str | None, answer: str) -> str:
    """Assemble an R1-Zero completion from scratch work (None for a direct answer)."""
    body = f"<answer>{answer}</answer>"
    return body if think is None else f"<think>{think}</think>{body}"


def perturb_number(value: int, rng: random.Random) -> int:
    """A plausible wrong guess: ``value`` with one digit changed, keeping its length and sign,
    the way a model that half-knows the answer gets one place wrong.

    >>> perturb_number(8617, random.Random(0)) != 8617
    True
    >>> len({len(str(perturb_number(8617, random.Random(s)))) for s in range(50)})
    1
    """
    digits = list(str(abs(value)))
    position = rng.randrange(len(digits))
    lowest = 1 if position == 0 and len(digits) > 1 else 0
    choices = [d for d in "0123456789"[lowest:] if d != digits[position]]
    digits[position] = rng.choice(choices)
    result = int("".join(digits))
    return -result if value < 0 else result


class SyntheticTask(Task):
    """A task whose problems are generated. Each split is a seeded stream of problems; a hash
    of each problem's split key decides which split may use it, so train and test are disjoint
    by construction and any prefix of a split is stable as ``n`` grows."""

    def __init__(
        self,
        seed: int = 0,
        train_size: int = 10000,
        test_size: int = 500,
        test_share: float = 0.1,
        direct_error_rate: float = 0.5,
        **kwargs,
    ):
        super().__init__(seed=seed, **kwargs)
        if not 0.0 < test_share < 1.0:
            raise ValueError(f"{self.name}: test_share must be in (0, 1), got {test_share}")
        if not 0.0 <= direct_error_rate <= 1.0:
            raise ValueError(f"{self.name}: direct_error_rate must be in [0, 1], got {direct_error_rate}")
        self.train_size, self.test_size = train_size, test_size
        self.test_share = test_share
        self.direct_error_rate = direct_error_rate

    def sample(self, rng: random.Random) -> Problem:
        """One random problem; the split machinery decides where it may go."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample(rng)")

    def split_key(self, problem: Problem) -> str:
        """What makes two problems 'the same' for the split (override to canonicalise)."""
        return problem.prompt

    def split_of(self, problem: Problem) -> str:
        digest = hashlib.blake2b(f"{self.name}:{self.seed}:{self.split_key(problem)}".encode(), digest_size=8)
        return "test" if int.from_bytes(digest.digest(), "big") / 2**64 < self.test_share else "train"

    def _load_split(self, split: str, n: int | None) -> list[Problem]:
        wanted = (self.train_size if split == "train" else self.test_size) if n is None else n
        rng = random.Random(f"{self.name}:{self.seed}:{split}")
        seen: set[str] = set()
        problems: list[Problem] = []
        # Small problem spaces run out of new problems; give up with a clear message instead
        # of looping forever. Only a `share` of draws can land in this split.
        share = self.test_share if split == "test" else 1.0 - self.test_share
        max_draws = int(20 * wanted / share) + 1000
        for _ in range(max_draws):
            if len(problems) == wanted:
                return problems
            problem = self.sample(rng)
            key = self.split_key(problem)
            if key in seen or self.split_of(problem) != split:
                continue
            seen.add(key)
            problems.append(problem)
        if len(problems) == wanted:
            return problems
        raise ValueError(
            f"{self.name}: found only {len(problems)} distinct {split} problems after {max_draws} draws, "
            f"{wanted} requested; the problem space is too small (ask for fewer or make problems larger)"
        )

    def direct_answer(self, correct: str, wrong: str, rng: random.Random) -> str:
        """The answer of a 'direct' trace: the wrong guess at ``direct_error_rate``."""
        return wrong if rng.random() < self.direct_error_rate else correct


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a Task subclass available to ``get_task(cls.name)``."""
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered by {TASKS[cls.name].__qualname__}")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, **kwargs) -> Task:
    """Build a task by registered name, or by ``"package.module:ClassName"`` for a user's own
    Task subclass that lives outside r1kit (importing it also registers it)."""
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot load task {name!r}: {error}") from error
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ValueError(f"task {name!r} is not a subclass of r1kit.tasks.Task")
        return _build(name, cls, kwargs)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)} (or use 'module:Class')")
    return _build(name, TASKS[name], kwargs)


def _build(name: str, cls: type, kwargs: dict) -> Task:
    """Construct a task; a wrong argument or an unreadable data file becomes one clear ValueError."""
    try:
        return cls(**kwargs)
    except TypeError as error:  # e.g. a misspelt task_args key
        raise ValueError(f"task {name!r}: {error}") from None
    except OSError as error:  # a data file that is missing or unreadable
        raise ValueError(f"task {name!r}: {error}") from None
