"""On-policy vs one-step off-policy GRPO (grpo.async = true, TIS) on the tiny R1-Zero task: wall time to the
same held-out greedy accuracy.

The recipe r1kit/recipes/r1_zero_tiny.toml from the same base (runs/bases/arith_tiny, pretrained first when
missing), everything equal but the mode and the intra-op threads:
  on-policy ×1   one thread, generation then training
  on-policy ×N   N intra-op threads (the cores the async run uses, given to one thread at a time)
  async 1+1...   generation of step s+1 in a second thread (from the weights before step s's update) while
                 step s trains, each thread with N/2 intra-op threads; corrections = ["tis"]
Each run stops at its first evaluation at --target (grpo.target_accuracy). Time to target is RL wall time,
evaluations (the same schedule for every mode) included: in async mode they run while the next batch is drawn,
so taking them out would hide that generation; their seconds are shown apart, and `s→tgt −eval` without them.
Per step (evaluation excluded): generation seconds (in the rollout thread when
async), training seconds, how long the trainer waited for its batch, and the generation hidden behind training
(overlap = generation − wait). The last lines are the ratios of on-policy time to target over async's.

--probe measures what overlaps, outside the loop: one step's generation and one update on the base, alone and
at once in two threads (one intra-op thread each), with the process's CPU time over wall time (≈ the cores
it got), beside two threads of GIL-free 512×512 matmuls (what the machine gives two threads at all).
    python bench/grpo_async.py [--seeds 0,1] [--threads 2] [--steps 40] [--eval-every 2] [--target 0.95] [--probe]
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import tempfile
import threading
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from r1kit.config import load_config
from r1kit.stages import grpo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_ablation import RECIPE, ensure_base  # noqa: E402  (the tiny base, pretrained once by its recipe)


def time_to_target(rows: list[dict], target: float) -> tuple[int | None, float | None, float]:
    """(step, RL seconds, evaluation seconds within them) at the first evaluation ≥ target."""
    evals = 0.0
    for r in rows:
        evals += r.get("eval_seconds", 0.0)
        if r.get("eval_greedy_accuracy", -1.0) >= target:
            return r["step"], r["rl_seconds"], evals
    return None, None, evals


def run_one(cfg: grpo.GRPOConfig, mode: str, threads: int, out: Path, target: float) -> dict:
    torch.set_num_threads(threads)  # async: the trainer's and (grpo_async) the rollout thread's count
    t0 = time.perf_counter()
    summary = grpo.run(replace(cfg, out_dir=str(out)))
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    step, secs, evals = time_to_target(rows, target)
    upto = rows[: step or len(rows)]
    later = upto[1:] if len(upto) > 1 else upto  # async: step 1 is drawn in line, the rest ahead
    mean = lambda k, rs=later: statistics.fmean(r.get(k, 0.0) for r in rs)  # noqa: E731
    evals_acc = [r["eval_greedy_accuracy"] for r in rows if "eval_greedy_accuracy" in r]
    return {"mode": mode, "seed": cfg.seed, "step": step, "secs": secs, "eval_s": evals, "wall": wall,
            "acc_at_stop": evals_acc[-1] if evals_acc else None, "final": summary.get("final_accuracy"),
            "gen": mean("gen_seconds"), "train": mean("train_seconds"), "wait": mean("gen_wait_seconds"),
            "overlap": mean("gen_seconds") - mean("gen_wait_seconds"),
            "step_s": statistics.fmean(b["rl_seconds"] - a["rl_seconds"] - b.get("eval_seconds", 0.0)
                                       for a, b in zip(upto, upto[1:])) if len(upto) > 1 else None,
            "mismatch": mean("mismatch_abs_logp"), "tis_clip": mean("tis_clip_frac")}


def timed_together(a, b) -> tuple[float, float, float, float]:
    """Run a() in a second thread and b() here → (a's seconds, b's seconds, wall, process CPU / wall)."""
    took = {}

    def in_thread():
        torch.set_num_threads(1)
        t = time.perf_counter()
        a()
        took["a"] = time.perf_counter() - t

    c0, t0 = os.times(), time.perf_counter()
    th = threading.Thread(target=in_thread)
    th.start()
    b()
    tb = time.perf_counter() - t0
    th.join()
    wall, c1 = time.perf_counter() - t0, os.times()
    return took["a"], tb, wall, (c1.user + c1.system - c0.user - c0.system) / wall


def timed(f) -> tuple[float, float]:
    """→ (seconds, process CPU / wall) of f() alone."""
    c0, t0 = os.times(), time.perf_counter()
    f()
    wall, c1 = time.perf_counter() - t0, os.times()
    return wall, (c1.user + c1.system - c0.user - c0.system) / wall


def probe(cfg: grpo.GRPOConfig, repeats: int = 3) -> None:
    """What overlaps: generation and training of one step, alone and at once (see the module docstring)."""
    import copy
    from r1kit import checkpoint
    from r1kit.engine import Engine
    from r1kit.tasks import get_task
    from r1kit.training import adamw
    torch.set_num_threads(1)
    model, tok = checkpoint.load(Path(cfg.base) / "model", dtype="float32")
    task = get_task(cfg.task, **cfg.task_args)
    problems = task.problems("train")
    snap = copy.deepcopy(model)
    gen_cfg = replace(cfg, dynamic_sampling=False)  # one round: the same work every repeat
    drawn = grpo.draw(gen_cfg, 0, model, tok, task, problems, Engine(model, tok), 0)
    batch = [r for g in drawn.trained for r in g]
    adv = grpo.advantages_of(cfg, task, batch, grpo.rewards_of(cfg, batch))
    opt = adamw(model, 0.0)  # lr 0: the same update every repeat
    gen = lambda: grpo.draw(gen_cfg, 1, snap, tok, task, problems, Engine(snap, tok), 0)  # noqa: E731
    train = lambda: grpo.policy_update(cfg, model, None, opt, batch, adv)  # noqa: E731
    x = torch.randn(512, 512)
    mm = lambda: [x @ x for _ in range(400)]  # noqa: E731  (GIL released inside each matmul)
    rows = {"gen alone": [], "train alone": [], "gen+train": [], "mm alone": [], "mm+mm": []}
    for _ in range(repeats):
        rows["gen alone"].append(timed(gen))
        rows["train alone"].append(timed(train))
        rows["gen+train"].append(timed_together(gen, train))
        rows["mm alone"].append(timed(mm))
        rows["mm+mm"].append(timed_together(mm, mm))
    med = {k: [statistics.median(c) for c in zip(*v)] for k, v in rows.items()}
    ntok = sum(len(r.sample.tokens) for r in batch)
    print(f"\nprobe (median of {repeats}; {len(batch)} rollouts, {ntok} completion tokens; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    for k in ("gen alone", "train alone", "mm alone"):
        print(f"  {k:<12} {med[k][0]:6.3f}s  cpu/wall {med[k][1]:.2f}")
    for k, (a, b) in (("gen+train", ("gen alone", "train alone")), ("mm+mm", ("mm alone", "mm alone"))):
        ta, tb, wall, util = med[k]
        serial = med[a][0] + med[b][0]
        print(f"  {k:<12} {wall:6.3f}s  cpu/wall {util:.2f}  (thread {ta:.3f}s, main {tb:.3f}s; one after the "
              f"other {serial:.3f}s → overlap_speedup={serial / wall:.2f})")


def fmt(x, spec="{:.2f}") -> str:
    return "never" if x is None else spec.format(x)


def report(results: list[dict], modes: list[str], args) -> dict:
    print(f"\nR1-Zero tiny, target {args.target:.0%} held-out greedy accuracy ({args.eval_problems} problems, "
          f"every {args.eval_every} steps), seeds {args.seeds}; per-step figures are means over steps 2..target")
    print(f"{'mode':<16} {'seed':>4} {'steps':>5} {'s→target':>8} {'eval s':>6} {'s→tgt −eval':>11} {'acc':>5} "
          f"{'s/step':>6} "
          f"{'gen s':>6} {'train s':>7} {'wait s':>6} {'overlap':>7} {'|Δlogp|':>7} {'tis clip':>8}")
    medians = {}
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        for r in rs:
            less = None if r["secs"] is None else r["secs"] - r["eval_s"]
            print(f"{mode:<16} {r['seed']:>4} {fmt(r['step'], '{}'):>5} {fmt(r['secs'], '{:.1f}'):>8} "
                  f"{r['eval_s']:>6.1f} {fmt(less, '{:.1f}'):>11} {fmt(r['acc_at_stop'], '{:.3f}'):>5} "
                  f"{fmt(r['step_s']):>6} {r['gen']:>6.3f} "
                  f"{r['train']:>7.3f} {r['wait']:>6.3f} {r['overlap']:>7.3f} {r['mismatch']:>7.4f} "
                  f"{r['tis_clip']:>8.4f}")
        secs = sorted(float("inf") if r["secs"] is None else r["secs"] for r in rs)
        medians[mode] = statistics.median(secs)
    return medians


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; every mode runs once per seed")
    p.add_argument("--threads", type=int, default=2, help="cores to use (async splits them between its two threads; "
                   "1: on-policy and each async thread get one intra-op thread)")
    p.add_argument("--steps", type=int, default=40, help="most steps per run (each stops at the target)")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--eval-problems", type=int, default=200)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--base", default="runs/bases/arith_tiny", help="base checkpoint dir (pretrained if missing)")
    p.add_argument("--probe", action="store_true", help="only measure what overlaps (see above)")
    args = p.parse_args()
    base = ensure_base(Path(args.base))
    cfg = load_config(grpo.GRPOConfig, RECIPE, section="grpo")
    cfg = replace(cfg, base=str(base), steps=args.steps, eval_every=args.eval_every, eval_problems=args.eval_problems,
                  time_budget_s=0.0, save_every=args.steps, target_accuracy=args.target)
    if args.probe:
        return probe(cfg)
    half = max(1, args.threads // 2)
    plans = [("on-policy x1", 1, {})] + ([(f"on-policy x{args.threads}", args.threads, {})] if args.threads > 1 else [])
    plans.append((f"async {half}+{half} tis", half, {"async_": True, "corrections": ["tis"]}))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(x) for x in args.seeds.split(",")]:
            for mode, threads, over in plans:
                r = run_one(replace(cfg, seed=seed, **over), mode, threads, Path(tmp) / f"{len(results)}", args.target)
                results.append(r)
                print(f"done {mode} seed {seed}: steps {fmt(r['step'], '{}')} {fmt(r['secs'], '{:.1f}')}s to target, "
                      f"wall {r['wall']:.0f}s", flush=True)
    medians = report(results, [m for m, _, _ in plans], args)
    asyn = medians[plans[-1][0]]
    for mode, _, _ in plans[:-1]:
        ratio = medians[mode] / asyn if asyn not in (0, float("inf")) and medians[mode] != float("inf") else None
        print(f"time_to_acc_ratio_{mode.replace(' ', '_')}_vs_async={fmt(ratio)}")


if __name__ == "__main__":
    main()
