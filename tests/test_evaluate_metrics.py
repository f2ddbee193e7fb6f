"""Pure evaluation metrics in r1kit.stages.evaluate, on hand-made sample sets."""

import math
from fractions import Fraction

import pytest

from r1kit.stages import evaluate as ev


# ---------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),            # c/n
    (5, 2, 2, 0.7),            # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 4, 5 / 6),         # 1 - C(7,4)/C(10,4) = 1 - 35/210
    (5, 2, 5, 1.0),            # k = n: some sample is correct
    (5, 2, 4, 1.0),            # n - c = 3 < k = 4: every 4-subset holds a correct one
    (5, 0, 3, 0.0),            # nothing correct
    (5, 5, 1, 1.0),            # everything correct
])
def test_pass_at_k_known_values(n, c, k, expected):
    assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_exact_binomials_including_large_n():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert ev.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    # C(1000, 100) ~ 1e139 and C(1000, 500) overflows a float: the product form is unaffected
    exact = 1 - Fraction(math.comb(990, 100), math.comb(1000, 100))
    assert ev.pass_at_k(1000, 10, 100) == pytest.approx(float(exact), rel=1e-10)
    assert 0.0 < ev.pass_at_k(1000, 1, 500) <= 1.0


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            ev.pass_at_k(n, c, k)


def test_pass_at_k_vectorized():
    got = ev.pass_at_k_per_problem([5, 5, 10], [2, 0, 3], 1)
    assert got.tolist() == pytest.approx([0.4, 0.0, 0.3])
    assert ev.pass_at_k_per_problem(5, [2, 5], 2).tolist() == pytest.approx([0.7, 1.0])
    with pytest.raises(ValueError):
        ev.pass_at_k_per_problem([5, 5], [1], 1)
    # problem 1: 2 of 4 -> pass@2 = 1 - C(2,2)/C(4,2) = 5/6; problem 2: 0 of 4 -> 0; mean 5/12
    correct = [[True, False, True, False], [False] * 4]
    assert ev.mean_pass_at_k(correct, 2) == pytest.approx(5 / 12)


def test_pass_at_1_mean_is_mean_of_per_problem_fractions():
    correct = [[True, False, True, True], [False, False, False, True], [True]]
    # 3/4, 1/4, 1/1 -> (0.75 + 0.25 + 1) / 3 = 2/3  (not 5/9 pooled over samples)
    assert ev.pass_at_1_mean(correct) == pytest.approx(2 / 3)
    assert ev.pass_at_1_mean(correct) == pytest.approx(ev.mean_pass_at_k(correct, 1))
    with pytest.raises(ValueError):
        ev.pass_at_1_mean([])
    with pytest.raises(ValueError):
        ev.pass_at_1_mean([[True], []])


# ---------------------------------------------------------------------------- majority vote / cons@k


def test_majority_vote_counts_and_ignores_none():
    assert ev.majority_vote(["3", None, None, None, "3", "4"]) == "3"  # None never wins
    assert ev.majority_vote([None, None]) is None
    assert ev.majority_vote([]) is None
    assert ev.majority_vote(["1", "2", "2"]) == "2"


def test_majority_vote_tie_goes_to_earliest_first_occurrence():
    # b and a both have 2; b appeared first (index 0) although a reached 2 first (index 2)
    assert ev.majority_vote(["b", "a", "a", "b"]) == "b"
    assert ev.majority_vote([None, "x", "y"]) == "x"
    assert ev.majority_vote(["y", None, "x", "x", "y", "z"]) == "y"


def test_majority_vote_key_groups_equivalent_answers():
    norm = lambda a: float(Fraction(a))  # noqa: E731 - "1/2" and "0.5" are the same number
    # classes: 0.5 x2 ("0.5", "1/2"), 3 x1 -> the class wins, represented by its first sample
    assert ev.majority_vote(["3", "0.5", "1/2"], key=norm) == "0.5"
    assert ev.majority_vote(["3", "0.5", "1/2"]) == "3"  # without key: three singletons, first wins


def test_cons_at_k_with_references_checker_and_k():
    answers = [["4", "4", "5"], ["1", None, "2"], [None, None], ["7", "8", "8"]]
    refs = ["4", "2", "0", "7"]
    # votes: "4" ok, "1" (tie 1/2 -> first) wrong, None wrong, "8" wrong -> 1/4
    assert ev.cons_correct(answers, refs) == [True, False, False, False]
    assert ev.cons_at_k(answers, refs) == pytest.approx(0.25)
    # first sample only: "4", "1", None, "7" -> 2/4
    assert ev.cons_at_k(answers, refs, k=1) == pytest.approx(0.5)
    # custom checker receives (vote, reference)
    numeric = lambda a, r: int(a) % 2 == int(r) % 2  # noqa: E731
    assert ev.cons_correct(answers, refs, is_correct=numeric) == [True, False, False, False]
    with pytest.raises(ValueError):
        ev.cons_at_k(answers, refs[:2])


# ---------------------------------------------------------------------------- confidence intervals


def test_wilson_hand_value_and_edges():
    # p = .8, n = 10, z^2 = 3.8416: centre (.8 + .19208)/1.38416 = .71675,
    # half 1.96*sqrt(.016 + .009604)/1.38416 = .22658 -> (.4902, .9433)
    lo, hi = ev.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = ev.wilson_interval(0, 10)
    assert lo == 0.0 and 0 < hi < 0.35  # not the degenerate [0, 0] of the normal interval
    assert ev.wilson_interval(10, 10)[1] == 1.0
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        ev.wilson_interval(3, 2)


def test_wilson_contains_p_and_shrinks_with_n():
    widths = []
    for n in (10, 100, 1000):
        lo, hi = ev.wilson_interval(7 * n // 10, n)
        assert lo < 0.7 < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_pass_at_1_ci_hand_value_contains_mean_and_shrinks():
    correct = [[True, True], [True, False], [False, False], [True, True]]
    # per-problem 1, .5, 0, 1: mean .625; sample var (.140625+.015625+.390625+.140625)/3 = .229167
    # se = sqrt(.229167)/2 = .239357; half = 1.96*se = .469140 -> (.15586, 1.09414) -> clip 1.0
    mean, lo, hi = ev.pass_at_1_ci(correct)
    assert (mean, lo, hi) == pytest.approx((0.625, 0.15586, 1.0), abs=1e-5)
    assert lo <= mean <= hi
    widths = []
    for reps in (1, 4, 16):  # same per-problem spread, more problems
        mean, lo, hi = ev.pass_at_1_ci(correct * reps)
        assert lo <= mean <= hi and mean == pytest.approx(0.625)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_mean_confidence_interval_unclipped_and_needs_two_problems():
    mean, lo, hi = ev.mean_confidence_interval([0.2, 0.4])
    # mean .3, sample std = .141421, se = .1, half = .196
    assert (mean, lo, hi) == pytest.approx((0.3, 0.104, 0.496))
    with pytest.raises(ValueError):
        ev.mean_confidence_interval([0.5])

