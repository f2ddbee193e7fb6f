"""GRPO stage: a tiny_policy run end to end, exact resume after SIGKILL, and clear errors on bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1kit.config import ConfigError, load_config
from r1kit.stages.grpo import GRPOConfig

RECIPE = """
[pretrain]
out_dir = "{root}/base"
steps = 30
batch_size = 16
save_every = 30
eval_problems = 8
[pretrain.model]
arch = "llama"
config = {{ hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 2, max_position_embeddings = 128 }}

[grpo]
base = "{root}/base"
out_dir = "{root}/grpo"
task_args = {{ require_think = false }}
steps = 6
prompts_per_step = 4
group_size = 4
max_new_tokens = 24
lr = 1e-3
mu = 2
kl_coef = 0.04
save_every = 2
eval_every = 3
eval_problems = 8
"""


def run_cli(recipe, *extra, wait=True):
    cmd = [sys.executable, "-m", "r1kit.cli", "grpo", "--config", str(recipe), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def metrics(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


DETERMINISTIC = ("reward_mean", "accuracy", "loss", "kl", "clip_frac", "response_length", "eval_greedy_accuracy")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    recipe = root / "r.toml"
    recipe.write_text(RECIPE.format(root=root))
    r = run_cli(recipe)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pretraining it first" in r.stdout
    return root


def test_run_writes_metrics_and_summary(uninterrupted):
    m = metrics(uninterrupted / "grpo" / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6]
    keys = ("reward_mean", "reward_std", "accuracy", "think_rate", "response_length", "kl", "clip_frac", "entropy",
            "zero_variance_frac", "truncation_rate", "gen_seconds", "train_seconds", "tokens_per_second",
            "update_skipped", "trained_groups", "sampled_groups", "sampling_rounds")
    for x in m:  # β > 0: every step updates, so every step reports its KL, clip fraction and entropy
        assert set(keys) <= set(x), sorted(set(keys) - set(x))
        assert x["update_skipped"] is False and x["trained_groups"] == x["sampled_groups"] == 4
        assert x["kl"] >= 0 and 0 <= x["clip_frac"] <= 1 and x["entropy"] > 0
    s = json.loads((uninterrupted / "grpo" / "summary.json").read_text())
    assert {"base_accuracy", "final_accuracy", "rl_seconds", "steps"} <= set(s)
    assert s["steps"] == 6
    assert (uninterrupted / "grpo" / "model" / "trainer_state" / "optimizer" / ".metadata").exists()


def test_sigkill_then_resume_is_exact(uninterrupted, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(root=tmp_path))
    os.symlink(uninterrupted / "base", tmp_path / "base")  # same base, no second pretraining
    proc = run_cli(recipe, wait=False)
    log = tmp_path / "grpo" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill between checkpoints: after step 3 is logged, before 4 is saved
        if log.exists() and len(metrics(log)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics(log)) < 6, "the run finished before it could be killed"
    r = run_cli(recipe)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout
    a, b = metrics(uninterrupted / "grpo" / "metrics.jsonl"), metrics(log)
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for k in DETERMINISTIC:
            assert x.get(k) == y.get(k), (x["step"], k)
    wa = load_file(uninterrupted / "grpo" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "grpo" / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_unknown_recipe_key_suggests_nearest(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[grpo]\ngroup_sise = 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'group_sise'; did you mean 'group_size'"):
        load_config(GRPOConfig, recipe, section="grpo")
    with pytest.raises(ConfigError, match=r"'lr' must be float"):
        load_config(GRPOConfig, None, ["grpo.lr=fast"], section="grpo")
    with pytest.raises(ConfigError, match=r"grpo.loss = 'ppo'"):
        load_config(GRPOConfig, None, ["loss=ppo"], section="grpo")


def test_reward_that_raises_is_reported(uninterrupted, tmp_path):
    from r1kit import checkpoint
    from r1kit.engine import SamplingParams
    from r1kit.rewards import RewardError
    from r1kit.rollout import rollout
    from r1kit.tasks import get_task

    class Broken(type(get_task("arithmetic"))):
        name = "broken"

        def verify(self, answer, problem):
            raise KeyError("no such field")

    model, tok = checkpoint.load(uninterrupted / "base" / "model")
    task = Broken()
    with pytest.raises(RewardError, match="Broken.verify raised KeyError"):
        for k in range(5):  # a completion with an <answer> reaches verify (seeded: the same draws every run)
            rollout(model, tok, task, task.problems("train", 4), SamplingParams(max_new_tokens=24, n=4, seed=k))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_accumulate_to_the_full_batch(aggregation, uninterrupted):
    import copy

    from r1kit import checkpoint, rl
    from r1kit.engine import Engine, SamplingParams
    from r1kit.rollout import Rollout
    from r1kit.stages.grpo import policy_update

    model, tok = checkpoint.load(uninterrupted / "base" / "model")
    groups = Engine(model, tok).generate([[1, 2, 3], [4, 5], [6, 7, 8, 9]],
                                         SamplingParams(max_new_tokens=12, n=4, seed=0))
    rollouts = [Rollout(None, p, s, "", {}) for p, g in zip([[1, 2, 3], [4, 5], [6, 7, 8, 9]], groups) for s in g]
    adv = rl.grpo_advantages(torch.randn(12, generator=torch.Generator().manual_seed(0)), 4)
    results = []
    for micro in (0, 5):
        m = copy.deepcopy(model)
        cfg = GRPOConfig(aggregation=aggregation, micro_batch=micro, grad_clip=1e9, max_new_tokens=12)
        policy_update(cfg, m, None, torch.optim.SGD(m.parameters(), lr=1.0), rollouts, adv)
        results.append(m.state_dict())
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-6), k


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path, monkeypatch, capsys):
    from r1kit.stages import grpo

    calls = {"n": 0}
    real_update = grpo.policy_update

    def poisoned(cfg, model, *a, **k):  # step 3's update meets a weight that has gone NaN
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                model.norm.weight.fill_(float("nan"))
        return real_update(cfg, model, *a, **k)

    monkeypatch.setattr(grpo, "policy_update", poisoned)
    monkeypatch.setattr(grpo, "rewards_of", lambda cfg, rollouts: torch.rand(len(rollouts)))
    cfg = grpo.GRPOConfig(base=str(uninterrupted / "base"), out_dir=str(tmp_path / "grpo"), steps=6,
                          prompts_per_step=2, group_size=2, max_new_tokens=8, save_every=2, eval_problems=4)
    summary = grpo.run(cfg)
    assert "loss is nan" in summary["stopped"]
    assert "last good checkpoint" in capsys.readouterr().out
    state = json.loads((tmp_path / "grpo" / "model" / "trainer_state" / "state.json").read_text())
    assert state["step"] == 2
    w = load_file(tmp_path / "grpo" / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())


def test_gpu_recipe_loads_and_steps_with_a_tiny_stand_in(tmp_path, monkeypatch):
    """The real-model recipe, unchanged but for paths and sizes: a tiny_policy Qwen2 and a 12-row GSM8K file."""
    import r1kit
    from r1kit.models.llama import Llama, LlamaConfig
    from r1kit.stages import grpo
    from r1kit.tokenizer import build_bpe_tokenizer

    tok = build_bpe_tokenizer(["Natalia sold 48 clips. How many? #### 72 <think> </think>"] * 20,
                              vocab_size=320, style="chatml")
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, architecture="Qwen2ForCausalLM", attention_bias=True,
                      tie_word_embeddings=True)
    r1kit.save(Llama(cfg).init_weights(0), tok, tmp_path / "qwen")
    rows = [{"question": f"Tom has {i} apples and buys {i + 2}. How many now?",
             "answer": f"He has {i} + {i + 2} = {2 * i + 2}.\n#### {2 * i + 2}"} for i in range(12)]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Path(grpo.__file__).parent.parent / "recipes" / "qwen_gsm8k_gpu.toml"
    cfg = load_config(GRPOConfig, recipe, [
        f"grpo.base={json.dumps(str(tmp_path / 'qwen'))}", f"out_dir={json.dumps(str(tmp_path / 'run'))}",
        f"task_args.path={json.dumps(str(tmp_path / 'gsm8k.jsonl'))}", "steps=1", "max_new_tokens=8",
        "prompts_per_step=2", "group_size=4", "micro_batch=3", "eval_problems=2", "overlong_cache=4",
        "device=\"cpu\""], section="grpo")
    # a random tiny_policy model never answers right: rewards that vary in the second group only
    monkeypatch.setattr(grpo, "rewards_of", lambda cfg, rollouts: (torch.arange(len(rollouts)) >= 4) *
                        (torch.arange(len(rollouts)) % 2) * 1.0)
    summary = grpo.run(cfg)
    assert summary["steps"] == 1 and "stopped" not in summary
    m = metrics(tmp_path / "run" / "metrics.jsonl")
    # no dynamic sampling and β > 0: the constant group stays in the batch (its gradient is the KL term's)
    assert m[0]["zero_variance_frac"] == 0.5 and m[0]["trained_groups"] == 2 and m[0]["update_skipped"] is False
    assert m[0]["kl"] >= 0 and m[0]["grad_norm"] > 0


def test_bare_overrides_go_to_the_stage_being_run(tmp_path):
    from r1kit.stages.pretrain import PretrainConfig
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(root=tmp_path))
    over = ["steps=9", "time_budget_s=5", "pretrain.lr=0.01"]
    g = load_config(GRPOConfig, recipe, over, section="grpo")
    p = load_config(PretrainConfig, recipe, over, section="pretrain", bare_keys=False)
    assert (g.steps, g.time_budget_s) == (9, 5.0)
    assert (p.steps, p.lr) == (30, 0.01)


def test_grpo_runs_on_the_deepseek_v3_style_model(tmp_path, monkeypatch):
    """MLA + MoE + MTP base from scratch, then GRPO steps that move the router biases."""
    from r1kit import checkpoint
    from r1kit.stages import grpo, pretrain
    from r1kit.training import ModelSpec

    spec = ModelSpec(arch="deepseek", config=dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=128))
    pretrain.run(pretrain.PretrainConfig(out_dir=str(tmp_path / "base"), model=spec, steps=4, batch_size=8,
                                         save_every=4, eval_problems=4, max_new_tokens=16))
    before, _ = checkpoint.load(tmp_path / "base" / "model")
    monkeypatch.setattr(grpo, "rewards_of", lambda cfg, rollouts: torch.rand(len(rollouts)))
    cfg = grpo.GRPOConfig(base=str(tmp_path / "base"), out_dir=str(tmp_path / "grpo"), steps=2, prompts_per_step=2,
                          group_size=4, max_new_tokens=12, eval_problems=4, kl_coef=0.01)
    summary = grpo.run(cfg)
    assert summary["steps"] == 2 and "stopped" not in summary
    after, _ = checkpoint.load(tmp_path / "grpo" / "model")
    gamma = before.config.bias_update_speed
    for layer in (1, 2, 3):  # two MoE layers of the main model, then the MTP block
        b0, b1 = (m.state_dict()[f"layers.{layer}.ffn.gate.e_score_correction_bias"] for m in (before, after))
        steps = (b1 - b0) / gamma  # each update moves each expert by -γ, 0 or +γ
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 2 + 1e-3
        if layer < 3:  # every routed layer was rebalanced (the balance sums to zero: some up, some down)
            assert steps.max() > 0.5 and steps.min() < -0.5, (layer, steps)
        else:  # GRPO never runs MTP: no tokens routed, so its bias must not drift
            assert torch.equal(b0, b1)


def test_resuming_another_stages_run_is_refused(uninterrupted):
    from r1kit import checkpoint
    from r1kit.formats.hf import CheckpointError
    with pytest.raises(CheckpointError, match="this is a pretrain run, not grpo"):
        checkpoint.load_trainer_state(uninterrupted / "base" / "model", stage="grpo")


def test_empty_train_split_is_a_one_line_error(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[grpo]\nout_dir = "{tmp_path / "grpo"}"\ntask_args = {{ train_size = 0 }}\n')
    r = run_cli(recipe)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "ZeroDivisionError" not in r.stderr
    assert "the train split is empty" in r.stderr + r.stdout
    assert len((r.stderr + r.stdout).strip().splitlines()) == 1


def test_each_loss_defaults_to_its_papers_aggregation():
    """GSPO's objective is a mean over sequences: by default it must not be token-weighted."""
    from r1kit import rl
    from r1kit.stages.grpo import _loss_setup, aggregation_of

    assert set(rl.LOSS_AGGREGATION) == set(rl.POLICY_LOSSES)  # every loss says which aggregation is its own
    assert aggregation_of(GRPOConfig(loss="gspo")) == "seq_mean_token_mean"
    assert aggregation_of(GRPOConfig(loss="clipped")) == "token_mean"
    assert aggregation_of(GRPOConfig(loss="gspo", aggregation="token_mean")) == "token_mean"  # explicit wins
    # two sequences of 1 and 3 tokens, advantages +1 and -1, on-policy (ratio 1)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    for aggregation, want in (("auto", [-1 / 2, 1 / 6, 1 / 6, 1 / 6]),  # sequence mean: 1/(G |y_i|) per token
                              ("token_mean", [-1 / 4, 1 / 4, 1 / 4, 1 / 4])):  # token mean: 1/sum|y|
        loss_fn, kw, agg = _loss_setup(GRPOConfig(loss="gspo", aggregation=aggregation))
        logp = torch.full((2, 3), -1.0, requires_grad=True)
        per_tok, _ = loss_fn(logp, logp.detach(), adv, mask, **kw)
        agg(per_tok, mask).backward()
        assert torch.allclose(logp.grad[mask], torch.tensor(want)), (aggregation, logp.grad)
    with pytest.raises(ConfigError, match="grpo.aggregation = 'mean'"):
        GRPOConfig(aggregation="mean")


# ---------------------------------------------------------------------------------------------
# Steps on a tiny_policy random model: what a step skips, samples and advances
# ---------------------------------------------------------------------------------------------


def one_step(cfg, tiny_policy, rewards, step=0, cursor=None):
    """train_step with `rewards(rollouts)` as the reward; → metrics, cursor, forwards with grad, batches trained."""
    from r1kit.engine import Engine
    from r1kit.stages import grpo
    from r1kit.training import adamw
    model, tok, task, problems = tiny_policy
    opt = adamw(model, cfg.lr)
    calls, batches = [], []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    real_rewards, real_update = grpo.rewards_of, grpo.policy_update
    grpo.rewards_of = lambda cfg, rollouts: rewards(rollouts)
    grpo.policy_update = lambda cfg, model, ref, opt, batch, *a: batches.append(batch) or real_update(
        cfg, model, ref, opt, batch, *a)
    try:
        cursor = cursor or grpo.Cursor()
        m, _ = grpo.train_step(cfg, step, model, None, tok, task, problems, opt, Engine(model, tok), cursor)
    finally:
        hook.remove()
        grpo.rewards_of, grpo.policy_update = real_rewards, real_update
    return m, cursor, sum(calls), batches, opt


def test_a_step_without_signal_does_no_forward_backward_or_update(tiny_policy):
    model = tiny_policy[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = GRPOConfig(prompts_per_step=3, group_size=4, max_new_tokens=6, kl_coef=0.0, lr=1e-2, warmup=5)
    m, cursor, grad_forwards, batches, opt = one_step(cfg, tiny_policy, lambda rs: torch.ones(len(rs)))
    assert m["update_skipped"] is True and m["trained_groups"] == 0 and not batches
    assert grad_forwards == 0  # generation only: no training forward, hence no backward
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state  # AdamW never stepped (its moments would otherwise exist)
    assert (cursor.prompts, cursor.updates) == (3, 0)  # the data moves on; the LR schedule waits
    assert m["lr"] == pytest.approx(1e-2 / 5)  # still warm-up step 1 for the next update
    # the same step with varied rewards does train, and only then advances the schedule
    m, cursor, grad_forwards, batches, _ = one_step(cfg, tiny_policy, lambda rs: torch.arange(len(rs)) % 2 * 1.0)
    assert m["update_skipped"] is False and m["trained_groups"] == 3 and grad_forwards >= 1
    assert (cursor.prompts, cursor.updates) == (3, 1)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_equal_rewards_with_a_kl_term_still_update(tiny_policy):
    import copy
    from r1kit.engine import Engine
    from r1kit.stages import grpo
    from r1kit.training import adamw
    model, tok, task, problems = tiny_policy
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)  # the policy has moved away from the reference: KL has a gradient
    cfg = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, kl_coef=0.1)
    real = grpo.rewards_of
    grpo.rewards_of = lambda cfg, rs: torch.zeros(len(rs))
    try:
        m, _ = grpo.train_step(cfg, 0, model, ref, tok, task, problems, adamw(model, 1e-3), Engine(model, tok),
                               grpo.Cursor())
    finally:
        grpo.rewards_of = real
    assert m["update_skipped"] is False and m["kl"] > 0 and m["grad_norm"] > 0


def test_no_signal_warns_from_the_first_step(uninterrupted, tmp_path, monkeypatch, capsys):
    from r1kit.stages import grpo
    monkeypatch.setattr(grpo, "rewards_of", lambda cfg, rollouts: torch.zeros(len(rollouts)))
    cfg = grpo.GRPOConfig(base=str(uninterrupted / "base"), out_dir=str(tmp_path / "grpo"), steps=2,
                          prompts_per_step=2, group_size=2, max_new_tokens=6, save_every=2, eval_problems=2)
    grpo.run(cfg)
    out = capsys.readouterr().out
    assert "step 1: no group's rewards varied and β = 0" in out and "update was skipped" in out
    assert out.count("no learning signal") == 1  # once per run, not every step
    assert [x["update_skipped"] for x in metrics(tmp_path / "grpo" / "metrics.jsonl")] == [True, True]
    state = json.loads((tmp_path / "grpo" / "model" / "trainer_state" / "state.json").read_text())
    assert state["cursor"] == {"prompts": 4, "updates": 0}


def half_constant(rollouts):
    """Reward 0 for every sample of prompts with an even first operand; else the first token's parity."""
    return torch.tensor([0.0 if int(r.problem.prompt.split("+")[0].split()[-1]) % 2 == 0
                         else float(r.sample.tokens[0] % 2) for r in rollouts])


def test_dynamic_sampling_fills_the_batch_with_varied_groups(tiny_policy):
    from r1kit import rl
    cfg = GRPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=4, dynamic_sampling=True,
                     dynamic_sampling_max_rounds=6)
    m, cursor, _, batches, _ = one_step(cfg, tiny_policy, half_constant)
    (batch,) = batches
    assert len(batch) == 4 * 4 and m["trained_groups"] == 4
    assert not rl.zero_variance_groups(half_constant(batch), 4).any()  # every trained group carries signal
    assert m["sampling_rounds"] >= 2 and m["sampled_groups"] > 4  # it sampled more, and counted it
    assert cursor.prompts == 4 * m["sampling_rounds"] and cursor.updates == 1
    # one try only (the cap): the batch shrinks to the varied groups of the first, and says so
    cfg.dynamic_sampling_max_rounds = 1
    m, cursor, _, batches, _ = one_step(cfg, tiny_policy, half_constant)
    assert m["sampling_rounds"] == 1 and m["sampled_groups"] == 4 and m["trained_groups"] == len(batches[0]) // 4 < 4


def test_dynamic_sampling_places_keep_their_first_varied_try_as_drawn_alone(tiny_policy, monkeypatch):
    """Streamed retries give what the rule says, whatever the timing: place i tries the stream's prompts
    cursor + k·P + i in turn and keeps the first group with reward variance — each try drawn by itself
    here, one generate() per group, seeded by (seed, step, stream index)."""
    from r1kit import rl
    from r1kit.engine import Engine, SamplingParams
    from r1kit.rollout import rollout
    from r1kit.stages import grpo
    model, tok, task, problems = tiny_policy
    monkeypatch.setattr(grpo, "rewards_of", lambda cfg, rollouts: half_constant(rollouts))
    P, G, tries, step, start = 4, 4, 3, 2, 5
    cfg = GRPOConfig(prompts_per_step=P, group_size=G, max_new_tokens=5, dynamic_sampling=True,
                     dynamic_sampling_max_rounds=tries, seed=3)
    cursor = grpo.Cursor(prompts=start)
    trained, sampled, rounds = grpo.sample_groups(cfg, step, model, tok, task, problems, Engine(model, tok), cursor)
    params = SamplingParams(max_new_tokens=5, temperature=cfg.temperature, top_p=cfg.top_p, n=G)
    want_kept, want_sampled, depth = [], [], 0
    for i in range(P):
        for k in range(tries):
            j = start + k * P + i
            (group,) = rollout(model, tok, task, grpo.problems_at(cfg, problems, [j]), params, Engine(model, tok),
                               seeds=[(cfg.seed * 100_003 + step) * 1_000_003 + j])
            want_sampled.append((k, i, group))
            depth = max(depth, k + 1)
            if rl.groups_to_keep(half_constant(group), G)[0]:
                want_kept.append(group)
                break
    def key(g):
        return g[0].problem.prompt, [r.sample.tokens for r in g]
    assert [key(g) for g in trained] == [key(g) for g in want_kept] and 0 < len(trained) <= P
    assert [key(g) for g in sampled] == [key(g) for _, _, g in sorted(want_sampled, key=lambda x: x[:2])]
    assert rounds == depth >= 2 and cursor.prompts == start + depth * P


def test_dynamic_sampling_that_drops_everything_does_not_advance_the_schedule(tiny_policy):
    cfg = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, dynamic_sampling=True,
                     dynamic_sampling_max_rounds=2, kl_coef=0.0, lr=1e-2, warmup=4)
    from r1kit.stages.grpo import Cursor
    m, cursor, grad_forwards, batches, _ = one_step(cfg, tiny_policy, lambda rs: torch.zeros(len(rs)), step=3,
                                                    cursor=Cursor(prompts=6, updates=1))
    assert m["update_skipped"] and m["trained_groups"] == 0 and not batches and grad_forwards == 0
    assert m["sampling_rounds"] == 2 and m["sampled_groups"] == 4 and cursor.prompts == 6 + 4
    assert cursor.updates == 1 and m["lr"] == pytest.approx(1e-2 * 2 / 4)


def test_grpo_learns_to_emit_the_rewarded_token():
    """The default suite's proof that GRPO learns: reward = share of completion tokens that are "7".

    A random 1-layer model emits it ~5% of the time; ten seeded steps of the real train_step (sampling,
    group advantages, clipped loss, AdamW) take that near 1, while the same steps at lr 0 do not.
    """
    from r1kit.engine import Engine
    from r1kit.models.llama import Llama, LlamaConfig
    from r1kit.stages import grpo
    from r1kit.tasks import get_task
    from r1kit.tokenizer import build_bpe_tokenizer
    from r1kit.training import adamw

    task = get_task("arithmetic", digits=2, train_size=200, test_size=10)
    problems = task.problems("train")
    tok = build_bpe_tokenizer([p.prompt for p in problems] * 2, vocab_size=40, all_bytes=False)
    seven = tok.encode("7")[0]

    def share_of_sevens(cfg, rollouts):
        return torch.tensor([sum(t == seven for t in r.sample.tokens) / max(len(r.sample.tokens), 1)
                             for r in rollouts])

    curves = {}
    for lr in (3e-2, 0.0):
        model = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=128)).init_weights(0)
        cfg = grpo.GRPOConfig(prompts_per_step=8, group_size=8, max_new_tokens=8, lr=lr, kl_coef=0.0)
        opt, engine, cursor = adamw(model, cfg.lr), Engine(model, tok), grpo.Cursor()
        real, grpo.rewards_of = grpo.rewards_of, share_of_sevens
        try:
            curves[lr] = [grpo.train_step(cfg, s, model, None, tok, task, problems, opt, engine, cursor)[0]["reward_mean"]
                          for s in range(10)]
        finally:
            grpo.rewards_of = real
    learned, frozen = curves[3e-2], curves[0.0]
    assert learned[0] < 0.15 and min(learned[-3:]) > 0.9, learned
    assert max(frozen) < 0.15, frozen  # the rise is the updates', not the sampler's
