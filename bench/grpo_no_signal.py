"""What a GRPO step with no learning signal costs: skipped (now) vs the zero update it used to run.

β = 0 and every reward equal (a real instruct model on a new answer format often scores 0 everywhere):
every advantage is 0, so the update is exactly zero. r1kit skips its forward, backward and optimizer
step; the peer here is the same step with the update run anyway (wave 1's behaviour), on the same
rollouts. One thread, process CPU time, fastest of a few interleaved repeats.

    python bench/grpo_no_signal.py [--quick]
Ends with: skipped_step_s=<x> full_step_s=<x> speedup=<x>
"""
from __future__ import annotations

import argparse
import time

import torch

from r1kit.engine import Engine
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.stages import grpo
from r1kit.tasks import get_task
from r1kit.tokenizer import build_bpe_tokenizer
from r1kit.training import adamw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task("arithmetic", digits=3, train_size=500, test_size=10)
    problems = task.problems("train")
    tok = build_bpe_tokenizer([p.prompt for p in problems], vocab_size=512)
    hidden, layers = (128, 2) if args.quick else (256, 4)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                              num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256)).init_weights(0)
    cfg = grpo.GRPOConfig(prompts_per_step=8, group_size=8, max_new_tokens=32 if args.quick else 96, kl_coef=0.0)
    opt, engine = adamw(model, cfg.lr), Engine(model, tok)
    grpo.rewards_of = lambda cfg, rollouts: torch.zeros(len(rollouts))  # no signal anywhere
    skipped, full = [], []
    for step in range(2 if args.quick else 4):
        t0 = time.process_time()
        m, rollouts = grpo.train_step(cfg, step, model, None, tok, task, problems, opt, engine, grpo.Cursor())
        skipped.append(time.process_time() - t0)
        assert m["update_skipped"]
        gen = m["gen_seconds"]  # wall time of generation; the peer pays it too
        t0 = time.process_time()
        grpo.policy_update(cfg, model, None, opt, rollouts, torch.zeros(len(rollouts)))
        full.append(skipped[-1] + time.process_time() - t0)
    s, f = min(skipped), min(full)
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{cfg.prompts_per_step}×{cfg.group_size} rollouts × ≤{cfg.max_new_tokens} tokens "
          f"(last generation {gen:.2f} s wall)")
    print(f"skipped_step_s={s:.3f} full_step_s={f:.3f} speedup={f / s:.2f}")


if __name__ == "__main__":
    main()
