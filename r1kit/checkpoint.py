"""Checkpoint directories: a Hugging Face model dir, written atomically, plus trainer state.

    DIR/config.json, model*.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json
    DIR/trainer_state/   optimizer.pt, rng.pt, state.json (step, data cursor, metrics so far)

`save` writes everything into a temporary sibling and renames it into place, so a crash
leaves either the previous checkpoint or the new one — never half of one.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from r1kit.formats import hf
from r1kit.tokenizer import Tokenizer

GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}  # R1's evaluation settings


def save(model, tok: Tokenizer, path, *, trainer_state: dict | None = None, dtype=None,
         extra_config: dict | None = None, shard_bytes: int = 4 << 30) -> Path:
    """Atomically write model + tokenizer (+ trainer state) as a checkpoint directory."""
    path = Path(path)
    with hf.atomic_dir(path) as tmp:
        hf.save_model(model, tmp, shard_bytes=shard_bytes, dtype=dtype, extra_config=extra_config)
        tok.save(tmp)
        gen = {**GENERATION_DEFAULTS, "eos_token_id": tok.stop_ids or None}
        if tok.bos_id is not None:
            gen["bos_token_id"] = tok.bos_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if trainer_state is not None:
            save_trainer_state(tmp / "trainer_state", **trainer_state)
    return path


def write_text_atomic(path, text: str) -> None:
    """Replace a small file whole (write a sibling, then rename): readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def has_trainer_state(path) -> bool:
    """Whether `path` is a checkpoint a stage can resume from (finishing an interrupted swap first)."""
    hf.recover_swap(path)
    return (Path(path) / "trainer_state" / "state.json").exists()


def load(path, device=None, dtype=None):
    """→ (model, tokenizer) from a checkpoint directory (ours or a Hugging Face one) or a .gguf file."""
    from r1kit.common import resolve_device, resolve_dtype
    device = resolve_device(device)
    if is_gguf(path):  # weights dequantized from the file, tokenizer from its header
        from r1kit.formats import gguf_read, gguf_vocab
        g = gguf_read.open_gguf(path)
        return gguf_read.load_model(g, device=device, dtype=resolve_dtype(dtype, device)), gguf_vocab.load_tokenizer(g)
    hf.recover_swap(path)
    model = hf.load_model(path, device=device, dtype=resolve_dtype(dtype, device))
    tok = Tokenizer.load(path)
    if tok.vocab_size > model.config.vocab_size:
        raise hf.CheckpointError(f"{Path(path) / 'tokenizer.json'}: {tok.vocab_size} tokens but config.json "
                                 f"has vocab_size {model.config.vocab_size}")
    return model, tok


def is_gguf(path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a checkpoint directory, a tokenizer.json (its tokenizer_config.json beside it) or a .gguf."""
    p = Path(path)
    if is_gguf(p):
        from r1kit.formats import gguf_vocab
        return gguf_vocab.load_tokenizer(p)
    if p.is_file() and p.name == "tokenizer.json":
        return Tokenizer.load(p.parent)
    if not p.is_dir():
        raise hf.CheckpointError(f"{p}: expected a checkpoint directory, a tokenizer.json or a .gguf file")
    hf.recover_swap(p)
    return Tokenizer.load(p)


# ---------------------------------------------------------------------------------------------
# Trainer state: everything needed for a bit-exact resume on CPU
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_trainer_state(path: Path, *, optimizer=None, state: dict | None = None, extra: dict | None = None) -> None:
    """optimizer.pt, rng.pt (+ any generator states in `extra`), state.json."""
    path.mkdir(parents=True, exist_ok=True)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save({"rng": rng_state(), **(extra or {})}, path / "rng.pt")
    (path / "state.json").write_text(json.dumps(state or {}, indent=2) + "\n")


def load_trainer_state(path, optimizer=None, stage: str | None = None) -> tuple[dict, dict]:
    """Restore the optimizer and global RNGs; → (state.json dict, extra objects saved in rng.pt).

    `stage` guards against resuming another stage's run (e.g. --out pointed at a GRPO directory).
    """
    path = Path(path) / "trainer_state"
    if not (path / "state.json").exists():
        raise hf.CheckpointError(f"{path}: no trainer state to resume from")
    saved = json.loads((path / "state.json").read_text()).get("stage")
    if stage is not None and saved not in (None, stage):
        raise hf.CheckpointError(f"{path}: this is a {saved} run, not {stage}; choose another --out directory")
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    blob = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    set_rng_state(blob.pop("rng"))
    return json.loads((path / "state.json").read_text()), blob
