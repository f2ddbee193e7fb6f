"""Rollouts: task problems → chat prompts → engine samples → scored records.

Shared by GRPO (training rollouts), evaluation and rejection sampling, so all three render
prompts and score completions the same way.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from r1kit import dist
from r1kit.engine import Engine, Sample, SamplingParams
from r1kit.rewards import RewardError


@dataclass
class Rollout:
    problem: object  # tasks.Problem
    prompt_ids: list[int]
    sample: Sample
    completion: str  # text the reward saw (with a template-forced "<think>\n" put back)
    reward: dict  # reward parts + "total"

    @property
    def correct(self) -> bool:
        return self.reward.get("accuracy", 0.0) >= 1.0

    def record(self, step: int | None = None) -> dict:
        """The JSONL rollout record (DESIGN.md): prompt, completion, reward parts, tokens, step."""
        return {"step": step, "prompt": self.problem.prompt, "answer": self.problem.answer,
                "completion": self.completion, "reward": self.reward, "correct": self.correct,
                "prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.sample.tokens),
                "finish_reason": self.sample.finish_reason}


def prompt_ids(tok, problem, system: str | None = None, task=None) -> list[int]:
    """The problem as one user turn through the checkpoint's chat template; with a task, the
    turn is ``task.render(problem)`` (the prompt plus its answer-format instruction)."""
    content = problem.prompt if task is None else task.render(problem)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return tok.chat_prompt(msgs)


def score(task, tok, problem, text: str, prefix: str = "") -> tuple[str, dict]:
    """Reward parts for a completion; a reward function that raises becomes a clear RewardError."""
    text = prefix + text  # text forced into the prompt is part of the answer the reward judges
    if tok.force_think:  # the prompt ended with "<think>\n": the reward must see it
        text = "<think>\n" + text
    try:
        return text, task.reward(text, problem)
    except RewardError:
        raise
    except Exception as e:  # a bug in a user's task: say which task and which completion
        raise RewardError(f"reward of task {task.name!r} raised {type(e).__name__}: {e} "
                          f"(prompt {problem.prompt!r}, completion {text[:80]!r})") from e


def rollout(model, tok, task, problems, params: SamplingParams, engine: Engine | None = None,
            system: str | None = None, prefix: str = "", seeds: list[int] | None = None,
            begin: list[int] | None = None,
            on_group: Callable[[int, list[Rollout]], Iterable[int]] | None = None) -> list[list[Rollout]]:
    """params.n samples per problem → scored rollouts, grouped per problem.

    `prefix`: text forced at the start of every completion (appended to the prompt), e.g.
    "<think>" to make a model reason without training it to (the R1-Zero control). `seeds`: one
    per problem (see Engine.generate). `begin` / `on_group`: streaming, as Engine.generate, except
    that on_group sees each group scored the moment it finishes (problems never begun: []).
    A DDP/FSDP2-wrapped model generates with its full weights.
    """
    extra = tok.encode(prefix) if prefix else []
    ids = [prompt_ids(tok, p, system, task) + extra for p in problems]
    out: list[list[Rollout]] = [[] for _ in problems]

    def scored(i: int, samples: list[Sample]) -> Iterable[int]:
        out[i] = [Rollout(problems[i], ids[i], s, *score(task, tok, problems[i], s.text, prefix)) for s in samples]
        return on_group(i, out[i]) if on_group is not None else ()

    with dist.generating(model) as module:
        (engine or Engine(module, tok)).generate(ids, params, seeds=seeds, begin=begin, on_group=scored)
    return out


def greedy_accuracy(model, tok, task, problems, max_new_tokens: int = 128) -> float:
    """Share of `problems` answered correctly by greedy decoding. Under torchrun every rank calls it:
    each decodes its share of the problems and the counts are summed."""
    if not problems:
        return 0.0
    mine = [problems[i] for i in dist.shard_range(len(problems))]
    groups = rollout(model, tok, task, mine, SamplingParams(max_new_tokens=max_new_tokens, temperature=0)) if mine else []
    return dist.global_sum(sum(g[0].correct for g in groups), "summing the evaluation") / len(problems)


def answers(groups: list[list[Rollout]], task) -> list[list[str | None]]:
    """The final answer of every completion, read in the task's answer format (for cons@k)."""
    return [[task.extract(r.completion) for r in g] for g in groups]
