"""Peak memory of one GRPO step with and without the memory switches, and the planner against it.

Each case runs in a fresh subprocess on one thread: a random model of the config's shape, one
rollout phase (the engine's KV cache for prompts × G sequences) and two policy updates (so AdamW's
moments exist) on those rollouts. Memory is the process's peak RSS (ru_maxrss) minus its RSS right
after `import torch, r1kit`, minus the same for a model too small to matter ("null": the runtime's
own scratch memory, printed): what the step's tensors cost, which is what `r1kit fit --train grpo`
predicts. "plain" is full fine-tuning with full (N, T, V) logits; "lean" is LoRA r16 on every
projection + activation checkpointing + vocabulary-chunked log-probs (1024 tokens per chunk).

Configs: "small" (hidden 512, 8 layers, 8 / 4 heads, ffn 1536, vocab 8192) and "real" (SmolLM2-135M's shape: hidden 576,
30 layers, 9 / 3 heads, ffn 1536, vocab 49,152, tied). Prints one line per case and, last,
`grpo_peak_ratio=<lean / plain on real>` and `planner_error=<max |predicted / measured − 1|>`.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    # runs the same code on a model too small to matter: what one step costs beyond its tensors (the
    # allocator's arenas, oneDNN/MKL scratch, autograd's engine) — subtracted from every case and printed
    "null": dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=1024),
    # small enough to run in seconds, large enough that its tensors (≈ 0.1–1 GiB) stand well above the
    # allocator's noise of a few MiB (a 4-layer 256-wide model's lean step is ~80 MiB: a 10% noise floor)
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024),
    "real": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048),
}
LEAN = dict(lora_rank=16, grad_checkpointing=True, logprob_chunk=1024)


def child(args) -> None:
    """One measured GRPO step (runs in the subprocess)."""
    import resource

    import torch
    torch.set_num_threads(1)
    import r1kit  # noqa: F401
    from r1kit.engine import Engine, SamplingParams
    from r1kit.models.llama import Llama, LlamaConfig
    from r1kit.rl import grpo_advantages
    from r1kit.rollout import Rollout
    from r1kit.stages.grpo import GRPOConfig, policy_update
    from r1kit.training import adamw, apply_memory_options

    base = _rss()
    cfg = GRPOConfig(grad_clip=1.0, max_new_tokens=args.completion, group_size=args.group,
                     **(LEAN if args.mode == "lean" else {}))
    model = Llama(LlamaConfig(**CONFIGS[args.config])).init_weights(0)
    apply_memory_options(model, cfg)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (args.prompt,), generator=g).tolist()
               for _ in range(args.prompts)]
    with torch.no_grad():  # the rollout phase: the engine's cache for every sequence at once
        groups = Engine(model, None, max_batch=args.prompts * args.group).generate(
            prompts, SamplingParams(max_new_tokens=args.completion, n=args.group, seed=0, ignore_eos=True))
    rollouts = [Rollout(None, p, s, "", {}) for p, grp in zip(prompts, groups) for s in grp]
    adv = grpo_advantages(torch.randn(len(rollouts), generator=g), args.group)
    opt = adamw(model, 1e-5)
    for _ in range(2):
        policy_update(cfg, model, None, opt, rollouts, adv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak - base}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def predicted(args, mode: str) -> float:
    from r1kit import plan_train as pt
    from r1kit.formats import hf
    c = CONFIGS[args.config]
    cfg = {"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, **c}
    lean = mode == "lean"
    setup = pt.TrainSetup(stage="grpo", lora_rank=16 if lean else 0, seq=args.prompt + args.completion,
                          rows=args.prompts * args.group, prompts=args.prompts, group=args.group,
                          grad_checkpointing=lean, chunk=1024 if lean else 0, base_dtype="fp32")
    assert hf.family_for("LlamaForCausalLM", "bench")
    return pt.plan_training(args.config, cfg, "bench", setup).peak


def measure(args, config: str, mode: str) -> float:
    cmd = [sys.executable, __file__, "--child", "--config", config, "--mode", mode, "--prompt", str(args.prompt),
           "--completion", str(args.completion), "--prompts", str(args.prompts), "--group", str(args.group)]
    # a fixed mmap threshold: glibc otherwise raises it after each large free, serving later tensors from
    # the heap, whose freed holes stay in RSS — peak RSS then measures fragmentation, not tensors
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["small", "real"], choices=[c for c in CONFIGS if c != "null"])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--completion", type=int, default=224, help="completion tokens")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="G completions per prompt")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="small", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT))
    worst, peaks = 0.0, {}
    null = {mode: measure(args, "null", mode) for mode in ("plain", "lean")}
    print(f"runtime scratch (null model): plain {null['plain'] / 2**20:.0f} MiB, lean {null['lean'] / 2**20:.0f} MiB "
          "— subtracted below", flush=True)
    for config in args.configs:
        args.config = config
        for mode in ("plain", "lean"):
            got, want = measure(args, config, mode) - null[mode], predicted(args, mode)
            peaks[config, mode] = got
            worst = max(worst, abs(want / got - 1))
            print(f"{config:5s} {mode:5s} measured {got / 2**30:6.2f} GiB  planner {want / 2**30:6.2f} GiB  "
                  f"error {want / got - 1:+.1%}", flush=True)
    ratio_cfg = "real" if "real" in args.configs else args.configs[0]
    print(f"grpo_peak_ratio={peaks[ratio_cfg, 'lean'] / peaks[ratio_cfg, 'plain']:.2f}")
    print(f"planner_error={worst:.2f}")


if __name__ == "__main__":
    main()
