"""GGUF export's tokenizer metadata, key by key, against the source tokenizer's behaviour.

Two sources: a Llama-3-like tokenizer whose post-processor adds BOS to every text, and a
SmolLM2-like one (BOS declared as `<|im_start|>`, pad `<|im_end|>`, an unknown token) that never
adds BOS. Each is saved as a checkpoint folder, read by r1kit and by transformers, exported, and
the GGUF read back by llama.cpp (vocab only) — the reference tokenizer for GGUF files.
"""
import contextlib
import json

import pytest
from gguf import GGUFReader
from tokenizers import processors

from r1kit.formats.gguf import GGUFExportError, export_gguf
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.tokenizer import STYLES, Tokenizer, build_bpe_tokenizer

CORPUS = ["1234+5678=<think>4+8+0=12</think><answer>6912</answer>", "hello world, a test\n\n  of text"] * 30
TEXTS = ["hello world 12+34", "<think>1+1=2</think><answer>2</answer>", "a test\n\n  of text <|im_end|> <|eot_id|>"]


def _folder(tmp_path, kind: str):
    if kind == "adds-bos":  # Llama 3: the post-processor puts <|begin_of_text|> before every text
        tok = build_bpe_tokenizer(CORPUS, vocab_size=360, style="llama3")
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.tk.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
        tok.save(tmp_path)
        return tmp_path, {}
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360, style="chatml")  # SmolLM2: never adds BOS
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(bos_token="<|im_start|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path, {"unk": "<|endoftext|>"}


def _export(tok, path):
    model = Llama(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)).init_weights(0)
    export_gguf(model, tok, path, "F32")
    return GGUFReader(path)


def _key(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


@contextlib.contextmanager
def _vocab(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        yield llama_cpp, llm, llm._model.vocab
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["adds-bos", "smollm2-like"])
def test_exported_tokenizer_keys_match_the_source(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    folder, extra = _folder(tmp_path / "ckpt", kind)
    tok, hf = Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
    adds_bos = hf("hello").input_ids[0] == hf.bos_token_id  # what transformers does with a plain text
    assert adds_bos == (kind == "adds-bos")
    rd = _export(tok, tmp_path / "m.gguf")
    assert _key(rd, "tokenizer.ggml.add_bos_token") is adds_bos
    assert _key(rd, "tokenizer.ggml.add_eos_token") is False
    assert _key(rd, "tokenizer.ggml.bos_token_id") == hf.bos_token_id == tok.bos_id
    assert _key(rd, "tokenizer.ggml.eos_token_id") == hf.eos_token_id == tok.eos_id
    assert _key(rd, "tokenizer.ggml.padding_token_id") == hf.pad_token_id  # the declared one, or absent
    assert _key(rd, "tokenizer.ggml.unknown_token_id") == hf.unk_token_id == (tok.token_to_id(extra["unk"]) if extra else None)
    assert _key(rd, "tokenizer.ggml.eot_token_id") == tok.token_to_id(STYLES[tok.style_name].eos)
    assert _key(rd, "tokenizer.chat_template") == hf.chat_template
    with _vocab(tmp_path / "m.gguf") as (llama_cpp, llm, vocab):
        assert llm.token_bos() == hf.bos_token_id and llm.token_eos() == hf.eos_token_id
        assert llama_cpp.llama_vocab_get_add_bos(vocab) is adds_bos
        assert llama_cpp.llama_vocab_pad(vocab) == (hf.pad_token_id if hf.pad_token_id is not None else -1)
        for text in TEXTS:  # a plain prompt: llama.cpp adds what transformers adds
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text).input_ids, text
        # token types: control tokens are the source's special ones (skipped in decoding), others are text
        ids = hf(TEXTS[2] + " <think>", add_special_tokens=False).input_ids
        assert llm.detokenize(ids, special=False).decode() == hf.decode(ids, skip_special_tokens=True)
        for t in ("<|im_end|>", "<|eot_id|>", "<think>"):
            if (i := tok.token_to_id(t)) is not None:
                control = bool(llama_cpp.llama_vocab_get_attr(vocab, i) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)
                assert control == (t in hf.all_special_tokens), t


def test_no_declared_pad_exports_none(tmp_path):
    folder, _ = _folder(tmp_path / "ckpt", "adds-bos")  # Llama 3 declares no pad token
    tok = Tokenizer.load(folder)
    assert tok.pad_token is None and tok.pad_id == tok.eos_id  # batches still pad with something
    assert _key(_export(tok, tmp_path / "m.gguf"), "tokenizer.ggml.padding_token_id") is None


def test_a_post_processor_llama_cpp_cannot_reproduce_is_refused(tmp_path):
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360, style="chatml")
    im_start = tok.token_to_id("<|im_start|>")
    tok.tk.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", im_start)])
    with pytest.raises(GGUFExportError, match=r"adds \['<\|im_start\|>'\] before every text; llama.cpp can add only the BOS"):
        _export(tok, tmp_path / "m.gguf")
