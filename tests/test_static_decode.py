"""Static-shape decoding (engine.StaticDecode): steps at power-of-two (rows, key span) buckets give the
dynamic step's tokens, and CUDA graphs are captured only where a step can be one."""
import sys
import types
from pathlib import Path

import pytest
import torch

from r1kit.engine import MIN_SPAN, Batch, Engine, SamplingParams, StaticDecode, bucket
from model_fixtures import build, make_model, tiny


def _model(family: str):
    if family == "deepseek-absorb":
        return build(tiny(max_position_embeddings=256))
    if family == "deepseek-naive":
        return build(tiny(max_position_embeddings=256), attn_impl="naive")
    return make_model(family)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "deepseek-absorb", "deepseek-naive"])
def test_static_decode_gives_the_dynamic_steps_tokens(family):
    """Ragged prompts, more rows than slots (continuous batching), rows that end early (compaction), seeded
    sampling, and completions that cross the 64-column span bucket: same tokens, same log-probs."""
    torch.manual_seed(0)
    m = _model(family)
    prompts = [[5, 6, 7], list(range(10, 40)), [42], [7] * 11, [3, 9], list(range(1, 20))]
    sp = SamplingParams(max_new_tokens=50, temperature=1.0, ignore_eos=True, seed=3)
    short = SamplingParams(max_new_tokens=3, temperature=1.0, ignore_eos=True, seed=3)
    runs = []
    for static in (False, True):
        eng = Engine(m, max_batch=4, static_decode=static)
        runs.append(eng.generate(prompts, sp, n=2) + eng.generate(prompts, short, n=2))
    for dyn, sta in zip(*runs):
        for a, b in zip(dyn, sta):
            assert a.tokens == b.tokens
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_static_steps_run_at_few_bucketed_shapes(monkeypatch):
    """Every step's (rows, span) is a power of two (or the capacity / max_len), covers the busy rows and the
    columns they read, and a whole generation needs only a handful of distinct shapes."""
    m = make_model("llama3")
    seen = []
    real = Batch.decode_logits

    def spy(self, n, span=None):
        busy = [s for s, r in enumerate(self.rows) if r is not None]
        columns = max(self.rows[s].prompt_len + len(self.rows[s].tokens) for s in busy)
        seen.append((n, span, busy[-1] + 1, columns, len(self.rows), self.max_len))
        return real(self, n, span)

    monkeypatch.setattr(Batch, "decode_logits", spy)
    prompts = [[i + 1] * (3 + 7 * i) for i in range(10)]
    params = [SamplingParams(max_new_tokens=5 + 13 * i, temperature=0, ignore_eos=True) for i in range(10)]
    eng = Engine(m, max_batch=12, static_decode=True)
    for p, s in zip(prompts, params):
        assert len(eng.generate([p], s)[0][0].tokens) == s.max_new_tokens
    assert {n for n, *_ in seen} == {1}  # one row at a time: a one-row step
    seen.clear()
    batch = Batch(m, None, capacity=12, max_len=220, static_decode=True)
    batch.add(prompts, params, list(range(10)))
    while batch.active:
        batch.step()
    for n, span, last_busy, columns, cap, max_len in seen:
        assert n >= last_busy and span >= columns
        assert n == cap or n & (n - 1) == 0
        assert span == max_len or (span & (span - 1) == 0 and span >= MIN_SPAN)
    shapes = {(n, span) for n, span, *_ in seen}
    assert len(shapes) <= 8 and len(seen) == 5 + 13 * 9 - 1  # the longest row's tokens but the prefill's


def test_bucket_rounds_up_to_powers_of_two_within_bounds():
    assert [bucket(n, 1000) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert bucket(3, 1000, least=64) == 64 and bucket(700, 1000, least=64) == 1000 and bucket(9, 12) == 12


def test_a_spanned_cache_view_masks_the_unfilled_columns():
    m = make_model("llama3")
    cache = m.new_cache(2, 40)
    with torch.no_grad():
        m(torch.tensor([[4, 5, 6], [7, 8, 9]]), kv_cache=cache)
        want = m(torch.tensor([[1], [2]]), kv_cache=cache.leading_rows(2))[:, -1]
        cache.lens -= 1  # the same step again, through a view with a fixed span of 32 columns
        view = cache.leading_rows(2, span=32)
        assert tuple(view.attn_mask(view.positions(1)).shape) == (2, 1, 1, 32)
        got = m(torch.tensor([[1], [2]]), kv_cache=view)[:, -1]
    assert torch.allclose(got, want, atol=1e-5) and cache.lens.tolist() == [4, 4]
    for bad in (0, 41):
        with pytest.raises(ValueError, match=f"span {bad} is outside the cache's 1..40 columns"):
            cache.leading_rows(2, span=bad)


@pytest.mark.parametrize("model, device, routing, capture", [
    ("llama3", "cuda", False, True), ("llama3", "cpu", False, False),
    ("deepseek", "cuda", False, False), ("llama3", "cuda", True, False)])
def test_graphs_are_captured_only_where_a_step_can_be_one(model, device, routing, capture):
    """CUDA only, a model that reads nothing back to the host in a cached forward (not MoE dispatch), no
    routing-replay hooks: elsewhere the static shapes run eagerly."""
    m = make_model("llama3") if model == "llama3" else build(tiny())
    fake = types.SimpleNamespace(device=torch.device(device), model=m, record_routing=routing)
    assert StaticDecode(fake).capture is capture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_equals_the_eager_step():
    m = make_model("llama3").cuda()
    prompts = [[5, 6, 7], list(range(10, 40)), [42], [7] * 11]
    sp = SamplingParams(max_new_tokens=70, temperature=0, ignore_eos=True)
    eager = Engine(m).generate(prompts, sp)
    graphed = Engine(m, static_decode=True).generate(prompts, sp)
    for a, b in zip(eager, graphed):
        assert a[0].tokens == b[0].tokens


def test_the_gpu_decode_bench_runs_its_whole_path_on_the_cpu(capsys):
    """bench/gpu_decode.py is for a GPU this box lacks: `--device cpu --tiny` runs every peer and the
    teacher-forced check, so the script cannot rot unseen; the static step's logits equal the eager one's."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_decode
    out = gpu_decode.main(["--device", "cpu", "--tiny", "--batch", "4", "--prompt", "8", "--new", "12",
                           "--repeats", "1"])
    assert set(out["tok_s"]) == {"r1kit", "r1kit_graphs", "hf"} and out["max_logit_diff"] <= 1e-5
    assert out["ratios"]["graphs_vs_eager"] == pytest.approx(out["tok_s"]["r1kit_graphs"] / out["tok_s"]["r1kit"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("ratios graphs_vs_eager=") and "graphs_vs_hf=" in last and "max_logit_diff=" in last


def test_grpo_with_static_decode_trains_as_the_dynamic_engine(tmp_path, tiny_tok, monkeypatch):
    """grpo.static_decode reaches the engine: two steps with it give the dynamic engine's rollouts and metrics;
    with FSDP it is refused by name (a CUDA graph cannot hold the weights' all-gathers)."""
    import json

    import r1kit
    from r1kit.config import ConfigError, load_config
    from r1kit.models.llama import Llama, LlamaConfig
    from r1kit.stages import grpo
    cfg = LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=256)
    r1kit.save(Llama(cfg).init_weights(0), tiny_tok, tmp_path / "base")
    # a random model never answers right: alternating rewards, so every step trains
    monkeypatch.setattr(grpo, "rewards_of", lambda cfg, rollouts: (torch.arange(len(rollouts)) % 2) * 1.0)
    runs = []
    for static in ("false", "true"):
        out = tmp_path / f"run-{static}"
        c = load_config(grpo.GRPOConfig, None, [
            f"grpo.base={json.dumps(str(tmp_path / 'base'))}", f"out_dir={json.dumps(str(out))}",
            "task=\"arithmetic\"", "task_args={digits = 2, train_size = 50, test_size = 4, require_think = false}",
            "steps=2", "prompts_per_step=3", "group_size=4", "max_new_tokens=12", "eval_every=2", "eval_problems=4",
            "save_every=100", "device=\"cpu\"", f"static_decode={static}"], section="grpo")
        grpo.run(c)
        runs.append([json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()])
    keys = ("reward_language", "response_length", "entropy", "grad_norm", "eval_greedy_accuracy")
    assert len(runs[0]) == 2 and all(k in runs[0][-1] for k in keys)
    assert [[m.get(k) for k in keys] for m in runs[0]] == [[m.get(k) for k in keys] for m in runs[1]]
    with pytest.raises(ConfigError, match="grpo.static_decode with parallel = 'fsdp'"):
        load_config(grpo.GRPOConfig, None, ["static_decode=true", "parallel=\"fsdp\""], section="grpo")
