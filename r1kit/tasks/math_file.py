"""Math word problems from a user's JSONL or Parquet file, graded with math-verify.

Each row needs a question and an answer field. The reference is taken from the answer field:
GSM8K style (``... #### 42``: the text after the last ``####``), MATH style (the last
``\\boxed{...}`` in a solution), or else the whole field as a short answer (``\\frac{1}{2}``).
Every reference is parsed at load time; a row that cannot be read or parsed fails the load
with ``file:line`` in the message, so it can never be silently graded.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from r1kit.common import require
from r1kit.rewards import extract_boxed, math_verify_equal, math_verify_extract, parse_reference
from r1kit.tasks.base import Problem, Task, check_style, completion, register_task

QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution")
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<48/2=24>>" annotations: tool calls, not prose


def split_reference(answer_text: str) -> tuple[str | None, str | None]:
    """(reference answer, worked solution or None) from an answer field.

    >>> split_reference("She pays 2*3=<<2*3=6>>6 dollars.\\n#### 6")
    ('6', 'She pays 2*3=6 dollars.')
    >>> split_reference("Hence $\\\\boxed{7}$.")
    ('7', 'Hence $\\\\boxed{7}$.')
    >>> split_reference(" 42 ")
    ('42', None)
    """
    if "####" in answer_text:
        solution, _, reference = answer_text.rpartition("####")
        return reference.strip() or None, _CALCULATOR_NOTE.sub("", solution).strip() or None
    if "\\boxed" in answer_text or "\\fbox" in answer_text:
        return extract_boxed(answer_text), answer_text.strip()
    return answer_text.strip() or None, None


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs; location is ``file:line`` for JSONL, ``file:row N`` for Parquet."""
    if not path.is_file():
        raise FileNotFoundError(f"math_file: no such file: {path}")
    if path.suffix == ".parquet":
        pq = require("pyarrow.parquet", f"reading {path} (or convert it to JSONL)")
        return [(f"{path}:row {i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"math_file: {path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(row, dict):
                kind = type(row).__name__
                raise ValueError(f"{path}:{number}: expected one JSON object per line (JSONL), got {kind}")
            rows.append((f"{path}:{number}", row))
    return rows


def _pick_field(row: dict, field: str | None, candidates: tuple[str, ...], kind: str, where: str) -> str:
    names = (field,) if field else candidates
    for name in names:
        if name in row:
            return name
    raise ValueError(f"{where}: no {kind} field {' or '.join(map(repr, names))}; the row has {sorted(row)}")


@register_task
class MathFileTask(Task):
    """Problems from ``path``; test problems from ``test_path`` if given, else a seeded
    ``test_fraction`` of the unique questions (duplicates are dropped so the splits stay disjoint).

    ``prompt_template`` formats the question (``{question}``). ``trace`` returns the file's own
    worked solution for "think" and the bare reference for "direct"; "slip" is unsupported.
    """

    name = "math_file"

    def __init__(self, path: str | Path, answer_field: str | None = None, question_field: str | None = None,
                 seed: int = 0, test_path: str | Path | None = None, test_fraction: float = 0.1,
                 prompt_template: str = "{question}", **kwargs):
        super().__init__(seed=seed, **kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"math_file: test_fraction must be in (0, 1), got {test_fraction}")
        if "{question}" not in prompt_template:
            raise ValueError(f"math_file: prompt_template must contain {{question}}, got {prompt_template!r}")
        self.path, self.test_path = Path(path), None if test_path is None else Path(test_path)
        self.answer_field, self.question_field = answer_field, question_field
        self.test_fraction, self.prompt_template = test_fraction, prompt_template
        problems = self._load_file(self.path)
        if self.test_path is not None:
            test = self._load_file(self.test_path)
            held_out = {problem.prompt for problem in test}
            # A question in both files would leak the test set into training: train drops it.
            self._splits = {"train": [p for p in problems if p.prompt not in held_out], "test": test}
        else:
            self._splits = self._random_split(problems)

    def _load_file(self, path: Path) -> list[Problem]:
        problems, seen = [], set()
        for where, row in _read_rows(path):
            question_name = _pick_field(row, self.question_field, QUESTION_FIELDS, "question", where)
            answer_name = _pick_field(row, self.answer_field, ANSWER_FIELDS, "answer", where)
            question, answer_text = row[question_name], row[answer_name]
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: field {question_name!r} must be a non-empty string, got {question!r:.80}")
            if isinstance(answer_text, (int, float)) and not isinstance(answer_text, bool):
                answer_text = str(answer_text)
            if not isinstance(answer_text, str):
                kind = type(answer_text).__name__
                raise ValueError(f"{where}: field {answer_name!r} must be a string or number, got {kind}")
            reference, solution = split_reference(answer_text)
            if reference is None:
                raise ValueError(f"{where}: no reference answer in field {answer_name!r}: {answer_text!r:.80}")
            try:
                parse_reference(reference)
            except ValueError as error:
                raise ValueError(f"{where}: field {answer_name!r}: {error}") from None
            prompt = self.prompt_template.format(question=question.strip())
            if prompt in seen:
                continue
            seen.add(prompt)
            problems.append(Problem(prompt=prompt, answer=reference, meta={"source": where, "solution": solution}))
        if not problems:
            raise ValueError(f"math_file: {path} has no problems")
        return problems

    def _random_split(self, problems: list[Problem]) -> dict[str, list[Problem]]:
        order = list(range(len(problems)))
        random.Random(f"{self.name}:{self.seed}").shuffle(order)
        n_test = max(1, round(self.test_fraction * len(problems))) if len(problems) > 1 else 0
        test = sorted(order[:n_test])
        train = sorted(order[n_test:])
        # Keep file order inside each split: it is the order a user expects to read them in.
        return {"train": [problems[i] for i in train], "test": [problems[i] for i in test]}

    def _load_split(self, split: str, n: int | None) -> list[Problem]:
        problems = self._splits[split]
        return list(problems if n is None else problems[:n])

    def extract(self, completion: str) -> str | None:
        return math_verify_extract(completion, self.answer_format)

    def verify(self, answer: str, problem: Problem) -> bool:
        return math_verify_equal(answer, problem.answer)

    def trace(self, problem: Problem, rng: random.Random, style: str = "think") -> str:
        """The file's worked solution as the think block ("think"), or the bare reference
        ("direct"); there are no synthetic slips for real data."""
        check_style(self.name, style, allowed=("think", "direct"))
        if style == "direct":
            return completion(None, problem.answer)
        solution = problem.meta.get("solution")
        if not solution:
            raise ValueError(f"{problem.meta.get('source', self.path)}: no worked solution for a 'think' trace")
        return completion(solution, problem.answer)
