"""Countdown: combine the given numbers with + - * / to hit a target (the TinyZero task).

Rule: each given number is used EXACTLY once (TinyZero's rule; ``use_all=False`` relaxes it to
"at most once"). Answers are expressions, checked by a safe evaluator (``ast`` with only
integers, + - * / and parentheses, exact Fraction arithmetic), never by string matching.
Problems are built from a random expression, so every one is solvable; that expression keeps
intermediate results positive integers, but a model's answer may use any exact route.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction

from r1kit.tasks.base import Problem, SyntheticTask, check_style, completion, register_task

MAX_EXPRESSION_CHARS = 200  # bounds parser work; real answers are a few dozen characters
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/() ]*")
_LOOK_ALIKES = str.maketrans({"×": "*", "÷": "/", "−": "-"})
_BINARY_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
# Precedence for printing: atoms bind tightest, then * and /, then + and -.
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the numbers it uses, or ValueError saying why
    it is not one (only non-negative integers, + - * / and parentheses are allowed).

    >>> evaluate_expression("(25 - 7) * 3 / 2")
    (Fraction(27, 1), [25, 7, 3, 2])
    >>> evaluate_expression("7/0")
    Traceback (most recent call last):
    ...
    ValueError: division by zero
    >>> evaluate_expression("__import__('os')")
    Traceback (most recent call last):
    ...
    ValueError: only digits, + - * / ( ) and spaces are allowed
    """
    text = text.translate(_LOOK_ALIKES).strip()
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not _ALLOWED_CHARS.fullmatch(text):
        raise ValueError("only digits, + - * / ( ) and spaces are allowed")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ValueError(f"not an expression ({type(error).__name__})") from error
    numbers: list[int] = []
    return _evaluate_node(tree.body, numbers), numbers


def _evaluate_node(node: ast.AST, numbers: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        numbers.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate_node(node.left, numbers), _evaluate_node(node.right, numbers)
        op = _BINARY_OPS[type(node.op)]
        if op == "+":
            return left + right
        if op == "-":
            return left - right
        if op == "*":
            return left * right
        if right == 0:
            raise ValueError("division by zero")
        return left / right
    # Unary minus is rejected: it would let an answer use a number that was not given (-7).
    culprit = node.op if isinstance(node, ast.BinOp) else node
    raise ValueError(f"{type(culprit).__name__} is not allowed; use numbers, + - * / and parentheses")


def countdown_mistake(answer: str, numbers: list[int], target: int, use_all: bool = True) -> str | None:
    """Why ``answer`` does not solve the problem, or None if it does. An ``= target`` suffix
    is tolerated, since models often write the whole equation.

    >>> countdown_mistake("25 + 3 * 2", [2, 3, 25], 31) is None
    True
    >>> countdown_mistake("25 + 3 + 3", [2, 3, 25], 31)
    'uses [25, 3, 3] but the numbers are [2, 3, 25] (each exactly once)'
    """
    expression, equals, claimed = answer.partition("=")
    if equals and claimed.strip() != str(target):
        return f"claims {claimed.strip()!r} instead of the target {target}"
    try:
        value, used = evaluate_expression(expression)
    except ValueError as error:
        return str(error)
    given, usage = Counter(numbers), Counter(used)
    if (usage != given) if use_all else (usage - given):
        rule = "each exactly once" if use_all else "each at most once"
        return f"uses {used} but the numbers are {sorted(numbers)} ({rule})"
    if value != target:
        return f"evaluates to {value} instead of {target}"
    return None


def check_countdown(answer: str, numbers: list[int], target: int, use_all: bool = True) -> bool:
    """Whether ``answer`` is an expression over ``numbers`` (per the rule) equal to ``target``."""
    return countdown_mistake(answer, numbers, target, use_all) is None


def _apply(op: str, left: int, right: int) -> int | None:
    """Integer result of ``left op right``, or None when division is not exact (or by zero)."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    return left // right if right and left % right == 0 else None


def _combine(left: tuple, right: tuple, op: str, value: int) -> tuple:
    """Join two (text, value, precedence) nodes, adding only the parentheses that are needed."""
    (lt, _, lp), (rt, _, rp) = left, right
    prec = _PRECEDENCE[op]
    if lp < prec:
        lt = f"({lt})"
    # a-(b+c) and a/(b*c) need parentheses on the right even at equal precedence.
    if rp < prec or (rp == prec and op in "-/"):
        rt = f"({rt})"
    return f"{lt}{op}{rt}", value, prec


def random_expression(numbers: list[int], rng: random.Random, positive: bool = True) -> tuple[str, int]:
    """A random expression using every number once, with integer intermediate results (exact
    divisions only); with ``positive`` they are also > 0, which keeps scratch work clean.

    >>> text, value = random_expression([2, 3, 25], random.Random(0))
    >>> evaluate_expression(text)[0] == value
    True
    """
    pool = [(str(n), n, _ATOM) for n in numbers]
    while len(pool) > 1:
        left, right = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
        if rng.random() < 0.5:
            left, right = right, left
        # Try the operators in random order, each both ways round; a+b always qualifies.
        for op in rng.sample("+-*/", 4):
            pairs = ((left, right), (right, left)) if op in "-/" else ((left, right),)
            value = next(
                ((a, b, v) for a, b in pairs
                 if (v := _apply(op, a[1], b[1])) is not None and (v > 0 or not positive)),
                None,
            )
            if value is not None:
                a, b, v = value
                pool.append(_combine(a, b, op, v))
                break
    text, value, _ = pool[0]
    return text, value


@register_task
class CountdownTask(SyntheticTask):
    """Reach ``target`` (1..max_target) from ``n_numbers`` numbers in 1..max_number."""

    name = "countdown"
    PROMPT_STYLES = ("compact", "text")

    def __init__(self, n_numbers: int = 3, max_target: int = 100, seed: int = 0, max_number: int = 20,
                 use_all: bool = True, prompt_style: str = "compact", **kwargs):
        self.n_numbers, self.max_target, self.max_number = n_numbers, max_target, max_number
        self.use_all = use_all
        self.prompt_style = prompt_style
        super().__init__(seed=seed, **kwargs)
        if not 2 <= n_numbers <= 6:
            raise ValueError(f"countdown: n_numbers must be in 2..6, got {n_numbers}")
        if max_target < 1 or max_number < 1:
            raise ValueError(f"countdown: max_target and max_number must be >= 1, got {max_target}, {max_number}")
        if prompt_style not in self.PROMPT_STYLES:
            raise ValueError(f"countdown: prompt_style must be one of {self.PROMPT_STYLES}, got {prompt_style!r}")

    def prompt(self, numbers: list[int], target: int) -> str:
        """"compact" suits a tiny from-scratch model; "text" is TinyZero's instruction for
        pretrained chat models."""
        if self.prompt_style == "compact":
            return f"{target} from {','.join(map(str, numbers))}="
        rule = "exactly once" if self.use_all else "at most once"
        return (
            f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
            f"arithmetic operations (+, -, *, /) and each number must be used {rule}. Show your work in "
            "<think> </think> tags. And return the final equation in <answer> </answer> tags, "
            "for example <answer>(1 + 2) / 3</answer>."
        )

    def sample(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            for _ in range(20):  # several trees per number set before drawing new numbers
                solution, value = random_expression(numbers, rng)
                if 1 <= value <= self.max_target:
                    target = int(value)
                    meta = {"numbers": numbers, "target": target}
                    return Problem(prompt=self.prompt(numbers, target), answer=solution, meta=meta)

    def split_key(self, problem: Problem) -> str:
        # The same numbers in another order are the same problem: keep them in one split.
        return f"{sorted(problem.meta['numbers'])}->{problem.meta['target']}"

    def verify(self, answer: str, problem: Problem) -> bool:
        return check_countdown(answer, problem.meta["numbers"], problem.meta["target"], self.use_all)

    def _wrong_expression(self, numbers: list[int], target: int, rng: random.Random) -> tuple[str, int]:
        """A random expression over the numbers that misses the target."""
        for attempt in range(60):
            text, value = random_expression(numbers, rng, positive=attempt < 30)
            if value != target:
                return text, value
        # Every combination hit the target (tiny number sets); a wrong number is still wrong.
        text, value = random_expression([numbers[0] + 1, *numbers[1:]], rng, positive=False)
        return text, value

    def trace(self, problem: Problem, rng: random.Random, style: str = "think") -> str:
        """"think": 0-2 failed attempts ``expr=value`` then the solution ``expr=target``;
        "slip": the same, but the last attempt misses and is claimed to hit the target;
        "direct": just an expression, wrong at ``direct_error_rate``.

        >>> task = CountdownTask()
        >>> task.trace(Problem("31 from 2,3,25=", "25+3*2", {"numbers": [2, 3, 25], "target": 31}), random.Random(0))
        '<think>(3-2)*25=25,25+3*2=31</think><answer>25+3*2</answer>'
        """
        check_style(self.name, style)
        numbers, target = problem.meta["numbers"], problem.meta["target"]
        if style == "direct":
            wrong, _ = self._wrong_expression(numbers, target, rng)
            return completion(None, self.direct_answer(problem.answer, wrong, rng))
        attempts = [self._wrong_expression(numbers, target, rng) for _ in range(rng.randint(0, 2))]
        steps = [f"{text}={value}" for text, value in attempts]
        if style == "think":
            final = problem.answer
        else:
            final, _ = self._wrong_expression(numbers, target, rng)
        steps.append(f"{final}={target}")
        return completion(",".join(steps), final)
