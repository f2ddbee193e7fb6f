"""Time to a held-out greedy accuracy on the tiny R1-Zero task: r1kit's recipe vs TRL's GRPOTrainer.

Both start from one base (r1kit's tiny arithmetic llama; its Hugging Face directory loads in
transformers as it is) and train with the recipe r1kit ships, r1kit/recipes/r1_zero_tiny.toml: the
same prompts per step, group size, learning rate, completion length, temperature, β = 0, one update per
batch, clipped loss with token-mean aggregation (TRL loss_type="dapo"), AdamW betas, gradient clip and
seed (grpo_peer.trl_args), the same reward — r1kit's task reward (accuracy 1.0 + format 0.1) wrapped as
a TRL reward function — and the prompts in r1kit's data-stream order, each through the checkpoint's chat
template (the token ids are checked equal). r1kit keeps what it ships: DAPO dynamic sampling (TRL has no
equivalent: it trains on every group, zero-variance ones included) and its continuous-batching engine.

Every `eval_every` steps both sides are scored by one evaluator, r1kit's greedy_accuracy on the same
held-out problems (TRL's weights are copied into an r1kit model), with the clock paused; the clock starts
at the first step, so loading and set-up count on neither side.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import r1kit
from r1kit import checkpoint, rollout
from r1kit.common import seed_everything
from r1kit.config import load_config
from r1kit.engine import Engine
from r1kit.formats.hf import hf_state_names
from r1kit.stages.grpo import Cursor, GRPOConfig, batch_problems, train_step
from r1kit.tasks import get_task
from r1kit.training import adamw, is_checkpoint, resolve_ckpt

from grpo_peer import Profile, check_trl_equivalent, load_avg, step_callback, timed_attr, timed_generate, trl_args

RECIPE = Path(r1kit.__file__).parent / "recipes" / "r1_zero_tiny.toml"


class Clock:
    """Wall and process-CPU seconds since the first start(), with the paused blocks (evaluation) taken out.
    On a shared machine CPU seconds are the steadier figure: another job's load stretches wall time only."""

    def __init__(self):
        self.t0, self.off = None, (0.0, 0.0)

    @staticmethod
    def _read() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = self._read()

    def now(self) -> tuple[float, float]:
        """(wall, cpu) seconds on the clock."""
        return tuple(t - t0 - off for t, t0, off in zip(self._read(), self.t0, self.off))

    @contextlib.contextmanager
    def paused(self):
        t = self._read()
        try:
            yield
        finally:
            self.off = tuple(off + b - a for off, a, b in zip(self.off, t, self._read()))


@dataclass
class Curve:
    side: str
    points: list = field(default_factory=list)  # (step, wall s, cpu s, held-out greedy accuracy); step 0: the base
    profile: Profile = field(default_factory=Profile)
    notes: str = ""  # what the side did besides the points (r1kit: sampling rounds, skipped updates)

    def reached(self, target: float):
        return next((p for p in self.points if p[3] >= target), None)

    def summary(self, target: float) -> str:
        hit = self.reached(target)
        if hit:
            return f"{self.side:6s} reached {target:.0%} at step {hit[0]} in {hit[1]:.1f} s (cpu {hit[2]:.1f} s)"
        step, wall, cpu, _ = self.points[-1]
        return (f"{self.side:6s} not reached in {wall:.1f} s (cpu {cpu:.1f} s, {step} steps), "
                f"best acc {max(p[3] for p in self.points):.3f}")

    def curve(self) -> str:
        return " ".join(f"{s}:{w:.1f}s:{a:.3f}" for s, w, _, a in self.points)


@dataclass
class Race:
    cfg: GRPOConfig  # r1kit's recipe as shipped (base and held-out size from the command line)
    target: float  # held-out greedy accuracy that ends a side's run
    eval_every: int  # steps between evaluations, on both sides
    cap_s: float  # clock seconds after which a side stops, reached or not

    def __post_init__(self):
        self.task = get_task(self.cfg.task, **self.cfg.task_args)
        self.problems = self.task.problems("train")
        self.test = self.task.problems("test", self.cfg.eval_problems)

    def evaluate(self, model, tok) -> float:
        return rollout.greedy_accuracy(model, tok, self.task, self.test, self.cfg.max_new_tokens)

    def after_step(self, step: int, clock: Clock, curve: Curve, evaluate) -> bool:
        """Evaluate on the shared schedule (and at the cap), clock paused → whether this side is done."""
        over = clock.now()[0] >= self.cap_s
        if step % self.eval_every and not over:
            return False
        with clock.paused():
            acc = evaluate()
        curve.points.append((step, *clock.now(), acc))
        return acc >= self.target or over


def race_config(base: str, eval_problems: int, overrides=()) -> GRPOConfig:
    """The recipe's [grpo] section (+ `key=value` overrides, which both sides then follow); a missing base is
    pretrained first by the recipe's [pretrain] section."""
    cfg = load_config(GRPOConfig, RECIPE, overrides, section="grpo")
    cfg.base, cfg.eval_problems = base, eval_problems
    check_trl_equivalent(cfg)  # before either side runs
    if not is_checkpoint(resolve_ckpt(base)):
        from r1kit.stages import pretrain
        print(f"race: base {base} is missing — pretraining it with {RECIPE.name}'s [pretrain] section", flush=True)
        pre = load_config(pretrain.PretrainConfig, RECIPE, section="pretrain", bare_keys=False)
        pre.out_dir = base
        pretrain.run(pre)
    return cfg


def run_r1kit(race: Race) -> Curve:
    """r1kit's GRPO steps (stages/grpo.train_step, the recipe's settings) until the target or the cap."""
    cfg, curve, clock = race.cfg, Curve("r1kit"), Clock()
    seed_everything(cfg.seed)
    model, tok = checkpoint.load(resolve_ckpt(cfg.base), device="cpu", dtype="float32")
    opt, engine, cursor, prof = adamw(model, cfg.lr, cfg.weight_decay), Engine(model, tok), Cursor(), curve.profile
    curve.points.append((0, 0.0, 0.0, race.evaluate(model, tok)))
    rounds = skipped = 0
    with prof.attach(model):
        clock.start()
        for step in range(10**9):
            prof.begin_step()
            reward0 = prof.seconds["reward"]
            with timed_attr(rollout, "score", prof, "reward"):  # rollout() scores each sample by this name
                m, _ = train_step(cfg, step, model, None, tok, race.task, race.problems, opt, engine, cursor)
            prof.end_step()
            prof.add("generation", m["gen_seconds"] - (prof.seconds["reward"] - reward0))  # the engine's share
            rounds, skipped = rounds + m["sampling_rounds"], skipped + m["update_skipped"]
            if race.after_step(step + 1, clock, curve, lambda: race.evaluate(model, tok)):
                break
    curve.notes = (f"dynamic sampling: {rounds / (step + 1):.2f} generation rounds/step, "
                   f"{cursor.prompts} prompts drawn, {skipped} updates skipped")
    return curve


def run_trl(race: Race) -> Curve:
    """TRL's GRPOTrainer with the recipe's settings mirrored (grpo_peer.trl_args) until the target or the cap."""
    import transformers
    from datasets import Dataset
    from trl import GRPOTrainer
    cfg, curve, clock = race.cfg, Curve("TRL"), Clock()
    path = resolve_ckpt(cfg.base)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    twin, tok = checkpoint.load(path, device="cpu", dtype="float32")  # the evaluator's model: TRL's weights copied in
    names = hf_state_names(twin)  # {HF name: r1kit name}

    def evaluate() -> float:
        src, dst = model.state_dict(), twin.state_dict()
        with torch.no_grad():
            for hf, ours in names.items():
                dst[ours].copy_(src[hf])
        return race.evaluate(twin, tok)

    max_steps = 4 * int(race.cap_s) + race.eval_every  # a bound the cap ends first (a step takes far over 0.25 s)
    stream = batch_problems(cfg, race.problems, 0, max_steps * cfg.prompts_per_step)  # r1kit's prompt order
    rows = [{"prompt": _messages(cfg, race.task, p), "row": j} for j, p in enumerate(stream)]
    for r, p in zip(rows[: cfg.prompts_per_step], stream):
        ids = hf_tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        if list(ids["input_ids"]) != rollout.prompt_ids(tok, p, cfg.system, race.task):
            raise SystemExit(f"race: transformers renders the prompt {p.prompt!r} to other token ids than r1kit "
                             f"({path / 'tokenizer_config.json'} chat_template): the sides would not see one prompt")

    def reward(completions, row, **kw):  # the task's weighted total, as r1kit's rewards_of reads it
        with curve.profile.timing("reward"):
            return [rollout.score(race.task, tok, stream[j], c[-1]["content"])[1]["total"]
                    for c, j in zip(completions, row)]

    def on_end(state, control):
        if race.after_step(state.global_step, clock, curve, evaluate):
            control.should_training_stop = True

    curve.points.append((0, 0.0, 0.0, evaluate()))
    timed_generate(model, curve.profile)
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=trl_args(cfg, out, max_steps),
                              train_dataset=Dataset.from_list(rows), processing_class=hf_tok,
                              callbacks=[step_callback(curve.profile, lambda state: clock.start(), on_end)])
        with curve.profile.attach(model):
            trainer.train()
    curve.notes = "no dynamic sampling in TRL: every group trains, zero-variance ones at advantage 0"
    return curve


def _messages(cfg: GRPOConfig, task, problem) -> list[dict]:
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return system + [{"role": "user", "content": task.render(problem)}]


def run(race: Race) -> dict[str, Curve]:
    """Both sides, one after the other; prints each side's result, curve and step profile."""
    curves = {}
    for run_side in (run_r1kit, run_trl):
        before = load_avg()
        c = run_side(race)
        curves[c.side] = c
        print(f"race {c.summary(race.target)}  ({before} → {load_avg()})", flush=True)
        print(f"race {c.side:6s} curve step:seconds:acc  {c.curve()}", flush=True)
        print(f"race {c.side:6s} {c.profile.line()}", flush=True)
        print(f"race {c.side:6s} {c.notes}", flush=True)
    return curves


def ratio_line(curves: dict[str, Curve], race: Race, clock: int = 1) -> str:
    """`time_to_acc_ratio=<TRL/r1kit>` in wall (clock=1) or CPU (clock=2) seconds; a bound (">x") when only
    r1kit reached the target."""
    ours, theirs = (curves[k].reached(race.target) for k in ("r1kit", "TRL"))
    name = "time_to_acc_ratio" + ("" if clock == 1 else "_cpu")
    if ours and theirs:
        return f"{name}={theirs[clock] / ours[clock]:.2f}"
    if ours:
        return f"{name}=>{curves['TRL'].points[-1][clock] / ours[clock]:.2f} (TRL not reached)"
    return f"{name}=nan (r1kit not reached)"
