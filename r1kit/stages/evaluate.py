"""Evaluation stage.

The top half is pure metric functions (stdlib + numpy only, no other r1kit import), so they can
be tested on hand-made sample sets and reused by the report. The bottom half samples a
checkpoint with the engine and writes `eval.json`:
    r1kit eval CKPT --task arithmetic [--k 4 --problems 0 (all) --split auto --out eval.json]

Metrics follow DeepSeek-R1 §3: sample k completions per problem (temperature 0.6, top-p 0.95) and report
    * pass@1   = mean over problems of the fraction of the k samples that are correct,
    * cons@k   = accuracy of the majority-voted answer over the k samples,
    * pass@k   = Chen et al. (2021)'s unbiased estimator from n >= k samples.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
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


# ============================================================================================
# Engine-driven evaluation: sample a checkpoint, grade it, write eval.json
# ============================================================================================
# r1kit is imported inside these functions, so the pure half above stays importable alone.


@dataclass
class EvalConfig:
    checkpoint: str = ""  # checkpoint directory (or a stage directory holding model/)
    task: str = "arithmetic"  # verifiable task: arithmetic | countdown | math_file
    task_args: dict = field(default_factory=dict)  # the task's options, e.g. { path = "test.jsonl" }
    problems: int = 0  # grade the first N problems of `split`; 0 = all of them (a file's every line)
    # which problems: test | train | all (both splits) | auto = the whole file for a task read
    # from one file (math_file with no test_path or test_fraction), else the held-out test split
    split: str = "auto"
    k: int = 4  # samples per problem
    temperature: float = 0.6  # sampling temperature (R1's evaluation setting)
    top_p: float = 0.95  # nucleus sampling (R1's evaluation setting)
    max_new_tokens: int = 96  # most tokens per answer
    seed: int = 0  # sampling seed
    system: str | None = None  # optional system prompt
    prefix: str = ""  # text forced at the start of each answer; "<think>" = the no-RL control
    greedy: bool = True  # also grade one greedy completion per problem
    out: str = "eval.json"  # the eval.json file to write (samples go beside it, NAME_samples.jsonl)
    device: str = "auto"  # cuda | mps | cpu | auto (cuda → mps → cpu)
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (bf16 on a GPU that has it, else fp32)


def evaluate_model(model, tok, task, problems, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """k samples (and one greedy answer) per problem → (metrics, per-sample records)."""
    from r1kit.engine import SamplingParams
    from r1kit.rollout import rollout
    from r1kit.training import Progress

    if not problems:
        raise ValueError(f"eval: task {task.name!r} has no test problems to evaluate on")
    model.eval()
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            n=cfg.k, seed=cfg.seed)
    bar = Progress(2 if cfg.greedy else 1, "eval")
    with bar:
        groups = rollout(model, tok, task, problems, params, system=cfg.system, prefix=cfg.prefix)
        bar.update(1, f"{len(problems)} × {cfg.k} samples")
        m, records = _grade(task, problems, groups, cfg)
        if cfg.greedy:
            greedy = rollout(model, tok, task, problems, SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0),
                             system=cfg.system, prefix=cfg.prefix)
            hits = sum(g[0].correct for g in greedy)
            m.update(greedy_accuracy=hits / len(problems), greedy_accuracy_ci=list(wilson_interval(hits, len(problems))))
            records += [dict(g[0].record(), sample="greedy") for g in greedy]
            bar.update(2, "greedy")
    m["example"] = _solved_example(records)
    return m, records


def _grade(task, problems, groups, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """k graded samples per problem → R1's metrics (pass@1 with its interval, cons@k, pass@k, rates)."""
    from r1kit.rollout import answers
    correct = [[r.correct for r in g] for g in groups]
    flat = [r for g in groups for r in g]
    mean, low, high = pass_at_1_ci(correct) if len(problems) > 1 else (pass_at_1_mean(correct), 0.0, 1.0)
    votes = cons_correct(answers(groups, task), problems, lambda a, p: task.verify(a, p))
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= cfg.k} | {cfg.k})
    m = {"pass_at_1": mean, "pass_at_1_ci": [low, high],
         f"cons_at_{cfg.k}": sum(votes) / len(votes), f"cons_at_{cfg.k}_ci": list(wilson_interval(sum(votes), len(votes))),
         "pass_at_k": {str(k): mean_pass_at_k(correct, k) for k in ks},
         "think_rate": sum(r.reward.get("think", 0.0) for r in flat) / len(flat),
         "format_rate": sum(r.reward.get("format", 0.0) for r in flat) / len(flat),
         "response_length": sum(len(r.sample.tokens) for r in flat) / len(flat),
         "truncation_rate": sum(r.sample.finish_reason == "length" for r in flat) / len(flat)}
    return m, [dict(r.record(), sample=j) for g in groups for j, r in enumerate(g)]


def _solved_example(records: list[dict]) -> dict | None:
    """A correct answer that shows its reasoning (else any correct one) for the report."""
    good = [r for r in records if r["correct"]]
    best = next((r for r in good if "</think>" in r["completion"]), good[0] if good else None)
    return None if best is None else {k: best[k] for k in ("prompt", "answer", "completion")}


SPLIT_CHOICES = ("auto", "test", "train", "all")


def resolve_split(task, cfg: EvalConfig) -> str:
    """"auto" → "all" for a task read from one file with no held-out part asked for, else "test".

    A user who points eval at a file means that file; a 10% split of it is only right when they
    asked for one (test_fraction) or gave a separate test file (test_path).
    """
    if cfg.split != "auto":
        return cfg.split
    one_file = getattr(task, "path", None) is not None and getattr(task, "test_path", None) is None
    return "all" if one_file and "test_fraction" not in cfg.task_args else "test"


def select_problems(task, split: str, n: int) -> tuple[list, int]:
    """The first n problems (0: all) of `split` → (problems, how many the split holds)."""
    from r1kit.config import ConfigError
    from r1kit.tasks import SyntheticTask
    if split == "all":
        if isinstance(task, SyntheticTask):
            raise ConfigError(f"eval: split 'all' needs a task read from a file; {task.name!r} generates "
                              "its problems (use split = test)")
        # held-out problems first, so a --problems cap still grades the test split before train
        pool = task.problems("test") + task.problems("train")
    else:
        pool = task.problems(split)
    return (pool[:n] if n else pool), len(pool)


def describe_selection(task, split: str, n: int, available: int, asked: int) -> str:
    """One sentence for stdout: exactly which problems are graded, and how to get others."""
    source, test_file = getattr(task, "path", None), getattr(task, "test_path", None)
    files = " and ".join(str(f) for f in (source, test_file) if f is not None)
    what = {"all": f"every problem of {files}" if files else "every problem",
            "test": "the held-out test split", "train": "the train split"}[split]
    if split == "test" and test_file is not None:
        what += f" ({test_file})"
    elif split == "test" and source:
        what += f" of {source} (--set split=all grades the whole file)"
    note = f"; {asked} asked for, the split has {available}" if asked > available else ""
    capped = f" (the first {n} of {available}; --problems 0 grades all)" if n < available else ""
    return f"grading {n} problems: {what}{capped}{note}"


def versions() -> dict:
    import torch

    import r1kit
    return {"torch": torch.__version__, "r1kit": r1kit.__version__, "python": platform.python_version()}


def run(cfg: EvalConfig) -> dict:
    """Evaluate cfg.checkpoint; write cfg.out (eval.json) and the samples beside it."""
    from r1kit import checkpoint
    from r1kit.common import print0
    from r1kit.config import ConfigError
    from r1kit.tasks import get_task
    from r1kit.training import is_checkpoint, resolve_ckpt

    ckpt = resolve_ckpt(cfg.checkpoint)
    if not is_checkpoint(ckpt) and not checkpoint.is_gguf(ckpt):
        raise ConfigError(f"eval: {cfg.checkpoint} has no checkpoint (config.json) and is no .gguf file")
    if cfg.k < 1 or cfg.problems < 0:
        raise ConfigError(f"eval: k must be ≥ 1 and problems ≥ 0 (0: all), got k={cfg.k}, problems={cfg.problems}")
    if cfg.split not in SPLIT_CHOICES:
        raise ConfigError(f"eval.split = {cfg.split!r}; choose one of {list(SPLIT_CHOICES)}")
    model, tok = checkpoint.load(ckpt, device=cfg.device, dtype=cfg.dtype)
    task = get_task(cfg.task, **cfg.task_args)
    split = resolve_split(task, cfg)
    problems, available = select_problems(task, split, cfg.problems)
    print0(f"eval: {describe_selection(task, split, len(problems), available, cfg.problems)}")
    metrics, records = evaluate_model(model, tok, task, problems, cfg)
    result = {"checkpoint": str(ckpt), "task": task.name, "task_args": cfg.task_args, "n_problems": len(problems),
              "k": cfg.k, "seed": cfg.seed, "split": split, "problems_in_split": available,
              "engine": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                         "samples_per_problem": cfg.k, "greedy": cfg.greedy, "prefix": cfg.prefix,
                         "system": cfg.system, "device": str(model.embed.weight.device),
                         "dtype": str(model.embed.weight.dtype).removeprefix("torch.")},
             "versions": versions(), "metrics": metrics, "config": asdict(cfg)}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = out.with_name(out.stem + "_samples.jsonl")
    checkpoint.write_text_atomic(samples, "".join(json.dumps(r) + "\n" for r in records))
    checkpoint.write_text_atomic(out, json.dumps(result, indent=2) + "\n")  # last: its presence means "done"
    ci = metrics["pass_at_1_ci"]
    print0(f"eval: {ckpt}: pass@1 {metrics['pass_at_1']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (k={cfg.k}, "
           f"T={cfg.temperature}, top-p {cfg.top_p}), cons@{cfg.k} {metrics[f'cons_at_{cfg.k}']:.3f}"
           + (f", greedy {metrics['greedy_accuracy']:.3f}" if cfg.greedy else "") + f" on {len(problems)} problems → {out}")
    return result


# flags for the keys a user changes most; every key is also a --set KEY=VALUE (listed in --help)
FLAGS = ("task", "k", "problems", "split", "temperature", "top_p", "max_new_tokens", "seed", "prefix", "system",
         "device", "dtype")


def add_args(p) -> None:
    from r1kit.config import add_config_args, add_field_flags, field_meanings
    p.add_argument("checkpoint", nargs="?", help=field_meanings(EvalConfig)["checkpoint"])
    add_field_flags(p, EvalConfig, FLAGS)
    p.add_argument("--task-args", help='the task\'s options as JSON, e.g. \'{"digits": 3}\' or \'{"path": "test.jsonl"}\'')
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass (= --set greedy=false)")
    add_config_args(p, EvalConfig, "eval", out_key="out")  # --config reads the recipe's [eval] table


def main(args) -> int:
    from r1kit.config import ConfigError, load_config
    cfg = load_config(EvalConfig, args.config, args.overrides, section="eval")
    flags = {key: getattr(args, key) for key in (*FLAGS, "checkpoint", "out")}
    for key, value in flags.items():
        if value is not None:
            setattr(cfg, key, value)
    if args.task_args:
        try:
            cfg.task_args = json.loads(args.task_args)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--task-args: invalid JSON ({e.msg})") from None
    if args.no_greedy:
        cfg.greedy = False
    if not cfg.checkpoint:
        raise ConfigError("eval: name a checkpoint: r1kit eval CKPT --task arithmetic")
    run(cfg)
    return 0
