"""LoRA adapters in PEFT's on-disk format, so `peft.PeftModel.from_pretrained(hf_base, DIR)` and
r1kit read the same directory.

    DIR/adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    DIR/adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight (r, in)
                                   base_model.model.<HF module>.lora_B.weight (out, r)

Module names go through the family's HF name map (formats/hf.py), the same table checkpoints use.
What PEFT can express but r1kit's LoRALinear does not (DoRA, biases, per-layer rank patterns,
fan-in/fan-out storage) is refused with the field named, never silently dropped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r1kit.formats import hf
from r1kit.models import lora

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_adapter_dir(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def _hf_module(model, name: str) -> str:
    hf_name = hf.translate(f"{name}.weight", hf.family_of(model).name_map, to_hf=True)
    if hf_name is None:
        raise hf.CheckpointError(f"module {name!r} has no Hugging Face name")
    return hf_name.removesuffix(".weight")


def _r1kit_module(model, hf_module: str, where) -> str:
    name = hf.translate(f"{hf_module}.weight", hf.family_of(model).name_map, to_hf=False)
    if name is None:
        raise hf.CheckpointError(f"{where}: adapter for {hf_module!r}, which {model.config.architecture} does not have")
    return name.removesuffix(".weight")


def save_adapter(model, path, base: str | None = None) -> None:
    """Write the model's adapters (only them) into an existing directory `path`."""
    path = Path(path)
    layers = lora.lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    first = next(iter(layers.values()))
    tensors, leaves = {}, set()
    for name, m in layers.items():
        mod = _hf_module(model, name)
        leaves.add(mod.rsplit(".", 1)[-1])
        tensors[f"{PREFIX}{mod}.lora_A.weight"] = m.lora_A.detach().float().contiguous().cpu()
        tensors[f"{PREFIX}{mod}.lora_B.weight"] = m.lora_B.detach().float().contiguous().cpu()
    dropout = getattr(first.lora_dropout, "p", 0.0)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.rank, "lora_alpha": first.alpha,
           "lora_dropout": dropout, "target_modules": sorted(leaves), "bias": "none", "fan_in_fan_out": False,
           "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
           "modules_to_save": None, "base_model_name_or_path": base}
    (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def read_adapter_config(path) -> dict:
    where = Path(path) / CONFIG
    d = hf.read_json(where)
    f = lambda k, t, default=hf.REQUIRED: hf.field(d, k, t, default, str(where))  # noqa: E731
    if f("peft_type", str) != "LORA":
        raise hf.CheckpointError(f"{where}: field 'peft_type' must be \"LORA\", got {d['peft_type']!r}")
    refuse = {"use_dora": False, "fan_in_fan_out": False, "bias": "none"}
    for key, want in refuse.items():
        if d.get(key, want) not in (want, None):
            raise hf.CheckpointError(f"{where}: field '{key}' = {json.dumps(d[key])} is not supported (only {want!r})")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "modules_to_save"):
        if d.get(key):
            raise hf.CheckpointError(f"{where}: field '{key}' is not supported by r1kit's LoRA")
    return {"r": f("r", int), "alpha": f("lora_alpha", float, None), "dropout": f("lora_dropout", float, 0.0),
            "targets": f("target_modules", (list, str)), "rslora": f("use_rslora", bool, False),
            "base": f("base_model_name_or_path", str, None)}


def load_adapter(model, path) -> list[str]:
    """Wrap `model` (the base, already loaded) with the adapters stored in `path` and fill them."""
    path = Path(path)
    cfg = read_adapter_config(path)
    files = path / WEIGHTS
    try:
        with safe_open(files, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise hf.CheckpointError(f"{files}: not a readable safetensors file ({e})") from None
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if m is None:
            raise hf.CheckpointError(f"{files}: unexpected tensor {key!r} (not a LoRA A/B weight)")
        by_module.setdefault(_r1kit_module(model, m.group(1), files), {})[m.group(2)] = t
    names = set(by_module)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    r, alpha = cfg["r"], cfg["alpha"] if cfg["alpha"] is not None else float(cfg["r"])
    wrapped = lora.apply_lora(model, rank=r, alpha=alpha, dropout=cfg["dropout"], targets=sorted(leaves),
                              modules=names)
    layers = lora.lora_layers(model)
    for name, parts in by_module.items():
        m = layers[name]
        if cfg["rslora"]:  # rank-stabilised LoRA scales by α/√r instead of α/r
            m.scaling = alpha / r ** 0.5
        for part, t in parts.items():
            dst = getattr(m, part)
            if tuple(t.shape) != tuple(dst.shape):
                raise hf.CheckpointError(f"{files}: {name}.{part} has shape {list(t.shape)}, "
                                         f"the model and r={r} imply {list(dst.shape)}")
            with torch.no_grad():
                dst.copy_(t.to(dst.dtype))
        if set(parts) != {"lora_A", "lora_B"}:
            raise hf.CheckpointError(f"{files}: {name} has {sorted(parts)} but needs both lora_A and lora_B")
    return wrapped
