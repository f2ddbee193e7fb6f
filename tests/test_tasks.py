"""Tasks: hand-computed traces, split determinism/disjointness, the countdown checker, file
loading (GSM8K/MATH references, malformed rows, Parquet) and the registry."""

import json
import random
import sys

import pytest

from r1kit.tasks import (
    TASKS,
    ArithmeticTask,
    CountdownTask,
    MathFileTask,
    Problem,
    SyntheticTask,
    Task,
    check_countdown,
    evaluate_expression,
    get_task,
    register_task,
)
from r1kit.tasks.countdown import countdown_mistake
from r1kit.rewards import extract_boxed
from r1kit.tasks.math_file import split_reference


def arithmetic_problem(a, op, b):
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Problem(f"{a}{op}{b}=", str(answer), {"a": a, "b": b, "op": op})


# ---------------------------------------------------------------- arithmetic

def test_addition_think_trace_matches_the_recipe():
    task = ArithmeticTask()
    trace = task.trace(arithmetic_problem(7456, "+", 1161), random.Random(0), "think")
    assert trace == "<think>6+1+0=07,5+6+0=11,4+1+1=06,7+1+0=08</think><answer>8617</answer>"


def test_subtraction_and_multiplication_think_traces():
    task = ArithmeticTask(ops="+-*")
    sub = task.trace(arithmetic_problem(7456, "-", 1161), random.Random(0), "think")
    assert sub == "<think>6-1-0=5,15-6-0=9,4-1-1=2,7-1-0=6</think><answer>6295</answer>"
    mul = task.trace(arithmetic_problem(123, "*", 45), random.Random(0), "think")
    assert mul == "<think>123*5=615,123*40=4920,615+4920=5535</think><answer>5535</answer>"
    zeros = task.trace(arithmetic_problem(1000, "-", 999), random.Random(0), "think")
    assert zeros.endswith("<answer>1</answer>")


def test_default_problems_are_fixed_length_four_digit_sums():
    problems = ArithmeticTask().problems("train", 300)
    for problem in problems:
        a, b = problem.meta["a"], problem.meta["b"]
        assert problem.prompt == f"{a}+{b}=" and 1000 <= a <= 9999 and 1000 <= b <= 9999
        assert len(problem.answer) == 4 and int(problem.answer) == a + b


@pytest.mark.parametrize("ops, digits, digits_b", [("+", 4, 4), ("-", 3, 3), ("*", 3, 2), ("+-*", 2, 3), ("+", 3, 1)])
def test_traces_of_every_style_have_the_right_correctness(ops, digits, digits_b):
    task = ArithmeticTask(digits=digits, ops=ops, digits_b=digits_b, fixed_length=False)
    rng = random.Random(1)
    for problem in task.problems("train", 150):
        think = task.reward(task.trace(problem, rng, "think"), problem)
        assert (think["accuracy"], think["format"], think["think"]) == (1.0, 1.0, 1.0), problem
        slip_trace = task.trace(problem, rng, "slip")
        slip = task.reward(slip_trace, problem)
        assert (slip["accuracy"], slip["format"]) == (0.0, 1.0), (problem, slip_trace)
        assert set(slip_trace) <= set("0123456789+-*=,<>/thinkasweru")  # digits, operators, tags
        direct = task.reward(task.trace(problem, rng, "direct"), problem)
        assert (direct["format"], direct["think"]) == (0.0, 0.0)


def test_direct_error_rate_is_a_parameter():
    problems = ArithmeticTask().problems("train", 400)

    def accuracy(rate):
        task = ArithmeticTask(direct_error_rate=rate)
        rng = random.Random(0)
        return sum(task.reward(task.trace(p, rng, "direct"), p)["accuracy"] for p in problems) / len(problems)

    assert accuracy(0.0) == 1.0
    assert accuracy(1.0) == 0.0
    assert 0.35 < accuracy(0.5) < 0.65


def test_reward_parts_and_total():
    task = ArithmeticTask()
    problem = arithmetic_problem(7456, "+", 1161)
    parts = task.reward("<think>6+1+0=07</think>\n<answer>8617</answer>", problem)
    assert parts == {"accuracy": 1.0, "format": 1.0, "language": 1.0, "think": 1.0, "total": pytest.approx(1.1)}
    assert task.reward("<answer>8617</answer>", problem)["total"] == 1.0
    assert task.reward("<think>x</think><answer>8618</answer>", problem)["total"] == pytest.approx(0.1)
    no_think_required = ArithmeticTask(require_think=False, weights={"accuracy": 1.0, "format": 0.5})
    assert no_think_required.reward("<answer>8617</answer>", problem)["total"] == 1.5


@pytest.mark.parametrize("answer, ok", [("8617", True), (" 8617 ", True), ("08617", True), ("8618", False),
                                        ("86 17", False), ("8617.0", False), ("", False), ("9" * 5000, False)])
def test_arithmetic_verify(answer, ok):
    assert ArithmeticTask().verify(answer, arithmetic_problem(7456, "+", 1161)) is ok


def test_synthetic_splits_are_deterministic_disjoint_and_prefix_stable():
    task = ArithmeticTask(digits=3, ops="+-")
    train, test = task.problems("train", 2000), task.problems("test", 200)
    assert train == ArithmeticTask(digits=3, ops="+-").problems("train", 2000)
    assert task.problems("train", 50) == train[:50]
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert len({p.prompt for p in train}) == len(train)
    assert ArithmeticTask(digits=3, ops="+-", seed=1).problems("train", 50) != train[:50]
    assert task.problems("test", 0) == []
    assert len(ArithmeticTask(train_size=30, test_size=7).problems("test")) == 7


def test_split_errors():
    task = ArithmeticTask(digits=1)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        task.problems("valid")
    with pytest.raises(ValueError, match="problem space is too small"):
        task.problems("test", 100)  # 1-digit sums under 10: only 36 problems exist
    with pytest.raises(ValueError, match="ops must be"):
        ArithmeticTask(ops="+/")
    with pytest.raises(ValueError, match="unknown trace style 'chatty'"):
        task.trace(task.problems("train", 1)[0], random.Random(0), "chatty")


# ----------------------------------------------------------------- countdown

@pytest.mark.parametrize(
    "answer, numbers, target, reason",
    [
        ("25 + 3 * 2", [2, 3, 25], 31, None),
        ("(25+3*2)", [25, 3, 2], 31, None),
        ("25 + 3*2 = 31", [2, 3, 25], 31, None),
        ("4 / (3 / 6)", [3, 4, 6], 8, None),  # fractional intermediate, exact arithmetic
        ("25 × 2 − 3 ÷ 3", [25, 2, 3, 3], 49, None),
        ("25 + 3 * 2 = 30", [2, 3, 25], 31, "claims '30'"),
        ("25 + 3 * 3", [2, 3, 25], 34, "uses [25, 3, 3]"),  # reused number
        ("25 + 4 * 2", [2, 3, 25], 33, "uses [25, 4, 2]"),  # wrong number
        ("25 + 6", [2, 3, 25], 31, "uses [25, 6]"),  # a computed number is not a given one
        ("25 + 3", [2, 3, 25], 28, "each exactly once"),  # unused number
        ("25 + 3 * 2", [2, 3, 25], 32, "evaluates to 31"),
        ("25 / (3 - 3) + 2", [2, 3, 3, 25], 1, "division by zero"),
        ("-2 + 3 + 25", [2, 3, 25], 26, "UnaryOp is not allowed"),
        ("2 ** 3 + 25", [2, 3, 25], 33, "Pow is not allowed"),
        ("25 // 3 + 2", [2, 3, 25], 10, "FloorDiv is not allowed"),
        ("(2)(3)", [2, 3], 6, "Call is not allowed"),
        ("2.5 * 2", [2, 2], 5, "only digits"),
        ("abc", [2, 3, 25], 31, "only digits"),
        ("__import__('os').system('x')", [1], 1, "only digits"),
        ("(2 + 3", [2, 3], 5, "not an expression"),
        ("2 3", [2, 3], 5, "not an expression"),
        ("", [2, 3], 5, "not an expression"),
        ("0x1F", [31], 31, "only digits"),
        ("(" * 150 + "1" + ")" * 150, [1], 1, "longer than"),
    ],
)
def test_countdown_checker(answer, numbers, target, reason):
    mistake = countdown_mistake(answer, numbers, target)
    if reason is None:
        assert mistake is None and check_countdown(answer, numbers, target)
    else:
        assert mistake is not None and reason in mistake, mistake
        assert not check_countdown(answer, numbers, target)


def test_countdown_at_most_once_rule():
    assert not check_countdown("25 + 3", [2, 3, 25], 28)
    assert check_countdown("25 + 3", [2, 3, 25], 28, use_all=False)
    assert not check_countdown("25 + 3 + 3", [2, 3, 25], 31, use_all=False)


def test_evaluate_expression_is_exact():
    value, used = evaluate_expression("1/3 + 1/3 + 1/3")
    assert value == 1 and used == [1, 3, 1, 3, 1, 3]


@pytest.mark.parametrize("n_numbers", [3, 4])
def test_countdown_problems_are_solvable_and_in_range(n_numbers):
    task = CountdownTask(n_numbers=n_numbers, max_target=100, max_number=20)
    rng = random.Random(0)
    for problem in task.problems("train", 200):
        numbers, target = problem.meta["numbers"], problem.meta["target"]
        assert len(numbers) == n_numbers and all(1 <= n <= 20 for n in numbers) and 1 <= target <= 100
        assert problem.prompt == f"{target} from {','.join(map(str, numbers))}="
        assert task.verify(problem.answer, problem)
        think = task.reward(task.trace(problem, rng, "think"), problem)
        assert (think["accuracy"], think["format"]) == (1.0, 1.0)
        slip = task.reward(task.trace(problem, rng, "slip"), problem)
        assert (slip["accuracy"], slip["format"]) == (0.0, 1.0)


def test_countdown_split_is_disjoint_up_to_number_order():
    task = CountdownTask()
    train, test = task.problems("train", 1000), task.problems("test", 100)
    key = lambda p: (tuple(sorted(p.meta["numbers"])), p.meta["target"])  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in test}
    assert train == CountdownTask().problems("train", 1000)


def test_countdown_text_prompt_and_validation():
    problem = CountdownTask(prompt_style="text").problems("train", 1)[0]
    assert "each number must be used exactly once" in problem.prompt and "<answer>" in problem.prompt
    with pytest.raises(ValueError, match="n_numbers must be in 2..6"):
        CountdownTask(n_numbers=1)


# ----------------------------------------------------------------- math files

def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


GSM8K_ROWS = [
    {"question": f"Tom has {i} apples and buys 2 more. How many?",
     "answer": f"He has {i}+2=<<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"}
    for i in range(20)
]


def test_reference_extraction():
    assert split_reference("a\n#### 1,234") == ("1,234", "a")
    assert split_reference("So $x=\\boxed{\\frac{\\sqrt{3}}{2}}$.")[0] == "\\frac{\\sqrt{3}}{2}"
    assert split_reference("\\frac{1}{2}") == ("\\frac{1}{2}", None)
    assert extract_boxed("\\boxed{1} then \\boxed{{2}}") == "{2}"
    assert extract_boxed("\\boxed{unclosed") is None


def test_gsm8k_file_split_verify_and_trace(tmp_path):
    task = MathFileTask(write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS), seed=3)
    train, test = task.problems("train"), task.problems("test")
    assert len(train) == 18 and len(test) == 2
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert test == MathFileTask(tmp_path / "gsm.jsonl", seed=3).problems("test")
    problem = next(p for p in train if p.prompt.startswith("Tom has 5 "))
    assert problem.answer == "7" and problem.meta["source"].endswith("gsm.jsonl:6")
    assert task.reward("<think>5+2</think><answer>\\boxed{7}</answer>", problem)["accuracy"] == 1.0
    assert task.reward("<think>5+2</think><answer>7.0</answer>", problem)["accuracy"] == 1.0
    assert task.reward("<think>5+2</think><answer>8</answer>", problem)["accuracy"] == 0.0
    assert task.trace(problem, random.Random(0), "think") == (
        "<think>He has 5+2=7 apples.</think><answer>7</answer>"
    )
    assert task.trace(problem, random.Random(0), "direct") == "<answer>7</answer>"
    with pytest.raises(ValueError, match="unknown trace style 'slip'"):
        task.trace(problem, random.Random(0), "slip")


def test_math_style_fields_template_and_test_file(tmp_path):
    rows = [{"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
            {"problem": "Root of 8?", "solution": "$\\boxed{2\\sqrt{2}}$"}]
    test_rows = [{"problem": "Root of 8?", "solution": "$\\boxed{2\\sqrt{2}}$"}, {"problem": "Two?", "solution": "2"}]
    train_file, test_file = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "test.jsonl", test_rows)
    task = MathFileTask(train_file, test_path=test_file, prompt_template="Q: {question}\nA:")
    train, test = task.problems("train"), task.problems("test")
    assert [p.prompt for p in train] == ["Q: Half of one?\nA:"]  # the test question is dropped from train
    assert [p.answer for p in test] == ["2\\sqrt{2}", "2"]
    assert task.verify("0.5", train[0]) and task.verify("\\sqrt{8}", test[0]) and not task.verify("2", test[0])
    with pytest.raises(ValueError, match="no worked solution"):
        task.trace(test[1], random.Random(0), "think")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "Q?", "answer": "#### 3"', r"bad\.jsonl:3: invalid JSON"),
        ('[1, 2]', r"bad\.jsonl:3: expected one JSON object per line"),
        ('{"question": "Q?"}', r"bad\.jsonl:3: no answer field 'answer' or 'solution'; the row has \['question'\]"),
        ('{"question": "Q?", "answer": "#### }{"}', r"bad\.jsonl:3: field 'answer': cannot parse reference"),
        ('{"question": "Q?", "answer": "text ####  "}', r"bad\.jsonl:3: no reference answer in field 'answer'"),
        ('{"question": "", "answer": "#### 3"}', r"bad\.jsonl:3: field 'question' must be a non-empty string"),
        ('{"question": "Q?", "answer": ["3"]}', r"bad\.jsonl:3: field 'answer' must be a string or number"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], "", bad_line])
    with pytest.raises(ValueError, match=message):
        MathFileTask(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        MathFileTask(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        MathFileTask(write_jsonl(tmp_path / "data.csv", GSM8K_ROWS))
    with pytest.raises(ValueError, match="has no problems"):
        MathFileTask(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match=r"no question field 'q'"):
        MathFileTask(write_jsonl(tmp_path / "x.jsonl", GSM8K_ROWS), question_field="q")


def test_numeric_answers_and_duplicates(tmp_path):
    rows = [{"question": "A?", "answer": 3}, {"question": "A?", "answer": 3}, {"question": "B?", "answer": 4.5}]
    task = MathFileTask(write_jsonl(tmp_path / "n.jsonl", rows))
    problems = task.problems("train") + task.problems("test")
    assert sorted(p.answer for p in problems) == ["3", "4.5"]


def test_parquet_files(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS[:5] + [{"question": "Bad?", "answer": "#### }{"}]), path)
    with pytest.raises(ValueError, match=r"gsm\.parquet:row 6: field 'answer'"):
        MathFileTask(path)
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS[:5]), path)
    assert len(MathFileTask(path).problems("train")) == 4
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # simulate pyarrow not installed
    with pytest.raises(ImportError, match=r"needs the 'pyarrow' package: pip install 'r1kit\[math\]'"):
        MathFileTask(path)


# ------------------------------------------------------------------- registry

def test_registry_and_user_tasks():
    assert {"arithmetic", "countdown", "math_file"} <= set(TASKS)
    assert isinstance(get_task("countdown", n_numbers=4), CountdownTask)
    assert isinstance(get_task("r1kit.tasks.arithmetic:ArithmeticTask", digits=2), ArithmeticTask)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="is not a subclass"):
        get_task("random:Random")
    with pytest.raises(ValueError, match="cannot load task"):
        get_task("no_such_module_xyz:Task")

    @register_task
    class ParityTask(SyntheticTask):
        name = "parity_test_only"

        def sample(self, rng):
            n = rng.randrange(10**6)
            return Problem(f"{n}%2=", str(n % 2))

        def verify(self, answer, problem):
            return answer.strip() == problem.answer

    try:
        task = get_task("parity_test_only", seed=1)
        problem = task.problems("train", 1)[0]
        assert task.reward(f"<think>x</think><answer>{problem.answer}</answer>", problem)["accuracy"] == 1.0
        with pytest.raises(ValueError, match="already registered"):
            register_task(type("Clash", (Task,), {"name": "parity_test_only"}))
    finally:
        TASKS.pop("parity_test_only")


def test_problems_are_hashable_and_base_task_explains_missing_methods():
    assert len({Problem("a", "1", {"x": 1}), Problem("a", "1", {"x": 2})}) == 1
    with pytest.raises(NotImplementedError, match="must implement"):
        Task().problems("train")
    with pytest.raises(NotImplementedError, match="no synthetic traces"):
        Task().trace(Problem("a", "1"), random.Random(0))


def test_task_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"weights for unknown reward parts \['acuracy'\]"):
        ArithmeticTask(weights={"acuracy": 1.0})
    with pytest.raises(ValueError, match="unsupported lang 'xx'"):
        CountdownTask(lang="xx")
    problem = Problem("1 from 1=", "1", {"numbers": [1], "target": 1})
    assert CountdownTask(lang="zh").reward("<think>先</think><answer>1</answer>", problem)["language"] == 1.0


# ---------------------------------------------------------------- answer formats

def test_default_answer_format_keeps_the_tiny_tasks_unchanged():
    """Tags and no instruction by default: the tiny recipes' prompts and rewards stay as they were."""
    task = ArithmeticTask(digits=2)
    problem = task.problems("train", 1)[0]
    assert task.answer_format == "tags" and task.instruction == ""
    assert task.render(problem) == problem.prompt
    right = task.trace(problem, random.Random(0), "think")
    assert task.reward(right, problem)["accuracy"] == 1.0
    assert task.reward(problem.answer, problem)["accuracy"] == 0.0  # a bare number is not an answer


@pytest.mark.parametrize("fmt, text, marker", [
    ("last_number", "So the result is {n}.", "Answer: "),
    ("boxed", "So the result is \\boxed{{{n}}}, done.", "\\boxed{}"),
    ("auto", "So the result is {n}", "\\boxed{}"),
])
def test_answer_format_drives_prompt_extraction_and_reward(fmt, text, marker):
    task = ArithmeticTask(digits=2, answer_format=fmt)
    problem = task.problems("test", 1)[0]
    assert task.render(problem).startswith(problem.prompt + "\n") and marker in task.render(problem)
    parts = task.reward(text.format(n=problem.answer), problem)
    assert parts["accuracy"] == 1.0
    wrong = task.reward(text.format(n=int(problem.answer) + 1), problem)
    assert wrong["accuracy"] == 0.0
    # default weights: accuracy 1 + format 0.1 × the format part
    assert parts["total"] == pytest.approx(1.0 + 0.1 * parts["format"])


def test_format_reward_weight_zero_turns_it_off_and_instruction_overrides():
    task = ArithmeticTask(digits=2, answer_format="boxed", weights={"accuracy": 1.0, "format": 0.0},
                          instruction="Box it.")
    problem = task.problems("test", 1)[0]
    parts = task.reward(f"\\boxed{{{int(problem.answer) + 1}}}", problem)
    assert parts["format"] == 1.0 and parts["total"] == 0.0
    assert task.render(problem) == problem.prompt + "\nBox it."
    assert ArithmeticTask(answer_format="boxed", instruction="").render(problem) == problem.prompt


def test_unknown_answer_format_is_a_clear_error():
    with pytest.raises(ValueError, match="arithmetic: answer_format 'xml'; choose one of"):
        get_task("arithmetic", answer_format="xml")


def test_math_file_auto_format_reads_latex_with_math_verify(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"question": "Half of 1?", "answer": "\\frac{1}{2}"}) + "\n"
                    + json.dumps({"question": "Two?", "answer": "2"}) + "\n")
    task = MathFileTask(path, test_fraction=0.5, answer_format="auto")
    problem = Problem("q", "\\frac{1}{2}")
    assert task.reward("so it is $\\frac{1}{2}$.", problem)["accuracy"] == 1.0
    assert task.reward("so it is 0.5", problem)["accuracy"] == 1.0
    assert task.reward("so it is $\\frac{1}{3}$.", problem)["accuracy"] == 0.0


# ---------------------------------------------------------------- word problems (real-model task)

from r1kit.tasks import WordProblemTask  # noqa: E402


@pytest.mark.parametrize("kind", ["add", "add_sub", "mul"])
def test_word_problems_answers_are_exact_and_splits_disjoint(kind):
    task = WordProblemTask(kind=kind, digits=2)
    train, test = task.problems("train", 300), task.problems("test", 30)
    assert not {task.split_key(p) for p in train} & {task.split_key(p) for p in test}
    for p in train[:50]:
        m = p.meta
        expected = {"add": m["a"] + m["b"], "add_sub": m["a"] + m["b"] - m["c"], "mul": m["a"] * m["b"]}[kind]
        assert int(p.answer) == expected > 0
        assert str(m["a"]) in p.prompt and str(m["b"]) in p.prompt
    assert task.problems("test", 30) == test  # seeded


def test_word_problems_grade_free_text_by_default():
    task = WordProblemTask(kind="add", digits=1)
    problem = Problem("Mia has 5 apples and gets 7 more. How many apples does Mia have now?", "12",
                      {"kind": "add", "a": 5, "b": 7, "c": 0})
    assert "Answer: " in task.render(problem)
    assert task.reward("5 + 7 = 12 Apples Mia has now.", problem)["accuracy"] == 1.0
    assert task.reward("Mia has 5 + 7 = 12 apples. Answer: 12", problem)["format"] == 1.0
    assert task.reward("Mia has 5 + 7 = 13 apples.", problem)["accuracy"] == 0.0
    assert task.reward("12.0", problem)["accuracy"] == 1.0
    trace = task.trace(problem, random.Random(0), "think")
    assert trace == "5 + 7 = 12.\nAnswer: 12" and task.reward(trace, problem)["total"] == pytest.approx(1.1)


def test_word_problems_small_spaces_size_themselves_and_bad_kinds_fail():
    task = WordProblemTask(kind="add", digits=1)  # 64 pairs in all
    assert len(task.problems("train")) == task.train_size < 64
    with pytest.raises(ValueError, match="word_problems: kind 'div'; choose one of"):
        get_task("word_problems", kind="div")


def test_smollm2_recipe_loads_and_one_grpo_step_runs_on_a_tiny_llama(tmp_path, monkeypatch):
    """The real-model recipe, unchanged but for the base, sizes and paths: a tiny random Llama
    with a ChatML template samples word problems rendered with the format instruction."""
    from pathlib import Path

    import torch

    import r1kit
    from r1kit.config import load_config
    from r1kit.engine import SamplingParams
    from r1kit.models.llama import Llama, LlamaConfig
    from r1kit.rollout import rollout
    from r1kit.stages import grpo
    from r1kit.tokenizer import build_bpe_tokenizer

    recipe = Path(grpo.__file__).parent.parent / "recipes" / "r1_zero_smollm2.toml"
    cfg = load_config(grpo.GRPOConfig, recipe, [
        f"grpo.base={json.dumps(str(tmp_path / 'base'))}", f"out_dir={json.dumps(str(tmp_path / 'run'))}",
        "steps=1", "max_new_tokens=8", "prompts_per_step=2", "group_size=4", "eval_problems=2"], section="grpo")
    assert cfg.task == "word_problems" and cfg.task_args["answer_format"] == "last_number" and cfg.kl_coef == 0
    task = get_task(cfg.task, **cfg.task_args)
    corpus = [task.render(p) + " " + task.trace(p, random.Random(0)) for p in task.problems("train", 40)]
    tok = build_bpe_tokenizer(corpus, vocab_size=400, style="chatml")
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, tie_word_embeddings=True)).init_weights(0)
    r1kit.save(model, tok, tmp_path / "base")
    problem = task.problems("train", 1)[0]
    (group,) = rollout(model, tok, task, [problem], SamplingParams(max_new_tokens=4, n=2, seed=0))
    assert "Answer: " in tok.decode(group[0].prompt_ids) and problem.prompt in tok.decode(group[0].prompt_ids)
    assert set(group[0].reward) >= {"accuracy", "format", "total"}
    # a random model never answers right: vary the rewards so the step really updates
    monkeypatch.setattr(grpo, "rewards_of", lambda cfg, rollouts: torch.rand(len(rollouts)))
    summary = grpo.run(cfg)
    assert summary["steps"] == 1 and "stopped" not in summary and summary["task"] == "word_problems"
    (m,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_accuracy", "reward_format", "response_length"} <= set(m) and m["grad_norm"] > 0
    assert m["trained_groups"] == 2
