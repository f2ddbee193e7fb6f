"""GGUF in: r1kit.load / load_tokenizer / convert / fit on GGUF files, and their one-line refusals.

The files are r1kit's own exports of tiny random models (every family the exporter knows), so
reading must give back the model that was written: same logits, same tokenizer ids. Tokenizer
ids are also compared with llama.cpp's own tokenizer on the same file when llama_cpp imports.
The real-model checks (SmolLM2-135M) live in tests/real/.
"""
import json

import numpy as np
import pytest
import torch
from gguf import GGUFValueType, GGUFWriter
from test_gguf import FAMILIES, TOKENIZE_CASES, loaded, tiny_model
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import r1kit
from r1kit import checkpoint
from r1kit.cli import main as cli_main
from r1kit.formats import gguf_read
from r1kit.formats.gguf import LLAMA3_SPLIT, export_gguf
from r1kit.formats.hf import CheckpointError
from r1kit.plan import plan_fit
from r1kit.tokenizer import Tokenizer

IDS = [5, 17, 200, 3, 99, 42, 7, 150, 11, 0, 64, 300]


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama_cpp not importable: {e}")
    return llama_cpp


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tok):
    """family → (model, its F32 GGUF export)."""
    out, d = {}, tmp_path_factory.mktemp("gguf_in")
    for family in FAMILIES:
        model = tiny_model(family)
        export_gguf(model, tiny_tok, d / f"{family}.gguf", "F32")
        out[family] = model, d / f"{family}.gguf"
    return out


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_gguf_computes_the_exported_model(exported, family):
    model, path = exported[family]
    loaded_model, tok = r1kit.load(path, device="cpu", dtype="float32")
    assert loaded_model.config.architecture == model.config.architecture
    assert loaded_model.config.tie_word_embeddings == model.config.tie_word_embeddings
    torch.testing.assert_close(logits(loaded_model), logits(model), atol=2e-5, rtol=1e-5)


def test_config_comes_from_metadata(exported):
    model, path = exported["llama"]
    _, c = gguf_read.read_config(gguf_read.open_gguf(path))
    want = model.config
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta"):
        assert getattr(c, f) == getattr(want, f), f
    assert c.rms_norm_eps == pytest.approx(want.rms_norm_eps)
    assert c.rope_scaling == {**want.rope_scaling, "factor": 8.0}  # rebuilt from rope_freqs.weight
    assert gguf_read.read_config(gguf_read.open_gguf(exported["llama-bias-tied"][1]))[1].rope_scaling == \
        {"rope_type": "linear", "factor": 2.0}


def test_llama_rows_are_deinterleaved_back_to_hf_layout(exported):
    model, path = exported["llama"]
    g = gguf_read.open_gguf(path)
    stored = g.values("blk.0.attn_q.weight")
    assert not np.allclose(stored, model.layers[0].attn.wq.weight.detach().numpy())  # the file is interleaved
    state = gguf_read.read_state(g, model)
    np.testing.assert_array_equal(state["layers.0.attn.wq.weight"], model.layers[0].attn.wq.weight.detach().numpy())


def test_quantized_gguf_loads_close(tiny_tok, tmp_path):
    model = tiny_model("qwen3", std=0.02, hidden_size=256, intermediate_size=512, head_dim=64)
    export_gguf(model, tiny_tok, tmp_path / "q8.gguf", "Q8_0")
    got, _ = r1kit.load(tmp_path / "q8.gguf", device="cpu")
    g = gguf_read.open_gguf(tmp_path / "q8.gguf")
    assert {t.qtype.name for t in g.tensors.values()} >= {"Q8_0"}
    ref = logits(model)
    assert float((logits(got) - ref).abs().max() / ref.abs().max()) < 2e-2


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------
def _byte_bpe(pre, corpus, vocab_size=400) -> Tokenizer:
    tk = HFTokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]) if pre == "llama-bpe" else \
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(tk)


CORPUS = ["The quick brown fox's 12345 jumps\n  over  the lazy dog. It's 2024; THEY'LL go.",
          "naïve café — ünïcödé ✓ 中文 日本語 😀 def f(x):\n\treturn x ** 2\n"] * 30
TEXTS = TOKENIZE_CASES + ["emoji 😀👍🏽 and CJK 你好世界", "  lead\t\ttabs  trail   ", "x = [1, 22, 333, 4444]\n",
                          "I'M DON'T we'd it'ſ 'K 'ß", "<|im_start|>user\nhi<|im_end|>\n", ""]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory, tiny_tok):
    """pre-tokenizer name → (r1kit tokenizer, GGUF exported with it)."""
    d, out = tmp_path_factory.mktemp("gguf_tok"), {}
    toks = {"qwen2": tiny_tok, "gpt-2": _byte_bpe("gpt-2", CORPUS), "llama-bpe": _byte_bpe("llama-bpe", CORPUS)}
    for pre, tok in toks.items():
        path = d / f"{pre}.gguf"
        export_gguf(tiny_model("llama", vocab_size=max(tok.vocab_size, 320)), tok, path, "F32")
        out[pre] = tok, path
    return out


@pytest.mark.parametrize("pre", ["qwen2", "gpt-2", "llama-bpe"])
def test_tokenizer_from_header_matches_the_source_tokenizer(tokenizer_files, pre):
    tok, path = tokenizer_files[pre]
    got = r1kit.load_tokenizer(path)
    assert gguf_read.open_gguf(path).get("tokenizer.ggml.pre") == pre
    for text in TEXTS:
        assert got.encode(text) == tok.encode(text), text
        assert got.decode(got.encode(text), skip_special_tokens=False) == text, text


@pytest.mark.parametrize("pre", ["qwen2", "gpt-2", "llama-bpe"])
def test_tokenizer_from_header_matches_llama_cpp(llama_cpp, tokenizer_files, pre):
    _, path = tokenizer_files[pre]
    got = r1kit.load_tokenizer(path)
    with loaded(llama_cpp, path, vocab_only=True) as llm:
        for text in TEXTS:
            assert got.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text
            if got.bos_id is not None:  # add_bos_token=true in r1kit's exports when there is a BOS
                assert got.tk.encode(text).ids == llm.tokenize(text.encode(), add_bos=True, special=True), text


def test_tokenizer_header_only_and_chat_template(tokenizer_files, monkeypatch):
    _, path = tokenizer_files["qwen2"]
    monkeypatch.setattr(gguf_read.GGUFFile, "values", lambda *a: pytest.fail("tensor data was read"))
    tok = r1kit.load_tokenizer(path)
    assert tok.style_name == "deepseek-r1" and tok.chat_template  # tiny_tok's style, carried by the template
    src = tokenizer_files["qwen2"][0]
    assert tok.chat_prompt("What is 2+3?") == src.chat_prompt("What is 2+3?")
    assert src.token_to_id("<｜end▁of▁sentence｜>") in tok.stop_ids


def test_load_tokenizer_takes_a_directory_and_a_tokenizer_json(tiny_tok, tmp_path):
    checkpoint.save(tiny_model("qwen2"), tiny_tok, tmp_path / "ck")
    for p in (tmp_path / "ck", tmp_path / "ck" / "tokenizer.json"):
        assert r1kit.load_tokenizer(p).encode(TEXTS[0]) == tiny_tok.encode(TEXTS[0])
    with pytest.raises(CheckpointError, match="nothing-here"):
        r1kit.load_tokenizer(tmp_path / "nothing-here")


# ---------------------------------------------------------------------------------------------
# convert and fit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "deepseek-v3"])
def test_convert_writes_a_directory_transformers_loads(exported, family, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    model, path = exported[family]
    assert cli_main(["convert", str(path), "--out", str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref = hf_model(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ref, logits(model), atol=2e-4, rtol=1e-4)
    again, _ = r1kit.load(tmp_path / "hf", device="cpu")
    torch.testing.assert_close(logits(again), logits(model), atol=2e-5, rtol=1e-5)


def test_fit_reads_deepseek2_kv_shape_from_metadata(exported, monkeypatch):
    model, path = exported["deepseek-v3"]
    monkeypatch.setattr(gguf_read.GGUFFile, "values", lambda *a: pytest.fail("tensor data was read"))
    r = plan_fit(str(path), ctx=64, vram_gib=0)
    c = model.config
    assert r.shape.mla and r.kv_per_token == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2
    assert r.sizes.file_bytes == path.stat().st_size
    assert r.sizes.types == {"F32": len(gguf_read.open_gguf(path).tensors)}


def test_fit_reads_the_file_as_stored(tiny_tok, tmp_path, monkeypatch):
    model = tiny_model("llama", hidden_size=256, intermediate_size=512)
    res = export_gguf(model, tiny_tok, tmp_path / "m.gguf", "Q8_0")
    monkeypatch.setattr(gguf_read.GGUFFile, "values", lambda *a: pytest.fail("tensor data was read"))
    r = plan_fit(str(tmp_path / "m.gguf"), ctx=128, vram_gib=0)
    assert r.sizes.file_bytes == (tmp_path / "m.gguf").stat().st_size and r.sizes.measured
    assert r.sizes.types == res.type_counts()
    assert r.kv_per_token == 2 * 2 * model.config.num_key_value_heads * model.config.head_dim * 2  # f16, 2 layers
    assert r.mix == "Q8_0"


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file and the key or tensor
# ---------------------------------------------------------------------------------------------
def _tiny_foreign_gguf(path, arch="gemma3", pre="gpt-2", n_tokens=8, rows=8):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(4)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([chr(0x100 + i) for i in range(n_tokens)])
    w.add_token_types([1] * n_tokens)
    w.add_tensor("token_embd.weight", np.zeros((rows, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _one_line_cli_error(argv, capsys, *needles):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_truncated_gguf(exported, tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(exported["llama"][1].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated GGUF header \(metadata 'tokenizer\."):
        r1kit.load(cut, device="cpu")
    _one_line_cli_error(["convert", str(cut), "--out", str(tmp_path / "o")], capsys, "cut.gguf", "truncated")
    _one_line_cli_error(["fit", str(cut)], capsys, "cut.gguf", "truncated")
    _one_line_cli_error(["generate", str(cut), "--prompt", "hi"], capsys, "cut.gguf", "truncated")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, capsys):
    path = _tiny_foreign_gguf(tmp_path / "g.gguf", arch="gemma3")
    with pytest.raises(CheckpointError, match=r"g\.gguf: general\.architecture 'gemma3' is not supported"):
        r1kit.load(path, device="cpu")
    _one_line_cli_error(["convert", str(path), "--out", str(tmp_path / "o")], capsys, "g.gguf", "general.architecture")
    _one_line_cli_error(["fit", str(path)], capsys, "g.gguf", "gemma3")


def test_unknown_pre_tokenizer(tmp_path, capsys):
    path = _tiny_foreign_gguf(tmp_path / "p.gguf", arch="llama", pre="no-such-pre")
    with pytest.raises(CheckpointError, match=r"p\.gguf: tokenizer\.ggml\.pre 'no-such-pre' is not a known"):
        r1kit.load_tokenizer(path)


def _rewrite(src, dst, drop: str | None = None, n_tokens: int | None = None, nextn: int = 0):
    """A copy of GGUF `src` without tensor `drop`, with its vocabulary cut to `n_tokens` entries, or with
    `nextn` MTP blocks appended the way llama.cpp's deepseek2 converter writes them (copies of block 1)."""
    g = gguf_read.open_gguf(src)
    w = GGUFWriter(str(dst), g.arch)
    n_layer = g.hp("block_count")
    if nextn:
        w.add_uint32(f"{g.arch}.nextn_predict_layers", nextn)
        w.add_block_count(n_layer + nextn)
    for key, f in g.header.fields.items():
        if key == "general.architecture" or (nextn and key.endswith(".block_count")):
            continue
        v = f.value.tolist() if isinstance(f.value, np.ndarray) else f.value
        if n_tokens is not None and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            v = v[:n_tokens]
        if n_tokens is not None and key == "tokenizer.ggml.merges":
            continue
        w.add_key_value(key, v, GGUFValueType(f.type), f.sub_type and GGUFValueType(f.sub_type))
    for name in g.tensors:
        if name != drop:
            w.add_tensor(name, g.values(name))
    for k in range(nextn):
        for name in [n for n in g.tensors if n.startswith("blk.1.")]:
            w.add_tensor(name.replace("blk.1.", f"blk.{n_layer + k}.", 1), g.values(name))
        w.add_tensor(f"blk.{n_layer + k}.nextn.eh_proj.weight", np.zeros((8, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_vocabulary_disagrees_with_embedding_rows(exported, tmp_path, capsys):
    path = _rewrite(exported["qwen2"][1], tmp_path / "v.gguf", n_tokens=300)
    with pytest.raises(CheckpointError, match=r"v\.gguf: tokenizer\.ggml\.tokens lists 300 tokens but tensor "
                                              r"'token_embd\.weight' has 320 rows"):
        r1kit.load(path, device="cpu")
    _one_line_cli_error(["convert", str(path), "--out", str(tmp_path / "o")], capsys, "v.gguf", "token_embd.weight")


def test_deepseek2_mtp_blocks_in_the_file_are_left_out(exported, tmp_path):
    model, src = exported["deepseek-v3"]
    path = _rewrite(src, tmp_path / "mtp.gguf", nextn=1)
    got, _ = r1kit.load(path, device="cpu")
    assert got.config.num_hidden_layers == model.config.num_hidden_layers
    torch.testing.assert_close(logits(got), logits(model), atol=2e-5, rtol=1e-5)
    r = plan_fit(str(path), ctx=64, vram_gib=0)
    assert r.shape.layers == model.config.num_hidden_layers and r.sizes.file_bytes == path.stat().st_size


def test_missing_tensor_is_named(exported, tmp_path):
    path = _rewrite(exported["qwen2"][1], tmp_path / "m.gguf", drop="blk.1.ffn_up.weight")
    with pytest.raises(CheckpointError, match=r"m\.gguf: missing tensor 'blk\.1\.ffn_up\.weight'"):
        r1kit.load(path, device="cpu")


def test_not_a_gguf_at_all(tmp_path):
    (tmp_path / "x.gguf").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="x.gguf: not a GGUF file"):
        r1kit.load(tmp_path / "x.gguf", device="cpu")
