"""GPU check: FSDP2 + bf16 GRPO vs DDP + bf16 GRPO, each a 1-process NCCL group under torchrun.

The two runs start from the same base with the same seeds; FSDP2 computes in bf16 (MixedPrecisionPolicy)
with fp32 sharded master weights and fp32 gradient reduction, DDP under bf16 autocast with fp32 weights.
Both are bf16 computations of the same update, so their losses agree to bf16 noise, not bit for bit.

    python bench/fsdp_gpu.py [--steps 4]
Ends with: fsdp_loss=[…] ddp_loss=[…] max_abs_loss_diff=<x> max_rel_weight_diff=<x>
Needs a CUDA GPU (exits with a one-line message without one).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(parallel: str, base: Path, out: Path, steps: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [f"grpo.base={base}", "grpo.task=arithmetic", "grpo.task_args={digits = 3, train_size = 500, test_size = 32}",
            f"grpo.steps={steps}", "grpo.prompts_per_step=16", "grpo.group_size=8", "grpo.max_new_tokens=64",
            "grpo.kl_coef=0.001", "grpo.mu=2", "grpo.eval_every=1000", "grpo.eval_problems=32", "grpo.save_every=1000",
            "grpo.device=cuda", "grpo.dtype=bf16", f"grpo.parallel={parallel}", "grpo.dist_timeout_s=300"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "r1kit", "grpo", "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=1200, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"fsdp_gpu: the {parallel} run failed:\n{r.stderr[-2000:]}")
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fsdp_gpu: needs a CUDA GPU (NCCL); none is visible")
    from safetensors.torch import load_file

    from r1kit import checkpoint
    from r1kit.tasks import get_task
    from r1kit.tokenizer import build_bpe_tokenizer
    from r1kit.training import ModelSpec, build_model
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        task = get_task("arithmetic", digits=3, train_size=500, test_size=32)
        tok = build_bpe_tokenizer([p.prompt for p in task.problems("train")], vocab_size=256)
        spec = ModelSpec("llama", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                       num_attention_heads=8, max_position_embeddings=256))
        checkpoint.save(build_model(spec, tok.vocab_size, 0), tok, d / "base")
        fsdp, ddp = run("fsdp", d / "base", d / "fsdp", args.steps), run("ddp", d / "base", d / "ddp", args.steps)
        wf, wd = load_file(d / "fsdp" / "model" / "model.safetensors"), load_file(d / "ddp" / "model" / "model.safetensors")
        rel = max(((wf[k] - wd[k]).abs().max() / wd[k].abs().max().clamp(min=1e-12)).item() for k in wd)
    lf, ld = [m.get("loss", float("nan")) for m in fsdp], [m.get("loss", float("nan")) for m in ddp]
    for a, b in zip(fsdp, ddp):
        print(f"step {a['step']}: fsdp loss {a.get('loss', float('nan')):.5f} gen {a['gen_seconds']:.2f}s "
              f"train {a['train_seconds']:.2f}s | ddp loss {b.get('loss', float('nan')):.5f} "
              f"gen {b['gen_seconds']:.2f}s train {b['train_seconds']:.2f}s")
    diff = max(abs(a - b) for a, b in zip(lf, ld))
    print(f"fsdp_loss={[round(x, 5) for x in lf]} ddp_loss={[round(x, 5) for x in ld]} "
          f"max_abs_loss_diff={diff:.2e} max_rel_weight_diff={rel:.2e}")


if __name__ == "__main__":
    main()
