"""`r1kit convert MODEL.gguf --out DIR`: a GGUF file → a Hugging Face checkpoint directory.

Weights are dequantized (every type the `gguf` package reads), llama.cpp's q/k row interleave is
undone, and the tokenizer is rebuilt from the header so it splits text exactly as llama.cpp does;
the directory (config.json, model.safetensors, tokenizer.json with its chat template,
generation_config.json) is what `transformers` and vLLM load, and what every r1kit verb takes.
Written atomically through `r1kit.save`.
"""
from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def add_args(p) -> None:
    p.add_argument("gguf", metavar="MODEL.gguf", help="a llama / qwen2 / qwen3 / deepseek2 GGUF file")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write (replaced atomically)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the safetensors (default float32: dequantized values are kept exactly)")


def convert(gguf_path, out, dtype: str = "float32"):
    """GGUF → checkpoint directory; → (model, tokenizer) as loaded."""
    import torch

    from r1kit import checkpoint
    from r1kit.formats.hf import CheckpointError
    if not checkpoint.is_gguf(gguf_path):
        raise CheckpointError(f"{gguf_path}: expected a .gguf file")
    model, tok = checkpoint.load(gguf_path, device="cpu", dtype=torch.float32)
    checkpoint.save(model, tok, out, dtype=getattr(torch, dtype))
    return model, tok


def main(args) -> int:
    model, tok = convert(args.gguf, args.out, args.dtype)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {model.config.architecture}, {n / 1e6:.1f} M parameters, "
          f"{tok.vocab_size} tokens, {args.dtype}")
    return 0
