"""GRPO, r1kit vs TRL's GRPOTrainer (1.16, transformers generate, no vLLM), same weights, one thread.

1. Time to accuracy (grpo_race.py): both trainers on the tiny R1-Zero task with the recipe r1kit ships
   (r1kit/recipes/r1_zero_tiny.toml: 16 prompts × G 8, lr 1e-4, 64 tokens, T 1.0, β 0, one update,
   clipped + token-mean = TRL loss_type "dapo", accuracy + 0.1·format reward, seed 0), until held-out
   greedy accuracy ≥ --target on --eval-problems test problems, scored every --eval-every steps by the
   same evaluator with the clock paused, each side capped at --cap-s. Prints each side's steps and
   seconds to the target, its curve and a step profile, then `time_to_acc_ratio=<TRL/r1kit>`.
2. With --real [DIR]: one real-shaped row, SmolLM2-135M (DIR, a Hugging Face directory; converted from
   the fixture when missing, as bench/real_model.py does): 4 prompts × 4 samples × exactly 48 tokens,
   random rewards (the cost does not depend on them) — s/step and the generation share per side.
3. One optimizer step on a random Llama (hidden 256, 4 layers, vocab ~512), 8 prompts × 8 samples ×
   exactly 128 tokens, random rewards, lr 1e-6, token-mean loss: the final line `speedup_vs_trl=<x>`.
The step settings of both sides come from one r1kit GRPOConfig (grpo_peer.trl_args mirrors it into
TRL's), and one profile (hooks on the model, autograd and the optimizer) splits each side's step.
    python bench/grpo_vs_trl.py --threads 1 [--real] [--no-race] [--steps 3] [--cap-s 900]
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import r1kit
from r1kit import rl
from r1kit.config import ConfigError
from r1kit.engine import Engine, SamplingParams
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.rollout import Rollout
from r1kit.stages.grpo import GRPOConfig, policy_update
from r1kit.tokenizer import build_bpe_tokenizer
from r1kit.training import adamw

sys.path.insert(0, str(Path(__file__).parent))  # the bench's own helper modules
from grpo_peer import Profile, load_avg, step_callback, timed_generate, trl_args  # noqa: E402


@dataclass
class Shape:
    prompts: int
    group: int
    new: int  # exactly this many completion tokens per sample

    def config(self) -> GRPOConfig:
        return GRPOConfig(prompts_per_step=self.prompts, group_size=self.group, max_new_tokens=self.new, lr=1e-6,
                          mu=1, aggregation="token_mean", device="cpu", dtype="float32")


TINY, REAL = Shape(8, 8, 128), Shape(4, 4, 48)


def make_checkpoint(d: Path, n_prompts: int) -> list[str]:
    words = "the of and to in is was for on that with as by at from his her an were are which".split()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(40)) + f" {rng.randint(0, 99999)}" for _ in range(2000)]
    tok = build_bpe_tokenizer(corpus, vocab_size=512, style="chatml")
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    r1kit.save(Llama(cfg).init_weights(0), tok, d)
    return [f"Question {i}: " + " ".join(rng.choice(words) for _ in range(20)) for i in range(n_prompts)]


def word_problems(n: int) -> list[str]:
    from r1kit.tasks import get_task
    task = get_task("word_problems", kind="add", digits=2)
    return [task.render(p) for p in task.problems("test", n)]


def r1kit_steps(ckpt: Path, prompts: list[str], cfg: GRPOConfig, steps: int) -> Profile:
    """r1kit's engine + policy_update, fixed-length rollouts, random rewards; the first step is a warm-up."""
    model, tok = r1kit.load(ckpt, dtype="float32")
    opt, engine, prof, G = adamw(model, cfg.lr), Engine(model, tok), Profile(), cfg.group_size
    ids = [tok.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    with prof.attach(model):
        for step in range(steps + 1):
            prof.begin_step()
            with prof.timing("generation"):
                groups = engine.generate(ids, SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0, n=G,
                                                             ignore_eos=True, seed=step))
            rollouts = [Rollout(None, ids[i], s, "", {"total": random.random()}) for i, g in enumerate(groups)
                        for s in g]
            assert all(len(r.sample.tokens) == cfg.max_new_tokens for r in rollouts)
            adv = rl.grpo_advantages(torch.tensor([r.reward["total"] for r in rollouts]), G)
            policy_update(cfg, model, None, opt, rollouts, adv)
            prof.end_step()
            if step == 0:  # allocators and caches warm up: not counted
                prof.reset()
    return prof


def trl_steps(ckpt: Path, prompts: list[str], cfg: GRPOConfig, steps: int) -> Profile:
    """TRL's GRPOTrainer with the same settings, exactly max_new_tokens per sample; first step a warm-up."""
    import transformers
    from datasets import Dataset
    from trl import GRPOTrainer
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    prof = Profile()
    timed_generate(model, prof)

    def on_end(state, control):
        if state.global_step == 1:  # the warm-up step
            prof.reset()
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts] * (steps + 1))
    with tempfile.TemporaryDirectory() as out:
        # fixed-length rollouts need min_new_tokens (FINDINGS.md)
        args = trl_args(cfg, out, steps + 1, generation_kwargs={"min_new_tokens": cfg.max_new_tokens})
        trainer = GRPOTrainer(model=model, reward_funcs=random_rewards, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[step_callback(prof, on_end=on_end)])
        with prof.attach(model):
            trainer.train()
    return prof


def random_rewards(completions, **kw) -> list[float]:
    return [random.random() for _ in completions]


def per_step_row(name: str, ckpt: Path, prompts: list[str], shape: Shape, steps: int) -> float:
    """Both sides' step on one checkpoint → TRL/r1kit seconds per step; prints each side's profile."""
    cfg, sides = shape.config(), {}
    for side, fn in (("r1kit", r1kit_steps), ("TRL", trl_steps)):
        before = load_avg()
        prof = sides[side] = fn(ckpt, prompts, cfg, steps)
        gen = prof.per_step()["generation"] / prof.mean()[0]
        print(f"{name} {side:6s} {prof.line()}  generation share {gen:.0%}  ({before} → {load_avg()})", flush=True)
        gc.collect()
    (tw, tc), (ow, oc) = sides["TRL"].mean(), sides["r1kit"].mean()
    print(f"{name} {shape.prompts} prompts × {shape.group} × {shape.new} tokens: TRL/r1kit per step {tw / ow:.2f} "
          f"(cpu time {tc / oc:.2f})", flush=True)
    return tw / ow


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    ap.add_argument("--steps", type=int, default=3,
                    help="timed steps of the per-step rows (after a warm-up step); 0: no per-step rows")
    ap.add_argument("--race", action=argparse.BooleanOptionalAction, default=True,
                    help="the time-to-accuracy race on the tiny R1-Zero task (--no-race: per-step rows only)")
    ap.add_argument("--base", default="runs/bases/arith_tiny", help="race: the base (pretrained when missing)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="race: override the recipe's [grpo] field for both sides, e.g. --set seed=1")
    ap.add_argument("--target", type=float, default=0.95, help="race: held-out greedy accuracy to reach")
    ap.add_argument("--eval-every", type=int, default=1, help="race: steps between evaluations (both sides)")
    ap.add_argument("--eval-problems", type=int, default=200, help="race: held-out test-split problems")
    ap.add_argument("--cap-s", type=float, default=900, help="race: clock seconds after which a side stops")
    ap.add_argument("--real", nargs="?", const="runs/smollm2-hf", default=None, metavar="DIR",
                    help="also the real-shaped row on SmolLM2-135M (default DIR runs/smollm2-hf)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        run(args)
    except (ConfigError, ValueError) as e:  # a bad --set, --base or --real: one line, not a traceback
        sys.exit(f"grpo_vs_trl: {e}")


def run(args) -> None:
    final = []
    if args.race:
        import grpo_race
        cfg = grpo_race.race_config(args.base, args.eval_problems, args.overrides)
        race = grpo_race.Race(cfg, args.target, args.eval_every, args.cap_s)
        curves = grpo_race.run(race)
        print(grpo_race.ratio_line(curves, race, clock=2), flush=True)
        final.append(grpo_race.ratio_line(curves, race))
    if args.real and args.steps:
        real = Path(args.real)
        if not (real / "config.json").exists():
            from real_model import FIXTURE, convert_fixture
            print(f"converting the fixture {FIXTURE} → {real}", flush=True)
            convert_fixture(real)
        per_step_row("real", real, word_problems(REAL.prompts), REAL, args.steps)
    if args.steps:
        with tempfile.TemporaryDirectory() as d:
            prompts = make_checkpoint(Path(d), TINY.prompts)
            final.append(f"speedup_vs_trl={per_step_row('tiny', Path(d), prompts, TINY, args.steps):.2f}")
    print("\n".join(final))


if __name__ == "__main__":
    main()
