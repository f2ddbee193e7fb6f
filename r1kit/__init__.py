"""r1kit — the DeepSeek-R1 recipe, small, fast and hackable on PyTorch.

    model, tok = r1kit.load("path/to/checkpoint")          # r1kit or Hugging Face directory, or a .gguf
    tok = r1kit.load_tokenizer("model.gguf")               # a checkpoint dir, a tokenizer.json or a .gguf
    print(r1kit.generate(model, tok, ["What is 2+3?"], max_new_tokens=64))
    r1kit.save(model, tok, "path/to/new_checkpoint")
"""
from __future__ import annotations

__version__ = "0.1.0"

from r1kit.checkpoint import load, load_tokenizer, save  # noqa: E402

__all__ = ["load", "load_tokenizer", "save", "generate"]


def generate(model, tok, prompts, n: int = 1, max_new_tokens: int = 256, temperature: float = 0.6,
             top_p: float = 0.95, top_k: int = 0, stop=(), seed: int | None = None, chat: bool = True):
    """Sample completions for text prompts.

    Each prompt is a string (a user message) or a list of chat messages, rendered with the
    checkpoint's chat template. A checkpoint with no template is refused (TokenizerError): a chat
    model fed raw text answers nonsense or nothing, so raw text must be asked for with
    `chat=False`, which tokenizes each string prompt as is. Returns one string per prompt, or a
    list of `n` strings when n > 1.
    """
    from r1kit.engine import Engine, SamplingParams
    from r1kit.tokenizer import TokenizerError
    if isinstance(prompts, str):
        prompts = [prompts]
    if chat and not tok.has_chat_template:
        raise TokenizerError(f"{tok.no_template_reason()}; or pass chat=False to tokenize the prompts as plain text")
    if not chat and not all(isinstance(p, str) for p in prompts):
        raise TokenizerError("chat=False takes text prompts; a list of messages needs the chat template")
    ids = [tok.chat_prompt(p) if chat else tok.encode(p) for p in prompts]
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        n=n, stop=tuple(stop), seed=seed)
    out = Engine(model, tok).generate(ids, sp)
    texts = [[s.text for s in group] for group in out]
    return [t[0] for t in texts] if n == 1 else texts
