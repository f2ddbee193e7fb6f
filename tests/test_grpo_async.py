"""GRPO's one-step off-policy mode (grpo.async = true, stages/grpo_async.py): what it samples from, how the
staleness is corrected, and that it fails, resumes and learns like the synchronous loop."""
import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from r1kit import offpolicy
from r1kit.config import ConfigError, load_config
from r1kit.engine import Engine
from r1kit.stages import grpo
from r1kit.stages.grpo import GRPOConfig
from r1kit.stages.grpo_async import OneStepAhead
from r1kit.training import adamw


def first_token_parity(cfg, rollouts):
    """A reward that varies within every group and that an update moves: the parity of the first token."""
    return torch.tensor([float(r.sample.tokens[0] % 2) for r in rollouts])


def async_steps(cfg, tiny_policy, n, monkeypatch, reward=first_token_parity, late=False):
    """The run loop's async path over `n` steps → (metrics, rollouts trained on, live state at each step's start).

    late: the rollout thread draws step s+1 only once step s has updated the live model (the worst case
    for a sampler that read the live weights instead of its snapshot).
    """
    model, tok, task, problems = tiny_policy
    monkeypatch.setattr(grpo, "rewards_of", reward)
    opt, engine, cursor = adamw(model, cfg.lr), Engine(model, tok), grpo.Cursor()
    trained = [threading.Event() for _ in range(n)]

    def draw(module, eng, step, prompts):
        if late and eng is not engine:  # drawn ahead, in the rollout thread
            assert trained[step - 1].wait(60)
        return grpo.draw(cfg, step, module, tok, task, problems, eng, prompts)

    ms, batches, states, prompts = [], [], [], []
    with OneStepAhead(model, engine, draw, n, torch.get_num_threads()) as ahead:
        for step in range(n):
            states.append(copy.deepcopy(model.state_dict()))
            prompts.append(cursor.prompts)
            drawn = ahead.take(step, cursor.prompts)
            m, rollouts = grpo.train_step(cfg, step, model, None, tok, task, problems, opt, engine, cursor, drawn=drawn)
            trained[step].set()
            ms.append(m)
            batches.append(rollouts)
    return ms, batches, states, prompts


def redraw(cfg, tiny_policy, state, step, prompts):
    """Step `step`'s rollouts drawn in line, synchronously, from a saved copy of the weights."""
    model, tok, task, problems = tiny_policy
    frozen = copy.deepcopy(model)
    frozen.load_state_dict(state)
    d = grpo.draw(cfg, step, frozen, tok, task, problems, Engine(frozen, tok), prompts)
    return [r for g in d.sampled for r in g]


def tokens_and_logprobs(rollouts):
    return [(r.sample.tokens, r.sample.logprobs) for r in rollouts]


def some_groups_constant(cfg, rollouts):
    """0 for every sample of prompts with an even first operand (dynamic sampling drops those groups), else
    the first token's parity."""
    return torch.tensor([0.0 if int(r.problem.prompt.split("+")[0].split()[-1]) % 2 == 0
                         else float(r.sample.tokens[0] % 2) for r in rollouts])


@pytest.mark.parametrize("dynamic", [False, True], ids=["one_round", "dynamic_sampling"])
def test_rollouts_of_step_s_plus_1_are_those_of_the_weights_before_step_s_update(tiny_policy, monkeypatch, dynamic):
    cfg = GRPOConfig(prompts_per_step=3, group_size=4, max_new_tokens=6, lr=3e-2, corrections=["tis"], async_=True,
                     dynamic_sampling=dynamic)
    reward = some_groups_constant if dynamic else first_token_parity
    ms, batches, states, prompts = async_steps(cfg, tiny_policy, 4, monkeypatch, reward=reward, late=True)
    assert [m["rollout_lag"] for m in ms] == [0, 1, 1, 1]
    # step 0 is drawn in line from the start weights; step s+1 from the weights step s started with
    assert tokens_and_logprobs(batches[0]) == tokens_and_logprobs(redraw(cfg, tiny_policy, states[0], 0, prompts[0]))
    for s in range(3):
        stale = redraw(cfg, tiny_policy, states[s], s + 1, prompts[s + 1])
        assert tokens_and_logprobs(batches[s + 1]) == tokens_and_logprobs(stale), f"step {s + 1}"
        # ... and not those of the weights step s+1 trains (the updates moved the policy)
        fresh = redraw(cfg, tiny_policy, states[s + 1], s + 1, prompts[s + 1])
        assert tokens_and_logprobs(batches[s + 1]) != tokens_and_logprobs(fresh), f"step {s + 1}"
    # the data cursor advances by a batch per try the deepest place took (dynamic sampling: more than one)
    assert prompts == [sum(3 * m["sampling_rounds"] for m in ms[:s]) for s in range(4)]
    assert not dynamic or prompts[-1] > 9


def test_the_snapshot_follows_trained_weights_and_buffers_but_not_later_updates(tiny_tok):
    """MoE router biases (buffers) move at every update and LoRA trains only its adapters: the snapshot
    takes both at take(), keeps the frozen base it was built with, and shares no storage with the live model."""
    from r1kit.models import lora
    from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
    model = DeepseekV3(DeepseekConfig(vocab_size=tiny_tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                      n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                                      max_position_embeddings=128)).init_weights(0)
    lora.apply_lora(model, rank=2, targets=["q", "o"])
    drawn = []
    ahead = OneStepAhead(model, Engine(model, tiny_tok), lambda m, e, step, p: drawn.append(m) or grpo.Drawn(
        step, [], [], 1, p, 0.0, 0.0), steps=3, threads=1)
    with ahead, torch.no_grad():
        ahead.take(0, 0)
        ahead.pending()
        for name, t in model.state_dict().items():
            if "lora_B" in name or "e_score_correction_bias" in name:
                t.add_(1.0)  # what step 0's update (AdamW, the bias rule) does to the live model
        ahead.take(1, 0)
        want = {k: v.clone() for k, v in model.state_dict().items()}
        for t in model.state_dict().values():
            t.add_(1.0)  # step 1's update: the batch of step 2 is being drawn from the weights before it
        ahead.pending()
    assert drawn[1] is ahead.snapshot and drawn[2] is ahead.snapshot and drawn[0] is model  # step 0: in line
    got = ahead.snapshot.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert any("e_score_correction_bias" in k for k in want) and any("lora_B" in k for k in want)


def test_tis_and_icepop_weights_correct_the_stale_tokens(tiny_policy, monkeypatch):
    seen = []
    real_tis = offpolicy.CORRECTIONS["tis"]

    def recording_tis(logp_train, logp_rollout, adv, mask, **kw):
        w, s = real_tis(logp_train, logp_rollout, adv, mask, **kw)
        seen.append(w[mask.bool()])
        return w, s

    monkeypatch.setitem(offpolicy.CORRECTIONS, "tis", recording_tis)
    cfg = GRPOConfig(prompts_per_step=3, group_size=4, max_new_tokens=6, lr=3e-2, corrections=["tis"],
                     tis_cap=1.05, async_=True)
    ms, *_ = async_steps(cfg, (copy.deepcopy(tiny_policy[0]), *tiny_policy[1:]), 3, monkeypatch)
    # step 0 is on-policy: the trainer and the engine agree up to rounding; later steps trained on stale samples
    assert (seen[0] - 1).abs().max() < 1e-4 and ms[0]["mismatch_abs_logp"] < 1e-4
    for w, m in zip(seen[1:], ms[1:]):
        assert (w - 1).abs().max() > 1e-2 and m["mismatch_abs_logp"] > 1e-3
        assert 0 < m["tis_clip_frac"] == pytest.approx(float((w >= 1.05 - 1e-6).float().mean()), abs=1e-6)
    # the masked variant drops the tokens outside its band, and logs their share
    cfg = GRPOConfig(prompts_per_step=3, group_size=4, max_new_tokens=6, lr=3e-2, corrections=["icepop"],
                     icepop_low=0.95, icepop_high=1.05, async_=True)
    ms, *_ = async_steps(cfg, (copy.deepcopy(tiny_policy[0]), *tiny_policy[1:]), 3, monkeypatch)
    assert ms[0]["icepop_mask_frac"] == 0 and all(m["icepop_mask_frac"] > 0 for m in ms[1:])


def test_a_failure_in_the_rollout_thread_is_raised_in_the_trainer(tiny_policy, monkeypatch):
    from r1kit.rewards import RewardError
    real = grpo.sample_groups

    def fails_at_step_2(cfg, step, *a):
        if step == 2:
            raise RewardError("reward of task 'arithmetic' raised ZeroDivisionError: boom")
        return real(cfg, step, *a)

    monkeypatch.setattr(grpo, "sample_groups", fails_at_step_2)
    before = threading.active_count()
    cfg = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, async_=True, corrections=["tis"])
    with pytest.raises(RewardError, match="boom"):
        async_steps(cfg, tiny_policy, 4, monkeypatch)
    assert threading.active_count() == before  # the rollout thread is gone, not left running


@pytest.fixture()
def base_dir(tiny_policy, tmp_path):
    from r1kit import checkpoint
    model, tok, *_ = tiny_policy
    checkpoint.save(model, tok, tmp_path / "base")
    return tmp_path / "base"


def run_cfg(base, out, **kw):
    return GRPOConfig(**{"base": str(base), "out_dir": str(out), "task_args": {"digits": 2, "train_size": 200,
                         "test_size": 8}, "steps": 5, "prompts_per_step": 3, "group_size": 4, "max_new_tokens": 6,
                         "lr": 3e-2, "save_every": 2, "eval_every": 2, "eval_problems": 8, "corrections": ["tis"],
                         "async_": True, **kw})


def read_metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]


DETERMINISTIC = ("step", "reward_mean", "loss", "mismatch_abs_logp", "tis_clip_frac", "response_length",
                 "rollout_lag", "eval_greedy_accuracy", "updates")


def test_resume_trains_on_the_batch_drawn_ahead(base_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    monkeypatch.setattr(grpo, "rewards_of", first_token_parity)
    whole = run_cfg(base_dir, tmp_path / "whole")
    grpo.run(whole)
    real = grpo.train_step

    def killed_at_step_3(cfg, step, *a, **kw):
        if step == 3:  # after the checkpoint of step 2, while step 3's batch was being drawn ahead
            raise KeyboardInterrupt
        return real(cfg, step, *a, **kw)

    cut = run_cfg(base_dir, tmp_path / "cut")
    monkeypatch.setattr(grpo, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        grpo.run(cut)
    monkeypatch.setattr(grpo, "train_step", real)
    state = json.loads((tmp_path / "cut" / "model" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 2 and state["cursor"]["prompts"] == 2 * 3
    grpo.run(cut)
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        assert {k: x.get(k) for k in DETERMINISTIC} == {k: y.get(k) for k in DETERMINISTIC}, x["step"]
    assert b[2]["rollout_lag"] == 1  # step 3 trained on the saved stale batch, not one redrawn on-policy
    wa, wb = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rollouts = [(tmp_path / d / "rollouts.jsonl").read_text() for d in ("whole", "cut")]
    assert rollouts[0] == rollouts[1]


def test_a_run_that_stops_early_drops_the_batch_drawn_ahead(base_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "rewards_of", first_token_parity)
    cfg = run_cfg(base_dir, tmp_path / "r", steps=20, time_budget_s=1e-6)  # stops after its first step
    before = threading.active_count()
    summary = grpo.run(cfg)
    assert summary["steps"] == 1 and threading.active_count() == before
    blob = torch.load(tmp_path / "r" / "model" / "trainer_state" / "rng-0.pt", weights_only=False)
    assert "drawn_ahead" not in blob  # a resume with a larger budget draws step 2 afresh, on-policy


def test_async_key_in_recipes_overrides_and_help(tmp_path, capsys):
    from r1kit.cli import main
    recipe = tmp_path / "r.toml"
    recipe.write_text("[grpo]\nasync = true\ncorrections = [\"tis\"]\n")
    assert load_config(GRPOConfig, recipe, section="grpo").async_ is True
    assert load_config(GRPOConfig, recipe, ["grpo.async=false"], section="grpo").async_ is False
    assert load_config(GRPOConfig, None, ["async=true"], section="grpo").async_ is True
    with pytest.raises(ConfigError, match="did you mean 'async'"):
        load_config(GRPOConfig, None, ["asynk=true"], section="grpo")
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    out = capsys.readouterr().out
    assert "  async (bool) = false" in out and "async_" not in out


def test_async_under_torchrun_is_refused(tmp_path, monkeypatch):
    from r1kit import dist
    monkeypatch.setattr(dist, "world", lambda: dist.World(rank=0, world_size=2))
    monkeypatch.setattr(dist, "init", lambda device, timeout: (dist.World(rank=0, world_size=2), device))
    with pytest.raises(ConfigError, match="grpo.async = true runs in one process"):
        grpo.run(GRPOConfig(out_dir=str(tmp_path / "r"), async_=True))


def test_a_rollout_thread_error_is_one_line_from_the_cli(base_dir, tmp_path):
    """Through `r1kit grpo`: the error raised in the rollout thread ends the run with one line, no traceback."""
    script = f"""
import sys
from r1kit.cli import main
from r1kit.rewards import RewardError
from r1kit.stages import grpo
real = grpo.sample_groups
def fails(cfg, step, *a):
    if step == 2:
        raise RewardError("reward of task 'arithmetic' raised ZeroDivisionError: in the rollout thread")
    return real(cfg, step, *a)
grpo.sample_groups = fails
sys.exit(main(["grpo", "--set", "base={base_dir}", "--out", "{tmp_path / 'r'}", "--set", "async=true",
               "--set", "steps=4", "--set", "prompts_per_step=2", "--set", "group_size=2", "--set", "max_new_tokens=4",
               "--set", "task_args={{ digits = 2, train_size = 200, test_size = 8 }}", "--set", "eval_problems=4",
               "--set", 'corrections=["tis"]']))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("r1kit grpo: error: reward of task 'arithmetic' raised "
                                                 "ZeroDivisionError: in the rollout thread")
    assert "Traceback" not in r.stderr


def test_a_tiny_async_run_learns_to_emit_the_rewarded_token(monkeypatch):
    """test_grpo.py's toy (reward = share of "7" tokens), trained one step off-policy with TIS."""
    from r1kit.models.llama import Llama, LlamaConfig
    from r1kit.tasks import get_task
    from r1kit.tokenizer import build_bpe_tokenizer
    task = get_task("arithmetic", digits=2, train_size=200, test_size=10)
    problems = task.problems("train")
    tok = build_bpe_tokenizer([p.prompt for p in problems] * 2, vocab_size=40, all_bytes=False)
    seven = tok.encode("7")[0]

    def share_of_sevens(cfg, rollouts):
        return torch.tensor([sum(t == seven for t in r.sample.tokens) / max(len(r.sample.tokens), 1)
                             for r in rollouts])

    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=128)).init_weights(0)
    cfg = GRPOConfig(prompts_per_step=8, group_size=8, max_new_tokens=8, lr=3e-2, kl_coef=0.0, async_=True,
                     corrections=["tis"])
    ms, *_ = async_steps(cfg, (model, tok, task, problems), 12, monkeypatch, reward=share_of_sevens)
    curve = [m["reward_mean"] for m in ms]
    assert curve[0] < 0.15 and min(curve[-3:]) > 0.9, curve
    assert all(m["rollout_lag"] == 1 for m in ms[1:])


def test_an_async_lora_run_with_a_kl_term_trains(base_dir, tmp_path, monkeypatch):
    """LoRA: the rollout thread samples its snapshot with the adapters merged while the trainer's reference is
    the live model with them off."""
    monkeypatch.setattr(grpo, "rewards_of", first_token_parity)
    summary = grpo.run(run_cfg(base_dir, tmp_path / "r", steps=3, lora_rank=2, kl_coef=0.01))
    ms = read_metrics(tmp_path / "r")
    assert "stopped" not in summary and [m["rollout_lag"] for m in ms] == [0, 1, 1]
    assert all(m["mismatch_abs_logp"] > 1e-3 and m["kl"] > 0 for m in ms[1:])
    assert (tmp_path / "r" / "model" / "adapter_model.safetensors").exists()
