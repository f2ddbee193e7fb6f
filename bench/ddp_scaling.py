"""Data-parallel GRPO on this machine: tokens/s of one GRPO step on 1 vs 2 processes (1 thread each).

Each configuration is a real `torchrun --standalone --nproc-per-node N -m r1kit grpo` job (gloo on
CPU) on the same tiny base and the same global batch (prompts_per_step × group_size); the measured
step is the last of `--steps` (the first ones warm up). Throughput = completion tokens of the step /
(generation + training seconds of the step). Where the time goes: generation, training, and — for
2 processes — the gradient all-reduce alone, timed on a flat tensor of the model's size with the
same process group (DDP does one such reduction per backward here: μ = 1, one micro-batch).

    python bench/ddp_scaling.py [--quick]
Ends with: tokens_per_s_1=<x> tokens_per_s_2=<x> ddp_efficiency=<x>   (2-process / (2 × 1-process))
On a 2-core machine shared with other jobs the ideal is 1.0 only if both cores are free.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_base(d: Path, quick: bool) -> Path:
    from r1kit import checkpoint
    from r1kit.tasks import get_task
    from r1kit.tokenizer import build_bpe_tokenizer
    from r1kit.training import ModelSpec, build_model
    task = get_task("arithmetic", digits=3, train_size=500, test_size=10)
    tok = build_bpe_tokenizer([p.prompt for p in task.problems("train")], vocab_size=256)
    hidden, layers = (64, 2) if quick else (192, 4)
    spec = ModelSpec("llama", dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                                   num_attention_heads=4, max_position_embeddings=256))
    model = build_model(spec, tok.vocab_size, 0)
    checkpoint.save(model, tok, d / "base")
    return d / "base"


def run(nproc: int, base: Path, out: Path, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [f"grpo.base={base}", "grpo.task=arithmetic", "grpo.task_args={digits = 3, train_size = 500, test_size = 8}",
            f"grpo.steps={args.steps}", f"grpo.prompts_per_step={args.prompts}", f"grpo.group_size={args.group}",
            f"grpo.max_new_tokens={args.tokens}", "grpo.kl_coef=0.001", "grpo.eval_every=1000", "grpo.eval_problems=2",
            "grpo.save_every=1000", "grpo.device=cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--rdzv-endpoint", f"127.0.0.1:{port}", str(Path(__file__)), "--worker", "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"ddp_scaling: {nproc}-process run failed:\n{r.stderr[-2000:]}")
    m = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][-1]
    m.update(json.loads((out / "allreduce.json").read_text()))
    tokens = m["response_length"] * args.prompts * args.group
    m["tokens"] = tokens
    m["tokens_per_s"] = tokens / (m["gen_seconds"] + m["train_seconds"])
    return m


def worker(argv: list[str]) -> None:
    """Inside torchrun: the all-reduce of one gradient's worth of floats, timed; then the GRPO run."""
    torch.set_num_threads(1)
    from r1kit import dist
    from r1kit.checkpoint import load
    from r1kit.cli import main
    out = Path(argv[argv.index("--out") + 1])
    base = next(a.split("=", 1)[1] for a in argv if a.startswith("grpo.base="))
    n = sum(p.numel() for p in load(base, device="cpu")[0].parameters())
    dist.init(torch.device("cpu"), 120)
    seconds = 0.0
    if dist.world().world_size > 1:
        flat = torch.randn(n)
        dist.all_reduce_(flat)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            dist.all_reduce_(flat)
        seconds = (time.perf_counter() - t0) / 5
    result = {"allreduce_seconds": seconds, "params": n}
    if main(["grpo", *argv]) != 0:  # joins the same group, leaves it at the end
        raise SystemExit(1)
    if int(os.environ.get("RANK", 0)) == 0:
        (out / "allreduce.json").write_text(json.dumps(result))


def main() -> None:
    if "--worker" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--worker"]
        return worker(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    args.prompts, args.group, args.tokens = (4, 4, 16) if args.quick else (8, 8, 48)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        base = make_base(d, args.quick)
        one, two = run(1, base, d / "one", args), run(2, base, d / "two", args)
    print(f"model {one['params'] / 1e6:.2f}M parameters; step: {args.prompts} prompts × {args.group} samples, "
          f"≤ {args.tokens} new tokens")
    for name, m in (("1 process", one), ("2 processes", two)):
        per_rank = ""
        if "gen_seconds_ranks" in m:
            per_rank = (f"  per rank gen {['%.2f' % x for x in m['gen_seconds_ranks']]} "
                        f"train {['%.2f' % x for x in m['train_seconds_ranks']]}")
        print(f"{name:12s} tokens {m['tokens']:.0f}  gen {m['gen_seconds']:.2f}s  train {m['train_seconds']:.2f}s  "
              f"all-reduce {m['allreduce_seconds']:.3f}s  → {m['tokens_per_s']:.0f} tokens/s{per_rank}")
    share = two["allreduce_seconds"] / max(two["train_seconds"], 1e-9)
    print(f"2 processes: the gradient all-reduce is {share:.0%} of the training time; the rest is compute")
    eff = two["tokens_per_s"] / (2 * one["tokens_per_s"])
    print(f"tokens_per_s_1={one['tokens_per_s']:.1f} tokens_per_s_2={two['tokens_per_s']:.1f} ddp_efficiency={eff:.2f}")


if __name__ == "__main__":
    main()
