"""Evaluation stage.

The top half is pure metric functions (stdlib + numpy only, no other r1kit import), so they can
be tested on hand-made sample sets and reused by the report. Metrics follow DeepSeek-R1 §3:
sample k completions per problem (temperature 0.6, top-p 0.95) and report
    * pass@1   = mean over problems of the fraction of the k samples that are correct,
    * cons@k   = accuracy of the majority-voted answer over the k samples,
    * pass@k   = Chen et al. (2021)'s unbiased estimator from n >= k samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

# ============================================================================================
# Pure metric functions
# ============================================================================================


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    ``1 - C(n-c, k) / C(n, k)``: the probability that a random size-k subset of the n samples
    holds at least one correct one. The binomials get huge (and overflow as floats) for
    realistic n, so the ratio is computed as the product ``prod_{i=n-c+1}^{n} (1 - k/i)``,
    which equals ``C(n-c, k) / C(n, k)`` and stays in [0, 1] at every step.

    >>> round(pass_at_k(5, 2, 1), 12)
    0.4
    >>> pass_at_k(5, 2, 5), pass_at_k(5, 0, 3)
    (1.0, 0.0)
    """
    if not (0 <= c <= n):
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        # Fewer than k wrong samples: every size-k subset contains a correct one.
        return 1.0
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


def pass_at_k_per_problem(num_samples: Sequence[int] | int, num_correct: Sequence[int], k: int) -> np.ndarray:
    """``pass_at_k`` for each problem: ``(P,)`` float64.

    Args:
        num_samples: n per problem ``(P,)``, or one int shared by all problems.
        num_correct: c per problem ``(P,)``.
        k: the k in pass@k (must be <= every n).
    """
    cs = list(num_correct)
    ns = [num_samples] * len(cs) if isinstance(num_samples, int) else list(num_samples)
    if len(ns) != len(cs):
        raise ValueError(f"{len(ns)} sample counts for {len(cs)} correct counts")
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(ns, cs)], dtype=np.float64)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``correct[p]`` holds the n_p verdicts of problem p.

    >>> mean_pass_at_k([[True, False], [False, False]], k=2)
    0.5
    """
    if not correct:
        raise ValueError("no problems")
    ns = [len(s) for s in correct]
    cs = [sum(map(bool, s)) for s in correct]
    return float(pass_at_k_per_problem(ns, cs, k).mean())


def per_problem_accuracy(correct: Sequence[Sequence[bool]]) -> np.ndarray:
    """Fraction of correct samples for each problem: ``(P,)`` float64."""
    if any(len(s) == 0 for s in correct):
        raise ValueError("every problem needs at least one sample")
    return np.array([sum(map(bool, s)) / len(s) for s in correct], dtype=np.float64)


def pass_at_1_mean(correct: Sequence[Sequence[bool]]) -> float:
    """R1's pass@1 with k samples: mean over problems of (correct samples / k).

    Equal to ``mean_pass_at_k(correct, 1)``, but with far less variance than grading one greedy
    sample, which is why R1 reports it.

    >>> pass_at_1_mean([[True, False, True, True], [False, False, False, True]])
    0.5
    """
    if not correct:
        raise ValueError("no problems")
    return float(per_problem_accuracy(correct).mean())


def majority_vote(answers: Sequence[str | None], key: Callable[[str], Hashable] | None = None) -> str | None:
    """Most frequent non-None answer; None if every answer is None.

    Tie rule (deterministic): among answers tied for the highest count, the one whose *first*
    occurrence comes earliest in sample order wins. ``key`` maps an answer to the thing that is
    counted (e.g. a normalised form, so "1/2" and "0.5" vote together); the returned answer is the
    first sample seen of the winning class, as written.

    >>> majority_vote(["b", "a", "a", "b", None, None, None])
    'b'
    >>> majority_vote([None, "7"]), majority_vote([None, None])
    ('7', None)
    """
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, str] = {}
    for a in answers:
        if a is None:
            continue
        cls = key(a) if key is not None else a
        if cls not in counts:
            # dicts keep insertion order, so iteration below follows first occurrence.
            counts[cls] = 0
            first[cls] = a
        counts[cls] += 1
    if not counts:
        return None
    best = max(counts.values())
    winner = next(cls for cls, n in counts.items() if n == best)
    return first[winner]


def cons_correct(answers_per_problem: Sequence[Sequence[str | None]], references: Sequence[Any],
                 is_correct: Callable[[str, Any], bool] | None = None, k: int | None = None) -> list[bool]:
    """Per-problem correctness of the majority-voted answer: ``(P,)`` bools.

    Args:
        answers_per_problem: extracted final answers (None = no answer) per problem.
        references: one reference per problem; anything ``is_correct`` understands.
        is_correct: ``(voted_answer, reference) -> bool``; defaults to string equality. Pass a
            math-verify based checker for symbolic equivalence. A None vote is always wrong.
        k: vote over the first k samples only (None = all of them).
    """
    if len(answers_per_problem) != len(references):
        raise ValueError(f"{len(answers_per_problem)} problems but {len(references)} references")
    check = is_correct if is_correct is not None else (lambda a, ref: a == ref)
    out = []
    for answers, ref in zip(answers_per_problem, references):
        vote = majority_vote(answers[:k] if k is not None else answers)
        out.append(vote is not None and bool(check(vote, ref)))
    return out


def cons_at_k(answers_per_problem: Sequence[Sequence[str | None]], references: Sequence[Any],
              is_correct: Callable[[str, Any], bool] | None = None, k: int | None = None) -> float:
    """cons@k: fraction of problems whose majority-voted answer is correct (see ``cons_correct``).

    >>> cons_at_k([["4", "4", "5"], ["1", None, "2"]], ["4", "2"])
    0.5
    """
    verdicts = cons_correct(answers_per_problem, references, is_correct, k)
    if not verdicts:
        raise ValueError("no problems")
    return sum(verdicts) / len(verdicts)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%): ``(low, high)``.

    Preferred over the normal "p +- z*sqrt(p(1-p)/n)" interval because it never leaves [0, 1] and
    does not collapse to zero width when p is 0 or 1 (common for small eval sets). Use it for
    cons@k or single-sample accuracy, where each problem is one Bernoulli outcome. n = 0 gives
    the uninformative (0, 1).

    >>> tuple(round(x, 4) for x in wilson_interval(8, 10))
    (0.4902, 0.9433)
    """
    if not (0 <= successes <= n):
        raise ValueError(f"need 0 <= successes <= n, got {successes}, {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_confidence_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """Normal-approximation CI of a mean over problems: ``(mean, mean - z*se, mean + z*se)``.

    ``se = s / sqrt(P)`` with ``s`` the sample std (ddof=1) of the per-problem values. Problems
    are the independent units: the k samples of one problem are correlated, so treating all
    P*k samples as independent (a Wilson interval over them) would be too narrow. Needs P >= 2.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise ValueError("a standard error needs at least 2 problems")
    mean = float(v.mean())
    half = z * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half


def pass_at_1_ci(correct: Sequence[Sequence[bool]], z: float = 1.96) -> tuple[float, float, float]:
    """pass@1-with-k-samples and its CI: ``(mean, low, high)``, bootstrap-free.

    ``mean_confidence_interval`` over per-problem accuracies, clipped to [0, 1] (the normal
    approximation can overshoot near the edges; the true pass@1 cannot). If every problem has
    the same accuracy the interval has zero width: the estimate then has no between-problem
    spread to measure, which is a limit of this interval on tiny sets.

    >>> tuple(round(x, 4) for x in pass_at_1_ci([[True, True], [True, False], [False, False], [True, True]]))
    (0.625, 0.1559, 1.0)
    """
    mean, low, high = mean_confidence_interval(per_problem_accuracy(correct), z)
    return mean, max(0.0, low), min(1.0, high)
