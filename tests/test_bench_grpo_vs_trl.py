"""The pieces bench/grpo_vs_trl.py's comparison rests on: TRL runs r1kit's algorithm, both sides see the
same prompt ids, TRL's weights reach r1kit's evaluator intact, the clock leaves evaluation out, and the
step profile counts what it names."""
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import grpo_peer  # noqa: E402
import grpo_race  # noqa: E402

import r1kit  # noqa: E402
from r1kit.config import load_config  # noqa: E402
from r1kit.models.llama import Llama, LlamaConfig  # noqa: E402
from r1kit.stages.grpo import GRPOConfig  # noqa: E402


def recipe() -> GRPOConfig:
    return load_config(GRPOConfig, grpo_race.RECIPE, section="grpo")


def test_trl_args_mirror_the_r1kit_recipe(tmp_path):
    pytest.importorskip("trl")
    cfg = recipe()
    a = grpo_peer.trl_args(cfg, str(tmp_path), 10)
    assert (a.loss_type, a.scale_rewards) == ("dapo", "group")  # clipped + token_mean, (r − mean)/(std + ε)
    assert a.per_device_train_batch_size == cfg.prompts_per_step * cfg.group_size == 128
    assert (a.num_generations, a.max_completion_length, a.learning_rate) == (8, 64, 1e-4)
    assert (a.temperature, a.top_p, a.top_k, a.beta, a.num_iterations) == (1.0, 1.0, 0, 0.0, 1)
    assert (a.epsilon, a.epsilon_high, a.max_grad_norm, a.weight_decay) == (0.2, 0.2, 1.0, 0.0)
    assert (a.adam_beta1, a.adam_beta2) == (0.9, 0.95)  # r1kit's AdamW, not HF's 0.999
    assert getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type) == "constant"
    assert a.activation_checkpointing is False and a.gradient_checkpointing is False  # TRL's default is on


def test_trl_args_refuse_a_setting_trl_lacks(tmp_path):
    pytest.importorskip("trl")
    cfg = recipe()
    cfg.loss = "gspo"
    with pytest.raises(ValueError, match="grpo.loss"):
        grpo_peer.trl_args(cfg, str(tmp_path), 10)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, tiny_tok):
    d = tmp_path_factory.mktemp("ckpt")
    cfg = LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    r1kit.save(Llama(cfg).init_weights(0), tiny_tok, d)
    return d


def test_trl_weights_reach_the_evaluator_unchanged(hf_checkpoint):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32)
    with torch.no_grad():  # as after a TRL update: the twin must follow the HF weights, not the base
        for p in hf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    twin, _ = r1kit.load(hf_checkpoint, dtype="float32")
    src, dst = hf.state_dict(), twin.state_dict()
    with torch.no_grad():
        for name, ours in grpo_race.hf_state_names(twin).items():
            dst[ours].copy_(src[name])
    idx = torch.randint(0, twin.config.vocab_size, (2, 12))
    torch.testing.assert_close(twin(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_transformers_renders_the_prompt_ids_r1kit_does(hf_checkpoint):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_checkpoint)
    _, tok = r1kit.load(hf_checkpoint)
    cfg = recipe()
    race = grpo_race.Race(cfg, 0.95, 2, 60.0)
    for p in race.problems[:4]:
        msgs = grpo_race._messages(cfg, race.task, p)
        ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(ids["input_ids"]) == grpo_race.rollout.prompt_ids(tok, p, cfg.system, race.task)


def test_race_clock_leaves_evaluation_out_and_follows_the_schedule():
    cfg = recipe()
    cfg.eval_problems = 4
    race = grpo_race.Race(cfg, target=0.9, eval_every=2, cap_s=60.0)
    clock, curve = grpo_race.Clock(), grpo_race.Curve("x")
    accs = iter([0.5, 0.95])

    def slow_eval():  # busy: it costs wall and CPU time alike
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:
            pass
        return next(accs)
    clock.start()
    done = [race.after_step(s, clock, curve, slow_eval) for s in (1, 2, 3, 4)]
    assert done == [False, False, False, True]  # scored at steps 2 and 4; 0.95 ≥ 0.9 ends the run
    assert [p[0] for p in curve.points] == [2, 4] and curve.reached(0.9)[0] == 4
    assert max(curve.points[-1][1:3]) < 0.2  # two 0.2 s evaluations, none of it on the wall or CPU clock


def test_race_stops_at_the_cap_with_a_last_evaluation():
    cfg = recipe()
    cfg.eval_problems = 4
    race = grpo_race.Race(cfg, target=0.9, eval_every=100, cap_s=0.0)
    clock, curve = grpo_race.Clock(), grpo_race.Curve("x")
    clock.start()
    assert race.after_step(3, clock, curve, lambda: 0.25)
    assert curve.reached(0.9) is None and "not reached" in curve.summary(0.9) and "best acc 0.250" in curve.summary(0.9)


def test_profile_counts_training_forward_backward_and_optimizer_only():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters())
    prof = grpo_peer.Profile()
    backward = torch.autograd.backward
    with prof.attach(model):
        prof.begin_step()
        with torch.no_grad():  # a generation-style forward
            model(torch.randn(512, 64))
        assert prof.seconds["forward"] == 0.0
        model(torch.randn(512, 64)).sum().backward()
        opt.step()
        prof.end_step()
    assert torch.autograd.backward is backward  # restored
    s = prof.per_step()
    assert s["forward"] > 0 and s["backward"] > 0 and s["optimizer"] > 0
    assert sum(s.values()) == pytest.approx(prof.step_seconds, rel=1e-6)
    model(torch.randn(4, 64)).sum().backward()  # detached: later work is not counted
    assert prof.per_step()["backward"] == s["backward"]
