"""Rejection sampling and distillation: R1's filters, the traces file, refusals on nothing to learn."""
import json
import random
from types import SimpleNamespace

import pytest

from r1kit import checkpoint
from r1kit.rollout import Rollout
from r1kit.stages import distill
from r1kit.stages.distill import DistillConfig, NoTracesError, check_traces, drop_reason
from r1kit.stages.sft import SFTConfig
from r1kit.tasks import get_task
from r1kit.tokenizer import build_bpe_tokenizer
from r1kit.training import ModelSpec, build_model

TASK_ARGS = {"digits": 2, "train_size": 300, "test_size": 20, "require_think": False}
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "max_position_embeddings": 128}


def fake(completion, correct=True, finish="stop", language=1.0, n_tokens=10, prompt="12+34="):
    """A trace record as sample_traces writes it."""
    from r1kit.rewards import extract_answer
    reward = {"accuracy": float(correct), "language": language}
    return {"prompt_id": 0, "sample": 0, "prompt": prompt, "reference": "46", "completion": completion,
            "finish_reason": finish, "usage": {"completion_tokens": n_tokens},
            "verdict": {"correct": correct, "answer": extract_answer(completion), "reward": reward}}


GOOD = "<think>4+2+0=06,3+1+0=04</think><answer>46</answer>"


def test_filters_in_order():
    cfg = DistillConfig(max_completion_tokens=20, max_per_prompt=2)
    assert drop_reason(fake(GOOD), cfg, set()) is None
    assert drop_reason(fake("<think>4+2=6</think> the answer is 46", correct=False), cfg, set()) == "missing"
    assert drop_reason(fake(GOOD, correct=False), cfg, set()) == "wrong"
    assert drop_reason(fake("<answer>46</answer>"), cfg, set()) == "format"  # no reasoning
    assert drop_reason(fake("<think>a</think><answer>46</answer> and more"), cfg, set()) == "format"
    assert drop_reason(fake(GOOD, language=0.5), cfg, set()) == "language"
    assert drop_reason(fake(GOOD, finish="length"), cfg, set()) == "length"
    assert drop_reason(fake(GOOD, n_tokens=21), cfg, set()) == "length"
    assert drop_reason(fake(GOOD), cfg, {GOOD}) == "duplicate"
    assert drop_reason(fake(GOOD), cfg, {"x", "y"}) == "cap"
    assert drop_reason(fake("<answer>46</answer>"), DistillConfig(require_think=False), set()) is None


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """An untrained model: it never solves a problem."""
    task, rng = get_task("arithmetic", **TASK_ARGS), random.Random(0)
    corpus = [p.prompt + task.trace(p, rng) for p in task.problems("train", 100)]
    tok = build_bpe_tokenizer(corpus, vocab_size=60, all_bytes=False)
    d = tmp_path_factory.mktemp("teacher")
    checkpoint.save(build_model(ModelSpec("llama", LLAMA), tok.vocab_size, 0), tok, d)
    return d


def cfg_for(tmp_path, teacher, **kw):
    student = SFTConfig(model=ModelSpec("llama", LLAMA), tokenizer=str(teacher), steps=3, batch_size=4, max_len=128,
                        eval_problems=0)
    base = dict(teacher=str(teacher), out_dir=str(tmp_path / "d"), task_args=TASK_ARGS, prompts=8, k=2,
                max_new_tokens=16, student=student)
    return DistillConfig(**{**base, **kw})


def test_teacher_that_never_solves_is_refused_clearly(tmp_path, tiny_teacher):
    with pytest.raises(NoTracesError, match="trace set is empty — the teacher produced no verified-correct"):
        distill.run(cfg_for(tmp_path, tiny_teacher))
    stats = json.loads((tmp_path / "d" / "rejection.json").read_text())
    assert stats["prompts_unsolved"] == stats["prompts"] == 8 and stats["kept"] == 0
    assert stats["dropped"]["wrong"] + stats["dropped"]["missing"] == 16 and len(stats["unsolved_examples"]) == 5
    assert len((tmp_path / "d" / "traces.jsonl").read_text().splitlines()) == 16  # every sample is on record
    assert not (tmp_path / "d" / "student").exists()  # nothing was trained


def oracle_rollout(task):
    """Stands in for the engine: every sample is the task's own correct trace (a perfect teacher)."""
    def run(model, tok, _task, problems, params, engine=None, system=None, prefix=""):
        rng = random.Random(0)
        out = []
        for p in problems:
            text = task.trace(p, rng)
            out.append([Rollout(p, [1], SimpleNamespace(tokens=[0] * 20, finish_reason="stop"), text,
                                task.reward(text, p)) for _ in range(params.n)])
        return out
    return run


def test_traces_are_chat_jsonl_and_the_student_trains(tmp_path, tiny_teacher, monkeypatch):
    import r1kit.rollout
    task = get_task("arithmetic", **TASK_ARGS)
    monkeypatch.setattr(r1kit.rollout, "rollout", oracle_rollout(task))
    s = distill.run(cfg_for(tmp_path, tiny_teacher))
    records = [json.loads(x) for x in (tmp_path / "d" / "traces.jsonl").read_text().splitlines()]
    assert sorted((r["prompt_id"], r["sample"]) for r in records) == [(p, s) for p in range(8) for s in range(2)]
    r0 = records[0]
    assert r0["reasoning"] and r0["answer"].startswith("<answer>") and r0["verdict"]["correct"]
    assert r0["sampling"]["temperature"] == 0.7 and r0["usage"]["completion_tokens"] == 20
    rows = [json.loads(x) for x in (tmp_path / "d" / "kept.jsonl").read_text().splitlines()]
    assert len(rows) == 8 == s["rejection"]["kept"]  # k=2 identical samples: one kept, one duplicate
    assert s["rejection"]["dropped"]["duplicate"] == 8
    for r in rows:  # the messages format other tools (TRL, …) read
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][1]["content"].startswith("<think>") and "answer" in r
    assert s["student"]["steps"] == 3 and (tmp_path / "d" / "student" / "model" / "config.json").exists()
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["model"].endswith("student/model")
    monkeypatch.setattr(r1kit.rollout, "rollout", None)  # a second run reuses the traces, samples nothing
    (tmp_path / "d" / "summary.json").unlink()
    assert distill.run(cfg_for(tmp_path, tiny_teacher))["rejection"]["kept"] == 8


def test_local_sampling_resumes_missing_samples_only(tmp_path, tiny_teacher, monkeypatch):
    import r1kit.rollout
    task = get_task("arithmetic", **TASK_ARGS)
    monkeypatch.setattr(r1kit.rollout, "rollout", oracle_rollout(task))
    cfg = cfg_for(tmp_path, tiny_teacher, sample_only=True)
    distill.run(cfg)
    path = tmp_path / "d" / "traces.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:17])  # a kill: five whole lines and half of the sixth
    distill.run(cfg)
    again = path.read_text().splitlines(keepends=True)
    assert sorted(again) == sorted(lines)  # the cut line dropped, each missing sample drawn once


def test_traces_from_other_prompts_are_refused(tmp_path, tiny_teacher, monkeypatch):
    import r1kit.rollout
    monkeypatch.setattr(r1kit.rollout, "rollout", oracle_rollout(get_task("arithmetic", **TASK_ARGS)))
    distill.run(cfg_for(tmp_path, tiny_teacher, sample_only=True))
    distill.run(cfg_for(tmp_path, tiny_teacher, sample_only=True, prompt_offset=3))  # ids are split indices: fine
    from r1kit.config import ConfigError
    with pytest.raises(ConfigError, match="these traces came from other prompts; use a fresh distill.out_dir"):
        distill.run(cfg_for(tmp_path, tiny_teacher, sample_only=True, task_args={**TASK_ARGS, "seed": 1}))


def test_check_traces_refuses_empty_and_all_wrong(tmp_path):
    task = get_task("arithmetic", **TASK_ARGS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(NoTracesError, match="the trace set is empty"):
        check_traces(empty, task)
    row = {"messages": [{"role": "user", "content": "12+34="},
                        {"role": "assistant", "content": "<think>x</think><answer>47</answer>"}], "answer": "46"}
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps(row) + "\n")
    with pytest.raises(NoTracesError, match="none of the 1 traces is correct"):
        check_traces(wrong, task)
    row["messages"][1]["content"] = GOOD
    wrong.write_text(json.dumps(row) + "\n" + json.dumps({**row, "answer": "99"}) + "\n")
    assert check_traces(wrong, task) == 1
    assert check_traces(wrong, None) == 2  # without a task there is nothing to verify against


def test_student_stage_refuses_given_all_wrong_traces(tmp_path, tiny_teacher):
    row = {"messages": [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": GOOD}], "answer": "47"}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(NoTracesError, match="refusing to train the student"):
        distill.run(cfg_for(tmp_path, tiny_teacher, traces=str(path)))
