"""On-policy distillation vs off-policy SFT distillation: student accuracy per wall-second.

Same teacher, same student base, same tokenizer, one thread, 2-digit addition:
    teacher   pretrained from scratch on scratch-work traces only (it always reasons)
    student   a base pretrained briefly on R1-Zero's mixed corpus (mostly answers without thinking)
    on-policy the GRPO stage with advantage = "teacher_logprob": the student samples, the teacher
              scores each sampled token, A_t = log π_teacher − log π_student (reverse KL)
    SFT       the distill stage: the teacher samples k traces per prompt, R1's filters keep the
              verified ones, the student is fine-tuned on them (wall time = sampling + SFT)
Both get the same wall-clock budget; held-out greedy accuracy is measured along the way (eval
time excluded). Prints both curves, then
    on_policy: acc A0 → A1 in S s (Δ per 100 s)    sft: acc A0 → A2 in S' s (Δ per 100 s)
    ratio_on_policy_vs_sft=<gain per second, on-policy / SFT>
    python bench/on_policy_distill.py [--budget 60] [--root DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from r1kit.stages import distill, grpo, pretrain
from r1kit.stages.distill import DistillConfig
from r1kit.stages.grpo import GRPOConfig
from r1kit.stages.pretrain import PretrainConfig
from r1kit.stages.sft import SFTConfig
from r1kit.training import ModelSpec

TASK_ARGS = {"digits": 2, "require_think": False, "train_size": 2000, "test_size": 200}
MODEL = ModelSpec("llama", {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "max_position_embeddings": 128})
EVAL, NEW = 100, 48


def bases(root: Path, teacher_steps: int, student_steps: int) -> tuple[dict, dict]:
    common = dict(task_args=TASK_ARGS, model=MODEL, batch_size=32, eval_problems=EVAL, max_new_tokens=NEW,
                  save_every=10_000)
    if not (root / "teacher" / "model" / "config.json").exists():
        pretrain.run(PretrainConfig(out_dir=str(root / "teacher"), steps=teacher_steps, mix={"think": 1.0}, **common))
    if not (root / "student" / "model" / "config.json").exists():
        pretrain.run(PretrainConfig(out_dir=str(root / "student"), steps=student_steps, seed=1,
                                    tokenizer=str(root / "teacher" / "model"), **common))
    read = lambda d: json.loads((root / d / "summary.json").read_text())  # noqa: E731
    return read("teacher"), read("student")


def on_policy(root: Path, budget: float, lr: float) -> list[tuple[float, float]]:
    out = root / "on_policy"
    shutil.rmtree(out, ignore_errors=True)  # the bases are reused between runs, the method's output is not
    grpo.run(GRPOConfig(base=str(root / "student"), out_dir=str(out), task_args=TASK_ARGS,
                        advantage="teacher_logprob", teacher=str(root / "teacher"), steps=10_000,
                        time_budget_s=budget, prompts_per_step=16, group_size=2, max_new_tokens=NEW, lr=lr,
                        eval_every=10, eval_problems=EVAL, save_every=10_000))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())  # the end of the budget, evaluated
    return [(r["rl_seconds"], r["eval_greedy_accuracy"]) for r in rows if "eval_greedy_accuracy" in r] + \
        [(summary["rl_seconds"], summary["final_accuracy"])]


def sft(root: Path, budget: float, steps: list[int]) -> list[tuple[float, float]]:
    """SFT distillation at growing student step counts; a point's wall time = sampling the teacher once
    (its traces are shared by the points) + that point's training."""
    for d in root.glob("sft*"):
        shutil.rmtree(d)
    sample = distill.run(DistillConfig(teacher=str(root / "teacher"), out_dir=str(root / "sft"), task_args=TASK_ARGS,
                                       prompts=256, k=2, temperature=0.7, max_new_tokens=NEW, sample_only=True))
    sampling_s, curve = float(sample["rejection"]["seconds"]), []
    for n in steps:
        student = SFTConfig(base=str(root / "student" / "model"), steps=n, batch_size=16, max_len=128, lr=1e-3,
                            eval_problems=EVAL, max_new_tokens=NEW, save_every=10_000)
        s = distill.run(DistillConfig(teacher=str(root / "teacher"), out_dir=str(root / f"sft_{n}"),
                                      task_args=TASK_ARGS, traces=str(root / "sft" / "kept.jsonl"), student=student))
        seconds = sampling_s + float(s["student"]["train_seconds"])
        curve.append((seconds, s["student"]["greedy_accuracy"]))
        if seconds > budget:
            break
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=60.0, help="wall seconds each method may spend")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4, help="on-policy distillation learning rate")
    ap.add_argument("--skip-sft", action="store_true", help="only the on-policy run (when tuning its settings)")
    ap.add_argument("--root", default=None, help="keep the models here (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.root or tempfile.mkdtemp(prefix="r1kit-opd-"))
    t, s = bases(root, args.teacher_steps, args.student_steps)
    print(f"teacher greedy accuracy {t['greedy_accuracy']:.3f}; student base {s['greedy_accuracy']:.3f}")
    t0 = time.perf_counter()
    opd = on_policy(root, args.budget, args.lr)
    print(f"on-policy took {time.perf_counter() - t0:.0f} s of wall time with evals")
    a0 = s["greedy_accuracy"]
    if args.skip_sft:
        print("on_policy " + "  ".join(f"{sec:5.1f}s:{acc:.3f}" for sec, acc in opd))
        return
    off = sft(root, args.budget, [25, 50, 100, 200, 400])
    for name, curve in (("on_policy", opd), ("sft", off)):
        print(f"{name:9s} " + "  ".join(f"{sec:5.1f}s:{acc:.3f}" for sec, acc in curve))
    (so, ao), (ss, as_) = opd[-1], off[-1]
    go, gs = (ao - a0) / max(so, 1e-9), (as_ - a0) / max(ss, 1e-9)
    print(f"on_policy: acc {a0:.3f} → {ao:.3f} in {so:.0f} s ({100 * go:+.3f} per 100 s)    "
          f"sft: acc {a0:.3f} → {as_:.3f} in {ss:.0f} s ({100 * gs:+.3f} per 100 s)")
    print(f"ratio_on_policy_vs_sft={go / gs:.2f}" if gs > 0 else "ratio_on_policy_vs_sft=n/a (SFT gained nothing)")


if __name__ == "__main__":
    main()
