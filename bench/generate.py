"""r1kit's batched sampling vs transformers' generate on the same random weights, one thread.

Three configs — small, medium (the two FINDINGS.md measured transformers on) and real (the
SmolLM2-135M shape: 30 layers, hidden 576, 9 heads / 3 KV, ffn 1536, vocab 49152, tied) — at
batch 16 and 64: 32-token prompts, exactly `--new` new tokens, temperature 1. Peers run interleaved
in one process (the machine is shared and noisy) and the medians are reported, with

  flop   tokens/s as a fraction of the FLOP limit: 87 GFLOP/s / (2 × multiply-adds per token,
         attention at the mean context included);
  ceil   the same against the matmul ceiling measured in the same rounds: bare matmuls over this
         config's weight shapes at this batch, the faster of `F.linear` (MKL) and r1kit's CPU decode
         kernel (r1kit/models/kernels.py), i.e. what the matmuls alone would allow.

Final lines: `ratio_vs_hf=<small> <medium> <real>` and `flop_fraction=<small> <medium>` (batch 16). PEAK is the
issue's fixed limit (MKL's large matmul on the AVX2 box it was set on); the first line also measures this machine's
large-matmul rate, MKL's and oneDNN's (on a non-Intel AVX-512 core oneDNN's is ≈ 2.4× MKL's and the fixed limit
understates what the core can do), and the last line gives the batch-16 fractions of the faster one.
`--profile` prints where a decode step of each config at batch 16 spends its time (matmul, attention,
cache writes, norms, RoPE, sampling, other). On an AVX-512 machine, `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`
runs every side's CPU code as on the AVX2 box (torch's kernels, MKL's GEMM, r1kit's 256-bit decode kernel; the
first line says which ran) — the code the fixed limit was set for, on this machine's memory and clock.
    python bench/generate.py [--new 128 --new-real 64 --repeats 3 --threads 1 --profile]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from r1kit import sampling
from r1kit.engine import Batch, Engine, SamplingParams
from r1kit.formats import hf
from r1kit.models import kernels, llama
from r1kit.models.llama import Llama, LlamaConfig

PEAK = 87e9  # fp32 FLOP/s of one thread in a large matmul on this machine (FINDINGS.md); × --threads
CONFIGS = {
    "small": dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=688),
    "medium": dict(vocab_size=512, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, intermediate_size=1376),
    "real": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True),
}


def weight_shapes(cfg: LlamaConfig) -> list[tuple[int, int, int]]:
    """(out, in, count) of every matmul a decode step runs per token."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_layer = [(cfg.num_attention_heads * hd, d), (cfg.num_key_value_heads * hd, d),
                 (cfg.num_key_value_heads * hd, d), (d, cfg.num_attention_heads * hd),
                 (cfg.intermediate_size, d), (cfg.intermediate_size, d), (d, cfg.intermediate_size)]
    L = cfg.num_hidden_layers
    return [(o, i, L) for o, i in per_layer] + [(cfg.vocab_size, d, 1)]


def macs_per_token(cfg: LlamaConfig, ctx: float) -> float:
    """Multiply-adds per generated token: the weights, plus q·k and p·v over `ctx` cached positions."""
    weights = sum(o * i * n for o, i, n in weight_shapes(cfg))
    return weights + cfg.num_hidden_layers * 2 * cfg.num_attention_heads * cfg.head_dim * ctx


def machine_peak(n: int = 1536, repeats: int = 5) -> dict:
    """GFLOP/s of an n³ fp32 matmul by MKL (F.linear) and by oneDNN (where torch has it): this core's large-matmul rate."""
    a, w = torch.randn(n, n), torch.randn(n, n)
    fns = {"mkl": lambda: F.linear(a, w)}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        fns["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
    return {k: 2 * n ** 3 / t / 1e9 for k, t in interleaved(fns, repeats).items()}


def matmul_steps(cfg: LlamaConfig, rows: int, steps: int, matmul=F.linear):
    """A callable running `steps` decode steps' worth of bare `matmul` over the config's weight shapes
    at `rows` rows: a matmul ceiling, timed in the same rounds as the peers. Every layer has weights of
    its own, as in the model: one matrix reused L times would sit in cache and overstate the ceiling."""
    mats = [(torch.randn(rows, i), [torch.randn(o, i) for _ in range(n)]) for o, i, n in weight_shapes(cfg)]

    def run():
        with torch.no_grad(), kernels.decode_kernels():  # as the engine calls them
            for _ in range(steps):
                for x, ws in mats:
                    for w in ws:
                        matmul(x, w)
    return run


def interleaved(fns: dict, repeats: int) -> dict:
    """Run each callable once to warm up, then `repeats` rounds in turn → median seconds of each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def build(name: str):
    import transformers
    cfg = LlamaConfig(max_position_embeddings=1024, **CONFIGS[name])
    model = Llama(cfg).init_weights(seed=0).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_model(model, d)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return cfg, model, ref


def bench(name: str, batch: int, new: int, args, built) -> dict:
    cfg, model, ref = built
    prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(0))
    engine = Engine(model)
    sp = SamplingParams(max_new_tokens=new, temperature=1.0, ignore_eos=True, seed=0)
    gen_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                  pad_token_id=0, eos_token_id=None)

    def theirs():
        with torch.inference_mode():
            ref.generate(prompts, attention_mask=torch.ones_like(prompts), **gen_kw)

    t = interleaved({"r1kit": lambda: engine.generate(prompts.tolist(), sp), "hf": theirs,
                     "mkl": matmul_steps(cfg, batch, new),
                     "kernel": matmul_steps(cfg, batch, new, kernels.linear)}, args.repeats)
    n = batch * new
    ours, hf_tps = n / t["r1kit"], n / t["hf"]
    ceiling = n / min(t["mkl"], t["kernel"])  # the faster of F.linear (MKL) and r1kit's decode kernel
    limit = PEAK * args.threads / (2 * macs_per_token(cfg, args.prompt + new / 2))  # the limit of all threads
    print(f"{name:6s} batch {batch:3d}  r1kit {ours:7.0f} tok/s   transformers {hf_tps:7.0f} tok/s   "
          f"ratio {ours / hf_tps:4.2f}x   flop {ours / limit:4.0%} (limit {limit:6.0f})   "
          f"ceil {ours / ceiling:4.0%} (matmuls alone {ceiling:6.0f} tok/s: F.linear {n / t['mkl']:.0f}, "
          f"kernel {n / t['kernel']:.0f})", flush=True)
    return {"ratio": ours / hf_tps, "flop": ours / limit}


def sampling_times(vocab: int, rows: int, repeats: int = 20) -> None:
    """Top-p 0.95 truncation over a real vocabulary: the full sort against the top-k prefilter.

    Logits N(0, 5²): a peaked next-token distribution like a trained model's, whose 0.95 nucleus fits in
    the prefilter (with N(0, 3²) it would not: the near-flat tail of a random model spills to the full sort).
    """
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 5
    args = (logits, torch.ones(rows), torch.full((rows,), 0.95), torch.zeros(rows, dtype=torch.long), torch.rand(rows))
    t = interleaved({"sort": lambda: sampling.sample(*args, prefilter=0),
                     "prefilter": lambda: sampling.sample(*args)}, repeats)
    print(f"top-p 0.95 over {vocab} tokens, {rows} rows: full sort {t['sort'] * 1e3:.1f} ms, "
          f"top-k prefilter {t['prefilter'] * 1e3:.1f} ms ({t['sort'] / t['prefilter']:.1f}x)", flush=True)


PARTS = {  # part of a decode step → the top-level operators whose inclusive time it is
    "matmul": ("linear",), "attention": ("attention",),
    "cache": ("aten::index_copy_",), "norms": ("aten::rms_norm",), "rope": ("aten::roll", "aten::addcmul"),
    "sampling": ("sampling",), "fused layers": ("layers",),  # decode_layers: all of them in one C++ call
}


def profile_step(name: str, built, batch: int = 16, prompt: int = 32, steps: int = 24) -> None:
    """Where a decode step's time goes: torch.profiler over `steps` steps of a running batch, summed into the
    parts of PARTS (sampling.sample, kernels.linear, kernels.attention and kernels.decode_layers — the whole
    layer stack where the fused C++ step applies — are labelled as wholes); "other" is everything else — the small ops between
    them (residual adds, SiLU, views), the embedding and Python. Shares of the profiled wall time."""
    from torch.profiler import ProfilerActivity, profile, record_function
    cfg, model, _ = built
    b = Batch(model, None, batch, prompt + 128)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)).tolist()
    b.add(ids, [SamplingParams(max_new_tokens=128, temperature=1.0, ignore_eos=True, seed=i) for i in range(batch)],
          list(range(batch)))
    for _ in range(64 - steps // 2):  # profile around the mean context of a 128-token generation
        b.step()
    plain = {"sampling": (sampling, sampling.sample), "linear": (kernels, kernels.linear),
             "attention": (llama, llama.attention),  # llama.py holds its own name for kernels.attention
             "layers": (kernels, kernels.decode_layers)}

    def labelled(label, fn):
        def run(*a, **kw):
            with record_function(label):
                return fn(*a, **kw)
        return run
    for label, (module, fn) in plain.items():  # both are called through their modules
        setattr(module, fn.__name__, labelled(label, fn))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                b.step()
            wall = time.perf_counter() - t0
    finally:
        for module, fn in plain.values():
            setattr(module, fn.__name__, fn)
    total = {e.key: e.cpu_time_total * 1e-6 for e in prof.key_averages()}
    parts = {part: sum(total.get(op, 0.0) for op in ops) for part, ops in PARTS.items()}
    parts["other"] = max(0.0, wall - sum(parts.values()))
    print(f"profile {name} batch {batch}: decode step {wall / steps * 1e3:.2f} ms under the profiler — "
          + " ".join(f"{k} {v / wall:.0%}" for k, v in parts.items()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128, help="new tokens per row, small and medium")
    ap.add_argument("--new-real", type=int, default=64, help="new tokens per row, real config")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak = machine_peak()
    print("this machine, one n³ matmul: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items())
          + f" (the fixed limit: {PEAK / 1e9:.0f} a thread); r1kit's CPU GEMM outside the decode kernel: "
          + ("oneDNN" if kernels.onednn_gemm() else "MKL (F.linear)") + f"; torch's CPU code {torch.backends.cpu.get_cpu_capability()}"
          + (f", the decode kernel's {kernels._module().vector_width()}-bit" if kernels._module() is not None else ""),
          flush=True)
    results = {}
    for name in args.configs:
        built = build(name)
        for batch in args.batches:
            results[name, batch] = bench(name, batch, args.new_real if name == "real" else args.new, args, built)
        if args.profile:
            profile_step(name, built)
        if name == "real":
            sampling_times(CONFIGS["real"]["vocab_size"], 16)
        del built
    b = args.batches[0]
    print("ratio_vs_hf=" + " ".join(f"{results[n, b]['ratio']:.2f}" for n in args.configs if (n, b) in results))
    scale = PEAK / 1e9 / max(peak.values())  # fractions of this machine's faster large matmul instead of PEAK
    print(f"of this machine's {max(peak.values()):.0f} GFLOP/s: " + " ".join(
        f"{n} {results[n, b]['flop'] * scale:.2f}" for n in ("small", "medium") if (n, b) in results))
    print("flop_fraction=" + " ".join(f"{results[n, b]['flop']:.2f}" for n in ("small", "medium") if (n, b) in results))


if __name__ == "__main__":
    main()
