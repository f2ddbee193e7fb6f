"""r1kit's batched sampling vs transformers' generate on the same random weights, one thread.

Batch 16, 32-token prompts, exactly 128 new tokens, temperature 1. Prints tokens/s for each and
the final line `ratio_vs_hf=<small> <medium>`.
    python bench/generate.py [--batch 16 --prompt 32 --new 128 --threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from r1kit.engine import Engine, SamplingParams
from r1kit.formats import hf
from r1kit.models.llama import Llama, LlamaConfig

CONFIGS = {  # the two sizes FINDINGS.md measured transformers on
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=688),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=1376),
}


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(name: str, args) -> float:
    import transformers
    cfg = LlamaConfig(vocab_size=512, max_position_embeddings=1024, **CONFIGS[name])
    model = Llama(cfg).init_weights(seed=0).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_model(model, d)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompts = torch.randint(0, 512, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    engine = Engine(model)
    sp = SamplingParams(max_new_tokens=args.new, temperature=1.0, ignore_eos=True, seed=0)
    ours = best_of(lambda: engine.generate(prompts.tolist(), sp), args.repeats)
    gen_kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=True, temperature=1.0,
                  top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        theirs = best_of(lambda: ref.generate(prompts, attention_mask=torch.ones_like(prompts), **gen_kw),
                         args.repeats)
    n = args.batch * args.new
    print(f"{name:6s} params={sum(p.numel() for p in model.parameters())/1e6:.2f}M  "
          f"r1kit {n/ours:8.0f} tok/s ({ours:.2f}s)   transformers {n/theirs:8.0f} tok/s ({theirs:.2f}s)   "
          f"ratio {theirs/ours:.2f}x", flush=True)
    return theirs / ours


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [bench(name, args) for name in ("small", "medium")]
    print("ratio_vs_hf=" + " ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
