"""Rejection sampling and distillation — R1 §2.3.3 and §2.4 in miniature.

A teacher samples k completions per training prompt; a completion is kept only when it is
verified correct and passes R1's filters, in this order (the first that fails names the drop):
    wrong       the task's verifier says the answer is wrong (or there is none)
    format      not <think>…</think><answer>…</answer> (R1 keeps only readable reasoning)
    language    language-consistency reward below `min_language` (mixed-language reasoning)
    length      truncated at max_new_tokens, or longer than `max_completion_tokens`
    duplicate   the same text as a kept completion of the same prompt
    cap         beyond `max_per_prompt` distinct traces of one prompt
The survivors are written as chat JSONL (`{"messages": [...], "answer": ...}`, readable by TRL
and other tools), then a student — a fresh small dense model, or any checkpoint — is fine-tuned
on them with the SFT stage. The same stage makes R1's cold-start data: teacher = the R1-Zero
model, student = the base.

    r1kit distill --config recipe.toml [--set distill.k=8] [--out DIR]
writes DIR/traces.jsonl, DIR/rejection.json (filter counts, prompts the teacher never solved),
DIR/student/ (the SFT stage's directory: model/, metrics.jsonl, summary.json), DIR/summary.json.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from r1kit.common import print0, seed_everything
from r1kit.config import ConfigError, add_config_args, load_config
from r1kit.rewards import format_reward
from r1kit.stages.sft import DataError, SFTConfig, read_jsonl, row_messages
from r1kit.training import Progress, resolve_ckpt

FILTERS = ("wrong", "format", "language", "length", "duplicate", "cap")


class NoTracesError(DataError):
    """The trace set is empty or holds no verified-correct trace: there is nothing to distill."""


@dataclass
class DistillConfig:
    teacher: str = ""  # checkpoint (or stage dir) to sample
    out_dir: str = "runs/distill"  # where traces.jsonl and the student go
    task: str = "arithmetic"  # verifiable task the teacher is sampled on
    task_args: dict = field(default_factory=dict)  # the task's options
    system: str | None = None  # optional system prompt for the teacher
    traces: str = ""  # an existing traces JSONL: skip sampling and train the student on it
    prompts: int = 512  # training-split problems to sample
    prompt_offset: int = 0  # skip this many first training problems (fresh prompts per stage)
    k: int = 4  # samples per prompt
    temperature: float = 0.7  # teacher sampling temperature
    top_p: float = 0.95  # teacher nucleus sampling
    max_new_tokens: int = 96  # most tokens per teacher completion
    chunk: int = 128  # prompts per engine call (bounds the KV cache; one progress tick each)
    require_think: bool = True  # format filter: reasoning must be inside <think>…</think>
    min_language: float = 1.0  # language-consistency threshold (1.0: one script only)
    max_completion_tokens: int = 0  # length filter; 0 → drop only truncated completions
    max_per_prompt: int = 1  # distinct traces kept per prompt
    seed: int = 0  # seeds the teacher's sampling
    student: SFTConfig = field(default_factory=SFTConfig)  # the student's SFT (data and out_dir are set by this stage)


# ---------------------------------------------------------------------------------------------
# Rejection sampling
# ---------------------------------------------------------------------------------------------
def drop_reason(r, cfg: DistillConfig, kept_texts: set[str]) -> str | None:
    """Which filter rejects rollout `r` (None: keep it); `kept_texts` are this prompt's keepers."""
    if not r.correct:
        return "wrong"
    if format_reward(r.completion, require_think=cfg.require_think) < 1.0:
        return "format"
    if r.reward.get("language", 1.0) < cfg.min_language:
        return "language"
    too_long = cfg.max_completion_tokens and len(r.sample.tokens) > cfg.max_completion_tokens
    if r.sample.finish_reason == "length" or too_long:
        return "length"
    if r.completion.strip() in kept_texts:
        return "duplicate"
    if len(kept_texts) >= cfg.max_per_prompt:
        return "cap"
    return None


def trace_row(problem, completion: str, system: str | None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": problem.prompt}, {"role": "assistant", "content": completion.strip()}]
    return {"messages": msgs, "answer": problem.answer}


def rejection_sample(cfg: DistillConfig, model, tok, task, problems) -> tuple[list[dict], dict]:
    """k samples per problem → (kept trace rows, statistics)."""
    from r1kit.engine import Engine, SamplingParams
    from r1kit.rollout import rollout

    engine, rows = Engine(model, tok), []
    dropped = dict.fromkeys(FILTERS, 0)
    unsolved, samples, correct = [], 0, 0
    chunks = [problems[i: i + cfg.chunk] for i in range(0, len(problems), cfg.chunk)]
    with Progress(len(problems), "rejection sampling") as bar:
        for c, chunk in enumerate(chunks):
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p, n=cfg.k, seed=cfg.seed * 10_007 + c)
            for group in rollout(model, tok, task, chunk, params, engine, cfg.system):
                kept: set[str] = set()
                samples += len(group)
                correct += sum(r.correct for r in group)
                if not any(r.correct for r in group):
                    unsolved.append(group[0].problem)
                for r in group:
                    reason = drop_reason(r, cfg, kept)
                    if reason:
                        dropped[reason] += 1
                        continue
                    kept.add(r.completion.strip())
                    rows.append(trace_row(r.problem, r.completion, cfg.system))
            bar.update(min((c + 1) * cfg.chunk, len(problems)), f"kept {len(rows)}")
    stats = {"prompts": len(problems), "samples": samples, "correct": correct, "kept": len(rows),
             "dropped": dropped, "prompts_solved": len(problems) - len(unsolved),
             "prompts_unsolved": len(unsolved),
             "unsolved_examples": [{"prompt": p.prompt, "answer": p.answer} for p in unsolved[:5]]}
    return rows, stats


def sample_traces(cfg: DistillConfig, out: Path) -> dict:
    """Sample the teacher once: traces.jsonl and rejection.json appear together (atomically)."""
    from r1kit import checkpoint
    from r1kit.tasks import get_task

    teacher = resolve_ckpt(cfg.teacher)
    if not (teacher / "config.json").exists():
        raise ConfigError(f"distill.teacher: {cfg.teacher} has no checkpoint (config.json)")
    model, tok = checkpoint.load(teacher, device=cfg.student.device, dtype=cfg.student.dtype)  # the student's device
    task = get_task(cfg.task, **cfg.task_args)
    problems = task.problems("train", cfg.prompt_offset + cfg.prompts)[cfg.prompt_offset:]
    t0 = time.perf_counter()
    rows, stats = rejection_sample(cfg, model, tok, task, problems)
    stats.update(teacher=str(teacher), seconds=round(time.perf_counter() - t0, 1), k=cfg.k,
                 temperature=cfg.temperature, top_p=cfg.top_p)
    checkpoint.write_text_atomic(out / "traces.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    checkpoint.write_text_atomic(out / "rejection.json", json.dumps(stats, indent=2) + "\n")  # last: marks sampling done
    d = stats["dropped"]
    print0(f"distill: teacher solved {stats['prompts_solved']}/{stats['prompts']} prompts, "
           f"{stats['correct']}/{stats['samples']} samples correct; kept {stats['kept']} traces "
           f"(dropped {', '.join(f'{k} {v}' for k, v in d.items() if v)}) in {stats['seconds']:.0f}s")
    if stats["prompts_unsolved"]:
        print0(f"distill: the teacher never solved {stats['prompts_unsolved']} of {stats['prompts']} prompts "
               f"(e.g. {stats['unsolved_examples'][0]['prompt']!r})")
    return stats


def check_traces(path: Path, task=None) -> int:
    """Refuse an empty or all-wrong trace set before any training; → the number of usable rows.

    Rows that carry an "answer" are re-verified with the task's verifier when one is given
    (a trace file from elsewhere may hold unverified samples).
    """
    from r1kit.rewards import extract_answer
    from r1kit.tasks import Problem

    rows = read_jsonl(path)
    if not rows:
        raise NoTracesError(f"{path}: the trace set is empty — the teacher produced no verified-correct "
                            "trace, so there is nothing to train the student on")
    right = 0
    for row, where in rows:
        msgs = row_messages(row, where)
        if task is None or "answer" not in row:
            right += 1
            continue
        last = lambda role: next((m.get("content", "") for m in reversed(msgs) if m.get("role") == role), "")  # noqa: E731
        got = extract_answer(last("assistant"))
        right += got is not None and task.verify(got, Problem(last("user"), str(row["answer"])))
    if right == 0:
        raise NoTracesError(f"{path}: none of the {len(rows)} traces is correct — refusing to train the student "
                            "on wrong answers")
    return right


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def run(cfg: DistillConfig) -> dict:
    """Sample (unless done or given traces) → check → fine-tune the student → DIR/summary.json."""
    from r1kit import checkpoint, dist
    from r1kit.common import resolve_device
    from r1kit.stages import sft
    from r1kit.tasks import get_task

    # torchrun: join first, so the teacher's traces are written by rank 0 alone (every rank samples
    # the same seeded traces; the student's SFT is the data-parallel part)
    dist.init(resolve_device(cfg.student.device), cfg.student.dist_timeout_s)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.traces:
        traces, stats = Path(cfg.traces), {"traces": cfg.traces}
    else:
        traces = out / "traces.jsonl"
        if (out / "rejection.json").exists():
            stats = json.loads((out / "rejection.json").read_text())
            print0(f"distill: reusing {traces} ({stats['kept']} traces)")
        else:
            stats = sample_traces(cfg, out)
    task = get_task(cfg.task, **cfg.task_args) if cfg.task else None
    check_traces(traces, task)
    student = cfg.student
    student.data, student.out_dir = [str(traces)], str(out / "student")
    if not student.base and not student.tokenizer and cfg.teacher:  # a fresh student speaks the teacher's tokens
        student.tokenizer = str(resolve_ckpt(cfg.teacher))
    if not student.task and cfg.task:
        student.task, student.task_args = cfg.task, dict(cfg.task_args)
    s = sft.run(student)
    summary = {"rejection": stats, "student": s, "model": str(out / "student" / "model"),
               "seconds": round(time.perf_counter() - t0, 1)}
    checkpoint.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def add_args(p) -> None:
    add_config_args(p, DistillConfig, "distill")
    p.add_argument("--teacher", help="teacher checkpoint (replaces distill.teacher)")
    p.add_argument("--traces", help="train the student on this traces JSONL instead of sampling a teacher")


def main(args) -> int:
    cfg = load_config(DistillConfig, args.config, args.overrides, section="distill")
    if args.out:
        cfg.out_dir = args.out
    if args.teacher:
        cfg.teacher = args.teacher
    if args.traces:
        cfg.traces = args.traces
    if not cfg.teacher and not cfg.traces:
        raise ConfigError("distill: set distill.teacher (a checkpoint to sample) or --traces FILE")
    run(cfg)
    return 0
