"""`r1kit.generate` and `r1kit generate`: prompts go through the checkpoint's chat template, and a
checkpoint without one is refused (one line, with advice that suits the caller) unless raw text is asked for."""
import pytest

import r1kit
from r1kit.cli import main
from r1kit.engine import Engine
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.tokenizer import Tokenizer, TokenizerError

OWN = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[answer] {% endif %}"


def _checkpoint(tmp_path, tiny_tok, template: str | None):
    model = Llama(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)).init_weights(0)
    tok = Tokenizer(tiny_tok.tk, chat_template=template, eos=tiny_tok.eos_token)  # no r1kit style
    r1kit.save(model, tok, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def prompts_seen(monkeypatch):
    seen = []
    real = Engine.generate

    def spy(self, prompts, sp, *a, **kw):
        seen.extend(prompts)
        return real(self, prompts, sp, *a, **kw)
    monkeypatch.setattr(Engine, "generate", spy)
    return seen


def test_a_template_that_names_no_known_style_is_still_used(tmp_path, tiny_tok, prompts_seen):
    model, tok = r1kit.load(_checkpoint(tmp_path, tiny_tok, OWN))
    assert tok.style_name is None and tok.has_chat_template
    r1kit.generate(model, tok, "hi", max_new_tokens=2, seed=0)
    assert prompts_seen == [tok.encode("[user] hi\n[answer] ")]


def test_api_refuses_raw_text_unless_asked(tmp_path, tiny_tok, prompts_seen):
    ckpt = _checkpoint(tmp_path, tiny_tok, None)
    model, tok = r1kit.load(ckpt)
    with pytest.raises(TokenizerError, match=rf"{ckpt}: no chat template .*pass chat=False"):
        r1kit.generate(model, tok, "hi", max_new_tokens=2)
    assert prompts_seen == []
    assert isinstance(r1kit.generate(model, tok, "12+", chat=False, max_new_tokens=2, seed=0)[0], str)
    assert prompts_seen == [tok.encode("12+")]
    with pytest.raises(TokenizerError, match="chat=False takes text prompts"):
        r1kit.generate(model, tok, [[{"role": "user", "content": "hi"}]], chat=False)


def test_cli_refuses_raw_text_in_one_line_with_cli_advice(tmp_path, tiny_tok, capsys):
    ckpt = _checkpoint(tmp_path, tiny_tok, None)
    assert main(["generate", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt) in err[0] and "no chat template" in err[0] and "--raw" in err[0]
    assert "chat=False" not in err[0] and "encode()" not in err[0]  # no Python-API advice on the command line
    assert main(["generate", str(ckpt), "--prompt", "12+", "--raw", "--max-new-tokens", "2", "--seed", "0"]) == 0
    assert "> 12+" in capsys.readouterr().out


def test_stage_errors_without_a_template_give_no_python_advice(tmp_path, tiny_tok):
    tok = r1kit.load(_checkpoint(tmp_path, tiny_tok, None))[1]
    with pytest.raises(TokenizerError) as e:  # what eval / chat / serve / grpo hit when rendering prompts
        tok.chat_prompt("hi")
    assert "no chat template" in str(e.value) and "encode()" not in str(e.value) and "chat_template.jinja" in str(e.value)
