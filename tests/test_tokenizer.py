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
    (tmp_path / "chat_template.jinja").unlink()  # a transformers 4 era folder: the template is in the config
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
    (tmp_path / "chat_template.jinja").unlink()  # a transformers 4 era folder: the template is in the config
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
    (tmp_path / "chat_template.jinja").unlink()  # a transformers 4 era folder: the template is in the config
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
    (tmp_path / "chat_template.jinja").unlink()  # a transformers 4 era folder: the template is in the config
    assert not Tokenizer.load(tmp_path).force_think


# ---------------------------------------------------------------------------------------------
# Folders written by transformers 5: chat_template.jinja, additional_chat_templates/, and the older places
# ---------------------------------------------------------------------------------------------
OTHER = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _hf_ids(folder, msgs):
    ids = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _saved_by_transformers(tmp_path, template):
    """An r1kit tokenizer, loaded by transformers, given `template`, saved with save_pretrained."""
    build_bpe_tokenizer(CORPUS, vocab_size=360, style="chatml").save(tmp_path / "r1kit")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "r1kit")
    hf.chat_template = template
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_a_template_saved_by_transformers5_round_trips(tmp_path):
    folder = _saved_by_transformers(tmp_path, QWEN_LIKE)
    assert (folder / "chat_template.jinja").read_text() == QWEN_LIKE  # what transformers 5 does …
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())  # … not this
    msgs = MESSAGES[1:]
    loaded = Tokenizer.load(folder)
    assert loaded.chat_template == QWEN_LIKE
    ids, mask = loaded.render_chat(msgs, add_generation_prompt=True)
    assert ids == _hf_ids(folder, msgs) == loaded.chat_prompt(msgs)
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "chat_template.jinja").read_text() == QWEN_LIKE
    # transformers 4 reads only tokenizer_config.json: the same template is there too
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["chat_template"] == QWEN_LIKE
    assert Tokenizer.load(tmp_path / "again").render_chat(msgs, add_generation_prompt=True) == (ids, mask)
    assert _hf_ids(tmp_path / "again", msgs) == ids
    Tokenizer(loaded.tk).save(tmp_path / "again")  # no template now: the old file must not linger
    assert not (tmp_path / "again" / "chat_template.jinja").exists()
    assert not Tokenizer.load(tmp_path / "again").has_chat_template


def test_named_templates_use_the_default_and_all_are_kept(tmp_path):
    folder = _saved_by_transformers(tmp_path, {"default": QWEN_LIKE, "tool_use": OTHER})
    assert (folder / "additional_chat_templates" / "tool_use.jinja").read_text() == OTHER
    loaded = Tokenizer.load(folder)
    assert loaded.chat_template == QWEN_LIKE and loaded.extra_templates == {"tool_use": OTHER}
    assert loaded.chat_prompt(MESSAGES[1:2]) == _hf_ids(folder, MESSAGES[1:2])
    loaded.save(tmp_path / "again")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again").chat_template == \
        {"default": QWEN_LIKE, "tool_use": OTHER}
    cfg = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == [{"name": "default", "template": QWEN_LIKE}, {"name": "tool_use", "template": OTHER}]
    rd = _export(loaded, tmp_path / "m.gguf")  # GGUF: the default and each named one, as llama.cpp's converter does
    assert rd.fields["tokenizer.chat_template"].contents() == QWEN_LIKE
    assert rd.fields["tokenizer.chat_template.tool_use"].contents() == OTHER


def _plain_folder(tmp_path, **cfg_over):
    tok = build_bpe_tokenizer(CORPUS, vocab_size=360, style="chatml")
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["r1kit"], cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, **cfg_over}))
    return tmp_path


def test_template_precedence_follows_transformers(tmp_path):
    msgs = MESSAGES[1:2]
    # the .jinja file wins over tokenizer_config.json, as in AutoTokenizer
    folder = _plain_folder(tmp_path / "a", chat_template=OTHER)
    (folder / "chat_template.jinja").write_text(QWEN_LIKE)
    assert Tokenizer.load(folder).chat_template == QWEN_LIKE
    assert Tokenizer.load(folder).chat_prompt(msgs) == _hf_ids(folder, msgs)
    # a list of named templates in tokenizer_config.json (transformers 4's form): the default one
    folder = _plain_folder(tmp_path / "b", chat_template=[{"name": "tool_use", "template": OTHER},
                                                          {"name": "default", "template": QWEN_LIKE}])
    assert Tokenizer.load(folder).chat_prompt(msgs) == _hf_ids(folder, msgs)
    # a processor's chat_template.json counts only when the tokenizer has none
    folder = _plain_folder(tmp_path / "c")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_LIKE}))
    assert Tokenizer.load(folder).chat_template == QWEN_LIKE
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": OTHER}))
    assert Tokenizer.load(folder).chat_template == OTHER


def test_no_default_template_and_bad_fields_say_so(tmp_path):
    folder = _plain_folder(tmp_path / "a", chat_template=[{"name": "tool_use", "template": OTHER}])
    tok = Tokenizer.load(folder)
    assert not tok.has_chat_template and tok.extra_templates == {"tool_use": OTHER}
    with pytest.raises(TokenizerError, match=r"no chat template .*named templates \(tool_use\) include no 'default'"):
        tok.chat_prompt("hi")
    folder = _plain_folder(tmp_path / "b", chat_template={"default": OTHER})
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: field 'chat_template' must be a string or a list"):
        Tokenizer.load(folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TokenizerError, match="chat template does not render"):
        Tokenizer.load(folder)


def _export(tok, path):
    from gguf import GGUFReader

    from r1kit.formats.gguf import export_gguf
    from r1kit.models.llama import Llama, LlamaConfig
    model = Llama(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)).init_weights(0)
    export_gguf(model, tok, path, "F32")
    return GGUFReader(path)


def test_gguf_export_carries_the_checkpoints_template(tmp_path):
    rd = _export(Tokenizer.load(_saved_by_transformers(tmp_path, QWEN_LIKE)), tmp_path / "m.gguf")
    assert rd.fields["tokenizer.chat_template"].contents() == QWEN_LIKE
    assert "tokenizer.chat_templates" not in rd.fields
