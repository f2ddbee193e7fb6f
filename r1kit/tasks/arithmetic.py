"""Multi-digit arithmetic (+, -, *) with digit-by-digit scratch work: the smallest task on which
a tiny from-scratch model shows the R1-Zero effect (thinking raises accuracy, RL raises the
think rate).

Default recipe (measured): 4-digit + 4-digit with sums below 10000, so every answer has the
same length, and think traces that add digit pairs from the least significant end:
``7456+1161=`` → ``<think>6+1+0=07,5+6+0=11,4+1+1=06,7+1+0=08</think><answer>8617</answer>``.
"""

from __future__ import annotations

import random
import re

from r1kit.tasks.base import Problem, SyntheticTask, check_style, completion, perturb_number, register_task

OPS = "+-*"
_INTEGER = re.compile(r"-?\d{1,40}")  # 40 digits: far beyond any answer, far below int()'s limit


def add_steps(a: int, b: int, slip_at: int | None = None, delta: int = 0) -> tuple[list[str], int]:
    """Column addition from the least significant digit: steps ``x+y+carry=rr`` (two digits, so
    the carry is always the tens digit) and the resulting sum. A slip adds ``delta`` to one
    column's result; later carries follow the slipped value, as a human's would.

    >>> add_steps(7456, 1161)
    (['6+1+0=07', '5+6+0=11', '4+1+1=06', '7+1+0=08'], 8617)
    >>> add_steps(7456, 1161, slip_at=1, delta=-1)[1]
    8607
    """
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, digits, carry = [], [], 0
    for i, (x, y) in enumerate(zip(xs, ys)):
        result = int(x) + int(y) + carry + (delta if i == slip_at else 0)
        steps.append(f"{x}+{y}+{carry}={result:02d}")
        digits.append(result % 10)
        carry = result // 10
    total = carry * 10**width + sum(d * 10**i for i, d in enumerate(digits))
    return steps, total


def sub_steps(a: int, b: int, slip_at: int | None = None, delta: int = 0) -> tuple[list[str], int]:
    """Column subtraction (``a >= b``) from the least significant digit: ``x-y-borrow=r``, written
    ``1x-y-borrow=r`` when the column borrows ten (so the next borrow is visible). A slip
    shifts one column's result digit by ``delta``.

    >>> sub_steps(7456, 1161)
    (['6-1-0=5', '15-6-0=9', '4-1-1=2', '7-1-0=6'], 6295)
    >>> sub_steps(1000, 999)
    (['10-9-0=1', '10-9-1=0', '10-9-1=0', '1-0-1=0'], 1)
    """
    width = len(str(a))
    xs, ys = str(a)[::-1], str(b).zfill(width)[::-1]
    steps, digits, borrow = [], [], 0
    for i, (x, y) in enumerate(zip(xs, ys)):
        borrow_in = borrow
        borrow = 1 if int(x) - int(y) - borrow_in < 0 else 0
        result = 10 * borrow + int(x) - int(y) - borrow_in + (delta if i == slip_at else 0)
        steps.append(f"{'1' if borrow else ''}{x}-{y}-{borrow_in}={result}")
        digits.append(result)
    return steps, sum(d * 10**i for i, d in enumerate(digits))


def mul_steps(a: int, b: int, slip_at: int | None = None, rng: random.Random | None = None) -> tuple[list[str], int]:
    """Long multiplication: one partial product per nonzero digit of ``b`` (``a*d0`` shifted by
    its place), then a running sum. A slip changes one digit of one partial product.

    >>> mul_steps(123, 45)
    (['123*5=615', '123*40=4920', '615+4920=5535'], 5535)
    >>> mul_steps(123, 7)
    (['123*7=861'], 861)
    """
    places = [(int(d), i) for i, d in enumerate(str(b)[::-1]) if d != "0"]
    steps, partials = [], []
    for k, (digit, place) in enumerate(places):
        product = a * digit
        if k == slip_at:
            product = perturb_number(product, rng)
        partial = product * 10**place
        steps.append(f"{a}*{digit * 10**place}={partial}")
        partials.append(partial)
    if not partials:  # b == 0: the single step is the only place a slip can go
        product = 0 if slip_at is None else perturb_number(0, rng)
        return [f"{a}*0={product}"], product
    running = partials[0]
    for partial in partials[1:]:
        steps.append(f"{running}+{partial}={running + partial}")
        running += partial
    return steps, running


@register_task
class ArithmeticTask(SyntheticTask):
    """``digits``-digit (op) ``digits_b``-digit problems, prompt ``a+b=``, answer the integer.

    ops: any of "+", "-", "*" (each problem picks one uniformly). "-" puts the larger operand
    first so answers are never negative. With ``fixed_length`` (default) "+" keeps only sums
    with no carry out of the top digit, so every answer has the same number of digits.
    """

    name = "arithmetic"

    def __init__(self, digits: int = 4, ops: str = "+", seed: int = 0, digits_b: int | None = None,
                 fixed_length: bool = True, **kwargs):
        self.digits = digits
        self.digits_b = digits if digits_b is None else digits_b
        self.ops = ops
        self.fixed_length = fixed_length
        super().__init__(seed=seed, **kwargs)
        if not ops or any(op not in OPS for op in ops):
            raise ValueError(f"arithmetic: ops must be a non-empty string of {OPS!r}, got {ops!r}")
        if not (1 <= self.digits <= 18 and 1 <= self.digits_b <= 18):
            raise ValueError(
                f"arithmetic: digits and digits_b must be in 1..18, got {self.digits} and {self.digits_b}"
            )

    def _operand(self, rng: random.Random, digits: int) -> int:
        return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)

    def sample(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        while True:
            a, b = self._operand(rng, self.digits), self._operand(rng, self.digits_b)
            if op == "-":
                a, b = max(a, b), min(a, b)
            if op == "+" and self.fixed_length and a + b >= 10 ** max(self.digits, self.digits_b):
                continue
            break
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(prompt=f"{a}{op}{b}=", answer=str(result), meta={"a": a, "b": b, "op": op})

    def verify(self, answer: str, problem: Problem) -> bool:
        text = answer.strip()
        return bool(_INTEGER.fullmatch(text)) and int(text) == int(problem.answer)

    def trace(self, problem: Problem, rng: random.Random, style: str = "think") -> str:
        check_style(self.name, style)
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        if style == "direct":
            correct = int(problem.answer)
            return completion(None, str(self.direct_answer(correct, perturb_number(correct, rng), rng)))
        if style == "think":
            steps, result = {"+": add_steps, "-": sub_steps, "*": mul_steps}[op](a, b)
        else:
            steps, result = self._slipped_steps(a, b, op, rng)
        return completion(",".join(steps), str(result))

    def _slipped_steps(self, a: int, b: int, op: str, rng: random.Random) -> tuple[list[str], int]:
        """Scratch work with exactly one wrong step whose error reaches the answer."""
        if op == "*":
            n_partials = sum(d != "0" for d in str(b))
            return mul_steps(a, b, slip_at=rng.randrange(max(n_partials, 1)), rng=rng)
        column_steps = add_steps if op == "+" else sub_steps
        steps, _ = column_steps(a, b)
        column = rng.randrange(len(steps))
        shown = int(steps[column].split("=")[1])
        # Keep the slipped column result in its legal range (0..19 for +, 0..9 for -) so the
        # trace stays well formed and the error shows up in the final number.
        limit = 19 if op == "+" else 9
        delta = rng.choice([d for d in (-1, 1) if 0 <= shown + d <= limit])
        return column_steps(a, b, slip_at=column, delta=delta)
