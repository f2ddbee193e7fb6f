"""`r1kit merge ADAPTER_DIR --out DIR`: fold a LoRA adapter into its base, as a full checkpoint.

The adapter directory is PEFT's format (what a LoRA run of `r1kit sft|grpo|distill` saves, or what
`peft` writes); its base is the local checkpoint named by base_model_name_or_path. The result is a
plain Hugging Face directory that transformers, vLLM and `r1kit export` read with no PEFT at all.
"""
from __future__ import annotations

import sys


def add_args(p) -> None:
    p.add_argument("adapter", help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="directory to write the merged checkpoint to (replaced atomically)")
    p.add_argument("--dtype", default="float32", help="dtype of the merged weights: float32 | bfloat16 | float16")


def merge_adapter(adapter, out, dtype: str = "float32"):
    """Load base + adapter, fold W + (α/r)·BA into plain linear layers, save a full checkpoint."""
    import torch

    from r1kit import checkpoint
    from r1kit.common import resolve_dtype
    from r1kit.formats import hf, peft
    from r1kit.models import lora
    if not peft.is_adapter_dir(adapter):
        raise hf.CheckpointError(f"{adapter}: not a LoRA adapter directory (no {peft.CONFIG})")
    model, tok = checkpoint.load(adapter, device="cpu", dtype="float32")  # fold in fp32, then cast
    lora.fold(model)
    return checkpoint.save(model, tok, out, dtype=resolve_dtype(dtype, torch.device("cpu")))


def main(args) -> int:
    path = merge_adapter(args.adapter, args.out, args.dtype)
    print(f"merged {args.adapter} into {path}", file=sys.stdout)
    return 0
