"""`r1kit generate CKPT --prompt TEXT`: sample from a checkpoint directory.

Prompts are user messages rendered with the checkpoint's chat template; a checkpoint without one
is refused with a one-line error unless `--raw` asks for the text to be tokenized as is.
"""
from __future__ import annotations

import r1kit
from r1kit.tokenizer import TokenizerError


def add_args(p) -> None:
    p.add_argument("ckpt", help="checkpoint directory (r1kit or Hugging Face format) or a .gguf file")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeat for several)")
    p.add_argument("-n", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens per sample (default 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible (default: random)")
    p.add_argument("--raw", action="store_true",
                   help="tokenize the prompt as is, without the chat template (needed for a checkpoint "
                        "that has none, e.g. a base model)")
    p.add_argument("--device", default="auto", help="auto (cuda → mps → cpu), cpu, cuda …")


def main(args) -> int:
    model, tok = r1kit.load(args.ckpt, device=args.device)
    if not args.raw and not tok.has_chat_template:
        raise TokenizerError(f"{tok.no_template_reason()}; or pass --raw to tokenize the prompt as plain text")
    out = r1kit.generate(model, tok, args.prompt, n=args.n, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=not args.raw)
    for prompt, texts in zip(args.prompt, out):
        for t in (texts if args.n > 1 else [texts]):
            print(f"> {prompt}\n{t}\n")
    return 0
