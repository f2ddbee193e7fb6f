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


# A checkpoint's own template, Qwen2.5-like: a default system prompt when none is given.
QWEN_LIKE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
             "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
             "{%- endif %}{%- for message in messages %}{%- if message.role != 'system' %}"
             "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}"
             "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_checkpoints_own_template_is_rendered_and_kept(tmp_path):
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360, style="chatml")
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["r1kit"]
    cfg["chat_template"] = QWEN_LIKE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = Tokenizer.load(tmp_path)
    msgs = MESSAGES[1:]  # no system message: the template adds its default one
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    ids, mask = loaded.render_chat(msgs, add_generation_prompt=True)
    assert ids == list(theirs) == loaded.chat_prompt(msgs)
    assert "You are a helpful assistant." in loaded.decode(ids)
    trained = loaded.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == msgs[1]["content"] + "<|im_end|>"
    loaded.save(tmp_path / "again") if (tmp_path / "again").mkdir() is None else None
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["chat_template"] == QWEN_LIKE
    assert Tokenizer.load(tmp_path / "again").render_chat(msgs, add_generation_prompt=True) == (ids, mask)


def test_a_template_that_rewrites_history_is_refused_for_masks(tmp_path):
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360, style="deepseek-r1")
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["r1kit"]
    # like R1's own template: earlier answers lose their reasoning once another turn follows
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                            "{% else %}{% set c = m['content'] %}{% if not loop.last %}{% set c = c.split('</think>')[-1] %}"
                            "{% endif %}<｜Assistant｜>{{ c }}{{ eos_token }}{% endif %}{% endfor %}"
                            "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.force_think
    two_turns = [MESSAGES[1], MESSAGES[2], MESSAGES[1], MESSAGES[2]]
    with pytest.raises(TokenizerError, match="renders earlier turns differently"):
        loaded.render_chat(two_turns)
    assert loaded.render_chat(two_turns[:2])[1].count(1) > 0  # one turn is fine


def test_force_think_is_read_from_what_the_template_renders(tmp_path):
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360, style="chatml")
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["r1kit"]
    # Qwen3-like: "<think>" appears after add_generation_prompt, but only when thinking is switched off
    cfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                            "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
                            "{% endif %}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not Tokenizer.load(tmp_path).force_think
