"""GPU check: decode tokens/s of a ~0.5B-shaped random model at batch 64, with and without CUDA graphs.

The model has Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV, ffn 4864, vocabulary 151,936,
tied, q/k/v biases) and random weights, in bf16. Peers, on the same weights, one after another:

  r1kit         Engine.generate, eager: a decode step is a few hundred small kernels queued by Python
  r1kit_graphs  Engine(static_decode=True): each step at a power-of-two (rows, key span), replayed as a
                CUDA graph (engine.StaticDecode), captured by each generate() (included in its time);
                sampling and stop checks stay outside the graph
  hf            transformers' generate (SDPA, its default dynamic cache)
  vllm          vLLM's LLM.generate, when vllm is installed (its own CUDA graphs and paged attention)

All sample at temperature 1 for exactly `--new` tokens after `--prompt`-token random prompts. Before the
timing, a teacher-forced check: the graphed step's logits against the eager step's over the first decode
steps, in fp32 (the two run the same kernels but attend over a padded key span, so they agree to fp32
rounding, not bit for bit). Final lines:

  tok_s r1kit=… r1kit_graphs=… hf=… [vllm=…]
  ratios graphs_vs_eager=… graphs_vs_hf=… [graphs_vs_vllm=…] max_logit_diff=…

    python bench/gpu_decode.py [--batch 64 --prompt 128 --new 256 --repeats 3]
Needs a CUDA GPU for the measurement; `--device cpu --tiny` runs every step at a small shape (no graphs
there: the static shapes run eagerly), which is how the test suite keeps this script working.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from r1kit.engine import Batch, Engine, SamplingParams
from r1kit.formats import hf
from r1kit.models.llama import Llama, LlamaConfig

SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, max_len: int):
    cfg = LlamaConfig(max_position_embeddings=max_len, architecture="Qwen2ForCausalLM", attention_bias=True,
                      tie_word_embeddings=True, rope_theta=1e6, **SHAPES[shape])
    return Llama(cfg).init_weights(seed=0).to(device=device, dtype=dtype).eval()


def max_logit_diff(model, prompts: list[list[int]], steps: int) -> float:
    """Teacher-forced: the static (graphed) decode step's logits vs the eager step's, fed the same tokens."""
    max_len = max(map(len, prompts)) + steps + 1
    sp = [SamplingParams(max_new_tokens=steps + 1, temperature=0, ignore_eos=True)] * len(prompts)
    eager, static = (Batch(model, None, len(prompts), max_len, static_decode=s) for s in (False, True))
    for b in (eager, static):
        b.add(prompts, sp, list(range(len(prompts))))
    static.last.copy_(eager.last)
    worst, n = 0.0, len(prompts)
    for _ in range(steps):
        want, _ = eager.decode_logits(n)
        rows, span = static.static.shapes(n, int(static.cache.lens.max()) + 1)
        got, _ = static.static.logits(rows, span)
        worst = max(worst, float((got[:n].float() - want.float()).abs().max()))
        eager.last[:n] = static.last[:n] = want.argmax(-1)
    return worst


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn` after one warm-up run (CUDA context, cuBLAS handles, allocator pools). Each
    r1kit_graphs run is a new generate() and captures its own batch's graphs: their cost is in its time."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def hf_generate(path: str, prompts: torch.Tensor, new: int, device: torch.device, dtype: torch.dtype):
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
              pad_token_id=0, eos_token_id=None)

    def run():
        with torch.inference_mode():
            ref.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    return run


def vllm_generate(path: str, prompts: list[list[int]], new: int):
    """A callable running vLLM on the same weights, or None when vllm does not import."""
    try:
        import vllm
    except ImportError:
        return None
    llm = vllm.LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.4, seed=0)
    sp = vllm.SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=1.0, detokenize=False)
    batch = [{"prompt_token_ids": p} for p in prompts]
    return lambda: llm.generate(batch, sp, use_tqdm=False)


def measure(model, path: str, prompts: torch.Tensor, args, device: torch.device, dtype: torch.dtype,
            label: str) -> dict:
    """Tokens/s of each peer, run one after another on the same weights."""
    sp = SamplingParams(max_new_tokens=args.new, temperature=1.0, ignore_eos=True, seed=0)
    runs = {"r1kit": lambda: Engine(model).generate(prompts.tolist(), sp),
            "r1kit_graphs": lambda: Engine(model, static_decode=True).generate(prompts.tolist(), sp),
            "hf": hf_generate(path, prompts.to(device), args.new, device, dtype)}
    vllm_run = vllm_generate(path, prompts.tolist(), args.new) if device.type == "cuda" else None
    if vllm_run is not None:
        runs["vllm"] = vllm_run
    tok_s = {}
    for name, fn in runs.items():
        tok_s[name] = args.batch * args.new / timed(fn, args.repeats, device)
        print(f"{name:13s} {tok_s[name]:9.0f} tok/s  (batch {args.batch}, {args.prompt} + {args.new} tokens, "
              f"{label})", flush=True)
    return tok_s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small shape, fp32 (a check that the script runs)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_decode.py: no CUDA device here (use --device cpu --tiny for a dry run)")
    shape = "tiny" if args.tiny else "qwen2.5-0.5b"
    dtype = torch.float32 if args.tiny or device.type != "cuda" else torch.bfloat16
    max_len = args.prompt + args.new + 1
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[shape]["vocab_size"]
    prompts = torch.randint(0, vocab, (args.batch, args.prompt), generator=g)

    check = build(shape, device, torch.float32, max_len)  # fp32: the check compares rounding, not bf16 noise
    diff = max_logit_diff(check, prompts[:8].tolist(), steps=min(16, args.new))
    del check
    model = build(shape, torch.device("cpu"), dtype, max_len)
    with tempfile.TemporaryDirectory(prefix="r1kit-gpu-decode-") as path:  # the same weights for HF and vLLM
        hf.save_model(model, path)
        label = f"{shape}, {str(dtype).removeprefix('torch.')}, {device.type}"
        tok_s = measure(model.to(device), path, prompts, args, device, dtype, label)
    ratios = {"graphs_vs_eager": tok_s["r1kit_graphs"] / tok_s["r1kit"],
              "graphs_vs_hf": tok_s["r1kit_graphs"] / tok_s["hf"]}
    if "vllm" in tok_s:
        ratios["graphs_vs_vllm"] = tok_s["r1kit_graphs"] / tok_s["vllm"]
    print("tok_s " + " ".join(f"{k}={v:.0f}" for k, v in tok_s.items()))
    print("ratios " + " ".join(f"{k}={v:.2f}" for k, v in ratios.items()) + f" max_logit_diff={diff:.2e}")
    return {"tok_s": tok_s, "ratios": ratios, "max_logit_diff": diff}


if __name__ == "__main__":
    main()
