"""Checkpoint directories: a Hugging Face model dir, written atomically, plus trainer state.

    DIR/config.json, model*.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json
    DIR/trainer_state/   optimizer/ (torch.distributed.checkpoint), rng-RANK.pt, state.json
                         (step, data cursor, metrics so far, world_size)

`save` writes everything into a temporary sibling, fsyncs it and renames it into place, so a
crash leaves either the previous checkpoint or the new one — never half of one — and the
temporaries a killed writer leaves are removed on the next save or load. Under torch.distributed
every rank takes part (FSDP2 gathers the weights; each rank writes its optimizer shard and its RNG
state into a staging directory on the shared filesystem) and rank 0 writes the Hugging Face files
and swaps the whole directory in. The optimizer state is keyed by parameter name and resharded on
load, so a run saved on N processes resumes on any number.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from r1kit import dist
from r1kit.common import is_main_process
from r1kit.formats import hf, peft
from r1kit.models import lora
from r1kit.tokenizer import Tokenizer

# What a stage's `generation_config` option adds to the checkpoint's generation_config.json:
# "source" nothing (the starting checkpoint's own file is kept as it is; a model with none gets only
# its token ids), "r1" DeepSeek-R1's evaluation settings, which `serve` and vLLM adopt as defaults.
GENERATION_PRESETS = {"source": {}, "r1": {"do_sample": True, "temperature": 0.6, "top_p": 0.95}}


def save(model, tok: Tokenizer, path, *, trainer_state: dict | None = None, dtype=None,
         extra_config: dict | None = None, shard_bytes: int = 4 << 30, generation: str = "source") -> Path:
    """Atomically write model + tokenizer (+ trainer state) as a checkpoint directory.

    generation_config.json is the one the model was loaded with, unchanged (`hf.load_model` keeps
    it as `model.generation_config`), or only the token ids; `generation` names a GENERATION_PRESETS
    entry to write on top. Call it on every rank (DDP/FSDP2-wrapped models too): all of them gather
    and stage the trainer state, rank 0 writes, and all return once the checkpoint is in place.
    """
    path = Path(path)
    gen = generation_config(dist.unwrap(model), tok, generation)  # every rank: a bad preset stops all of them
    if not path.parent.is_dir():
        raise hf.CheckpointError(f"{path.parent}: output directory does not exist")
    inner = dist.unwrap(model)
    adapter = lora.has_lora(inner)  # the same on every rank, so the collective below pairs up
    sd = None if adapter else dist.full_state_dict(model)  # collective under FSDP2; rank 0 holds the tensors
    staged = _stage_trainer_state(model, path, **trainer_state) if trainer_state is not None else None
    if is_main_process():
        with hf.atomic_dir(path) as tmp:
            if adapter:  # a LoRA run: only the adapter, in PEFT's format, pointing at its base
                peft.save_adapter(inner, tmp, base=inner.lora.get("base"))
            else:
                hf.save_model(inner, tmp, shard_bytes=shard_bytes, dtype=dtype, extra_config=extra_config,
                              state_dict=sd)
            tok.save(tmp)
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            if staged is not None:
                os.replace(staged, tmp / "trainer_state")
    dist.barrier("waiting for rank 0 to write the checkpoint")
    return path


def generation_config(model, tok: Tokenizer, preset: str = "source") -> dict:
    """The checkpoint's own generation config (else its bos/eos ids) with the preset's settings on top."""
    if preset not in GENERATION_PRESETS:
        raise ValueError(f"generation_config = {preset!r}; choose one of {sorted(GENERATION_PRESETS)}")
    own = getattr(model, "generation_config", None)
    if own is None:
        own = {k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.stop_ids or None)) if v is not None}
    return {**own, **GENERATION_PRESETS[preset]}


def write_text_atomic(path, text: str) -> None:
    """Replace a small file whole (write a sibling, then rename): readers never see half of it.

    Under torchrun every rank calls it with the same text: rank 0 writes, all return once it is in place.
    """
    path = Path(path)
    if not is_main_process():
        dist.barrier(f"waiting for rank 0 to write {path.name}")
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # the data is on disk before the name points at it
    tmp.replace(path)
    hf.fsync_dir(path.parent)
    dist.barrier(f"waiting for rank 0 to write {path.name}")


def has_trainer_state(path) -> bool:
    """Whether `path` is a checkpoint a stage can resume from (finishing an interrupted swap first)."""
    hf.recover_swap(path)
    return (Path(path) / "trainer_state" / "state.json").exists()


def load(path, device=None, dtype=None):
    """→ (model, tokenizer) from a checkpoint directory (ours or a Hugging Face one), a .gguf file, or a
    LoRA adapter directory in PEFT's format (its base, named by base_model_name_or_path, plus the adapter)."""
    from r1kit.common import resolve_device, resolve_dtype
    device = resolve_device(device)
    hf.recover_swap(path)  # finish a swap a crash interrupted (a no-op for files and intact directories)
    if peft.is_adapter_dir(path):
        return load_adapter_dir(path, device, dtype)
    if is_gguf(path):  # weights dequantized from the file, tokenizer from its header
        from r1kit.formats import gguf_read, gguf_vocab
        g = gguf_read.open_gguf(path)
        return gguf_read.load_model(g, device=device, dtype=resolve_dtype(dtype, device)), gguf_vocab.load_tokenizer(g)
    model = hf.load_model(path, device=device, dtype=resolve_dtype(dtype, device))
    tok = Tokenizer.load(path)
    if tok.vocab_size > model.config.vocab_size:
        raise hf.CheckpointError(f"{Path(path) / 'tokenizer.json'}: {tok.vocab_size} tokens but config.json "
                                 f"has vocab_size {model.config.vocab_size}")
    return model, tok


def load_adapter_dir(path, device=None, dtype=None):
    """Base checkpoint + the adapter in `path`; the tokenizer is the adapter dir's when it has one."""
    path = Path(path)
    base = peft.read_adapter_config(path)["base"]
    if not base:
        raise hf.CheckpointError(f"{path / peft.CONFIG}: no base_model_name_or_path; r1kit needs the base "
                                 "checkpoint's local path there")
    base_path = Path(base) if Path(base).is_absolute() else (path / base)
    if not base_path.exists():
        raise hf.CheckpointError(f"{path / peft.CONFIG}: base_model_name_or_path {base!r} is not a local "
                                 "checkpoint (r1kit downloads nothing); point it at the base directory")
    model, tok = load(base_path, device=device, dtype=dtype)
    peft.load_adapter(model, path)
    model.lora["base"] = str(base_path.resolve())
    if (path / "tokenizer.json").exists():
        tok = Tokenizer.load(path)
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


def _stage_trainer_state(model, path: Path, *, optimizer=None, state: dict | None = None,
                         extra: dict | None = None) -> Path:
    """Every rank writes its optimizer shard and RNG state into a staging sibling → its path.

    optimizer/ (torch.distributed.checkpoint, FQN-keyed), rng-RANK.pt (+ any generator states in
    `extra`), state.json. A killed run's staging directory is removed by the next save.
    """
    staging = path.parent / f".{path.name}.trainer-staging"
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    dist.barrier("creating the checkpoint's staging directory")
    if optimizer is not None:
        dist.save_optimizer(model, optimizer, staging / "optimizer")
    torch.save({"rng": rng_state(), **(extra or {})}, staging / f"rng-{dist.world().rank}.pt")
    if is_main_process():
        (staging / "state.json").write_text(json.dumps({**(state or {}), "world_size": dist.world().world_size},
                                                       indent=2) + "\n")
    dist.barrier("writing the trainer state")
    return staging


def load_trainer_state(path, optimizer=None, stage: str | None = None, model=None) -> tuple[dict, dict]:
    """Restore the optimizer (of `model`, as wrapped for this run) and this rank's RNGs;
    → (state.json dict, extra objects saved with the RNG state).

    The optimizer state is resharded to this run's layout (any process count, DDP or FSDP2). A rank
    the saving run did not have (resuming on more processes) takes rank 0's RNG state: the stages seed
    their data and rollouts by step, so the RNG only matters for bit-exact resumes on the same layout.
    `stage` guards against resuming another stage's run (e.g. --out pointed at a GRPO directory).
    """
    path = Path(path) / "trainer_state"
    if not (path / "state.json").exists():
        raise hf.CheckpointError(f"{path}: no trainer state to resume from")
    state = json.loads((path / "state.json").read_text())
    saved = state.get("stage")
    if stage is not None and saved not in (None, stage):
        raise hf.CheckpointError(f"{path}: this is a {saved} run, not {stage}; choose another --out directory")
    if optimizer is not None and (path / "optimizer").is_dir():
        if model is None:
            raise ValueError("load_trainer_state: pass the model whose optimizer is restored")
        dist.load_optimizer(model, optimizer, path / "optimizer")
    rng = path / f"rng-{dist.world().rank}.pt"
    blob = torch.load(rng if rng.exists() else path / "rng-0.pt", map_location="cpu", weights_only=False)
    set_rng_state(blob.pop("rng"))
    return state, blob
