"""`r1kit export CKPT --gguf OUT.gguf --quant Q4_K_M`: a checkpoint directory → a GGUF file.

The checkpoint is ours or any Hugging Face Llama / Qwen2 / Qwen3 / DeepSeek-V3 directory
(config.json, safetensors, tokenizer.json). Quantized mixes are written directly, tensor by tensor, with the
bytes llama.cpp's own quantizer would produce from the F32 export.
"""
from __future__ import annotations

import sys
from pathlib import Path

QUANTS = ("F32", "F16", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K")


def add_args(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (config.json + safetensors + tokenizer.json)")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf",
                   help="output file; written to a temporary sibling and renamed, so no partial file is left")
    p.add_argument("--quant", default="F16", type=str.upper, choices=QUANTS,
                   help="F32/F16 store weights as is; Q8_0, Q4_K_M, Q5_K_M, Q6_K follow llama.cpp's "
                        "per-tensor mix rules (default F16)")
    p.add_argument("--name", default=None, help="general.name stored in the file (default: the directory name)")


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def export_checkpoint(ckpt, out_path, quant: str = "F16", name: str | None = None):
    """A checkpoint directory (ours or Hugging Face's) → GGUF. Lives with the verb, above formats/ and checkpoint."""
    import torch

    from r1kit import checkpoint
    from r1kit.formats.gguf import export_gguf
    model, tok = checkpoint.load(ckpt, device="cpu", dtype=torch.float32)
    return export_gguf(model, tok, out_path, quant, name or Path(ckpt).resolve().name)


def main(args) -> int:
    from r1kit.formats.gguf import GGUFExportError
    try:
        r = export_checkpoint(args.checkpoint, args.gguf, args.quant, args.name)
    except GGUFExportError as e:
        print(f"r1kit export: error: {e}", file=sys.stderr)
        return 2
    types = ", ".join(f"{t} ×{n}" for t, n in sorted(r.type_counts().items(), key=lambda kv: -kv[1]))
    print(f"wrote {r.path} ({args.quant}): {r.n_tensors} tensors [{types}], {_human(r.n_bytes)} "
          f"({r.n_bytes} bytes), {r.seconds:.2f} s")
    return 0
