"""`r1kit fit`: sizes from llama.cpp's per-tensor mix rules, KV caches (GQA and MLA), GPU layers,
a bandwidth bound on speed, and clear errors for names and configs it cannot use."""
import json

import pytest
from gguf import GGUFReader

from r1kit.cli import main as cli_main
from r1kit.plan import GB, GiB, KNOWN, FitError, model_sizes, plan_fit, shape_from_config
from r1kit.formats.gguf import export_gguf, model_tensors
from r1kit.formats.hf_deepseek import config_to_hf
from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
from r1kit.formats.hf import CheckpointError, dense_config_to_hf
from r1kit.models.llama import Llama, LlamaConfig


def test_seed_case_70b_q5_k_m_on_a_24_gb_card():
    r = plan_fit("llama-3.1-70b", "Q5_K_M", vram_gib=24, ctx=8192)
    assert 70.4e9 < r.sizes.params < 70.7e9
    assert 49.5 * GB < r.sizes.file_bytes < 50.5 * GB  # published Q5_K_M files: 49.95 GB
    assert r.sizes.types == {"Q5_K": 481, "Q6_K": 81, "F32": 162}  # ffn_down/attn_v bumps + output
    assert r.kv_bytes == 2 * 80 * 8 * 128 * 2 * 8192 == 2.5 * GiB
    assert 35 <= r.gpu_layers <= 41 and not r.output_on_gpu and r.ngl == r.gpu_layers  # partial offload
    assert r.gpu_bytes <= 24 * GiB < r.gpu_bytes + max(r.sizes.layer_bytes) + r.kv_bytes / 80
    assert 1.5 < r.tokens_per_s < 3.0  # RAM-bound: ~27 GB per token at 60 GB/s


@pytest.mark.parametrize("name,quant,published_gb", [
    ("llama-3.1-8b", "Q4_K_M", 4.92), ("qwen2.5-7b", "Q4_K_M", 4.68), ("qwen2.5-72b", "Q4_K_M", 47.42),
    ("deepseek-r1", "Q4_K_M", 404.4), ("deepseek-v3", "Q8_0", 713.3)])
def test_file_sizes_match_published_ggufs(name, quant, published_gb):
    got = plan_fit(name, quant).sizes.file_bytes / GB
    assert abs(got - published_gb) / published_gb < 0.005


def test_mla_caches_the_latent_gqa_caches_heads():
    ds = plan_fit("deepseek-r1", "Q4_K_M", ctx=4096)
    assert ds.kv_per_token == 61 * (512 + 64) * 2  # K only: c_kv + rope key, V read from the latent
    llama = plan_fit("llama-3.1-8b", "Q4_K_M", ctx=4096, kv_type="q8_0")
    assert llama.kv_per_token == 2 * 32 * 8 * 128 * 34 / 32
    assert 670e9 < ds.sizes.params < 672e9
    assert sum(ds.sizes.layer_active) < 0.06 * sum(ds.sizes.layer_bytes)  # 8 of 256 experts + dense parts
    assert "MLA latent cache" in cli_text(["fit", "deepseek-r1", "--ctx", "4096"])


def test_everything_fits_on_a_big_card_and_cpu_only_works():
    r = plan_fit("qwen2.5-7b", "Q4_K_M", vram_gib=24, ctx=8192)
    assert r.gpu_layers == 28 and r.output_on_gpu and r.ngl == 29 and r.gpu_bytes < 24 * GiB
    cpu = plan_fit("qwen2.5-7b", "Q4_K_M", vram_gib=0)
    assert cpu.ngl == 0 and cpu.gpu_read == 0 and cpu.tokens_per_s < r.tokens_per_s


def test_config_json_and_checkpoint_dir_inputs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KNOWN["llama-3.1-70b"]))
    a, b = plan_fit(str(tmp_path / "config.json"), "Q5_K_M"), plan_fit(str(tmp_path), "Q5_K_M")
    ref = plan_fit("llama-3.1-70b", "Q5_K_M")
    assert a.sizes.file_bytes == b.sizes.file_bytes == ref.sizes.file_bytes and a.ngl == ref.ngl


def test_planner_agrees_with_a_real_export(tiny_tok, tmp_path):
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, architecture="Qwen2ForCausalLM",
                      attention_bias=True)
    result = export_gguf(Llama(cfg).init_weights(), tiny_tok, tmp_path / "m.gguf", "Q4_K_M")
    sizes = model_sizes(shape_from_config(dense_config_to_hf(cfg)), "Q4_K_M")
    data = sum(int(t.n_bytes) for t in GGUFReader(tmp_path / "m.gguf").tensors)
    assert sum(sizes.layer_bytes) + sizes.embd_bytes + sizes.output_bytes == data
    assert abs(sizes.file_bytes - result.n_bytes) < 20_000  # only the metadata is estimated


@pytest.mark.parametrize("over", [dict(q_lora_rank=12, num_nextn_predict_layers=1),
                                  dict(q_lora_rank=None, tie_word_embeddings=True, n_shared_experts=2)])
def test_deepseek_tensor_list_is_the_exporters(over):
    # the planner lists DeepSeek tensors by formula (building V3 on the meta device takes ~10 s);
    # on a small config the formula must give exactly what the exporter writes
    cfg = DeepseekConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=3, num_attention_heads=2, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=8, **over)
    _, tensors = model_tensors(DeepseekV3(cfg))
    assert sorted((t.name, t.shape) for t in tensors) == sorted(shape_from_config(config_to_hf(cfg)).tensors)


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(FitError, match="did you mean 'llama-3.1-70b'"):
        plan_fit("lama-3.1-70b")
    assert plan_fit("deepseek-ai/DeepSeek-R1-Distill-Llama-70B").name == "deepseek-r1-distill-llama-70b"


def test_malformed_config_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"architectures": ["LlamaForCausalLM"],\n "hidden_size": 4096,,}')
    with pytest.raises(CheckpointError, match="invalid JSON at line 2"):
        plan_fit(str(bad))
    bad.write_text(json.dumps({**KNOWN["llama-3.1-8b"], "num_hidden_layers": "32"}))
    with pytest.raises(CheckpointError, match="'num_hidden_layers' must be an integer"):
        plan_fit(str(bad))
    bad.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="unknown architecture 'GPT2LMHeadModel'"):
        plan_fit(str(bad))
    with pytest.raises(FitError, match="--vram must be"):
        plan_fit("qwen2.5-7b", vram_gib=-1)


def cli_text(argv) -> str:
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(argv) == 0
    return buf.getvalue()


def test_cli_prints_the_plan(capsys):
    out = cli_text(["fit", "llama-3.1-70b", "--quant", "q5_k_m", "--vram", "24", "--ctx", "8192"])
    assert "49.95 GB" in out and "partial offload: -ngl" in out and "tokens/s" in out
    assert cli_main(["fit", "qwen9-7b"]) == 2
    assert "not a checkpoint directory, a config.json or a known model" in capsys.readouterr().err
