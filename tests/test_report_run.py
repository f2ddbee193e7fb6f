"""report.py on one GRPO run's directory (r1kit grpo --out DIR): the curves PNG."""
import json

from r1kit import report


def test_report_of_a_grpo_run_plots_reward_accuracy_and_length(tmp_path, capsys):
    rows = [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s, "response_length": 60 - s} for s in range(1, 6)]
    rows[-1]["eval_greedy_accuracy"] = 0.4
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rollouts.jsonl").write_text("")
    (tmp_path / "summary.json").write_text(json.dumps({"task": "word_problems", "base": "runs/smollm2-hf",
                                                       "base_accuracy": 0.2}))
    assert report.main([str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert str(png) in capsys.readouterr().out
