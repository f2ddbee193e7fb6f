"""torchrun data parallelism (gloo, CPU): 2 processes × half the batch = 1 process × the full batch,
for DDP and FSDP2, both model families; checkpoints that resume on another process count; faults."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from r1kit import checkpoint
from r1kit.stages import pretrain, sft
from r1kit.training import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "max_position_embeddings": 128}
DEEPSEEK = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
            "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8, "v_head_dim": 8, "max_position_embeddings": 128, "seq_aux_alpha": 0.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("R1KIT_TEST_")}
    return {**e, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def torchrun(args: list[str], nproc: int = 2, timeout: float = 150, fault: str | None = None, check: bool = True,
             **extra_env):
    """`torchrun --standalone --nproc-per-node N tests/dist_worker.py VERB ...` → CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", WORKER, *args]
    e = env(**({"R1KIT_TEST_FAULT": fault} if fault else {}), **extra_env)
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def pretrain_toml(path: Path, arch="llama", steps=5, save_every=5, parallel="ddp") -> Path:
    config = LLAMA if arch == "llama" else DEEPSEEK
    path.write_text(f"""[pretrain]
task = "arithmetic"
task_args = {{ digits = 2, train_size = 500 }}
steps = {steps}
batch_size = 8
lr = 3e-3
warmup = 2
save_every = {save_every}
eval_problems = 2
max_new_tokens = 4
parallel = "{parallel}"
dist_timeout_s = 60
[pretrain.model]
arch = "{arch}"
config = {{ {", ".join(f"{k} = {v}" for k, v in config.items() if v is not None)} }}
""")
    return path


def pretrain_cfg(out, arch="llama", steps=5, save_every=5) -> pretrain.PretrainConfig:
    return pretrain.PretrainConfig(out_dir=str(out), task="arithmetic", task_args={"digits": 2, "train_size": 500}, steps=steps,
                                   batch_size=8, lr=3e-3, warmup=2, save_every=save_every, eval_problems=2,
                                   max_new_tokens=4, model=ModelSpec(arch, LLAMA if arch == "llama" else DEEPSEEK))


def losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory):
    """One process, the full batch of 8, 5 steps: the run every layout must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "one"
    pretrain.run(pretrain_cfg(out))
    return out


# ------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_pretrain_two_processes_match_one(pretrain_reference, tmp_path, parallel):
    """`torchrun -m r1kit pretrain`, 2 × 4 sequences = 1 × 8: same loss curve, same final weights."""
    cfg = pretrain_toml(tmp_path / "p.toml", parallel=parallel)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "r1kit", "pretrain", "--config", str(cfg),
           "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("pretrain: llama model") == 1  # rank 0 alone prints
    assert f"2 processes ({parallel})" in r.stdout
    assert losses(tmp_path / "two") == pytest.approx(losses(pretrain_reference), abs=1e-5)
    assert max_weight_diff(tmp_path / "two", pretrain_reference) <= 1e-5
    state = json.loads((tmp_path / "two" / "model" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 5


def sft_cfg(out, teacher, data, arch="llama", parallel="ddp", steps=5) -> sft.SFTConfig:
    return sft.SFTConfig(data=[str(data)], tokenizer=str(teacher), model=ModelSpec(arch, LLAMA if arch == "llama"
                         else DEEPSEEK), out_dir=str(out), steps=steps, batch_size=4, max_len=48, lr=3e-3, warmup=2,
                         save_every=steps, device="cpu", parallel=parallel)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """Chat JSONL of arithmetic traces and a checkpoint whose tokenizer a fresh student uses."""
    import random

    from r1kit.tasks import get_task
    from r1kit.tokenizer import build_bpe_tokenizer
    from r1kit.training import build_model
    d = tmp_path_factory.mktemp("sftdata")
    task, rng = get_task("arithmetic", digits=2, train_size=200, test_size=10), random.Random(0)
    rows = [{"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": task.trace(p, rng)}]}
            for p in task.problems("train", 60)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_bpe_tokenizer([r["messages"][0]["content"] + r["messages"][1]["content"] for r in rows],
                              vocab_size=60, all_bytes=False)
    checkpoint.save(build_model(ModelSpec("llama", LLAMA), tok.vocab_size, 0), tok, d / "teacher")
    return d / "data.jsonl", d / "teacher"


def sft_toml(path: Path, cfg: sft.SFTConfig) -> Path:
    model = ", ".join(f"{k} = {json.dumps(v)}" for k, v in cfg.model.config.items() if v is not None)
    path.write_text(f"""[sft]
data = {json.dumps(cfg.data)}
tokenizer = "{cfg.tokenizer}"
steps = {cfg.steps}
batch_size = {cfg.batch_size}
max_len = {cfg.max_len}
lr = {cfg.lr}
warmup = {cfg.warmup}
save_every = {cfg.save_every}
device = "cpu"
parallel = "{cfg.parallel}"
dist_timeout_s = 60
[sft.model]
arch = "{cfg.model.arch}"
config = {{ {model} }}
""")
    return path


@pytest.mark.parametrize("arch,parallel", [pytest.param("llama", "fsdp", marks=pytest.mark.slow),
                                           pytest.param("deepseek", "ddp", marks=pytest.mark.slow),
                                           ("deepseek", "fsdp")])
def test_sft_two_processes_match_one(sft_data, tmp_path, arch, parallel):
    """Document-packed SFT, 2 × 2 rows = 1 × 4 rows (global token mean), dense and MoE (router biases
    moved by the loads of both ranks); DeepSeek here without MTP and balance loss, whose per-rank
    means are weighted by token share rather than recomputed globally (docs/distributed.md)."""
    data, teacher = sft_data
    one = sft_cfg(tmp_path / "one", teacher, data, arch)
    if arch == "deepseek":
        one.model.config = {**DEEPSEEK, "mtp_lambda": 0.0}
    sft.run(one)
    two = sft_cfg(tmp_path / "two", teacher, data, arch, parallel)
    two.model = one.model
    torchrun(["sft", "--config", str(sft_toml(tmp_path / "s.toml", two)), "--out", str(tmp_path / "two")])
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert max_weight_diff(tmp_path / "two", tmp_path / "one") <= 1e-5


# ------------------------------------------------------------------------------------ checkpoints
class Stop(Exception):
    pass


def test_saved_on_two_processes_resumes_on_one(pretrain_reference, tmp_path):
    """FSDP2 on 2 processes writes sharded optimizer state at step 3; 1 process resumes it to step 5."""
    cfg = pretrain_toml(tmp_path / "p.toml", save_every=3, parallel="fsdp")
    torchrun(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")], fault="stop:3")
    assert len(losses(tmp_path / "run")) == 3
    assert json.loads((tmp_path / "run" / "model" / "trainer_state" / "state.json").read_text())["world_size"] == 2
    pretrain.run(pretrain_cfg(tmp_path / "run", save_every=3))
    assert losses(tmp_path / "run") == pytest.approx(losses(pretrain_reference), abs=1e-5)
    assert max_weight_diff(tmp_path / "run", pretrain_reference) <= 1e-5


@pytest.mark.slow
def test_saved_on_one_process_resumes_on_two(pretrain_reference, tmp_path, monkeypatch):
    save = checkpoint.save

    def save_then_stop(*a, **kw):
        save(*a, **kw)
        if kw["trainer_state"]["state"]["step"] == 3:
            raise Stop
    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(Stop):
        pretrain.run(pretrain_cfg(tmp_path / "run", save_every=3))
    cfg = pretrain_toml(tmp_path / "p.toml", save_every=3, parallel="ddp")
    r = torchrun(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert "resuming" in r.stdout and "at step 3" in r.stdout
    assert losses(tmp_path / "run") == pytest.approx(losses(pretrain_reference), abs=1e-5)
    assert max_weight_diff(tmp_path / "run", pretrain_reference) <= 1e-5


def test_sigkilled_rank_then_relaunch_ends_as_uninterrupted(pretrain_reference, tmp_path):
    """Rank 1 is SIGKILLed at step 4 (checkpoint at step 2): torchrun fails, the same command resumes."""
    cfg = pretrain_toml(tmp_path / "p.toml", save_every=2, parallel="ddp")
    args = ["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]
    killed = torchrun(args, fault="kill:1:4", check=False)
    assert killed.returncode != 0
    assert json.loads((tmp_path / "run" / "model" / "trainer_state" / "state.json").read_text())["step"] == 2
    r = torchrun(args)
    assert "at step 2" in r.stdout
    assert losses(tmp_path / "run") == pytest.approx(losses(pretrain_reference), abs=1e-5)
    assert max_weight_diff(tmp_path / "run", pretrain_reference) <= 1e-5


# ------------------------------------------------------------------------------------ faults
def launch_ranks(args, world: int, ranks, fault=None, port=None) -> list[subprocess.Popen]:
    """The ranks of a job started by hand (no torchrun agent to tear the others down): what a
    multi-node job looks like to the survivors when a node dies."""
    port = port or free_port()
    procs = []
    for r in ranks:
        e = env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **({"R1KIT_TEST_FAULT": fault} if fault else {}))
        procs.append(subprocess.Popen([sys.executable, WORKER, *args], env=e, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def test_rank_dying_mid_step_ends_the_others_with_one_line(tmp_path):
    cfg = pretrain_toml(tmp_path / "p.toml", steps=8, save_every=100)
    procs = launch_ranks(["pretrain", "--config", str(cfg), "--set", "pretrain.dist_timeout_s=30",
                          "--out", str(tmp_path / "run")], 2, [0, 1], fault="exit:1:3")
    try:
        out1 = procs[1].communicate(timeout=120)
        died = time.monotonic()
        out0 = procs[0].communicate(timeout=60)
        waited = time.monotonic() - died
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 1, out1[1][-2000:]
    assert procs[0].returncode == 3, out0[1][-2000:]
    err = out0[1].strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r1kit pretrain: error: rank 0: lost a peer"), out0[1][-2000:]
    assert waited < 30 + 10  # within the configured timeout (a closed connection is seen at once)


def test_missing_peer_is_one_line_within_the_timeout(tmp_path):
    cfg = pretrain_toml(tmp_path / "p.toml")
    t0 = time.monotonic()
    [p] = launch_ranks(["pretrain", "--config", str(cfg), "--set", "pretrain.dist_timeout_s=5",
                        "--out", str(tmp_path / "run")], 2, [0])
    try:
        _, err = p.communicate(timeout=90)
    finally:
        p.kill()
    assert p.returncode == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "could not join the process group" in lines[0] and "within 5s" in lines[0], err
    assert time.monotonic() - t0 < 60


# ------------------------------------------------------------------------------------ GRPO
GRPO = dict(task="arithmetic", task_args={"digits": 2, "train_size": 200, "test_size": 8}, steps=3,
            prompts_per_step=4, group_size=4, max_new_tokens=10, lr=1e-3, mu=2, micro_batch=6, kl_coef=0.01,
            eval_every=100, eval_problems=8, save_every=100, device="cpu")


@pytest.fixture(scope="module")
def grpo_base(sft_data):
    """A fresh tiny llama checkpoint: with the length reward its groups already vary."""
    return sft_data[1]


def grpo_toml(path: Path, base: Path, **over) -> Path:
    cfg = {**GRPO, "base": str(base), "dist_timeout_s": 60, **over}
    lines = ["[grpo]"] + [f"{k} = {json.dumps(v) if not isinstance(v, dict) else '{ ' + ', '.join(f'{a} = {b}' for a, b in v.items()) + ' }'}"
                          for k, v in cfg.items()]
    path.write_text("\n".join(lines).replace("true", "true") + "\n")
    return path


def grpo_reference(tmp_path, base, monkeypatch, **over) -> Path:
    import dist_worker

    from r1kit.stages import grpo
    monkeypatch.setattr(grpo, "rewards_of", dist_worker.length_reward)
    grpo.run(grpo.GRPOConfig(**{**GRPO, "base": str(base), "out_dir": str(tmp_path / "one"), **over}))
    return tmp_path / "one"


def grpo_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_grpo(two: Path, one: Path) -> None:
    m2, m1 = grpo_metrics(two), grpo_metrics(one)
    assert [m["updates"] for m in m2] == [m["updates"] for m in m1] and m1[-1]["updates"] > 0
    for k in ("reward_mean", "loss", "kl", "grad_norm", "response_length", "sampled_groups"):
        assert [m.get(k) for m in m2] == pytest.approx([m.get(k) for m in m1], abs=1e-5), k
    assert all(len(m["gen_seconds_ranks"]) == 2 for m in m2)
    assert max_weight_diff(two, one) <= 1e-5


@pytest.mark.parametrize("parallel,over", [("ddp", {}),
                                           pytest.param("fsdp", {"dynamic_sampling": True}, marks=pytest.mark.slow)])
def test_grpo_two_processes_match_one(grpo_base, tmp_path, monkeypatch, parallel, over):
    """Rollouts sharded by whole groups (seeded per prompt), KL to a reference sharded like the policy,
    μ = 2 with uneven micro-batches: 2 processes reproduce the 1-process run."""
    one = grpo_reference(tmp_path, grpo_base, monkeypatch, **over)
    cfg = grpo_toml(tmp_path / "g.toml", grpo_base, parallel=parallel, **over)
    torchrun(["grpo", "--config", str(cfg), "--out", str(tmp_path / "two")], R1KIT_TEST_REWARD="length")
    assert_same_grpo(tmp_path / "two", one)
