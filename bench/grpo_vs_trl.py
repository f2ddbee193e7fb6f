"""One GRPO optimizer step, r1kit vs TRL's GRPOTrainer, same weights, one thread, one run.

Llama (hidden 256, 4 layers, vocab ~512), 8 prompts × 8 generations, exactly 128 completion
tokens, fp32, no KL (β = 0), one update per batch, random rewards (the cost does not depend on
what the reward says). Prints seconds per step split into generation and training, and the
final line `speedup_vs_trl=<x>`.
    python bench/grpo_vs_trl.py [--steps 3]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import r1kit
from r1kit.engine import Engine, SamplingParams
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.rollout import Rollout
from r1kit.stages.grpo import GRPOConfig, policy_update
from r1kit import rl
from r1kit.tokenizer import build_bpe_tokenizer
from r1kit.training import adamw

PROMPTS, G, NEW = 8, 8, 128


def make_checkpoint(d: Path):
    words = "the of and to in is was for on that with as by at from his her an were are which".split()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(40)) + f" {rng.randint(0, 99999)}" for _ in range(2000)]
    tok = build_bpe_tokenizer(corpus, vocab_size=512, style="chatml")
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    r1kit.save(Llama(cfg).init_weights(0), tok, d)
    prompts = [f"Question {i}: " + " ".join(rng.choice(words) for _ in range(20)) for i in range(PROMPTS)]
    return prompts


def r1kit_steps(ckpt: Path, prompts: list[str], steps: int):
    model, tok = r1kit.load(ckpt)
    cfg = GRPOConfig(group_size=G, max_new_tokens=NEW, lr=1e-6, mu=1, aggregation="seq_mean_token_mean")
    opt, engine = adamw(model, cfg.lr), Engine(model, tok)
    ids = [tok.chat_prompt(p) for p in prompts]
    gen, train = [], []
    for step in range(steps + 1):  # the first step warms up allocators and is not counted
        t0 = time.perf_counter()
        groups = engine.generate(ids, SamplingParams(max_new_tokens=NEW, temperature=1.0, n=G, ignore_eos=True,
                                                     seed=step))
        rollouts = [Rollout(None, ids[i], s, "", {"total": random.random()}) for i, g in enumerate(groups) for s in g]
        t1 = time.perf_counter()
        adv = rl.grpo_advantages(torch.tensor([r.reward["total"] for r in rollouts]), G)
        policy_update(cfg, model, None, opt, rollouts, adv, tok.pad_id)
        t2 = time.perf_counter()
        assert all(len(r.sample.tokens) == NEW for r in rollouts)
        if step:
            gen.append(t1 - t0)
            train.append(t2 - t1)
    return sum(gen) / steps, sum(train) / steps


def trl_steps(ckpt: Path, prompts: list[str], steps: int):
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    gen_time = []
    original = model.generate

    def timed_generate(*a, **kw):  # split the step: time spent inside generate() is generation
        t0 = time.perf_counter()
        out = original(*a, **kw)
        gen_time.append(time.perf_counter() - t0)
        return out
    model.generate = timed_generate
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts] * (steps + 1))
    with tempfile.TemporaryDirectory() as out:
        args = TRLConfig(output_dir=out, per_device_train_batch_size=PROMPTS * G, gradient_accumulation_steps=1,
                         num_generations=G, max_completion_length=NEW, learning_rate=1e-6, beta=0.0,
                         num_iterations=1, use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1000,
                         save_strategy="no", max_steps=steps + 1, temperature=1.0, top_p=1.0, top_k=0,
                         generation_kwargs={"min_new_tokens": NEW}, dataloader_num_workers=0, seed=0,
                         shuffle_dataset=False)
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [random.random() for _ in completions],
                              args=args, train_dataset=data, processing_class=tok)
        step_times = []
        cb = _StepTimer(step_times)
        trainer.add_callback(cb)
        trainer.train()
    steps_t, gens = step_times[1:], gen_time[1:]
    g = sum(gens) / len(steps_t)
    return g, sum(steps_t) / len(steps_t) - g


class _StepTimer:
    def __init__(self, out):
        self.out, self.t0 = out, None

    def __getattr__(self, name):  # the TrainerCallback interface: ignore every other event
        return lambda *a, **k: None

    def on_step_begin(self, *a, **k):
        self.t0 = time.perf_counter()

    def on_step_end(self, *a, **k):
        self.out.append(time.perf_counter() - self.t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        prompts = make_checkpoint(Path(d))
        og, ot = r1kit_steps(Path(d), prompts, args.steps)
        print(f"r1kit  {og + ot:6.2f} s/step  (generation {og:.2f} s, training {ot:.2f} s)", flush=True)
        tg, tt = trl_steps(Path(d), prompts, args.steps)
        print(f"TRL    {tg + tt:6.2f} s/step  (generation {tg:.2f} s, training {tt:.2f} s)", flush=True)
    print(f"speedup_vs_trl={(tg + tt) / (og + ot):.2f}")


if __name__ == "__main__":
    main()
