"""GGUF export: llama.cpp (llama-cpp-python 0.3.36) loads our files and computes what r1kit computes.

Families: llama (Llama 3.1 rope scaling → rope_freqs, permuted q/k), llama with q/k/v/o bias,
linear rope and tied embeddings, qwen2 (qkv bias, tied), qwen3 (QK-norm, head_dim ≠ hidden/heads).
Quantized exports are compared byte for byte with llama.cpp's quantizer run on our F32 export.
Tests that need llama.cpp skip when llama_cpp is not importable.
"""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, TokenType
from llama_cpp_probe import open_llama
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from r1kit import checkpoint
from r1kit.cli import main as cli_main
from r1kit.formats.gguf import GGUFExportError, export_gguf, interleave_rope_rows
from r1kit.formats.quants import MIXES
from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.tokenizer import Tokenizer, build_bpe_tokenizer

# a low original context so that Llama 3.1 scaling changes most frequencies within the prompt
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": dict(rope_scaling=LLAMA3_ROPE, rope_theta=10000.0),
    "llama-bias-tied": dict(attention_bias=True, o_bias=True, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(attention_bias=True, tie_word_embeddings=True, architecture="Qwen2ForCausalLM"),
    "qwen3": dict(head_dim=32, qk_norm=True, architecture="Qwen3ForCausalLM"),
    # DeepSeek-V3 (deepseek2 in llama.cpp): query LoRA, YaRN, group-limited routing, an MTP depth
    # that the export leaves out …
    "deepseek-v3": dict(q_lora_rank=32, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        num_nextn_predict_layers=1, rope_scaling={
                            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                            "mscale": 0.8, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}),
    # … and plain queries, half-split RoPE (reordered on export), tied head, unnormalised gates
    "deepseek-lite": dict(q_lora_rank=None, rope_interleave=False, tie_word_embeddings=True,
                          norm_topk_prob=False, num_nextn_predict_layers=0),
}
DS_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
               n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256)
PROMPT = ("<｜User｜>What is 1234+5678? Think step by step.<｜Assistant｜><think>\n4+8+0=12, carry 1\n"
          "3+7+1=11\n</think><answer>6912</answer> The quick brown fox")
TOKENIZE_CASES = ["0123456789 12+34=46", "two  spaces   and\ttabs", "line\n\nbreaks\r\n\n  indented\n",
                  "<think>\n1+1=2\n</think>\n<answer>2</answer>", "<｜User｜>hi<｜Assistant｜><think>ok</think>",
                  "The quick brown fox jumps over the lazy dog.", "naïve café — ünïcödé ✓ 中文"]


def tiny_model(family: str = "llama", seed: int = 0, std: float = 0.2, **over):
    if family.startswith("deepseek"):
        model = DeepseekV3(DeepseekConfig(**{**DS_BASE, **FAMILIES[family], **over})).init_weights(seed, std)
    else:
        model = Llama(LlamaConfig(**{**BASE, **FAMILIES[family], **over})).init_weights(seed=seed, std=std)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norms, biases and expert biases: a mis-mapped one shows
        for p in [*model.parameters(), *(gate.e_score_correction_bias for gate in getattr(model, "gates", list)())]:
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def llama_cpp():
    try:  # a broken build raises ImportError (not ModuleNotFoundError): skip on either
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama_cpp not importable: {e}")
    return llama_cpp


@contextlib.contextmanager
def loaded(llama_cpp, path, **kw):
    llm = open_llama(llama_cpp, path, n_ctx=256, **kw)  # a native build's AMX backend may crash: probed first
    try:
        yield llm
    finally:
        llm.close()


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


def our_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def our_greedy(model, ids, n) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(our_logits(model, ids)[-1].argmax()))
    return ids[-n:]


def llama_greedy(llm, n) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


# ---------------------------------------------------------------------------------------------
# llama.cpp runs our files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_and_greedy_tokens_match(llama_cpp, tiny_tok, tmp_path, family):
    model = tiny_model(family)
    path = tmp_path / f"{family}.gguf"
    export_gguf(model, tiny_tok, path, "F32")
    ids = tiny_tok.encode(PROMPT)
    ref = our_logits(model, ids)
    with loaded(llama_cpp, path, logits_all=True, type_k=0, type_v=0) as llm:  # F32 KV cache
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
        assert rel_err(got, ref) <= 1e-4
        assert llama_greedy(llm, 8) == our_greedy(model, ids, 8)
    if family == "llama":  # the check can see rope scaling: without it the logits move far more
        plain = tiny_model(family, rope_scaling=None)
        assert rel_err(got, our_logits(plain, ids)) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_loads_and_stays_close(llama_cpp, tiny_tok, tmp_path, family):
    model = tiny_model(family, seed=3)
    path = tmp_path / "f16.gguf"
    r = export_gguf(model, tiny_tok, path, "F16")
    assert {t.name for n, t in r.types.items() if n.endswith("norm.weight")} == {"F32"}
    ids = tiny_tok.encode(PROMPT)
    with loaded(llama_cpp, path, logits_all=True) as llm:
        llm.eval(ids)
        assert rel_err(np.array(llm.scores[:len(ids)]), our_logits(model, ids)) <= 1e-2


def test_tokenizer_ids_match_llama_cpp(llama_cpp, tiny_tok, tmp_path):
    path = tmp_path / "tok.gguf"
    export_gguf(tiny_model("qwen2"), tiny_tok, path, "F32")
    with loaded(llama_cpp, path, vocab_only=True) as llm:
        for text in TOKENIZE_CASES:
            ids = tiny_tok.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            assert llm.detokenize(ids, special=True) == text.encode(), text


def test_partial_byte_alphabet_tokenizer(llama_cpp, tmp_path):
    # pretrain builds its BPE with all_bytes=False: both libraries must drop unseen bytes alike
    corpus = ["1234+5678=<think>4+8+0=12</think><answer>6912</answer>", "The quick brown fox\n\n  x"] * 20
    tok = build_bpe_tokenizer(corpus, vocab_size=120, style="chatml", all_bytes=False)
    path = tmp_path / "ab.gguf"
    export_gguf(tiny_model("qwen2", vocab_size=128), tok, path, "F32")
    with loaded(llama_cpp, path, vocab_only=True) as llm:
        for text in ["12+34=<think>1+2</think>", "The fox\n\n  x", "unseen zebra ✓",
                     "<|im_start|>user\nhi<|im_end|>"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text


def test_gpt2_pre_tokenizer_is_recognised_and_tokenizes_alike(llama_cpp, tmp_path):
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["The quick brown fox's 12345 jumps\n  over  the lazy dog."] * 20, trainer=trainer)
    tok = Tokenizer(tk)
    path = tmp_path / "gpt2.gguf"
    export_gguf(tiny_model("llama"), tok, path, "F32")
    assert _field(GGUFReader(path), "tokenizer.ggml.pre") == "gpt-2"
    with loaded(llama_cpp, path, vocab_only=True) as llm:
        for text in TOKENIZE_CASES[:3] + ["It's 2024: they'll say 'hello'."]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text


# ---------------------------------------------------------------------------------------------
# metadata and layout
# ---------------------------------------------------------------------------------------------
def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_metadata_tokenizer_and_tensor_names(tiny_tok, tmp_path):
    path = tmp_path / "m.gguf"
    r = export_gguf(tiny_model("qwen3"), tiny_tok, path, "F32", name="tiny")
    rd = GGUFReader(path)
    assert _field(rd, "general.architecture") == "qwen3" and _field(rd, "general.name") == "tiny"
    assert _field(rd, "qwen3.attention.key_length") == 32 and _field(rd, "qwen3.attention.head_count_kv") == 2
    assert _field(rd, "qwen3.block_count") == 2 and _field(rd, "qwen3.context_length") == 256
    assert _field(rd, "tokenizer.ggml.model") == "gpt2" and _field(rd, "tokenizer.ggml.pre") == "qwen2"
    tokens, types = _field(rd, "tokenizer.ggml.tokens"), _field(rd, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 320  # padded from the tokenizer's 317 to the embedding rows
    assert types[tiny_tok.token_to_id("<｜User｜>")] == TokenType.CONTROL
    assert types[tiny_tok.token_to_id("<think>")] == TokenType.USER_DEFINED
    assert types[tiny_tok.token_to_id("7")] == TokenType.NORMAL and types[319] == TokenType.UNUSED
    assert tokens[tiny_tok.token_to_id("</answer>")] == "</answer>" and tokens[319] == "[PAD319]"
    assert _field(rd, "tokenizer.ggml.bos_token_id") == tiny_tok.bos_id
    assert _field(rd, "tokenizer.ggml.eos_token_id") == tiny_tok.eos_id
    assert _field(rd, "tokenizer.chat_template") == tiny_tok.jinja_template()
    names = {t.name for t in rd.tensors}
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "output.weight"} <= names
    assert r.n_tensors == len(names) == 3 + 2 * 11


def test_deepseek2_metadata_split_kv_b_stacked_experts_and_no_mtp(tiny_tok, tmp_path):
    model = tiny_model("deepseek-v3")
    export_gguf(model, tiny_tok, tmp_path / "d.gguf", "F32")
    rd = GGUFReader(tmp_path / "d.gguf")
    assert _field(rd, "general.architecture") == "deepseek2" and _field(rd, "deepseek2.block_count") == 3
    assert _field(rd, "deepseek2.attention.head_count_kv") == 1
    assert _field(rd, "deepseek2.attention.key_length") == 32 + 16  # cached [c_kv | k_pe]
    assert _field(rd, "deepseek2.attention.key_length_mla") == 32 and _field(rd, "deepseek2.expert_count") == 8
    assert _field(rd, "deepseek2.rope.scaling.yarn_log_multiplier") == pytest.approx(0.08)
    tensors = {t.name: t for t in rd.tensors}
    assert not any(n.startswith("blk.3.") for n in tensors)  # the MTP depth stays behind
    assert "blk.0.attn_kv_b.weight" not in tensors
    k_b, v_b = tensors["blk.1.attn_k_b.weight"], tensors["blk.1.attn_v_b.weight"]
    w = model.layers[1].attn.wkv_b.weight.detach().view(4, 16 + 16, 32).numpy()
    assert np.array_equal(k_b.data, w[:, :16].swapaxes(1, 2)) and np.array_equal(v_b.data, w[:, 16:])
    exps = tensors["blk.2.ffn_down_exps.weight"]
    assert np.array_equal(exps.data[5], model.layers[2].ffn.experts[5].w2.weight.detach().numpy())
    bias = tensors["blk.1.exp_probs_b.bias"]
    assert np.array_equal(bias.data, model.layers[1].ffn.gate.e_score_correction_bias.numpy())


def test_tied_and_rope_freqs_tensors(tiny_tok, tmp_path):
    export_gguf(tiny_model("qwen2"), tiny_tok, tmp_path / "q.gguf", "F32")
    names = {t.name for t in GGUFReader(tmp_path / "q.gguf").tensors}
    assert "output.weight" not in names and "blk.0.attn_q.bias" in names
    export_gguf(tiny_model("llama"), tiny_tok, tmp_path / "l.gguf", "F32")
    freqs = next(t for t in GGUFReader(tmp_path / "l.gguf").tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type == QT.F32 and freqs.data[0] < 8.0 and np.allclose(freqs.data[-3:], 8.0)


def test_llama_rope_interleave_moves_pairs_together():
    w = np.arange(2 * 8, dtype=np.float32).reshape(2 * 8, 1)  # two heads of dim 8: rows 0..15
    got = interleave_rope_rows(w, n_heads=2)[:, 0]
    assert got.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


# ---------------------------------------------------------------------------------------------
# quantized exports: byte-identical to llama.cpp's quantizer on our F32 file
# ---------------------------------------------------------------------------------------------
QUANT_MODELS = {  # sizes that divide the 256-blocks and sizes that force llama.cpp's fallbacks
    "llama-h256-ffn512": ("llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3)),
    "qwen2-h96-ffn160-tied": ("qwen2", dict(hidden_size=96, intermediate_size=160)),
    "qwen3-h256-ffn320": ("qwen3", dict(hidden_size=256, intermediate_size=320, head_dim=64)),
    "deepseek-h256-moe8": ("deepseek-v3", dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                               q_lora_rank=256, kv_lora_rank=256, qk_rope_head_dim=64,
                                               qk_nope_head_dim=64, v_head_dim=64)),
    "deepseek-lite-moe4-eff96": ("deepseek-lite", dict(hidden_size=256, n_routed_experts=4, moe_intermediate_size=96,
                                                       kv_lora_rank=96, qk_nope_head_dim=32)),
}
QUANT_MIXES = ("F16", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K")


@pytest.fixture(scope="module")
def f32_exports(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("gguf_f32")
    out = {}
    for name, (family, over) in QUANT_MODELS.items():
        model = tiny_model(family, seed=7, **over)
        out[name] = (model, root / f"{name}.gguf")
        export_gguf(model, tiny_tok, out[name][1], "F32")
    return out


@pytest.mark.parametrize("mix", QUANT_MIXES)
@pytest.mark.parametrize("model_name", QUANT_MODELS)
def test_quantized_export_is_byte_identical_to_llama_cpp(llama_cpp, f32_exports, tiny_tok, tmp_path, model_name, mix):
    model, f32 = f32_exports[model_name]
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    result = export_gguf(model, tiny_tok, ours, mix)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(MIXES[mix].ftype), 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(ref).encode(), params) == 0
    want, got = GGUFReader(ref), GGUFReader(ours)
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors]
    for w, g in zip(want.tensors, got.tensors):
        assert g.tensor_type == w.tensor_type == result.types[w.name], w.name
        assert np.array_equal(np.asarray(w.data).view(np.uint8), np.asarray(g.data).view(np.uint8)), w.name
    assert ours.read_bytes() == ref.read_bytes(), "tensors agree but the files differ (metadata order?)"


def test_quantized_file_runs(llama_cpp, tiny_tok, tmp_path):
    # weights at the usual init scale: the std-0.2 test models are chaotic enough to amplify
    # Q8_0's rounding (of weights and, inside llama.cpp's matmuls, activations) past 20%
    cfg = LlamaConfig(**{**BASE, **FAMILIES["llama"], "hidden_size": 256, "intermediate_size": 512})
    model = Llama(cfg).init_weights(seed=7).eval()
    export_gguf(model, tiny_tok, tmp_path / "q8.gguf", "Q8_0")
    ids = tiny_tok.encode(PROMPT)
    with loaded(llama_cpp, tmp_path / "q8.gguf", logits_all=True, type_k=0, type_v=0) as llm:
        llm.eval(ids)
        assert rel_err(np.array(llm.scores[:len(ids)]), our_logits(model, ids)) <= 5e-2


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing left behind
# ---------------------------------------------------------------------------------------------
def test_unmapped_parameter_is_named(tiny_tok, tmp_path):
    model = tiny_model("llama")
    model.layers[0].attn.extra = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(GGUFExportError, match=r"'layers\.0\.attn\.extra' has no GGUF name"):
        export_gguf(model, tiny_tok, tmp_path / "x.gguf", "F16")
    assert os.listdir(tmp_path) == []


def test_unsupported_architecture_and_features(tiny_tok, tmp_path):
    model = tiny_model("llama")
    model.config.architecture = "MistralForCausalLM"
    with pytest.raises(GGUFExportError, match="'MistralForCausalLM' cannot be exported.*LlamaForCausalLM"):
        export_gguf(model, tiny_tok, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="no attention output bias"):
        export_gguf(tiny_model("qwen2", o_bias=True), tiny_tok, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="unknown quantization mix 'Q3_XYZ'"):
        export_gguf(tiny_model("qwen2"), tiny_tok, tmp_path / "x.gguf", "Q3_XYZ")
    assert os.listdir(tmp_path) == []


def test_deepseek_features_llama_cpp_cannot_run_are_refused(tiny_tok, tmp_path):
    with pytest.raises(GGUFExportError, match="needs shared experts"):
        export_gguf(tiny_model("deepseek-lite", n_shared_experts=0), tiny_tok, tmp_path / "x.gguf")
    yarn = {**FAMILIES["deepseek-v3"]["rope_scaling"], "mscale": 1.0, "mscale_all_dim": 0.8}
    with pytest.raises(GGUFExportError, match="mscale == mscale_all_dim"):
        export_gguf(tiny_model("deepseek-v3", rope_scaling=yarn), tiny_tok, tmp_path / "x.gguf")
    assert os.listdir(tmp_path) == []


def test_missing_output_directory(tiny_tok, tmp_path):
    with pytest.raises(GGUFExportError, match="output directory does not exist"):
        export_gguf(tiny_model("qwen2"), tiny_tok, tmp_path / "nope" / "x.gguf")
    assert os.listdir(tmp_path) == []


def test_failure_midway_leaves_no_partial_file(tiny_tok, tmp_path):
    model = tiny_model("llama", hidden_size=256, intermediate_size=512)
    with torch.no_grad():
        model.layers[1].ffn.w3.weight[5, 9] = float("nan")
    (tmp_path / "x.gguf").write_bytes(b"previous export")
    with pytest.raises(GGUFExportError, match=r"blk\.1\.ffn_up\.weight.*NaN"):
        export_gguf(model, tiny_tok, tmp_path / "x.gguf", "Q4_K_M")
    assert os.listdir(tmp_path) == ["x.gguf"] and (tmp_path / "x.gguf").read_bytes() == b"previous export"


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.ByteLevel(use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["a b c"], trainer=trainer)
    with pytest.raises(GGUFExportError, match="unknown BPE pre-tokenizer"):
        export_gguf(tiny_model("llama"), Tokenizer(tk), tmp_path / "x.gguf")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_exports_a_checkpoint(tiny_tok, tmp_path, capsys):
    ckpt = checkpoint.save(tiny_model("qwen2"), tiny_tok, tmp_path / "ckpt")
    out = tmp_path / "m.gguf"
    assert cli_main(["export", str(ckpt), "--gguf", str(out), "--quant", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "26 tensors" in printed and f"{out.stat().st_size} bytes" in printed
    rd = GGUFReader(out)
    assert _field(rd, "general.file_type") == int(MIXES["Q8_0"].ftype) and _field(rd, "general.name") == "ckpt"
    assert cli_main(["export", str(ckpt), "--gguf", str(tmp_path / "no" / "m.gguf")]) == 2
    assert "output directory does not exist" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "missing"), "--gguf", str(out)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


def test_cli_exports_a_deepseek_checkpoint(tiny_tok, tmp_path, capsys):
    ckpt = checkpoint.save(tiny_model("deepseek-v3"), tiny_tok, tmp_path / "ds")
    assert cli_main(["export", str(ckpt), "--gguf", str(tmp_path / "ds.gguf"), "--quant", "Q4_K_M"]) == 0
    assert "tensors" in capsys.readouterr().out
    assert _field(GGUFReader(tmp_path / "ds.gguf"), "general.architecture") == "deepseek2"
