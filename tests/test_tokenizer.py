"""Chat templates: our (ids, mask) rendering equals transformers' apply_chat_template on our Jinja."""
import json

import pytest

from r1kit.tokenizer import STYLES, Tokenizer, TokenizerError, build_bpe_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = ["1234+5678=<think>4+8+0=12</think><answer>6912</answer>", "hello world, a test\n\n  of text"] * 30
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "1234+5678= hi"},
            {"role": "assistant", "content": "<think>4+8+0=12\n</think><answer>6912</answer>"},
            {"role": "user", "content": "again, 7+8?"}]


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("force_think", [False, True])
def test_render_matches_transformers(style, force_think, tmp_path):
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360, style=style, force_think=force_think)
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.style_name == style and loaded.force_think == force_think
    ids, mask = loaded.render_chat(MESSAGES, add_generation_prompt=True)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ids == list(theirs)
    trained = loaded.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == MESSAGES[2]["content"] + STYLES[style].eos  # only the assistant turn and its end


def test_digits_and_tags_are_single_tokens():
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360)
    pieces = [tok.tk.id_to_token(i) for i in tok.encode("<think>12+345</think>")]
    assert pieces == ["<think>", "1", "2", "+", "3", "4", "5", "</think>"]
    assert tok.decode(tok.encode("a b\n\nc 7")) == "a b\n\nc 7"
    assert tok.eos_id in tok.stop_ids


def test_external_template_styles_are_detected(tmp_path):
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360, style="chatml")
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["r1kit"]  # as a Qwen checkpoint would have it
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.load(tmp_path).style_name == "chatml"


def test_bad_messages_and_files(tmp_path):
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360)
    with pytest.raises(TokenizerError, match="message 1"):
        tok.render_chat([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot read tokenizer"):
        Tokenizer.load(tmp_path)
