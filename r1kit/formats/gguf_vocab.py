"""A GGUF's vocabulary metadata → r1kit's `Tokenizer`, tokenizing exactly as llama.cpp does.

Only the header is read (`tokenizer.ggml.*`, `tokenizer.chat_template`); no tensor data.

llama.cpp's BPE tokenizer (`tokenizer.ggml.model = "gpt2"`) is byte-level BPE whose text
splitting is chosen by the `tokenizer.ggml.pre` name. Each name maps to a list of regexes applied
one after the other, every match and every gap becoming a piece — which is what a `Sequence` of
`Split(regex, "isolated")` pre-tokenizers does in `tokenizers` (and `Digits`, and ByteLevel's own
GPT-2 regex). Then bytes → the GPT-2 alphabet and the BPE merges by rank.
Control tokens (`token_type` 3) become special added tokens, user-defined ones (4) plain added
tokens: both are matched in text before splitting, as llama.cpp does with `special=true`.
llama.cpp spells the contraction group `(?i:'s|…)` as `'[sS]|…`; the two agree on every text in
the tests (tests/test_gguf_read.py and tests/real/), so the Hugging Face spelling is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gguf import TokenType
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from r1kit.formats.gguf import LLAMA3_SPLIT
from r1kit.formats.gguf_read import GGUFFile, open_gguf
from r1kit.formats.hf import CheckpointError
from r1kit.tokenizer import QWEN2_SPLIT, Tokenizer, TokenizerError, _compiled, detect_style

@dataclass(frozen=True)
class PreTokenizer:
    build: Callable[[], pre_tokenizers.PreTokenizer]  # the splitting, ByteLevel included
    ignore_merges: bool = False  # a whole piece that is a token is taken as is (Llama 3)
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


def _split(regex: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    return lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2() -> pre_tokenizers.PreTokenizer:  # ByteLevel's own regex is GPT-2's
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm() -> pre_tokenizers.PreTokenizer:  # every digit alone, then GPT-2's split
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


_QWEN2 = PreTokenizer(_split(QWEN2_SPLIT))
_LLAMA3 = PreTokenizer(_split(LLAMA3_SPLIT), ignore_merges=True, add_bos=True)
# tokenizer.ggml.pre → splitting, after llama.cpp's llama-vocab.cpp (names it maps to one type share an entry).
# Written the way the models' own tokenizer.json files spell them, so a converted checkpoint carries the
# familiar pre-tokenizer and exports back to the same name.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": PreTokenizer(_gpt2),
    "smollm": PreTokenizer(_smollm),
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}


def pre_tokenizer(g: GGUFFile) -> PreTokenizer:
    model = g.get("tokenizer.ggml.model", str)
    if model != "gpt2":
        raise CheckpointError(f"{g.path}: tokenizer.ggml.model {model!r} is not supported (only byte-level "
                              "BPE, 'gpt2')")
    name = g.get("tokenizer.ggml.pre", str, "default")
    if name not in PRE_TOKENIZERS:
        raise CheckpointError(f"{g.path}: tokenizer.ggml.pre {name!r} is not a known pre-tokenizer; "
                              f"known: {', '.join(PRE_TOKENIZERS)}")
    return PRE_TOKENIZERS[name]


def _token_id(g: GGUFFile, key: str, n: int) -> int | None:
    i = g.get(key, int, None)
    if i is not None and not 0 <= i < n:
        raise CheckpointError(f"{g.path}: {key} = {i} is outside the vocabulary (0..{n - 1})")
    return i


def build_hf_tokenizer(g: GGUFFile) -> tuple[HFTokenizer, dict[str, int | None]]:
    """→ (`tokenizers.Tokenizer`, {"bos", "eos", "eot", "pad": id or None}) from the header."""
    pre = pre_tokenizer(g)
    tokens = g.get_array("tokenizer.ggml.tokens")
    types = g.get_array("tokenizer.ggml.token_type", None) or [int(TokenType.NORMAL)] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries for "
                              f"{len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string (some padding schemes) keeps its first id
    merges = []
    for k, m in enumerate(g.get_array("tokenizer.ggml.merges", [])):
        a, sep, b = m.partition(" ")
        if not sep or a not in vocab or b not in vocab or a + b not in vocab:
            raise CheckpointError(f"{g.path}: tokenizer.ggml.merges[{k}] = {m!r} does not join two tokens "
                                  "into a third")
        merges.append((a, b))
    tk = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    tk.pre_tokenizer = pre.build()
    tk.decoder = decoders.ByteLevel()
    control, user = int(TokenType.CONTROL), int(TokenType.USER_DEFINED)
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t == control and vocab[tokens[i]] == i])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, t in enumerate(types) if t == user and vocab[tokens[i]] == i])
    n = len(tokens)
    ids = {"bos": _token_id(g, "tokenizer.ggml.bos_token_id", n), "eos": _token_id(g, "tokenizer.ggml.eos_token_id", n),
           "eot": _token_id(g, "tokenizer.ggml.eot_token_id", n),
           "pad": _token_id(g, "tokenizer.ggml.padding_token_id", n)}
    if g.get("tokenizer.ggml.add_bos_token", bool, pre.add_bos) and ids["bos"] is not None:
        # llama.cpp prepends BOS to plain prompts: so does `encode(..., add_special_tokens=True)` here
        bos = tokens[ids["bos"]]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                          special_tokens=[(bos, ids["bos"])])
    return tk, ids


def load_tokenizer(path) -> Tokenizer:
    """r1kit's Tokenizer from a GGUF's header (a path or an open GGUFFile): llama.cpp's ids, its chat
    template and end tokens."""
    g = open_gguf(path)
    tk, ids = build_hf_tokenizer(g)
    text = lambda i: tk.id_to_token(i) if i is not None else None  # noqa: E731
    template = g.get("tokenizer.chat_template", str, None)
    # the turn ends at EOT when the file names one (Llama 3's <|eot_id|>), else at EOS (<|im_end|> in SmolLM2)
    eos, bos = text(ids["eot"] if ids["eot"] is not None else ids["eos"]), text(ids["bos"])
    force = False
    if template:
        try:
            opened = _compiled(template).render(messages=[{"role": "user", "content": "1+1"}],
                                                add_generation_prompt=True, bos_token=bos or "", eos_token=eos or "")
        except Exception as e:  # jinja2.TemplateSyntaxError, the template's raise_exception, …
            raise TokenizerError(f"{g.path}: tokenizer.chat_template does not render ({e})") from None
        force = opened.rstrip().endswith("<think>")
    unk = _token_id(g, "tokenizer.ggml.unknown_token_id", len(g.get_array("tokenizer.ggml.tokens")))
    # the file's own padding and unknown tokens travel with it, so a re-export writes the same ids
    tok = Tokenizer(tk, detect_style(template), force, template or None, eos=eos, bos=bos or "",
                    pad=text(ids["pad"]), unk=text(unk))
    # every end-of-generation token the file names stops generation, beside the family defaults
    tok.stop_ids = sorted({*tok.stop_ids, *(i for i in (ids["eos"], ids["eot"]) if i is not None)})
    return tok
