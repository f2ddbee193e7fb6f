"""Report: a demo directory (summary.json + each stage's metrics.jsonl) → report.md + PNG plots.

    python -m r1kit.report DIR      (r1kit demo writes it at the end)

Plots (matplotlib, Agg backend, so no display is needed): reward and accuracy vs step and
response length and think rate vs step for every GRPO stage, training loss of the supervised
stages, and held-out evaluation per stage with 95% intervals.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RL_STAGES = {"r1_zero": "R1-Zero (GRPO from base)", "reasoning_rl": "reasoning RL (after cold start)",
             "student_grpo": "student, GRPO only"}
LOSS_STAGES = {"base": "base/metrics.jsonl", "cold_start": "cold_start/student/metrics.jsonl",
               "student_base": "student_base/metrics.jsonl", "distill": "distill/student/metrics.jsonl"}


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _md(text: str) -> str:
    """Tags as code: a bare <think> in markdown is an HTML tag and would not be shown."""
    return text.replace("<think>", "`<think>`")


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: works with no display, in CI and over ssh
    import matplotlib.pyplot as plt
    return plt


def heldout_points(metrics: list[dict], run: dict) -> list[tuple[int, float]]:
    """(step, held-out greedy accuracy) of a GRPO run: the start model at step 0, every in-run
    evaluation, and the end-of-run one (summary's final_accuracy) when no step's metrics hold it.

    >>> heldout_points([{"step": 1}, {"step": 2, "eval_greedy_accuracy": 0.5}, {"step": 3}],
    ...                {"base_accuracy": 0.25, "final_accuracy": 0.75, "steps": 3})
    [(0, 0.25), (2, 0.5), (3, 0.75)]
    """
    ev = [(x["step"], x["eval_greedy_accuracy"]) for x in metrics if "eval_greedy_accuracy" in x]
    start, end, steps = run.get("base_accuracy"), run.get("final_accuracy"), run.get("steps")
    ev = ([(0, start)] if start is not None else []) + ev
    if end is not None and steps and all(s != steps for s, _ in ev):
        ev.append((steps, end))
    return ev


def plot_rl(d: Path, pairs: list[tuple[str, str]], name: str, title: str,
            stages: dict[str, str] = RL_STAGES) -> str | None:
    """A row per (metric key, label), a column per GRPO stage (each on its own step axis) → d/name.
    ``stages`` maps a stage's subdirectory to its column title ("." is d itself: one GRPO run)."""
    runs = {s: m for s in stages if (m := _metrics(d / s / "metrics.jsonl"))}
    if not runs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(pairs), len(runs), figsize=(4.2 * len(runs), 2.9 * len(pairs)), dpi=110,
                             sharey="row", squeeze=False)
    for col, (stage, m) in enumerate(runs.items()):
        steps = [x["step"] for x in m]
        for row, (key, label) in enumerate(pairs):
            ax = axes[row][col]
            ax.plot(steps, [x.get(key) for x in m], lw=1.6, color=f"C{row}", label="training samples")
            ev = heldout_points(m, _read(d / stage / "summary.json"))
            if key == "accuracy" and ev:  # where the run graded itself on held-out problems
                ax.plot([s for s, _ in ev], [a for _, a in ev], "o", color="k", ms=5, label="held-out greedy")
                ax.legend(fontsize=7, loc="lower right")
            if key in ("accuracy", "think_rate"):
                ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(stages[stage], fontsize=10)
            if row == len(pairs) - 1:
                ax.set_xlabel("GRPO step")
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(d / name)
    plt.close(fig)
    return name


def plot_loss(d: Path) -> str | None:
    runs = {s: m for s, p in LOSS_STAGES.items() if (m := _metrics(d / p))}
    if not runs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    for stage, m in runs.items():
        ax.plot([x["step"] for x in m], [x["loss"] for x in m], label=stage, lw=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title("pretraining and SFT loss (SFT: assistant tokens only)", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "training_loss.png")
    plt.close(fig)
    return "training_loss.png"


def plot_eval(d: Path, summary: dict) -> str | None:
    """Grouped bars per stage: greedy, pass@1 (with its 95% interval), cons@k."""
    rows = [(n, e) for n, e in summary["stages"].items() if e.get("pass_at_1") is not None]
    if not rows:
        return None
    plt = _pyplot()
    k = summary["eval"]["k"]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(rows) + 2), 4.2), dpi=110)
    width, xs = 0.26, range(len(rows))
    series = [("greedy", "greedy_accuracy", "#8da0cb"), (f"pass@1 (k={k})", "pass_at_1", "#fc8d62"),
              (f"cons@{k}", "cons_at_k", "#66c2a5")]
    for j, (label, key, color) in enumerate(series):
        vals = [e.get(key) or 0.0 for _, e in rows]
        pos = [x + (j - 1) * width for x in xs]
        err = None
        if key == "pass_at_1":
            err = [[v - e["pass_at_1_ci"][0] for v, (_, e) in zip(vals, rows)],
                   [e["pass_at_1_ci"][1] - v for v, (_, e) in zip(vals, rows)]]
        ax.bar(pos, vals, width, label=label, color=color, yerr=err, capsize=3)
        tops = [e["pass_at_1_ci"][1] if key == "pass_at_1" else v for v, (_, e) in zip(vals, rows)]
        for p, v, top in zip(pos, vals, tops):  # above the error bar, so the two never overlap
            ax.text(p, top + 0.015, f"{100 * v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(list(xs), [n for n, _ in rows], rotation=20, fontsize=9)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"evaluation per stage ({summary['eval']['problems']} held-out problems, "
                 f"T={summary['eval']['temperature']}, top-p {summary['eval']['top_p']})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(d / "eval_by_stage.png")
    plt.close(fig)
    return "eval_by_stage.png"


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def stage_table(summary: dict) -> list[str]:
    k = summary["eval"]["k"]
    out = [f"| stage | what | wall s | greedy | pass@1 (k={k}) [95% CI] | cons@{k} | pass@{k} | think rate | length |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name, e in summary["stages"].items():
        ci = e.get("pass_at_1_ci")
        p1 = "—" if e.get("pass_at_1") is None else f"{_pct(e['pass_at_1'])} [{_pct(ci[0])}, {_pct(ci[1])}]"
        note = " — refused" if "refused" in e else (" — skipped" if "skipped" in e else "")
        length = "—" if e.get("response_length") is None else f"{e['response_length']:.0f}"
        out.append(f"| {name} | {_md(e['what'])}{note} | {e['seconds']:.0f} | {_pct(e.get('greedy_accuracy'))} | {p1} | "
                   f"{_pct(e.get('cons_at_k'))} | {_pct(e.get('pass_at_k'))} | {_pct(e.get('think_rate'))} | {length} |")
    return out


def control_section(summary: dict) -> list[str]:
    """How much of R1-Zero's gain the base already had, made visible by forcing <think>."""
    s = summary["stages"]
    out = ["## Elicited or taught? The forced-`<think>` control", "",
           "The control is the pretrained base with no RL at all, its answer forced to begin with `<think>` "
           "(the token is appended to the prompt). Whatever the control already scores, RL did not have to teach: "
           "it only had to make the model *choose* to reason.", ""]
    base, ctl, zero = (s[n].get("pass_at_1") for n in ("base", "control", "r1_zero"))
    if None in (base, ctl, zero):
        return out + ["(not all three of base, control and R1-Zero were evaluated)", ""]
    out += ["| model | greedy | pass@1 | think rate |", "|---|--:|--:|--:|"]
    for name, label in (("base", "base, free to choose"), ("control", "base forced to open `<think>` (no RL)"),
                        ("r1_zero", "R1-Zero (GRPO from the base)")):
        e = s[name]
        out.append(f"| {label} | {_pct(e.get('greedy_accuracy'))} | {_pct(e['pass_at_1'])} | {_pct(e.get('think_rate'))} |")
    out.append("")
    gain = zero - base
    if gain <= 0:
        return out + [f"R1-Zero did not improve on the base here ({_pct(base)} → {_pct(zero)} pass@1).", ""]
    share = max(0.0, min(1.0, (ctl - base) / gain))
    out.append(f"R1-Zero gained {100 * gain:.1f} points of pass@1 over the base; forcing `<think>` alone recovers "
               f"{100 * share:.0f}% of that gain (**elicited**), and {100 * (1 - share):.0f}% is left for what RL "
               f"**taught** beyond making the model think.")
    if share >= 0.9:
        out[-1] += (" Here RL mostly elicited: the base had learned to reason in pretraining, and RL taught it "
                    "*when* to use that, not *how*.")
    return out + [""]


def rejection_section(summary: dict) -> list[str]:
    out = ["## Rejection sampling", "",
           "Filters, in order: wrong answer, format (`<think>…</think><answer>…</answer>`), language "
           "consistency, length (truncated), duplicate, per-prompt cap.", "",
           "| stage | teacher | prompts × k | correct samples | kept | dropped | prompts never solved |",
           "|---|---|--:|--:|--:|---|--:|"]
    notes = []
    for name in ("cold_start", "distill"):
        rj = summary["stages"].get(name, {}).get("rejection")
        if not rj or "prompts" not in rj:
            continue
        dropped = ", ".join(f"{k} {v}" for k, v in rj["dropped"].items() if v) or "none"
        out.append(f"| {name} | `{Path(rj['teacher']).parent.name}` | {rj['prompts']} × {rj['k']} | "
                   f"{rj['correct']}/{rj['samples']} | {rj['kept']} | {dropped} | {rj['prompts_unsolved']} |")
        if rj["prompts_unsolved"]:
            eg = ", ".join(f"`{x['prompt']}` (= {x['answer']})" for x in rj.get("unsolved_examples", []))
            notes.append(f"- {name}: the teacher never solved {rj['prompts_unsolved']} of {rj['prompts']} prompts "
                         f"in {rj['k']} tries, e.g. {eg}. Those prompts contribute no trace.")
        if rj["kept"] == 0:
            notes.append(f"- {name}: **no trace survived** — the student was not trained.")
    for name in ("cold_start", "distill"):
        if "refused" in summary["stages"].get(name, {}):
            notes.append(f"- {name} refused: {summary['stages'][name]['refused']}")
    return out + [""] + notes + ([""] if notes else [])


def comparison_section(summary: dict) -> list[str]:
    """R1 §4.1 in miniature: distilling a teacher vs RL on the small model itself, same wall time."""
    out = ["## Distillation vs RL on the small model, same wall time", "",
           "Both students start from the same from-scratch-pretrained small base. One is fine-tuned on the "
           "teacher's verified traces (its wall time: sampling the teacher + SFT); the other gets that much "
           "wall time of GRPO on its own samples.", ""]
    c = summary.get("comparison")
    if not c:
        why = summary["stages"].get("student_grpo", {}).get("skipped") or "one of the two students was not evaluated"
        return out + [f"Not run: {why}.", ""]
    d, g = c["distilled"], c["grpo_only"]
    out += ["| student | pass@1 | wall s |", "|---|--:|--:|",
            f"| distilled from the teacher | {_pct(d['pass_at_1'])} | {d['seconds']:.0f} |",
            f"| GRPO alone ({g.get('steps')} steps) | {_pct(g['pass_at_1'])} | {g['seconds'] or 0:.0f} |", ""]
    gap = 100 * abs(c["pass_at_1_gap"])
    if c["winner"] == "tie":
        verdict = "The two students tie."
    else:
        who = "Distillation" if c["winner"] == "distillation" else "GRPO alone"
        verdict = f"**{who} wins** by {gap:.1f} points of pass@1"
        verdict += (" — but the 95% intervals overlap, so this run cannot call it."
                    if c["intervals_overlap"] else ", outside the overlap of the 95% intervals.")
    return out + [verdict, ""]


def _student_note(summary: dict) -> list[str]:
    """Explain a student that samples better than its teacher, instead of leaving it a puzzle."""
    st, te = summary["stages"].get("distill", {}), summary["stages"].get("reasoning_rl", {})
    if None in (st.get("pass_at_1"), te.get("pass_at_1")) or st["pass_at_1"] <= te["pass_at_1"]:
        return []
    return [f"The student's pass@1 is above its teacher's: it was fine-tuned to a low loss on verified-correct traces "
            f"only, so its distribution is sharper and sampling at T={summary['eval']['temperature']} rarely leaves "
            f"its greedy answer (greedy: student {_pct(st.get('greedy_accuracy'))}, teacher "
            f"{_pct(te.get('greedy_accuracy'))}).", ""]


def write_report(d, summary: dict) -> Path:
    """DIR/report.md and its PNGs from DIR/summary.json's content and the stages' logs."""
    d = Path(d)
    plots = [plot_rl(d, [("reward_mean", "mean reward"), ("accuracy", "accuracy")],
                     "rl_reward_accuracy.png", "GRPO: reward and accuracy"),
             plot_rl(d, [("response_length", "response length (tokens)"), ("think_rate", "think rate")],
                     "rl_length_think.png", "GRPO: response length and think rate"),
             plot_eval(d, summary), plot_loss(d)]
    e = summary["eval"]
    lines = [f"# r1kit demo report — {summary['task']}", "",
             f"Total wall time {summary['total_seconds']:.0f} s. Every number below is on {e['problems']} held-out "
             f"problems: pass@1 is the mean over k={e['k']} samples at temperature {e['temperature']}, top-p "
             f"{e['top_p']} (R1's protocol), with a 95% interval over problems; greedy is one greedy answer.", "",
             f"**Distilled student pass@1: {_pct(summary['student_pass_at_1'])}** · teacher (after reasoning RL) "
             f"{_pct(summary['teacher_pass_at_1'])} · R1-Zero {_pct(summary['r1_zero_pass_at_1'])} · base forced to "
             f"think, no RL {_pct(summary['control_pass_at_1'])} · base {_pct(summary['base_pass_at_1'])}", "",
             *_student_note(summary), "## Stages", "", *stage_table(summary), ""]
    lines += [f"![{p}]({p})" for p in plots if p] + [""]
    lines += control_section(summary) + comparison_section(summary) + rejection_section(summary)
    ex = summary.get("example")
    if ex:
        lines += ["## One solved problem", "", f"From the `{ex['stage']}` model's evaluation samples:", "",
                  "```", f"prompt:     {ex['prompt']}", f"completion: {ex['completion']}", f"reference:  {ex['answer']}",
                  "```", ""]
    v = summary["versions"]
    lines += ["## Settings", "", f"- evaluation: seed {e['seed']}, max {e['max_new_tokens']} new tokens; "
              f"each stage's `eval.json` records its engine settings", f"- versions: torch {v['torch']}, "
              f"r1kit {v['r1kit']}, python {v['python']}", f"- task: `{summary['task']}` {summary['task_args']}", ""]
    path = d / "report.md"
    path.write_text("\n".join(lines))
    return path


RUN_CURVES = [("reward_mean", "reward"), ("accuracy", "accuracy"), ("response_length", "length (tokens)")]


def plot_run(d: Path) -> str | None:
    """One GRPO run's directory (``r1kit grpo --out DIR``) → DIR/curves.png: reward, accuracy
    (with the held-out greedy points) and response length vs step."""
    summary = _read(d / "summary.json")
    title = f"GRPO on {summary.get('task', 'its task')} from {Path(str(summary.get('base', d))).name}"
    return plot_rl(d, RUN_CURVES, "curves.png", title, stages={".": "training samples"})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m r1kit.report DIR   (a directory written by r1kit demo, or by r1kit grpo)",
              file=sys.stderr)
        return 2
    d = Path(argv[0])
    if (d / "rollouts.jsonl").exists():
        print(d / plot_run(d))  # one GRPO run: its curves
        return 0
    if not (d / "summary.json").exists():
        print(f"{d / 'summary.json'}: not found; run r1kit demo --out {d} first", file=sys.stderr)
        return 2
    print(write_report(d, json.loads((d / "summary.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
