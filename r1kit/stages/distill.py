"""Rejection sampling and distillation — R1 §2.3.3 and §2.4 in miniature, from any teacher.

The teacher is a checkpoint sampled in-process, or any OpenAI-compatible endpoint
(`teacher = "http://HOST:PORT/v1"`: DeepSeek's API, vLLM, llama.cpp's server, `r1kit serve`; see
teachers.py for the concurrency, retries and resume). Either way it draws k samples per training
prompt, and every sample becomes one record in DIR/traces.jsonl — prompt id, sample index, prompt,
reasoning, answer, verdict, usage, teacher id and sampling settings — appended as it finishes, so
a rerun of the same command resumes where a kill, a network drop or a spent budget left it.
A sample is kept only when it passes R1's filters, in this order (the first that fails names the drop):
    missing     no final answer at all (truncated, or the teacher ignored the answer format)
    wrong       the task's verifier says the answer is wrong
    format      not <think>…</think><answer>…</answer> (R1 keeps only readable reasoning)
    language    language-consistency reward below `min_language` (mixed-language reasoning)
    length      truncated at max_new_tokens, or longer than `max_completion_tokens`
    duplicate   the same text as a kept completion of the same prompt
    cap         beyond `max_per_prompt` distinct traces of one prompt
The survivors are written as chat JSONL (`{"messages": [...], "answer": ...}`, readable by TRL
and other tools) to DIR/kept.jsonl, then a student — a fresh small dense model, or any
checkpoint — is fine-tuned on them with the SFT stage. The same stage makes R1's cold-start
data: teacher = the R1-Zero model, student = the base.

    r1kit distill --config recipe.toml [--set distill.k=8] [--out DIR] [--sample-only]
writes DIR/traces.jsonl (every sample), DIR/kept.jsonl, DIR/rejection.json (filter counts,
prompts the teacher never solved, retries), DIR/student/ (the SFT stage's directory: model/,
metrics.jsonl, summary.json), DIR/summary.json.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from r1kit.common import print0, seed_everything
from r1kit.config import ConfigError, add_config_args, load_config
from r1kit.rewards import extract_answer, format_reward
from r1kit.stages.sft import DataError, SFTConfig, read_jsonl, row_messages
from r1kit.teachers import TeacherError, TraceLog, is_remote, public_url, split_reasoning
from r1kit.training import resolve_ckpt

FILTERS = ("missing", "wrong", "format", "language", "length", "duplicate", "cap")


class NoTracesError(DataError):
    """The trace set is empty or holds no verified-correct trace: there is nothing to distill."""


@dataclass
class DistillConfig:
    teacher: str = ""  # checkpoint (or stage dir) to sample, or an OpenAI-compatible URL (http://HOST:PORT/v1)
    teacher_model: str = ""  # URL teacher: the model id to ask for ("" → the server's only model)
    api_key_env: str = ""  # URL teacher: environment variable holding the API key (never the key itself)
    concurrency: int = 8  # URL teacher: requests in flight
    max_requests: int = 0  # URL teacher: requests this run may make, retries included (0 = no limit)
    max_total_tokens: int = 0  # URL teacher: prompt + completion tokens this run may spend (0 = no limit)
    request_timeout: float = 120.0  # URL teacher: seconds per request
    retries: int = 8  # URL teacher: retries of a sample on 429 / 5xx / timeouts / dropped connections
    backoff_base: float = 1.0  # URL teacher: first backoff in seconds (doubles per retry, full jitter)
    backoff_max: float = 60.0  # URL teacher: the longest backoff between retries, in seconds
    out_dir: str = "runs/distill"  # where traces.jsonl and the student go
    task: str = "arithmetic"  # verifiable task the teacher is sampled on
    task_args: dict = field(default_factory=dict)  # the task's options
    system: str | None = None  # optional system prompt for the teacher
    traces: str = ""  # an existing chat JSONL: skip sampling and train the student on it
    sample_only: bool = False  # sample and filter, do not train the student
    prompts: int = 512  # training-split problems to sample
    prompt_offset: int = 0  # skip this many first training problems (fresh prompts per stage)
    k: int = 4  # samples per prompt
    temperature: float = 0.7  # teacher sampling temperature
    top_p: float = 0.95  # teacher nucleus sampling
    max_new_tokens: int = 96  # most tokens per teacher completion
    chunk: int = 128  # local teacher: prompts per engine call (bounds the KV cache; one progress tick each)
    require_think: bool = True  # format filter: reasoning must be inside <think>…</think>
    min_language: float = 1.0  # language-consistency threshold (1.0: one script only)
    max_completion_tokens: int = 0  # length filter; 0 → drop only truncated completions
    max_per_prompt: int = 1  # distinct traces kept per prompt
    seed: int = 0  # seeds the teacher's sampling
    student: SFTConfig = field(default_factory=SFTConfig)  # the student's SFT (data and out_dir are set by this stage)


# ---------------------------------------------------------------------------------------------
# Trace records (one shape for every teacher) and R1's filters over them
# ---------------------------------------------------------------------------------------------
def sampling_of(cfg: DistillConfig) -> dict:
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens, "seed": cfg.seed}


def trace_record(cfg: DistillConfig, task, prompt_id: int, sample: int, problem, messages: list[dict],
                 message: dict, completion: str | None, finish_reason: str, usage: dict, teacher: dict,
                 parts: dict | None = None) -> dict:
    """One sample → its traces.jsonl record. `completion` is the text as the teacher wrote it when
    it is one string (a local model); otherwise reasoning and answer are joined R1-style."""
    from r1kit.teachers import joined_completion
    reasoning, answer, source = split_reasoning(message)
    text = completion if completion is not None else joined_completion(reasoning, answer)
    parts = task.reward(text, problem) if parts is None else parts  # a local rollout has scored it already
    return {"prompt_id": prompt_id, "sample": sample, "prompt": problem.prompt, "reference": problem.answer,
            "messages": messages, "reasoning": reasoning, "answer": answer, "reasoning_source": source,
            "completion": text, "finish_reason": finish_reason,
            "verdict": {"correct": parts.get("accuracy", 0.0) >= 1.0, "answer": extract_answer(text), "reward": parts},
            "usage": usage, "teacher": teacher, "sampling": sampling_of(cfg)}


def drop_reason(rec: dict, cfg: DistillConfig, kept_texts: set[str]) -> str | None:
    """Which filter rejects trace record `rec` (None: keep it); `kept_texts` are this prompt's keepers."""
    text, verdict = rec["completion"].strip(), rec["verdict"]
    if verdict["answer"] is None:
        return "missing"
    if not verdict["correct"]:
        return "wrong"
    if format_reward(text, require_think=cfg.require_think) < 1.0:
        return "format"
    if verdict["reward"].get("language", 1.0) < cfg.min_language:
        return "language"
    too_long = cfg.max_completion_tokens and rec["usage"].get("completion_tokens", 0) > cfg.max_completion_tokens
    if rec["finish_reason"] == "length" or too_long:
        return "length"
    if text in kept_texts:
        return "duplicate"
    if len(kept_texts) >= cfg.max_per_prompt:
        return "cap"
    return None


def trace_row(rec: dict) -> dict:
    """A kept record → a chat JSONL row for SFT (the prompt as the teacher saw it, then its completion)."""
    return {"messages": rec["messages"] + [{"role": "assistant", "content": rec["completion"].strip()}],
            "answer": rec["reference"]}


def filter_traces(records: list[dict], cfg: DistillConfig) -> tuple[list[dict], dict]:
    """Every record (sorted by prompt id, sample) → (kept chat rows, statistics)."""
    rows, dropped = [], dict.fromkeys(FILTERS, 0)
    by_prompt: dict[int, list[dict]] = {}
    for rec in sorted(records, key=lambda r: (r["prompt_id"], r["sample"])):
        by_prompt.setdefault(rec["prompt_id"], []).append(rec)
    unsolved, sources, usage = [], {}, {"prompt_tokens": 0, "completion_tokens": 0}
    for group in by_prompt.values():
        kept: set[str] = set()
        if not any(r["verdict"]["correct"] for r in group):
            unsolved.append(group[0])
        for rec in group:
            sources[rec["reasoning_source"]] = sources.get(rec["reasoning_source"], 0) + 1
            for k in usage:
                usage[k] += int(rec["usage"].get(k) or 0)
            reason = drop_reason(rec, cfg, kept)
            if reason:
                dropped[reason] += 1
                continue
            kept.add(rec["completion"].strip())
            rows.append(trace_row(rec))
    stats = {"prompts": len(by_prompt), "samples": len(records),
             "correct": sum(r["verdict"]["correct"] for r in records), "kept": len(rows), "dropped": dropped,
             "prompts_solved": len(by_prompt) - len(unsolved), "prompts_unsolved": len(unsolved),
             "unsolved_examples": [{"prompt": r["prompt"], "answer": r["reference"]} for r in unsolved[:5]],
             "reasoning_sources": sources, "usage": usage}
    return rows, stats


# ---------------------------------------------------------------------------------------------
# Sampling: a local checkpoint or a remote endpoint, both appending to traces.jsonl
# ---------------------------------------------------------------------------------------------
def chat_messages(cfg: DistillConfig, problem) -> list[dict]:
    return ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": problem.prompt}]


def pending_samples(cfg: DistillConfig, problems, done: dict, log: TraceLog) -> list[tuple[int, int]]:
    """(prompt_id, sample) pairs still to draw; refuses a traces file made from other prompts."""
    todo = []
    for i, p in enumerate(problems):
        pid = cfg.prompt_offset + i
        for s in range(cfg.k):
            rec = done.get((pid, s))
            if rec is None:
                todo.append((pid, s))
            elif rec["prompt"] != p.prompt:
                raise ConfigError(f"{log.path}: prompt {pid} was {rec['prompt']!r} there, but the task now gives "
                                  f"{p.prompt!r} — these traces came from other prompts; use a fresh distill.out_dir")
    return todo


def sample_local(cfg: DistillConfig, task, problems: dict, todo: list[tuple[int, int]], log: TraceLog) -> None:
    """Sample a checkpoint in-process; each prompt's missing samples are appended as its chunk finishes."""
    from r1kit import checkpoint
    from r1kit.engine import Engine, SamplingParams
    from r1kit.rollout import rollout
    from r1kit.training import Progress

    teacher = resolve_ckpt(cfg.teacher)
    if not (teacher / "config.json").exists():
        raise ConfigError(f"distill.teacher: {cfg.teacher} has no checkpoint (config.json)")
    model, tok = checkpoint.load(teacher, device=cfg.student.device, dtype=cfg.student.dtype)  # the student's device
    engine, ident = Engine(model, tok), {"id": str(teacher), "model": teacher.name}
    missing: dict[int, set[int]] = {}
    for pid, s in todo:
        missing.setdefault(pid, set()).add(s)
    pids = sorted(missing)
    chunks = [pids[i: i + cfg.chunk] for i in range(0, len(pids), cfg.chunk)]
    with Progress(len(pids), "rejection sampling") as bar:
        for c, chunk in enumerate(chunks):
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p, n=cfg.k, seed=cfg.seed * 10_007 + chunk[0])
            for pid, group in zip(chunk, rollout(model, tok, task, [problems[p] for p in chunk], params, engine,
                                                 cfg.system)):
                for s, r in enumerate(group):
                    if s in missing[pid]:
                        usage = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.sample.tokens),
                                 "total_tokens": len(r.prompt_ids) + len(r.sample.tokens)}
                        log.append(trace_record(cfg, task, pid, s, r.problem, chat_messages(cfg, r.problem),
                                                {"content": r.completion}, r.completion, r.sample.finish_reason,
                                                usage, ident, r.reward))
            bar.update(min((c + 1) * cfg.chunk, len(pids)), "")


def sample_remote(cfg: DistillConfig, task, problems: dict, todo: list[tuple[int, int]], log: TraceLog,
                  done_before: int) -> dict:
    """Ask an OpenAI-compatible endpoint; → the run's request and retry counts."""
    from r1kit.teachers import Budget, Job, RemoteTeacher, Sampling, run_jobs

    teacher = RemoteTeacher.from_env(cfg.teacher, cfg.api_key_env, model=cfg.teacher_model,
                                     timeout=cfg.request_timeout, retries=cfg.retries,
                                     backoff_base=cfg.backoff_base, backoff_max=cfg.backoff_max)
    jobs = [Job(pid, s, chat_messages(cfg, problems[pid]), problems[pid]) for pid, s in todo]
    seen = {"none": 0, "all": 0, "warned": False}

    def make_record(job: Job, data: dict, t) -> dict:
        choice = data["choices"][0]
        rec = trace_record(cfg, task, job.prompt_id, job.sample, job.problem, job.messages,
                           choice.get("message") or {}, None, choice.get("finish_reason") or "stop",
                           _usage(data.get("usage")), {"id": t.name, "model": t.model})
        seen["all"] += 1
        seen["none"] += rec["reasoning_source"] == "none"
        if seen["all"] == 8 and seen["none"] == 8:
            _warn_no_reasoning(t.name, 8)
            seen["warned"] = True
        return rec

    t0 = time.perf_counter()
    try:
        run = run_jobs(teacher, jobs, log, Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed),
                       make_record, cfg.concurrency, Budget(cfg.max_requests, cfg.max_total_tokens), done_before)
    finally:
        if seen["all"] and seen["none"] == seen["all"] and not seen["warned"]:
            _warn_no_reasoning(teacher.name, seen["all"])
    return {"requests": run.requests, "retries": dict(run.errors), "tokens": run.tokens,
            "seconds": round(time.perf_counter() - t0, 1), "samples_drawn": run.done}


def _usage(u) -> dict:
    u = u if isinstance(u, dict) else {}
    out = {k: int(u.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens")
    return {**out, "reasoning_tokens": int(reasoning)} if reasoning is not None else out


def _warn_no_reasoning(name: str, n: int) -> None:
    print0(f"distill: warning: teacher {name} returned no reasoning in the first {n} samples (no reasoning_content, "
           "no <think>…</think>): use a reasoning model, or start the server with its reasoning parser (vLLM "
           "--reasoning-parser deepseek_r1, llama.cpp --reasoning-format deepseek); the format filter will drop "
           "these samples")


def sample_traces(cfg: DistillConfig, out: Path) -> dict:
    """Draw what traces.jsonl still lacks, then filter all of it: kept.jsonl and rejection.json."""
    from r1kit import checkpoint
    from r1kit.tasks import get_task

    task = get_task(cfg.task, **cfg.task_args)
    problems = dict(enumerate(task.problems("train", cfg.prompt_offset + cfg.prompts)[cfg.prompt_offset:],
                              start=cfg.prompt_offset))
    log = TraceLog(out / "traces.jsonl")
    with log.exclusive():
        done = log.load()
        todo = pending_samples(cfg, list(problems.values()), done, log)
        job: dict = {}
        if todo:
            if done:
                print0(f"distill: resuming: {len(done)} samples in {log.path}, {len(todo)} to draw")
            t0 = time.perf_counter()
            if is_remote(cfg.teacher):
                job = sample_remote(cfg, task, problems, todo, log, len(problems) * cfg.k - len(todo))
            else:
                sample_local(cfg, task, problems, todo, log)
                job = {"seconds": round(time.perf_counter() - t0, 1), "samples_drawn": len(todo)}
        records = [r for key, r in log.load().items() if key[0] in problems and key[1] < cfg.k]
    rows, stats = filter_traces(records, cfg)
    prev = out / "rejection.json"  # sampling seconds add up over the runs that drew these traces
    before = json.loads(prev.read_text()).get("seconds", 0.0) if prev.exists() else 0.0
    stats.update(teacher=public_url(cfg.teacher) if is_remote(cfg.teacher) else str(resolve_ckpt(cfg.teacher)),
                 k=cfg.k, sampling=sampling_of(cfg), this_run=job, seconds=before + job.get("seconds", 0.0))
    checkpoint.write_text_atomic(out / "kept.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    checkpoint.write_text_atomic(out / "rejection.json", json.dumps(stats, indent=2) + "\n")
    _report(stats)
    return stats


def _report(stats: dict) -> None:
    d = stats["dropped"]
    print0(f"distill: teacher solved {stats['prompts_solved']}/{stats['prompts']} prompts, "
           f"{stats['correct']}/{stats['samples']} samples correct; kept {stats['kept']} traces "
           f"(dropped {', '.join(f'{k} {v}' for k, v in d.items() if v) or 'none'})")
    if stats["prompts_unsolved"]:
        print0(f"distill: the teacher never solved {stats['prompts_unsolved']} of {stats['prompts']} prompts "
               f"(e.g. {stats['unsolved_examples'][0]['prompt']!r})")


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
    """Sample what is missing (unless given traces) → filter → check → fine-tune the student → DIR/summary.json."""
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
        traces, stats = out / "kept.jsonl", sample_traces(cfg, out)
        if stats["kept"] == 0 and stats["correct"] > 0:  # say which filter took them, not just "empty"
            d = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v)
            raise NoTracesError(f"{traces}: the trace set is empty — none of the {stats['correct']} verified-correct "
                                f"samples passed R1's filters (dropped: {d}); see {out / 'rejection.json'}")
    task = get_task(cfg.task, **cfg.task_args) if cfg.task else None
    check_traces(traces, task)
    if cfg.sample_only:
        return {"rejection": stats, "traces": str(traces)}
    student = cfg.student
    student.data, student.out_dir = [str(traces)], str(out / "student")
    if not student.base and not student.tokenizer and cfg.teacher:  # a fresh student speaks the teacher's tokens
        if is_remote(cfg.teacher):
            raise ConfigError("distill.student: a URL teacher has no tokenizer to lend — set distill.student.base "
                              "(a checkpoint to fine-tune) or distill.student.tokenizer")
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
    p.add_argument("--teacher", help="teacher checkpoint or OpenAI-compatible URL (replaces distill.teacher)")
    p.add_argument("--traces", help="train the student on this chat JSONL instead of sampling a teacher")
    p.add_argument("--sample-only", action="store_true", help="sample and filter the teacher's traces; train no student")


def main(args) -> int:
    cfg = load_config(DistillConfig, args.config, args.overrides, section="distill")
    if args.out:
        cfg.out_dir = args.out
    if args.teacher:
        cfg.teacher = args.teacher
    if args.traces:
        cfg.traces = args.traces
    if args.sample_only:
        cfg.sample_only = True
    if not cfg.teacher and not cfg.traces:
        raise ConfigError("distill: set distill.teacher (a checkpoint or an http://…/v1 URL) or --traces FILE")
    try:
        run(cfg)
    except TeacherError as e:  # the network, the server or a budget: one line; finished traces are on disk
        print(f"r1kit distill: error: {e}", file=sys.stderr)
        return 3
    return 0
