"""Reward functions: hand-computed cases for extraction, format, accuracy, math-verify grading,
language consistency, the overlong penalty and weighted combination."""

import threading

import pytest

from r1kit.rewards import (
    RewardError,
    accuracy_reward,
    combine,
    extract_answer,
    format_reward,
    has_think,
    language_consistency,
    math_verify_equal,
    overlong_penalty,
    parse_reference,
)

GOOD = "<think>6+1+0=07,5+6+0=11,4+1+1=06,7+1+0=08</think><answer>8617</answer>"


def exact(answer, reference):
    return answer == reference


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD, "8617"),
        ("<think>\nwork\n</think>\n\n<answer>\n 8617 \n</answer>\n", "8617"),
        ("<answer>1</answer><answer>2</answer>", "2"),
        ("<answer>outer <answer>inner</answer>", "inner"),
        ("<think>x</think><answer>8617", None),  # truncated before the closing tag
        ("no tags at all", None),
        ("</answer><answer>", None),
        ("<answer></answer>", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, require_think, expected",
    [
        (GOOD, True, 1.0),
        ("  <think>\na\n</think>\n<answer>7</answer>\n\n", True, 1.0),
        ("<answer>7</answer>", True, 0.0),
        ("<answer>7</answer>", False, 1.0),
        (GOOD, False, 1.0),
        ("<think></think><answer>7</answer>", True, 0.0),  # empty reasoning does not count
        ("<think>a</think><answer> </answer>", True, 0.0),
        ("Sure! <think>a</think><answer>7</answer>", True, 0.0),
        ("<think>a</think><answer>7</answer> and more", True, 0.0),
        ("<think>a</think><answer>7</answer><answer>8</answer>", True, 0.0),
        ("<think>a</think><think>b</think><answer>7</answer>", True, 0.0),
        ("<think>a<answer>7</answer></think><answer>7</answer>", True, 0.0),
        ("<answer>7</answer><think>a</think>", False, 0.0),
        ("<think>a</think>", True, 0.0),
    ],
)
def test_format_reward(text, require_think, expected):
    assert format_reward(text, require_think=require_think) == expected


def test_has_think():
    assert has_think(GOOD)
    assert not has_think("<answer>1</answer>")
    assert not has_think("<think>  </think><answer>1</answer>")
    assert not has_think("<think>never closed")


def test_accuracy_reward_scores_the_last_answer():
    assert accuracy_reward(GOOD, "8617", exact) == 1.0
    assert accuracy_reward("<answer>8617</answer><answer>1</answer>", "8617", exact) == 0.0
    assert accuracy_reward("8617", "8617", exact) == 0.0  # no answer tag, no credit


def test_accuracy_reward_reports_a_failing_verifier():
    def broken_verifier(answer, reference):
        raise KeyError("numbers")

    with pytest.raises(RewardError, match=r"accuracy reward: verifier .*broken_verifier raised KeyError.*'8617'"):
        accuracy_reward(GOOD, "8617", broken_verifier)


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("72", "72", True),
        ("72.0", "72", True),
        ("1,234", "1234", True),
        ("-7", "-7", True),
        ("\\boxed{72}", "72", True),
        ("The answer is \\boxed{\\frac{1}{2}}", "0.5", True),
        ("1/2", "\\frac{1}{2}", True),
        ("\\dfrac{3}{4}", "0.75", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("2\\sqrt{2}", "2", False),  # the leading 2 alone must not match
        ("73", "72", False),
        ("banana", "72", False),
        ("", "72", False),
        ("7" * 5000, "7", False),  # absurdly long answers are wrong, not slow
    ],
)
def test_math_verify_equal(answer, reference, expected):
    assert math_verify_equal(answer, reference) is expected


def test_parse_reference_rejects_garbage_and_is_reusable():
    with pytest.raises(ValueError, match="cannot parse reference answer"):
        parse_reference("}{")
    parsed = parse_reference("\\frac{1}{2}")
    assert math_verify_equal("0.5", parsed)
    # An unparseable reference never yields reward 1, even for an identical answer string.
    with pytest.raises(ValueError):
        math_verify_equal("}{", "}{")


def test_math_verify_equal_works_off_the_main_thread():
    # math_verify's signal-based timeout fails in threads; the wrapper must not.
    results = []
    worker = threading.Thread(target=lambda: results.append(math_verify_equal("\\frac{6}{4}", "1.5")))
    worker.start()
    worker.join()
    assert results == [True]


@pytest.mark.parametrize(
    "text, lang, expected",
    [
        ("<think>first add the ones</think><answer>5</answer>", "en", 1.0),
        ("<think>先 加 个位</think>", "zh", 1.0),
        ("<think>first 先加</think>", "en", 1 / 3),  # 1 Latin word, 2 ideographs
        ("<think>first 先加</think>", "zh", 2 / 3),
        ("<think>1+6+0=07,5+6+0=11</think><answer>8617</answer>", "en", 1.0),  # no words
        ("<think>area is πr, θ = 2</think>", "en", 1.0),  # Greek letters are math, not language
        ("<think>сумма is</think>", "en", 0.5),
        ("<think>unclosed reasoning 中", "en", 2 / 3),
        ("no tags, just words", "en", 1.0),
    ],
)
def test_language_consistency(text, lang, expected):
    assert language_consistency(text, lang) == pytest.approx(expected)


def test_language_consistency_ignores_the_answer_and_rejects_unknown_languages():
    assert language_consistency("<think>reason here</think><answer>答案</answer>", "en") == 1.0
    with pytest.raises(ValueError, match="unsupported lang 'fr'"):
        language_consistency("x", "fr")


def test_overlong_penalty():
    assert [overlong_penalty(n, 1000, 200) for n in (0, 800, 900, 1000, 1001)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(850, 1000, 200) == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="cache_tokens"):
        overlong_penalty(10, 100, 200)


def test_combine():
    parts = {"accuracy": 1.0, "format": 1.0, "language": 0.5, "think": 1.0}
    assert combine(parts, {"accuracy": 1.0, "format": 0.1}) == pytest.approx(1.1)
    assert combine(parts, {"accuracy": 1.0, "language": 0.2}) == pytest.approx(1.1)
    assert combine(parts, {}) == 0.0
    with pytest.raises(ValueError, match="'overlong' has no matching reward part"):
        combine(parts, {"overlong": 1.0})


# ---------------------------------------------------------------- answer formats (real models)

from r1kit.rewards import (  # noqa: E402
    ANSWER_FORMATS,
    answer_format_reward,
    extract_boxed,
    extract_final,
    extract_last_number,
    math_verify_extract,
)

SMOLLM_TEXT = "5 + 7 = 12 Apples Mia has now."  # SmolLM2-135M-Instruct's own words: no tags


@pytest.mark.parametrize(
    "text, fmt, expected",
    [
        (SMOLLM_TEXT, "tags", None),
        (SMOLLM_TEXT, "last_number", "12"),
        (SMOLLM_TEXT, "auto", "12"),
        (SMOLLM_TEXT, "boxed", None),
        ("Mia has 5 + 7 = \\boxed{12} apples, not 13.", "boxed", "12"),
        ("Mia has 5 + 7 = \\boxed{12} apples, not 13.", "last_number", "13"),
        ("Mia has 5 + 7 = \\boxed{12} apples, not 13.", "auto", "12"),  # a box outranks a stray number
        ("<answer>12</answer> \\boxed{13} 14", "auto", "12"),  # tags outrank everything
        ("\\boxed{\\frac{1}{2}} then \\boxed{{3}}", "boxed", "{3}"),  # the last box, braces nested
        ("so \\boxed{12", "boxed", None),  # truncated box: no answer
        ("The total is 1,234 coins.", "last_number", "1234"),
        ("It is -3.5 degrees.", "last_number", "-3.5"),
        ("Answer: 42.", "last_number", "42"),
        ("version2 of x3", "last_number", None),  # digits glued to words are not numbers
        ("no digits here", "auto", None),
    ],
)
def test_extract_final(text, fmt, expected):
    assert extract_final(text, fmt) == expected


def test_extract_final_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="answer_format 'xml'; choose one of"):
        extract_final("12", "xml")


def test_last_number_reads_the_smollm_case_as_correct():
    """The issue's case: the right number in free text scores 1 with last_number, 0 with tags."""
    def same(a, r):
        return int(a) == int(r)
    assert accuracy_reward(SMOLLM_TEXT, "12", same, extract_last_number) == 1.0
    assert accuracy_reward(SMOLLM_TEXT, "12", same) == 0.0  # the tags default: no <answer>
    assert accuracy_reward("5 + 7 = 13 apples.", "12", same, extract_last_number) == 0.0


@pytest.mark.parametrize(
    "text, fmt, expected",
    [
        ("so it is \\boxed{12}.", "boxed", 1.0),
        ("\\boxed{12} or \\boxed{13}", "boxed", 0.0),  # two boxes: ambiguous
        ("\\boxed{}", "boxed", 0.0),
        ("12 apples", "boxed", 0.0),
        ("5 + 7 = 12. Answer: 12", "last_number", 1.0),
        ("Answer: **12**.", "last_number", 1.0),
        ('The answer is "12".', "last_number", 1.0),
        ("Answer: 12 apples", "last_number", 0.0),  # the number is not the last word
        (SMOLLM_TEXT, "last_number", 0.0),
        ("<think>x</think><answer>12</answer>", "tags", 1.0),
        ("<think>x</think><answer>12</answer>", "auto", 1.0),
        ("so \\boxed{12} it is", "auto", 1.0),
        ("12 apples", "auto", 0.0),
    ],
)
def test_answer_format_reward(text, fmt, expected):
    assert answer_format_reward(text, fmt) == expected


def test_every_format_has_an_extractor_and_a_format_reward():
    for fmt in ANSWER_FORMATS:
        assert extract_final("<answer>7</answer>", fmt) in ("7", None)
        assert answer_format_reward("<think>a</think><answer>7</answer>", fmt) in (0.0, 1.0)


def test_math_verify_extract_keeps_latex_whole_and_grades_it():
    text = "Half of the cake: the answer is $\\frac{1}{2}$."
    answer = math_verify_extract(text, "auto")
    assert answer == "\\frac{1}{2}" and math_verify_equal(answer, "0.5")
    assert extract_final(text, "auto") == "2"  # the plain reading would grade it wrong
    assert math_verify_extract("see \\boxed{7} not 8", "auto") == "7"
    assert math_verify_extract("see \\boxed{7} not 8", "last_number") == "8"
    assert extract_boxed("\\fbox{3}") == "3"
