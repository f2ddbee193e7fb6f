"""GRPO's update, r1kit's padding-free layout vs the right-padded batch, side by side.

One realistic batch: 8 prompts × 8 samples, prompts of 20–60 tokens (one length per prompt, shared by
its group), completion lengths drawn uniformly from 10..128 like a run's spread of short answers and
long chains. The same rollouts and weights go through r1kit's `policy_update` (the trainer's real path:
micro-batch planning, the scoring forwards, the policy forward + backward, the optimizer step; the
token-wise layers on the real tokens, each prompt once, attention in packed rows) and through the
right-padded update every padded trainer runs (one row per rollout, plain causal forward, the same
token-mean policy-gradient loss, backward, step), interleaved; one thread, process CPU time, fastest of
the repeats. Equality of the two is tests/test_grpo_packing.py's business; this one times them.

    python bench/grpo_packing.py [--configs small,real] [--repeats 3] [--real-repeats 1] [--kl]
small: the bench Llama (hidden 256, 4 layers, 4/2 heads, ffn 688, vocab 512); medium: hidden 512, 8 layers;
real: the SmolLM2-135M shape (30 layers, hidden 576, 9/3 heads, ffn 1536, vocab 49,152, tied) at
micro_batch 16 like its recipe. --kl adds a frozen reference (β = 0.04): one more no-grad forward.
Ends with: packing_speedup=<one per config>
"""
from __future__ import annotations

import argparse
import copy
import random
import time

import torch

from r1kit.engine import Sample
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.rollout import Rollout
from r1kit import rl
from r1kit.stages import grpo, grpo_batch

CONFIGS = {
    "small": (dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2), 0),
    "medium": (dict(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4), 0),
    "real": (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True), 16),
}


def batch(vocab: int, prompts: int = 8, group: int = 8, seed: int = 0) -> list[Rollout]:
    g = random.Random(seed)
    out = []
    for p in range(prompts):
        prompt = [g.randrange(vocab) for _ in range(g.randint(20, 60))]
        for _ in range(group):
            tokens = [g.randrange(vocab) for _ in range(g.randint(10, 128))]
            out.append(Rollout(None, prompt, Sample(p, tokens, [-2.0] * len(tokens), "stop"), "", {}))
    return out


def token_counts(cfg: grpo.GRPOConfig, rollouts: list[Rollout]) -> tuple[int, int, int, int]:
    """(real tokens, the padded batch's slots, tokens r1kit's token-wise layers compute, its attention cells)."""
    lengths = [len(r.prompt_ids) + len(r.sample.tokens) for r in rollouts]
    flat = cells = 0
    for mb in grpo.plan_micro_batches(cfg, rollouts):
        b, _ = grpo.rollout_batch(rollouts, mb, share=grpo_batch.shares_prompts(cfg))
        flat, cells = flat + b.tokens, cells + b.rows.index.numel()
    step = cfg.micro_batch or len(lengths)  # padded_update's micro-batches, each as wide as its longest
    padded = sum(len(lengths[a:a + step]) * max(lengths[a:a + step]) for a in range(0, len(lengths), step))
    return sum(lengths), padded, flat, cells


def padded_update(cfg, model, ref, opt, rollouts, adv) -> None:
    """The right-padded update: a row per rollout, micro-batched; μ = 1, token-mean −A·log π (+ β · the
    cfg.kl_estimator KL to ref)."""
    P = [len(r.prompt_ids) for r in rollouts]
    L = [p + len(r.sample.tokens) for p, r in zip(P, rollouts)]
    n_tok = sum(L) - sum(P)
    step = cfg.micro_batch or len(rollouts)
    for a in range(0, len(rollouts), step):
        rs, W = rollouts[a:a + step], max(L[a:a + step])
        ids = torch.zeros(len(rs), W, dtype=torch.long)
        scored = torch.zeros(len(rs), W - 1)
        for j, r in enumerate(rs):
            seq = r.prompt_ids + r.sample.tokens
            ids[j, :len(seq)] = torch.tensor(seq)
            scored[j, len(r.prompt_ids) - 1:len(seq) - 1] = 1
        logp = rl.token_logprobs(model(ids)[:, :-1], ids[:, 1:])  # (B, W - 1)
        per_tok = -adv[a:a + step, None] * logp
        if ref is not None:
            with torch.no_grad():
                ref_logp = rl.token_logprobs(ref(ids)[:, :-1], ids[:, 1:])
            per_tok = per_tok + cfg.kl_coef * rl.KL_ESTIMATORS[cfg.kl_estimator](logp, ref_logp, logp.detach())
        ((per_tok * scored).sum() / n_tok).backward()
    opt.step()


def timed_update(update, cfg, model, ref, rollouts, adv) -> float:
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    t0 = time.process_time()
    update(cfg, m, ref, opt, rollouts, adv)
    return time.process_time() - t0


def run(name: str, repeats: int, kl: bool) -> float:
    shape, micro = CONFIGS[name]
    model = Llama(LlamaConfig(max_position_embeddings=256, **shape)).init_weights(0).train()
    ref = Llama(LlamaConfig(max_position_embeddings=256, **shape)).init_weights(1).eval().requires_grad_(False) \
        if kl else None
    rollouts = batch(shape["vocab_size"])
    adv = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(0))
    cfg = grpo.GRPOConfig(max_new_tokens=128, micro_batch=micro, kl_coef=0.04 if kl else 0.0)
    real, padded, flat, cells = token_counts(cfg, rollouts)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {len(rollouts)} rollouts, "
          f"micro_batch {micro}: real_tokens={real} padded_tokens={padded} ({padded / real:.2f}×) "
          f"r1kit_tokens={flat} ({flat / real:.2f}×: each prompt once) attention_cells={cells} ({cells / real:.2f}×)")
    sides = {"padded": padded_update, "r1kit": grpo.policy_update}
    times = {k: [] for k in sides}
    for _ in range(repeats):
        for k, update in sides.items():
            times[k].append(timed_update(update, cfg, model, ref, rollouts, adv))
    t_pad, t_pack = min(times["padded"]), min(times["r1kit"])
    print(f"{name}: update_s padded={t_pad:.3f} r1kit={t_pack:.3f} speedup={t_pad / t_pack:.2f} "
          f"(forward{' + reference' if kl else ''} + backward + step, best of {repeats})")
    return t_pad / t_pack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,real", help="comma-separated: small, medium, real")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per layout (the fastest counts)")
    ap.add_argument("--real-repeats", type=int, default=1, help="repeats for the real shape (≈ a minute each)")
    ap.add_argument("--kl", action="store_true", help="add a frozen reference model (β = 0.04)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"grpo_packing: unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    speedups = [run(n, args.real_repeats if n == "real" else args.repeats, args.kl) for n in names]
    print("packing_speedup=" + " ".join(f"{s:.2f}" for s in speedups))


if __name__ == "__main__":
    main()
