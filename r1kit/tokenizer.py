"""Tokenizer: the HF `tokenizers` library underneath, chat templates on top.

One class wraps a `tokenizer.json`. Chats render to `(ids, loss_mask)` in one of three styles
— Llama 3, ChatML (Qwen) and DeepSeek-R1 — or with the checkpoint's own Jinja template. Templates
are read from every place transformers 5 reads them (`read_chat_templates`) and written the way it
writes them (`chat_template.jinja`, plus `tokenizer_config.json` for transformers 4), so
`transformers`, vLLM and llama.cpp render the same tokens.

The loss mask comes from character spans: the whole conversation is rendered to one string,
encoded once with offsets, and a token is trained on when it starts inside an assistant span.
Encoding the whole string (not pieces) keeps ids identical to what other tools produce.

`build_bpe_tokenizer` makes a small byte-level BPE in code for the synthetic tasks: digits are
single tokens (as in Qwen's pre-tokenizer), the reasoning tags are whole tokens.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

THINK_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen2's split pattern: letters runs, single digits, punctuation runs, whitespace rules.
# llama.cpp knows it as the "qwen2" pre-tokenizer, so GGUF exports tokenize identically.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class ChatStyle:
    """How one family renders a conversation. Strings may contain special-token text."""
    name: str
    bos: str
    eos: str  # the token that ends an assistant turn
    pad: str | None  # the padding token the family declares in tokenizer_config.json (None: none)
    specials: tuple[str, ...]
    jinja: str

    def render(self, messages: list[dict], add_generation_prompt: bool, force_think: bool):
        """→ (text, [(start, end) character spans of assistant output to train on])."""
        return _RENDERERS[self.name](self, messages, add_generation_prompt, force_think)


def _render_llama3(style, messages, gen, force_think):
    text, spans = style.bos, []
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        start = len(text)
        text += m["content"] + "<|eot_id|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
    if gen:
        text += "<|start_header_id|>assistant<|end_header_id|>\n\n" + ("<think>\n" if force_think else "")
    return text, spans


def _render_chatml(style, messages, gen, force_think):
    text, spans = "", []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"] + "<|im_end|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    if gen:
        text += "<|im_start|>assistant\n" + ("<think>\n" if force_think else "")
    return text, spans


def _render_r1(style, messages, gen, force_think):
    """DeepSeek-R1: system text first, then User/Assistant turns; EOS closes each answer."""
    text, spans = style.bos, []
    text += "".join(m["content"] for m in messages if m["role"] == "system")
    for m in messages:
        if m["role"] == "user":
            text += "<｜User｜>" + m["content"]
        elif m["role"] == "assistant":
            text += "<｜Assistant｜>"
            start = len(text)
            text += m["content"] + style.eos
            spans.append((start, len(text)))
    if gen:
        text += "<｜Assistant｜>" + ("<think>\n" if force_think else "")
    return text, spans


_RENDERERS = {"llama3": _render_llama3, "chatml": _render_chatml, "deepseek-r1": _render_r1}

# The same templates in Jinja for other tools. `force_think` is baked in when saving.
_JINJA = {
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{THINK}{% endif %}"),
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{THINK}{% endif %}"),
    "deepseek-r1": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
                    "{% endif %}{% endfor %}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>"
                    "{{ m['content'] }}{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}"
                    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{THINK}"
                    "{% endif %}"),
}

STYLES = {
    "llama3": ChatStyle("llama3", "<|begin_of_text|>", "<|eot_id|>", None,
                        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"), _JINJA["llama3"]),
    "chatml": ChatStyle("chatml", "", "<|im_end|>", "<|endoftext|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                        _JINJA["chatml"]),
    "deepseek-r1": ChatStyle("deepseek-r1", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>",
                             ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                              "<｜▁pad▁｜>"), _JINJA["deepseek-r1"]),
}


def detect_style(template: str | None) -> str | None:
    """Recognise a style from a Jinja chat template by its marker tokens."""
    if not template:
        return None
    for marker, name in (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"),
                         ("<｜Assistant｜>", "deepseek-r1")):
        if marker in template:
            return name
    return None


class TokenizerError(ValueError):
    pass


@lru_cache(maxsize=16)
def _compiled(template: str):
    """A checkpoint's chat template, compiled the way transformers does (sandboxed, trimmed blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: __import__("datetime").datetime.now().strftime(fmt))
    return env.from_string(template)


class Tokenizer:
    """`tokenizers.Tokenizer` + a chat style. ids are plain Python lists of ints."""

    def __init__(self, tk: HFTokenizer, style: str | None = None, force_think: bool = False,
                 chat_template: str | None = None, eos: str | None = None, bos: str | None = None,
                 pad: str | None = None, unk: str | None = None, extra_templates: dict[str, str] | None = None,
                 config: dict | None = None, source: str | None = None):
        self.tk, self.style_name, self.force_think = tk, style, force_think
        # a checkpoint's own Jinja template (None: render with r1kit's style, whose Jinja is equivalent)
        self.chat_template = chat_template
        self.extra_templates = dict(extra_templates or {})  # named templates besides the default, kept on save
        self.config = dict(config or {})  # the source's tokenizer_config.json: its other keys are kept on save
        self.source = source  # the folder it was loaded from, for messages
        st = STYLES.get(style) if style else None
        self.eos_token = eos or (st.eos if st else None)
        self.bos_token = bos if bos is not None else (st.bos if st else None)
        self.pad_token = pad  # the padding token the checkpoint declares (None: it declares none; see pad_id)
        self.unk_token = unk  # declared in tokenizer_config.json (tokenizer.json's BPE model may name one too)
        self.eos_id = self._id_or_none(self.eos_token)
        self.bos_id = self._id_or_none(self.bos_token)
        # every token that ends generation: the style's turn end plus the family's text end
        ends = {self.eos_token, "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>",
                "<｜end▁of▁sentence｜>"}
        self.stop_ids = sorted({i for t in ends if t and (i := tk.token_to_id(t)) is not None})

    def _id_or_none(self, tok: str | None) -> int | None:
        return self.tk.token_to_id(tok) if tok else None

    # -- basics ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """The id batches are padded with: the declared pad token, else EOS, else 0. Padding is
        masked out everywhere, so any id works here; only `pad_token` is written to files."""
        for i in (self._id_or_none(self.pad_token), self.eos_id):
            if i is not None:
                return i
        return 0

    def encode(self, text: str) -> list[int]:
        """Plain text → ids; special-token text inside is recognised, nothing is added."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, tok: str) -> int | None:
        return self.tk.token_to_id(tok)

    # -- chat ------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        """Whether conversations can be rendered: the checkpoint's own template or a known style."""
        return self.chat_template is not None or self.style_name in STYLES

    def no_template_reason(self) -> str:
        """One line saying that (and where) no chat template was found — advice that suits any caller."""
        where = self.source or "this tokenizer"
        named = f"; its named templates ({', '.join(sorted(self.extra_templates))}) include no 'default'" \
            if self.extra_templates else ""
        return (f"{where}: no chat template (looked for {CHAT_TEMPLATE_FILE}, {CHAT_TEMPLATE_DIR}/default.jinja, "
                f"'chat_template' in tokenizer_config.json and {PROCESSOR_TEMPLATE_FILE}{named}); add the model's "
                f"template as {CHAT_TEMPLATE_FILE}, or set r1kit.chat_style ({', '.join(STYLES)}) in "
                "tokenizer_config.json")

    @property
    def style(self) -> ChatStyle:
        if self.style_name not in STYLES:
            raise TokenizerError(self.no_template_reason())
        return STYLES[self.style_name]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """messages → (ids, loss_mask) where mask is 1 on assistant content and its end token."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise TokenizerError(f"message {i}: expected {{'role': system|user|assistant, "
                                     f"'content': str}}, got {m!r:.120}")
        if self.chat_template is not None:
            text, spans = self._render_jinja(messages, add_generation_prompt)
        else:
            text, spans = self.style.render(messages, add_generation_prompt, self.force_think)
        enc = self.tk.encode(text, add_special_tokens=False)
        mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc.offsets]
        return enc.ids, mask

    def _render_jinja(self, messages: list[dict], gen: bool) -> tuple[str, list[tuple[int, int]]]:
        """Render with the checkpoint's own template; assistant spans from rendering each prefix.

        A turn's span runs from where "history + assistant header" and "history + this turn" part
        to the end of the latter (its end token included, trailing newlines not). That needs a template that
        renders earlier turns the same whatever follows them; one that does not is refused.
        """
        tpl, kw = _compiled(self.chat_template), {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        text = tpl.render(messages=messages, add_generation_prompt=gen, **kw)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = tpl.render(messages=messages[:i], add_generation_prompt=True, **kw)
            upto = tpl.render(messages=messages[: i + 1], add_generation_prompt=False, **kw).rstrip("\n")
            # the turn starts where the two renders part (a forced "<think>\n" header may differ)
            start = len(os.path.commonprefix([head, upto]))
            if not text.startswith(upto):
                raise TokenizerError("the checkpoint's chat template renders earlier turns differently once "
                                     "later ones follow, so assistant tokens cannot be located for the loss mask; "
                                     "train on single-turn data or set r1kit.chat_style in tokenizer_config.json")
            spans.append((start, len(upto)))
        return text, spans

    def chat_prompt(self, messages: list[dict] | str) -> list[int]:
        """ids ready for generation: the conversation + the assistant header."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if self.chat_template is not None:  # no loss mask needed: skip the per-turn renders
            tpl = _compiled(self.chat_template)
            text = tpl.render(messages=messages, add_generation_prompt=True,
                              bos_token=self.bos_token or "", eos_token=self.eos_token or "")
            return self.tk.encode(text, add_special_tokens=False).ids
        return self.render_chat(messages, add_generation_prompt=True)[0]

    def jinja_template(self) -> str:
        if self.chat_template is not None:
            return self.chat_template
        return self.style.jinja.replace("{THINK}", "<think>\n" if self.force_think else "")

    # -- files -----------------------------------------------------------------------------------
    def templates(self) -> dict[str, str]:
        """{name: Jinja} to write: the default (the checkpoint's own or the style's) and any named ones."""
        out = {"default": self.jinja_template()} if self.has_chat_template else {}
        return {**out, **self.extra_templates}

    def save(self, path) -> None:
        """tokenizer.json, tokenizer_config.json and the chat template(s), the way transformers 5
        writes them (chat_template.jinja, additional_chat_templates/NAME.jinja) and, for
        transformers 4 readers, also inside tokenizer_config.json (5 prefers the files: same text)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(path / "tokenizer.json"))
        # the source's other keys stay; added tokens are tokenizer.json's to say, templates ours to write
        cfg = {k: v for k, v in self.config.items() if k not in ("chat_template", "r1kit", "added_tokens_decoder")}
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg.update({"bos_token": self.bos_token or None, "eos_token": self.eos_token, "pad_token": self.pad_token,
                    "unk_token": self.unk_token})
        cfg.setdefault("clean_up_tokenization_spaces", False)
        cfg.setdefault("model_max_length", 131072)
        cfg["r1kit"] = {"chat_style": self.style_name, "force_think": self.force_think}
        templates = self.templates()
        write_chat_templates(path, templates)
        if templates:
            cfg["chat_template"] = templates["default"] if list(templates) == ["default"] else \
                [{"name": k, "template": v} for k, v in templates.items()]
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        tj, tc = path / "tokenizer.json", path / "tokenizer_config.json"
        try:
            tk = HFTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust library reports parse errors as plain Exceptions
            raise TokenizerError(f"{tj}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
        cfg = _read_json(tc) if tc.exists() else {}
        specials = {**(_read_json(path / "special_tokens_map.json") if (path / "special_tokens_map.json").exists()
                       else {}), **cfg}  # the legacy map, where tokenizer_config.json says nothing
        templates = read_chat_templates(path, cfg)
        template = templates.pop("default", None)
        ours = cfg.get("r1kit") or {}
        style = ours.get("chat_style") or detect_style(template)
        force = bool(ours.get("force_think", False))
        tok_text = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
        eos, bos, pad, unk = (tok_text(specials.get(k)) for k in ("eos_token", "bos_token", "pad_token", "unk_token"))
        # r1kit renders its own styles natively (fast, exact loss masks); any other text — a model's
        # template, or ours edited by hand or replaced by transformers — is rendered as written
        native = template is None or (style in STYLES and ours.get("chat_style") == style
                                      and template == STYLES[style].jinja.replace("{THINK}", "<think>\n" * force))
        if not native:
            try:  # does the generation prompt itself open the reasoning (R1-Distill does, Qwen3 doesn't)?
                opened = _compiled(template).render(messages=[{"role": "user", "content": "1+1"}],
                                                    add_generation_prompt=True, bos_token=bos or "", eos_token=eos or "")
            except Exception as e:  # jinja2.TemplateSyntaxError, a template's raise_exception, …
                raise TokenizerError(f"{path}: chat template does not render ({e})") from None
            force = opened.rstrip().endswith("<think>")
        return cls(tk, style, force, None if native else template, eos=eos, bos=bos, pad=pad,
                   unk=unk, extra_templates=templates, config=cfg, source=str(path))


# ---------------------------------------------------------------------------------------------
# Chat template files: where transformers 5 reads and writes them
# ---------------------------------------------------------------------------------------------
CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR = "chat_template.jinja", "additional_chat_templates"
PROCESSOR_TEMPLATE_FILE = "chat_template.json"  # a processor's legacy file: {"chat_template": "..."}
_TEMPLATE_NAME = re.compile(r"^[\w.-]+$")


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path}: expected a JSON object at the top level")
    return d


def read_chat_templates(path: Path, cfg: dict) -> dict[str, str]:
    """Every chat template of a tokenizer folder as {name: Jinja}, in transformers 5's precedence.

    1. `chat_template.jinja` (the "default") and `additional_chat_templates/NAME.jinja`: when any
       of these files exists they replace whatever tokenizer_config.json holds (AutoTokenizer's rule);
    2. tokenizer_config.json's `chat_template`: one string (the default) or a list of {name, template};
    3. `chat_template.json`, a processor's legacy file: AutoProcessor reads it, AutoTokenizer does
       not, so it counts only when the tokenizer files have no template at all.
    Callers use the "default" one, as `apply_chat_template` does when no name is given.
    """
    found: dict[str, str] = {}
    if (path / CHAT_TEMPLATE_FILE).is_file():
        found["default"] = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (path / CHAT_TEMPLATE_DIR).is_dir():
        for f in sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            found[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if found:
        return found
    where, value = f"{path / 'tokenizer_config.json'}: field 'chat_template'", cfg.get("chat_template")
    if value is None and (path / PROCESSOR_TEMPLATE_FILE).is_file():
        where = f"{path / PROCESSOR_TEMPLATE_FILE}: field 'chat_template'"
        value = _read_json(path / PROCESSOR_TEMPLATE_FILE).get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(f"{where} must be a string or a list of {{\"name\": str, \"template\": str}}")


def write_chat_templates(path: Path, templates: dict[str, str]) -> None:
    """The default template → chat_template.jinja, each named one → additional_chat_templates/NAME.jinja;
    template files already there that `templates` does not hold are removed (they would be read next)."""
    for name in templates:
        if name != "default" and not _TEMPLATE_NAME.match(name):  # a name becomes a file name
            raise TokenizerError(f"chat template name {name!r}: use letters, digits, '_', '-' or '.'")
    stale = [*(path / CHAT_TEMPLATE_DIR).glob("*.jinja"), path / CHAT_TEMPLATE_FILE]
    for f in stale:
        f.unlink(missing_ok=True)
    for name, text in templates.items():
        if name == "default":
            (path / CHAT_TEMPLATE_FILE).write_text(text, encoding="utf-8")
            continue
        (path / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
        (path / CHAT_TEMPLATE_DIR / f"{name}.jinja").write_text(text, encoding="utf-8")


def build_bpe_tokenizer(corpus, vocab_size: int = 512, style: str = "deepseek-r1",
                        extra_tokens: list[str] = THINK_TAGS, force_think: bool = False,
                        all_bytes: bool = True) -> Tokenizer:
    """Train a byte-level BPE on `corpus` (an iterable of strings) with the style's specials.

    Digits stay single tokens (the split pattern isolates them): arithmetic in a tiny model is
    much easier to learn when every digit is its own token. With `all_bytes=False` the alphabet
    is only the characters the corpus uses — for synthetic tasks, where 256 never-seen byte
    tokens would each keep a sliver of probability at temperature 1 and, over a 50-token
    completion, sink a large share of samples.
    """
    st = STYLES[style]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    n_added = len(st.specials) + len(extra_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if all_bytes else []
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - n_added, 1), show_progress=False,
                                  initial_alphabet=alphabet, special_tokens=[])
    tk.train_from_iterator(corpus, trainer=trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in st.specials])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return Tokenizer(tk, style, force_think, pad=st.pad)
