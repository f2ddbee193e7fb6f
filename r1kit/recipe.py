"""The R1 recipe end to end — `r1kit demo`.

Stages, in order, each in its own directory under --out DIR:
    base           pretrain the teacher's base from scratch
    control        no training: the base *forced* to open <think> (how much RL elicits vs teaches)
    r1_zero        GRPO straight from the base (R1-Zero)
    cold_start     rejection-sample R1-Zero (correct, well-formed, with <think>) → SFT the base on it
    reasoning_rl   GRPO again from the cold-start model (R1's reasoning-oriented RL)
    student_base   pretrain a smaller dense student from scratch, with the teacher's tokenizer
    distill        rejection-sample the final teacher → SFT the student base on the traces
    student_grpo   the same student base trained by GRPO alone for the distillation's wall time
Every trained stage is then evaluated (eval.json: pass@1 over k samples at T=0.6, top-p 0.95,
cons@k, pass@k, greedy), and DIR/summary.json and DIR/report.md are written.

A stage is finished when DIR/STAGE/summary.json exists: re-running skips it. An interrupted stage
resumes from its own checkpoint (pretrain, GRPO and SFT save trainer state), so killing the demo
anywhere and running it again ends with the same result. The one exception is student_grpo,
which stops on a wall-clock budget: its step count depends on the machine's speed.

    r1kit demo [--out DIR] [--config r1kit/recipes/r1_tiny.toml] [--set r1_zero.steps=30 ...]
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from r1kit.common import print0
from r1kit.config import ConfigError, add_config_args, keys_help, load_config, read_toml
from r1kit.stages.distill import DistillConfig, NoTracesError
from r1kit.stages.evaluate import EvalConfig
from r1kit.stages.grpo import GRPOConfig
from r1kit.stages.pretrain import PretrainConfig

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "r1_tiny.toml"


@dataclass
class DemoConfig:
    out_dir: str = "runs/r1_tiny"  # one directory per stage under it, plus report.md
    task: str = "arithmetic"  # one task for every stage
    task_args: dict = field(default_factory=dict)  # the task's options, shared by every stage
    threads: int = 0  # > 0: torch.set_num_threads(threads) for the whole run
    control_prefix: str = "<think>"  # what the control forces at the start of the answer


@dataclass
class Recipe:
    demo: DemoConfig
    eval: EvalConfig
    pretrain: PretrainConfig
    r1_zero: GRPOConfig
    cold_start: DistillConfig
    reasoning_rl: GRPOConfig
    student_base: PretrainConfig
    distill: DistillConfig
    student_grpo: GRPOConfig


SECTIONS = {"demo": DemoConfig, "eval": EvalConfig, "pretrain": PretrainConfig, "r1_zero": GRPOConfig,
            "cold_start": DistillConfig, "reasoning_rl": GRPOConfig, "student_base": PretrainConfig,
            "distill": DistillConfig, "student_grpo": GRPOConfig}


def load_recipe(path=None, overrides=(), out: str | None = None) -> Recipe:
    """Every section of the recipe TOML (+ --set SECTION.KEY=VALUE) → configs; one task for all."""
    path = Path(path) if path else DEFAULT_RECIPE
    raw = read_toml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; a demo recipe has {list(SECTIONS)}")
    for text in overrides:
        head = text.split("=", 1)[0].split(".")[0].strip()
        if head not in SECTIONS:
            raise ConfigError(f"--set {text!r}: name the section, one of {list(SECTIONS)} (e.g. r1_zero.steps=30)")
    r = Recipe(**{name: load_config(cls, path, [o for o in overrides if o.startswith(name + ".")], section=name)
                  for name, cls in SECTIONS.items()})
    if out:
        r.demo.out_dir = out
    for name in ("eval", "pretrain", "r1_zero", "cold_start", "reasoning_rl", "student_base", "distill",
                 "student_grpo"):
        cfg = getattr(r, name)  # a stage's own task_args (e.g. reward weights) add to the demo's
        cfg.task, cfg.task_args = r.demo.task, {**r.demo.task_args, **cfg.task_args}
    for d in (r.cold_start, r.distill):
        d.student.task, d.student.task_args = r.demo.task, dict(d.task_args)
    return r


# ---------------------------------------------------------------------------------------------
# Stages: each takes (recipe, DIR) and returns its summary; paths between stages are fixed here
# ---------------------------------------------------------------------------------------------
def _base(r: Recipe, d: Path) -> dict:
    from r1kit.stages import pretrain
    r.pretrain.out_dir = str(d / "base")
    return pretrain.run(r.pretrain)


def _control(r: Recipe, d: Path) -> dict:
    return {"model": str(d / "base" / "model"), "prefix": r.demo.control_prefix,
            "note": "no training: the base model with its answer forced to begin with the prefix"}


def _grpo(cfg: GRPOConfig, base: Path, out: Path) -> dict:
    from r1kit.stages import grpo
    cfg.base, cfg.out_dir = str(base), str(out)
    s = grpo.run(cfg)
    if "stopped" in s:
        raise RuntimeError(f"{out.name}: GRPO stopped early: {s['stopped']}")
    return s


def _r1_zero(r: Recipe, d: Path) -> dict:
    return _grpo(r.r1_zero, d / "base" / "model", d / "r1_zero")


def _distill(cfg: DistillConfig, teacher: Path, student_base: Path, out: Path) -> dict:
    from r1kit.stages import distill
    cfg.teacher, cfg.out_dir, cfg.student.base = str(teacher), str(out), str(student_base)
    return distill.run(cfg)


def _cold_start(r: Recipe, d: Path) -> dict:
    return _distill(r.cold_start, d / "r1_zero" / "model", d / "base" / "model", d / "cold_start")


def _reasoning_rl(r: Recipe, d: Path) -> dict:
    cold = read_summary(d / "cold_start") or {}
    if "refused" in cold:  # no cold-start data: RL continues from R1-Zero, as the report says
        s = _grpo(r.reasoning_rl, d / "r1_zero" / "model", d / "reasoning_rl")
        return dict(s, started_from="r1_zero (the cold start was refused)")
    return _grpo(r.reasoning_rl, d / "cold_start" / "student" / "model", d / "reasoning_rl")


def _student_base(r: Recipe, d: Path) -> dict:
    from r1kit.stages import pretrain
    r.student_base.out_dir, r.student_base.tokenizer = str(d / "student_base"), str(d / "base" / "model")
    return pretrain.run(r.student_base)


def _distill_student(r: Recipe, d: Path) -> dict:
    return _distill(r.distill, d / "reasoning_rl" / "model", d / "student_base" / "model", d / "distill")


def distill_wall_seconds(s: dict) -> float:
    """The distilled student's cost: sampling the teacher plus training the student (no evals)."""
    return float(s.get("rejection", {}).get("seconds", 0.0)) + float(s.get("student", {}).get("train_seconds", 0.0))


def _student_grpo(r: Recipe, d: Path) -> dict:
    dist = read_summary(d / "distill")
    if dist is None or "refused" in dist:
        return {"skipped": "there is no distilled student to compare with"}
    r.student_grpo.time_budget_s = round(distill_wall_seconds(dist), 1)
    s = _grpo(r.student_grpo, d / "student_base" / "model", d / "student_grpo")
    s["matched_seconds"] = r.student_grpo.time_budget_s
    return s


# name → (what it does, function, the checkpoint its eval grades)
STAGES = {
    "base": ("pretrain the teacher's base from scratch", _base, "base/model"),
    "control": ("base forced to open <think>, no RL", _control, "base/model"),
    "r1_zero": ("GRPO from the base (R1-Zero)", _r1_zero, "r1_zero/model"),
    "cold_start": ("rejection-sample R1-Zero, SFT the base", _cold_start, "cold_start/student/model"),
    "reasoning_rl": ("GRPO from the cold-start model", _reasoning_rl, "reasoning_rl/model"),
    "student_base": ("pretrain a small dense student", _student_base, "student_base/model"),
    "distill": ("rejection-sample the teacher, SFT the student", _distill_student, "distill/student/model"),
    "student_grpo": ("the student by GRPO alone, same wall time", _student_grpo, "student_grpo/model"),
}


def read_summary(stage_dir: Path) -> dict | None:
    """A finished stage's summary, or None (missing, or cut short by a kill while being written)."""
    try:
        return json.loads((stage_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj) -> None:
    from r1kit.checkpoint import write_text_atomic
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
class Clock:
    """Wall seconds per stage in DIR/stage_seconds.json, added up over interrupted runs.

    A SIGINT adds the time spent so far; a SIGKILL loses only the killed run's part of one stage.
    """

    def __init__(self, d: Path):
        self.path = d / "stage_seconds.json"
        self.seconds = json.loads(self.path.read_text()) if self.path.exists() else {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 1)
        _write_json(self.path, self.seconds)


def run_stage(r: Recipe, d: Path, name: str, clock: Clock) -> tuple[dict, dict | None]:
    """Train (unless finished) and evaluate (unless done) one stage → (summary, eval result)."""
    _, fn, ckpt = STAGES[name]
    sdir = d / name
    summary = read_summary(sdir)
    ev = _read_eval(sdir)
    if summary is not None and (ev is not None or "refused" in summary or "skipped" in summary):
        print0(f"demo: {name}: finished earlier, skipping")
        return summary, ev
    t0 = time.perf_counter()
    try:
        if summary is not None:
            print0(f"demo: {name}: trained earlier, evaluating")
        else:
            sdir.mkdir(parents=True, exist_ok=True)
            try:
                summary = fn(r, d)
            except NoTracesError as e:  # nothing to distill: say so in the report, don't crash
                print0(f"demo: {name}: refused: {e}")
                summary = {"refused": str(e), "rejection": _read_json(sdir / "rejection.json")}
            _write_json(sdir / "summary.json", summary)
        if "refused" not in summary and "skipped" not in summary:
            ev = _evaluate(r, d, name, ckpt)
    finally:
        clock.add(name, time.perf_counter() - t0)
    return summary, ev


def _evaluate(r: Recipe, d: Path, name: str, ckpt: str) -> dict:
    from dataclasses import replace

    from r1kit.stages import evaluate
    prefix = r.demo.control_prefix if name == "control" else r.eval.prefix
    # every stage trains on the recipe's task, so its grade must come from the held-out split
    split = "test" if r.eval.split == "auto" else r.eval.split
    cfg = replace(r.eval, checkpoint=str(d / ckpt), out=str(d / name / "eval.json"), prefix=prefix, split=split)
    return evaluate.run(cfg)


def _read_eval(sdir: Path) -> dict | None:
    return _read_json(sdir / "eval.json")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run(r: Recipe) -> dict:
    """All stages in order (skipping finished ones) → DIR/summary.json and DIR/report.md."""
    from r1kit import report
    if r.demo.threads > 0:
        import torch
        torch.set_num_threads(r.demo.threads)
    d = Path(r.demo.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    clock, t0 = Clock(d), time.perf_counter()
    results = {}
    for i, name in enumerate(STAGES, 1):
        print0(f"\n━━ demo [{i}/{len(STAGES)}] {name}: {STAGES[name][0]}")
        results[name] = run_stage(r, d, name, clock)
    summary = build_summary(r, d, results, clock.seconds, time.perf_counter() - t0)
    _write_json(d / "summary.json", summary)
    report.write_report(d, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Summary and the final screen
# ---------------------------------------------------------------------------------------------
def _stage_entry(name: str, d: Path, summary: dict, ev: dict | None, seconds: float) -> dict:
    m = ev["metrics"] if ev else {}
    k = ev["k"] if ev else None
    e = {"what": STAGES[name][0], "seconds": seconds, "model": str(d / STAGES[name][2]) if ev else None,
         "greedy_accuracy": m.get("greedy_accuracy"), "pass_at_1": m.get("pass_at_1"),
         "pass_at_1_ci": m.get("pass_at_1_ci"), "cons_at_k": m.get(f"cons_at_{k}"),
         "pass_at_k": m.get("pass_at_k", {}).get(str(k)), "think_rate": m.get("think_rate"),
         "response_length": m.get("response_length")}
    for key in ("refused", "skipped", "started_from", "steps", "rl_seconds", "matched_seconds", "train_seconds"):
        if key in summary:
            e[key] = summary[key]
    if isinstance(summary.get("rejection"), dict):
        e["rejection"] = {k: v for k, v in summary["rejection"].items() if k != "unsolved_examples"}
        e["rejection"]["unsolved_examples"] = summary["rejection"].get("unsolved_examples", [])[:3]
    if isinstance(summary.get("student"), dict):
        e["train_seconds"] = summary["student"].get("train_seconds")
    return e


def build_summary(r: Recipe, d: Path, results: dict, seconds: dict, this_run: float) -> dict:
    from r1kit.stages.evaluate import versions
    stages = {n: _stage_entry(n, d, s, ev, seconds.get(n, 0.0)) for n, (s, ev) in results.items()}
    dist, solo = stages["distill"], stages["student_grpo"]
    comparison = None
    if dist.get("pass_at_1") is not None and solo.get("pass_at_1") is not None:
        gap = dist["pass_at_1"] - solo["pass_at_1"]
        overlap = dist["pass_at_1_ci"][0] <= solo["pass_at_1_ci"][1] and solo["pass_at_1_ci"][0] <= dist["pass_at_1_ci"][1]
        comparison = {"distilled": {"pass_at_1": dist["pass_at_1"], "seconds": distill_wall_seconds(results["distill"][0])},
                      "grpo_only": {"pass_at_1": solo["pass_at_1"], "seconds": solo.get("rl_seconds"),
                                    "steps": solo.get("steps")},
                      "winner": "tie" if gap == 0 else ("distillation" if gap > 0 else "grpo"),
                      "pass_at_1_gap": gap, "intervals_overlap": overlap}
    example = next((dict(ev["metrics"]["example"], stage=n) for n in ("distill", "reasoning_rl", "r1_zero")
                    if (ev := results[n][1]) and ev["metrics"].get("example")), None)
    return {"out_dir": str(d), "task": r.demo.task, "task_args": r.demo.task_args,
            "eval": {"k": r.eval.k, "temperature": r.eval.temperature, "top_p": r.eval.top_p,
                     "problems": r.eval.problems, "max_new_tokens": r.eval.max_new_tokens, "seed": r.eval.seed},
            "versions": versions(), "stages": stages,
            "student_pass_at_1": dist.get("pass_at_1"), "student_greedy_accuracy": dist.get("greedy_accuracy"),
            "teacher_pass_at_1": stages["reasoning_rl"].get("pass_at_1"),
            "r1_zero_pass_at_1": stages["r1_zero"].get("pass_at_1"),
            "control_pass_at_1": stages["control"].get("pass_at_1"), "base_pass_at_1": stages["base"].get("pass_at_1"),
            "comparison": comparison, "example": example,
            "total_seconds": round(sum(seconds.values()), 1), "this_run_seconds": round(this_run, 1)}


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.0f}"


def print_final(summary: dict, report_path: Path) -> None:
    """The stage table, the headline numbers, the report's path, and one solved problem."""
    from rich.console import Console
    from rich.table import Table
    con = Console()
    k = summary["eval"]["k"]
    t = Table(title=f"r1kit demo — {summary['task']}: {summary['eval']['problems']} held-out problems, "
                    f"pass@1 over k={k} samples at T={summary['eval']['temperature']}")
    for col in ("stage", "wall s", "greedy %", "pass@1 % [95% CI]", f"cons@{k} %", "think %"):
        t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for name, e in summary["stages"].items():
        ci = e.get("pass_at_1_ci")
        p1 = "—" if e.get("pass_at_1") is None else f"{_fmt(e['pass_at_1'])} [{_fmt(ci[0])}–{_fmt(ci[1])}]"
        if "refused" in e or "skipped" in e:
            p1 = "refused" if "refused" in e else "skipped"
        t.add_row(name, _fmt(e["seconds"], False), _fmt(e.get("greedy_accuracy")), p1,
                  _fmt(e.get("cons_at_k")), _fmt(e.get("think_rate")))
    con.print(t)
    con.print(f"student pass@1 {_fmt(summary['student_pass_at_1'])}% · teacher {_fmt(summary['teacher_pass_at_1'])}% · "
              f"base forced to <think>, no RL {_fmt(summary['control_pass_at_1'])}% · "
              f"total {summary['total_seconds']:.0f} s", highlight=False)
    c = summary.get("comparison")
    if c:
        con.print(f"distilled student {_fmt(c['distilled']['pass_at_1'])}% vs GRPO-only student "
                  f"{_fmt(c['grpo_only']['pass_at_1'])}% at ~{c['distilled']['seconds']:.0f} s each → {c['winner']}",
                  highlight=False)
    for name in ("cold_start", "distill"):
        if "refused" in summary["stages"][name]:
            con.print(f"{name} refused: {summary['stages'][name]['refused']}", highlight=False)
    con.print(f"report: {report_path}", highlight=False)
    _print_example(con, summary)


def _print_example(con, summary: dict) -> None:
    ex = summary.get("example")
    if not ex:
        return
    who = {"distill": "the distilled student"}.get(ex["stage"], f"the {ex['stage']} model")
    con.print(f"\n[bold]One solved problem[/bold] ({who}, held-out, sampled at T={summary['eval']['temperature']}):",
              highlight=False)
    m = re.search(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", ex["completion"], re.DOTALL)
    lines = [ex["prompt"]] + ([f"<think> {m.group(1).strip()} </think>", f"<answer> {m.group(2).strip()} </answer>"]
                              if m else [ex["completion"]])
    for ln in lines:
        con.print("  " + ln, markup=False, highlight=False, soft_wrap=True)
    con.print(f"  ✓ correct (reference {ex['answer']})", markup=False, highlight=False)


# the verb whose --help lists a section's keys (the demo's own help would be hundreds of lines)
VERB_OF = {EvalConfig: "eval", PretrainConfig: "pretrain", GRPOConfig: "grpo", DistillConfig: "distill"}


def recipe_help() -> str:
    """--help epilog: the [demo] keys in full, then each section and where its keys are listed."""
    lines = [keys_help(DemoConfig, "demo", bare_keys=False), "",
             f"recipe sections (default recipe {DEFAULT_RECIPE.name}; set a key with --set SECTION.KEY=VALUE):"]
    lines += [f"  {'[' + name + ']':15s} {cls.__name__}: keys as in `r1kit {VERB_OF[cls]} --help`"
              for name, cls in SECTIONS.items() if cls is not DemoConfig]
    lines.append("The defaults above are the config classes'; the recipe file sets its own values over them.")
    return "\n".join(lines)


def add_args(p) -> None:
    add_config_args(p, DemoConfig, "demo", epilog=recipe_help(), bare_keys=False)
    p.description = (p.description or "") + f".\nRecipe: {DEFAULT_RECIPE} unless --config is given."


def main(args) -> int:
    r = load_recipe(args.config, args.overrides, args.out)
    summary = run(r)
    print_final(summary, Path(r.demo.out_dir) / "report.md")
    return 0
