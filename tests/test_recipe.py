"""The recipe runner (`r1kit demo`): skipping finished stages, resuming killed ones, refusals, report."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1kit import recipe
from r1kit.config import ConfigError
from r1kit.stages.distill import NoTracesError

# Tiny real stages: 2-digit addition, models of a few thousand parameters, a handful of steps.
TINY = """
[demo]
task_args = { digits = 2, train_size = 1000, test_size = 50, require_think = false }
threads = 1
[eval]
problems = 12
k = 2
max_new_tokens = 24
[pretrain]
steps = 300
batch_size = 32
lr = 3e-3
mix = { think = 0.7, direct = 0.3 }
save_every = 100
eval_problems = 4
max_new_tokens = 24
[pretrain.model]
config = { hidden_size = 48, intermediate_size = 96, num_hidden_layers = 2, num_attention_heads = 2, max_position_embeddings = 64 }
[r1_zero]
steps = 3
prompts_per_step = 4
group_size = 4
max_new_tokens = 24
save_every = 1
eval_problems = 8
[cold_start]
prompts = 16
k = 2
max_new_tokens = 24
[cold_start.student]
steps = 4
batch_size = 4
max_len = 64
save_every = 2
eval_problems = 0
[reasoning_rl]
steps = 2
prompts_per_step = 4
group_size = 4
max_new_tokens = 24
save_every = 1
eval_problems = 8
[student_base]
steps = 10
batch_size = 16
save_every = 5
eval_problems = 4
max_new_tokens = 24
[student_base.model]
config = { hidden_size = 32, intermediate_size = 64, num_hidden_layers = 1, num_attention_heads = 2, max_position_embeddings = 64 }
[distill]
prompts = 16
k = 2
max_new_tokens = 24
[distill.student]
steps = 4
batch_size = 4
max_len = 64
save_every = 2
eval_problems = 0
[student_grpo]
steps = 50
prompts_per_step = 4
group_size = 4
max_new_tokens = 24
save_every = 1
eval_every = 1000
eval_problems = 8
"""


# ---------------------------------------------------------------------------------------------
# Skip logic, with stand-in stages (no training): fast and exact about what runs when
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_stages(monkeypatch):
    calls = []

    def stage(name):
        def fn(r, d):
            calls.append(name)
            return {"steps": 1}
        return fn

    def fake_eval(r, d, name, ckpt):
        calls.append(f"eval:{name}")
        result = {"k": r.eval.k, "metrics": {"pass_at_1": 0.5, "pass_at_1_ci": [0.4, 0.6], "greedy_accuracy": 0.5,
                                            f"cons_at_{r.eval.k}": 0.5, "example": None}}
        (d / name / "eval.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(recipe, "STAGES", {n: (w, stage(n), c) for n, (w, _, c) in recipe.STAGES.items()})
    monkeypatch.setattr(recipe, "_evaluate", fake_eval)
    return calls


def test_finished_stages_are_skipped(tmp_path, fake_stages):
    r = recipe.load_recipe(None, [], str(tmp_path))
    recipe.run(r)
    names = list(recipe.STAGES)
    assert fake_stages == [x for n in names for x in (n, f"eval:{n}")]
    fake_stages.clear()
    recipe.run(recipe.load_recipe(None, [], str(tmp_path)))
    assert fake_stages == []  # everything finished: nothing runs again
    (tmp_path / "distill" / "eval.json").unlink()  # killed during its evaluation
    (tmp_path / "r1_zero" / "summary.json").write_text('{"steps": ')  # killed while writing its summary
    recipe.run(recipe.load_recipe(None, [], str(tmp_path)))
    assert fake_stages == ["r1_zero", "eval:r1_zero", "eval:distill"]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert {"stages", "student_pass_at_1", "total_seconds"} <= set(s) and s["student_pass_at_1"] == 0.5
    assert (tmp_path / "report.md").exists()


def test_a_teacher_with_no_correct_trace_is_reported_not_a_crash(tmp_path, fake_stages, monkeypatch):
    def refuses(r, d):
        (d / "distill" / "rejection.json").write_text(json.dumps(
            {"prompts": 8, "samples": 16, "correct": 0, "kept": 0, "k": 2, "teacher": str(d / "reasoning_rl/model"),
             "dropped": {"wrong": 16}, "prompts_unsolved": 8, "unsolved_examples": [{"prompt": "1+2=", "answer": "3"}]}))
        raise NoTracesError("traces.jsonl: the trace set is empty")

    stages = dict(recipe.STAGES)
    stages["distill"] = (stages["distill"][0], refuses, stages["distill"][2])
    stages["student_grpo"] = (stages["student_grpo"][0], recipe._student_grpo, stages["student_grpo"][2])  # the real one
    monkeypatch.setattr(recipe, "STAGES", stages)
    s = recipe.run(recipe.load_recipe(None, [], str(tmp_path)))
    assert "refused" in s["stages"]["distill"] and "skipped" in s["stages"]["student_grpo"]
    assert s["student_pass_at_1"] is None and "eval:distill" not in fake_stages
    report = (tmp_path / "report.md").read_text()
    assert "the teacher never solved 8 of 8 prompts" in report and "distill refused" in report


def test_recipe_errors_name_the_section(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text("[r1zero]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['r1zero'\]"):
        recipe.load_recipe(bad)
    with pytest.raises(ConfigError, match="name the section"):
        recipe.load_recipe(None, ["steps=3"])
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        recipe.load_recipe(None, ["r1_zero.stepz=3"])


def test_the_shipped_recipe_loads():
    r = recipe.load_recipe()
    assert r.demo.task == "arithmetic" and r.reasoning_rl.task_args["weights"]["language"] > 0
    assert r.reasoning_rl.task_args["require_think"] is False  # the demo's task_args are kept
    assert r.student_base.model.config["hidden_size"] < r.pretrain.model.config["hidden_size"]


# ---------------------------------------------------------------------------------------------
# Real tiny stages: SIGKILL mid-run, run again, same result
# ---------------------------------------------------------------------------------------------
def demo_cmd(cfg, out):
    return [sys.executable, "-m", "r1kit.cli", "demo", "--config", str(cfg), "--out", str(out)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DETERMINISTIC = ("greedy_accuracy", "pass_at_1", "cons_at_k", "think_rate", "response_length")


def test_killed_demo_resumes_to_the_same_result(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    a = subprocess.run(demo_cmd(cfg, tmp_path / "a"), capture_output=True, text=True, env=ENV, timeout=300)
    assert a.returncode == 0, a.stderr[-2000:]
    # the tiny recipe's teacher solves some prompts (seeded, CPU): distillation runs, an example is shown
    assert "One solved problem" in a.stdout and "✓ correct" in a.stdout, a.stdout[-2000:]
    assert "refused" not in json.loads((tmp_path / "a" / "summary.json").read_text())["stages"]["distill"]
    shutil.copytree(tmp_path / "a" / "base", tmp_path / "b" / "base")  # finished: must be skipped, not redone
    killed_log = tmp_path / "killed.log"
    with open(killed_log, "w") as log:
        proc = subprocess.Popen(demo_cmd(cfg, tmp_path / "b"), stdout=log, stderr=subprocess.STDOUT, env=ENV)
        sft_ckpt = tmp_path / "b" / "cold_start" / "student" / "model" / "trainer_state" / "state.json"
        deadline = time.time() + 120
        while time.time() < deadline and not sft_ckpt.exists() and proc.poll() is None:
            time.sleep(0.02)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)  # mid cold-start SFT (or close after it)
        proc.wait()
    assert alive, f"the demo ended before it could be killed:\n{killed_log.read_text()[-2000:]}"
    b = subprocess.run(demo_cmd(cfg, tmp_path / "b"), capture_output=True, text=True, env=ENV, timeout=300)
    assert b.returncode == 0, b.stderr[-2000:]
    assert "base: finished earlier, skipping" in b.stdout and "r1_zero: finished earlier" in b.stdout
    # killed mid-SFT → it resumes; killed in the stage's evaluation → only that reruns
    assert any(m in b.stdout for m in ("resuming", "cold_start: trained earlier", "cold_start: finished earlier"))
    sa, sb = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    for name, e in sa["stages"].items():
        if name == "student_grpo":  # stops on a wall-clock budget: its length depends on the machine
            continue
        for key in DETERMINISTIC:
            assert e.get(key) == sb["stages"][name].get(key), (name, key)
    assert sa["student_pass_at_1"] == sb["student_pass_at_1"]
    for png in ("rl_reward_accuracy.png", "rl_length_think.png", "eval_by_stage.png", "training_loss.png"):
        assert (tmp_path / "b" / png).stat().st_size > 10_000


@pytest.mark.slow
def test_full_demo_meets_its_claims(tmp_path):
    """The shipped recipe end to end: ≤ 10 minutes on 2 CPU cores, student pass@1 ≥ 90%."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # default threads, as a user runs it
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "r1kit.cli", "demo", "--out", str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=1200)
    wall = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["student_pass_at_1"] >= 0.90, s["student_pass_at_1"]
    assert wall <= 600, f"the demo took {wall:.0f} s"
    report = Path(tmp_path / "report.md").read_text()
    for png in ("rl_reward_accuracy.png", "rl_length_think.png", "eval_by_stage.png", "training_loss.png"):
        assert f"]({png})" in report and (tmp_path / png).stat().st_size > 10_000
