"""Policy-loss ablation on the tiny R1-Zero recipe: steps (and seconds) to 95% held-out greedy accuracy.

One base (the recipe's [pretrain] section, ~2 minutes, reused when it exists), then one short,
seeded GRPO run per loss from that same base with everything else equal, each stopped at its
first evaluation at 95% (grpo.target_accuracy). Each run uses μ = 2
inner updates per batch: with one update the ratio is exactly 1 and every loss gives the same
gradient, so μ = 1 would measure nothing but noise. Prints one row per loss (steps to target for
each seed, their median, median RL seconds) and, last, the ratios of median steps against the
default clipped loss.
    python bench/grpo_ablation.py [--losses clipped,cispo,...] [--steps 20] [--mu 2] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from r1kit import rl
from r1kit.config import load_config
from r1kit.stages import grpo, pretrain

RECIPE = Path(__file__).resolve().parents[1] / "r1kit" / "recipes" / "r1_zero_tiny.toml"
TARGET = 0.95


def ensure_base(base_dir: Path) -> Path:
    if (base_dir / "model" / "config.json").exists():
        print(f"base: reusing {base_dir}")
        return base_dir
    cfg = load_config(pretrain.PretrainConfig, RECIPE, section="pretrain", bare_keys=False)
    cfg.out_dir = str(base_dir)
    t0 = time.perf_counter()
    pretrain.run(cfg)
    print(f"base: pretrained {base_dir} in {time.perf_counter() - t0:.0f}s")
    return base_dir


def first_at_target(rows: list[dict]) -> tuple[int | None, float | None]:
    """(step, RL seconds) of the first evaluation at or above TARGET; (None, None) if none."""
    for r in rows:
        if r.get("eval_greedy_accuracy", -1.0) >= TARGET:
            return r["step"], r["rl_seconds"]
    return None, None


def run_one(base_cfg: grpo.GRPOConfig, loss: str, seed: int, out: Path) -> dict:
    cfg = replace(base_cfg, loss=loss, seed=seed, out_dir=str(out))
    t0 = time.perf_counter()
    summary = grpo.run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    step, secs = first_at_target(rows)
    evals = [r["eval_greedy_accuracy"] for r in rows if "eval_greedy_accuracy" in r]
    clip = [r.get("clip_frac", r.get("cov_frac")) for r in rows]
    clip = [c for c in clip if c is not None]
    return {"loss": loss, "seed": seed, "steps_to_95": step, "rl_seconds_to_95": secs, "base": summary.get("base_accuracy"),
            "final": summary.get("final_accuracy"), "peak": max(evals) if evals else None,
            "mean_clip_or_mask": sum(clip) / len(clip) if clip else None, "wall_s": wall, "stopped": summary.get("stopped")}


def fmt(x, spec="{:.0f}") -> str:
    return "never" if x is None else spec.format(x)


def median(xs: list):
    """Median with a run that never reached the target counted as infinitely slow (None if most never did)."""
    v = sorted(float("inf") if x is None else x for x in xs)
    m = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return None if m == float("inf") else m


def report(results: list[dict], losses: list[str], seeds: list[int], args, cfg) -> None:
    print(f"\nR1-Zero tiny (4-digit addition), {cfg.prompts_per_step}×{cfg.group_size} samples/step, μ={args.mu}, "
          f"lr {cfg.lr}, seeds {seeds}; greedy accuracy on {args.eval_problems} held-out problems every "
          f"{args.eval_every} step(s); base accuracy {fmt(results[0]['base'], '{:.3f}')}")
    print(f"{'loss':<10} {'steps→95% per seed':>19} {'median':>6} {'RL s (median)':>13} {'final (mean)':>12} "
          f"{'clip/mask':>9}")
    summary = {}
    for loss in losses:
        rs = [r for r in results if r["loss"] == loss]
        steps, secs = [r["steps_to_95"] for r in rs], [r["rl_seconds_to_95"] for r in rs]
        finals = [r["final"] for r in rs if r["final"] is not None]
        clips = [r["mean_clip_or_mask"] for r in rs if r["mean_clip_or_mask"] is not None]
        summary[loss] = median(steps)
        print(f"{loss:<10} {' '.join(fmt(x) for x in steps):>19} {fmt(summary[loss], '{:.1f}'):>6} "
              f"{fmt(median(secs)):>13} {fmt(sum(finals) / len(finals) if finals else None, '{:.3f}'):>12} "
              f"{fmt(sum(clips) / len(clips) if clips else None, '{:.4f}').replace('never', '-'):>9}"
              + "".join(f"  seed {r['seed']} stopped: {r['stopped']}" for r in rs if r["stopped"]))
    ref = "clipped" if "clipped" in summary else losses[0]
    for loss in losses:
        if summary[loss] and summary[ref]:
            print(f"median_steps_to_95_ratio_{loss}_vs_{ref}={summary[loss] / summary[ref]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--losses", default="clipped,dual_clip,gspo,cispo,sapo,dppo_tv,clip_cov,kl_cov")
    p.add_argument("--steps", type=int, default=20, help="most steps per run (a run stops at 95%%)")
    p.add_argument("--mu", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each loss runs once per seed")
    p.add_argument("--base", default="runs/bases/arith_tiny", help="base checkpoint dir (pretrained if missing)")
    args = p.parse_args()
    torch.set_num_threads(1)
    losses = args.losses.split(",")
    unknown = [x for x in losses if x not in rl.POLICY_LOSSES]
    if unknown:
        raise SystemExit(f"grpo_ablation: unknown loss {unknown}; choose from {sorted(rl.POLICY_LOSSES)}")
    base = ensure_base(Path(args.base))
    cfg = load_config(grpo.GRPOConfig, RECIPE, section="grpo")
    cfg = replace(cfg, base=str(base), steps=args.steps, mu=args.mu, eval_every=args.eval_every,
                  eval_problems=args.eval_problems, time_budget_s=0.0, save_every=args.steps,
                  target_accuracy=TARGET)  # each run stops at its first evaluation at 95%
    seeds = [int(x) for x in args.seeds.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for loss in losses:
                results.append(run_one(cfg, loss, seed, Path(tmp) / f"{loss}_{seed}"))
                r = results[-1]
                print(f"done {loss} seed {seed}: steps_to_95={fmt(r['steps_to_95'])} wall {r['wall_s']:.0f}s", flush=True)
    report(results, losses, seeds, args, cfg)


if __name__ == "__main__":
    main()
