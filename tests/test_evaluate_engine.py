"""The engine-driven half of evaluation: metrics from graded samples, eval.json, the CLI, the prefix."""
import json
import random
from types import SimpleNamespace

import pytest

from r1kit import checkpoint
from r1kit.config import ConfigError
from r1kit.engine import SamplingParams
from r1kit.rollout import Rollout, rollout
from r1kit.stages import evaluate as ev
from r1kit.tasks import get_task
from r1kit.tokenizer import build_bpe_tokenizer
from r1kit.training import ModelSpec, build_model

TASK_ARGS = {"digits": 2, "train_size": 200, "test_size": 20, "require_think": False}
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    task, rng = get_task("arithmetic", **TASK_ARGS), random.Random(0)
    corpus = [p.prompt + task.trace(p, rng) for p in task.problems("train", 100)]
    tok = build_bpe_tokenizer(corpus, vocab_size=60, all_bytes=False)
    d = tmp_path_factory.mktemp("ckpt")
    checkpoint.save(build_model(ModelSpec("llama", LLAMA), tok.vocab_size, 0), tok, d)
    return d


def scripted_rollout(verdicts: dict):
    """Stands in for the engine: problem i's samples answer right or wrong as `verdicts[i]` says
    (the greedy pass, temperature 0, answers with the first verdict)."""
    def run(model, tok, task, problems, params, engine=None, system=None, prefix=""):
        out = []
        for i, p in enumerate(problems):
            marks = verdicts[i][:1] if params.temperature == 0 else verdicts[i]
            row = []
            for ok in marks:
                text = f"<think>w</think><answer>{p.answer if ok else int(p.answer) + 1}</answer>"
                sample = SimpleNamespace(tokens=[0] * 7, finish_reason="stop", logprobs=[])
                row.append(Rollout(p, [1], sample, text, task.reward(text, p)))
            out.append(row)
        return out
    return run


def test_metrics_from_graded_samples(monkeypatch):
    import r1kit.rollout
    verdicts = {0: [1, 1, 1, 1], 1: [1, 0, 0, 0], 2: [0, 1, 1, 0], 3: [0, 0, 0, 0]}
    monkeypatch.setattr(r1kit.rollout, "rollout", scripted_rollout(verdicts))
    task = get_task("arithmetic", **TASK_ARGS)
    m, records = ev.evaluate_model(SimpleNamespace(eval=lambda: None), None, task, task.problems("test", 4),
                                   ev.EvalConfig(k=4))
    assert m["pass_at_1"] == pytest.approx((1 + 0.25 + 0.5 + 0) / 4)
    # votes: problem 2 ties 2–2 and the first-seen answer (wrong) wins; problem 1's majority is wrong
    assert m["cons_at_4"] == pytest.approx(1 / 4)
    assert m["pass_at_k"]["4"] == pytest.approx(3 / 4)
    assert m["pass_at_k"]["2"] == pytest.approx((1 + 0.5 + 5 / 6 + 0) / 4)
    assert m["greedy_accuracy"] == pytest.approx(2 / 4)  # the first verdicts: 1, 1, 0, 0
    lo, hi = m["pass_at_1_ci"]
    assert lo <= m["pass_at_1"] <= hi
    assert m["think_rate"] == 1.0 and len(records) == 4 * 4 + 4
    assert m["example"]["completion"].startswith("<think>")


def test_eval_json_records_settings_and_is_reproducible(ckpt, tmp_path):
    cfg = ev.EvalConfig(checkpoint=str(ckpt), task_args=TASK_ARGS, problems=6, k=3, max_new_tokens=12, seed=7,
                        out=str(tmp_path / "e1" / "eval.json"))
    a = ev.run(cfg)
    on_disk = json.loads((tmp_path / "e1" / "eval.json").read_text())
    assert on_disk["k"] == 3 and on_disk["n_problems"] == 6 and on_disk["seed"] == 7
    assert on_disk["engine"]["temperature"] == 0.6 and on_disk["engine"]["top_p"] == 0.95
    assert set(on_disk["versions"]) == {"torch", "r1kit", "python"}
    for key in ("pass_at_1", "pass_at_1_ci", "cons_at_3", "pass_at_k", "greedy_accuracy", "greedy_accuracy_ci"):
        assert key in on_disk["metrics"], key
    samples = (tmp_path / "e1" / "eval_samples.jsonl").read_text().splitlines()
    assert len(samples) == 6 * 3 + 6
    b = ev.run(ev.EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "e2" / "eval.json")}))
    assert a["metrics"] == b["metrics"]  # same seed, same samples


def test_cli(ckpt, tmp_path, capsys):
    from r1kit.cli import main
    out = tmp_path / "e.json"
    rc = main(["eval", str(ckpt), "--task", "arithmetic", "--task-args", json.dumps(TASK_ARGS), "--k", "2",
               "--problems", "3", "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0 and json.loads(out.read_text())["k"] == 2
    assert "pass@1" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--task-args", "{bad"]) == 2


def test_bad_settings(ckpt):
    with pytest.raises(ConfigError, match="k must be ≥ 1"):
        ev.run(ev.EvalConfig(checkpoint=str(ckpt), task_args=TASK_ARGS, k=0))


def test_prefix_is_forced_into_the_prompt_and_scored(ckpt):
    model, tok = checkpoint.load(ckpt)
    task = get_task("arithmetic", **TASK_ARGS)
    probs = task.problems("test", 2)
    [[r], _] = rollout(model, tok, task, probs, SamplingParams(max_new_tokens=4, temperature=0), prefix="<think>")
    assert r.prompt_ids[-1] == tok.token_to_id("<think>")
    assert r.completion.startswith("<think>") and not r.sample.text.startswith("<think>")


@pytest.fixture
def math_file(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"question": f"{a}+{a + 1}=", "answer": str(2 * a + 1)}) + "\n"
                            for a in range(10, 40)))
    return path


def eval_cli(ckpt, out, *extra):
    from r1kit.cli import main
    return main(["eval", str(ckpt), "--k", "1", "--max-new-tokens", "2", "--no-greedy", "--out", str(out), *extra])


def test_eval_of_a_file_grades_the_whole_file_and_says_so(ckpt, math_file, tmp_path, capsys):
    for problems in (("--problems", "30"), ()):  # the command, and no count at all
        out = tmp_path / "all.json"
        assert eval_cli(ckpt, out, "--task", "math_file", "--task-args", json.dumps({"path": str(math_file)}),
                        *problems) == 0
        result = json.loads(out.read_text())
        assert result["n_problems"] == 30 and result["split"] == "all" and result["problems_in_split"] == 30
        assert f"grading 30 problems: every problem of {math_file}" in capsys.readouterr().out


def test_eval_of_a_split_says_how_many_it_holds(ckpt, math_file, tmp_path, capsys):
    out = tmp_path / "test.json"
    args = ("--task", "math_file", "--task-args", json.dumps({"path": str(math_file)}), "--problems", "30",
            "--split", "test")
    assert eval_cli(ckpt, out, *args) == 0
    result = json.loads(out.read_text())
    assert result["n_problems"] == 3 and result["split"] == "test" and result["problems_in_split"] == 3
    said = capsys.readouterr().out
    assert "grading 3 problems: the held-out test split" in said and "30 asked for, the split has 3" in said


def test_eval_synthetic_task_stays_on_its_test_split_and_refuses_all(ckpt, tmp_path, capsys):
    out = tmp_path / "a.json"
    assert eval_cli(ckpt, out, "--task-args", json.dumps(TASK_ARGS), "--problems", "2") == 0
    assert json.loads(out.read_text())["split"] == "test"
    assert eval_cli(ckpt, out, "--task-args", json.dumps(TASK_ARGS), "--split", "all") == 2
    assert "split 'all' needs a task read from a file" in capsys.readouterr().err
