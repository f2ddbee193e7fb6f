"""Hugging Face checkpoint directories: config translation, explicit name maps, safetensors I/O.

A checkpoint directory is what `transformers` and vLLM read with no conversion:
    config.json (+ an "r1kit" block), model.safetensors or model-0000k-of-0000n.safetensors with
    model.safetensors.index.json, generation_config.json, tokenizer.json, tokenizer_config.json.

Each model family registers a `Family`: the HF architecture name, how to read and write its
config, and a name-map table from r1kit parameter names to HF tensor names. Loading checks
every field's type and every tensor's presence and shape, and fails with one line naming the
file and the key — never a silent partial load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r1kit.common import umask_mode
from r1kit.models.llama import Llama, LlamaConfig

try:
    import fcntl
except ImportError:  # Windows: no flock, so temporaries are never judged stale
    fcntl = None


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed or does not match its config."""


# ---------------------------------------------------------------------------------------------
# Config fields, checked one by one
# ---------------------------------------------------------------------------------------------
REQUIRED = object()
_TYPES = {int: "an integer", float: "a number", bool: "true/false", str: "a string",
          dict: "an object", list: "a list"}


def field(d: dict, key: str, typ, default: Any = REQUIRED, where: str = "config.json"):
    """d[key] checked against `typ` (a type or tuple); None is allowed only as a default."""
    if key not in d or (d[key] is None and default is not REQUIRED):
        if default is REQUIRED:
            raise CheckpointError(f"{where}: missing required field '{key}'")
        return default
    v, types = d[key], typ if isinstance(typ, tuple) else (typ,)
    ok = any(isinstance(v, t) and not (isinstance(v, bool) and t in (int, float)) for t in types)
    if float in types and isinstance(v, int) and not isinstance(v, bool):
        v, ok = float(v), True
    if not ok:
        want = " or ".join(_TYPES.get(t, t.__name__) for t in types)
        raise CheckpointError(f"{where}: field '{key}' must be {want}, got {json.dumps(v)}")
    return v


def read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:  # a binary file (a .gguf, a .safetensors) given where JSON belongs
        raise CheckpointError(f"{path}: not a JSON file (not UTF-8 text)") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return d


def rope_from_hf(d: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers 5's `rope_parameters` or the older keys."""
    if isinstance(d.get("rope_parameters"), dict):
        rp = dict(d["rope_parameters"])
        theta = field(rp, "rope_theta", float, 10000.0, f"{where} rope_parameters")
        rp.pop("rope_theta", None)
        kind = rp.get("rope_type", rp.get("type", "default"))
        return theta, (rp if kind != "default" else None)
    theta = field(d, "rope_theta", float, 10000.0, where)
    scaling = field(d, "rope_scaling", dict, None, where)
    return theta, scaling


def rope_to_hf(theta: float, scaling: dict | None) -> dict:
    """Both spellings, so transformers 4.x, 5.x and vLLM all read the same rope."""
    params = {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
    return {"rope_theta": theta, "rope_scaling": scaling, "rope_parameters": params}


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------
@dataclass
class Family:
    arch: str
    model_type: str
    config_from_hf: Callable[[dict, str], Any]
    config_to_hf: Callable[[Any], dict]
    name_map: list[tuple[str, str]]  # (r1kit template, HF template); "{i}" is the layer index
    model_cls: type


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> None:
    FAMILIES[family.arch] = family


# families that live in their own module register themselves when it is imported
FAMILY_MODULES = {"DeepseekV3ForCausalLM": "r1kit.formats.hf_deepseek"}


def family_for(arch: str, where: str) -> Family:
    if arch not in FAMILIES and arch in FAMILY_MODULES:
        import importlib
        importlib.import_module(FAMILY_MODULES[arch])
    if arch not in FAMILIES:
        raise CheckpointError(f"{where}: unknown architecture {arch!r}; "
                              f"supported: {', '.join(sorted({*FAMILIES, *FAMILY_MODULES}))}")
    return FAMILIES[arch]


def family_of(model) -> Family:
    return family_for(model.config.architecture, "model")


DENSE_NAME_MAP = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attn.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.wq.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("layers.{i}.attn.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attn.wk.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("layers.{i}.attn.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attn.wv.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("layers.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.attn.wo.bias", "model.layers.{i}.self_attn.o_proj.bias"),
    ("layers.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("layers.{i}.attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.ffn.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.ffn.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.ffn.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("head.weight", "lm_head.weight"),
]

_DENSE = {  # per architecture: (model_type, q/k/v bias rule, QK-norm)
    "LlamaForCausalLM": ("llama", "config", False),
    "Qwen2ForCausalLM": ("qwen2", "always", False),
    "Qwen3ForCausalLM": ("qwen3", "config", True),
}


def dense_config_from_hf(d: dict, where: str) -> LlamaConfig:
    arch = d["architectures"][0]
    _, bias_rule, qk_norm = _DENSE[arch]
    f = lambda k, t, default=REQUIRED: field(d, k, t, default, where)  # noqa: E731
    if f("hidden_act", str, "silu") != "silu":
        raise CheckpointError(f"{where}: field 'hidden_act' must be \"silu\" for {arch}")
    if f("mlp_bias", bool, False):
        raise CheckpointError(f"{where}: field 'mlp_bias' = true is not supported")
    if f("use_sliding_window", bool, False):
        raise CheckpointError(f"{where}: field 'use_sliding_window' = true is not supported")
    attn_bias = f("attention_bias", bool, False)
    theta, scaling = rope_from_hf(d, where)
    heads = f("num_attention_heads", int)
    known = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
             "rope_scaling", "rope_parameters", "attention_bias", "tie_word_embeddings", "architectures"}
    try:
        return LlamaConfig(
            vocab_size=f("vocab_size", int), hidden_size=f("hidden_size", int),
            intermediate_size=f("intermediate_size", int), num_hidden_layers=f("num_hidden_layers", int),
            num_attention_heads=heads, num_key_value_heads=f("num_key_value_heads", int, heads),
            head_dim=f("head_dim", int, None), max_position_embeddings=f("max_position_embeddings", int, 2048),
            rms_norm_eps=f("rms_norm_eps", float, 1e-6), rope_theta=theta, rope_scaling=scaling,
            attention_bias=attn_bias or bias_rule == "always", o_bias=attn_bias and arch == "LlamaForCausalLM",
            qk_norm=qk_norm, tie_word_embeddings=f("tie_word_embeddings", bool, False), architecture=arch,
            extra={k: v for k, v in d.items() if k not in known})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def dense_config_to_hf(c: LlamaConfig) -> dict:
    model_type = _DENSE[c.architecture][0]
    d = {"architectures": [c.architecture], "model_type": model_type, "vocab_size": c.vocab_size,
         "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
         "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
         "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
         "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
         **rope_to_hf(c.rope_theta, c.rope_scaling), "hidden_act": "silu",
         "tie_word_embeddings": c.tie_word_embeddings}
    if model_type != "qwen2":  # Qwen2 has q/k/v bias by construction and no such field
        d["attention_bias"] = c.attention_bias
    extra = {k: v for k, v in c.extra.items() if k not in d}
    return {**extra, **d}


for _arch, (_mt, _, _) in _DENSE.items():
    register(Family(_arch, _mt, dense_config_from_hf, dense_config_to_hf, DENSE_NAME_MAP, Llama))


# ---------------------------------------------------------------------------------------------
# Name maps
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _template_regex(t: str) -> re.Pattern:
    """A name template → regex; "{i}" is a layer index, "{e}" an expert index."""
    return re.compile("^" + re.escape(t).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)") + "$")


def translate(name: str, name_map: list[tuple[str, str]], to_hf: bool) -> str | None:
    """Map one tensor name across the table (None when no row matches)."""
    for ours, hf in name_map:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        m = _template_regex(src).match(name)
        if m:
            for key, value in m.groupdict().items():
                dst = dst.replace("{" + key + "}", value)
            return dst
    return None


def hf_state_names(model) -> dict[str, str]:
    """{HF name: r1kit name} for every tensor the checkpoint must hold (tied head omitted)."""
    fam, out = family_of(model), {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name in model.state_dict():
        if tied and name == "head.weight":
            continue
        hf = translate(name, fam.name_map, to_hf=True)
        if hf is None:
            raise CheckpointError(f"parameter {name!r} has no entry in the {fam.arch} name map")
        out[hf] = name
    return out


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def read_config(path: Path):
    """config.json → (Family, model config)."""
    where = str(Path(path) / "config.json")
    d = read_json(Path(path) / "config.json")
    archs = field(d, "architectures", list, where=where)
    if not archs or not isinstance(archs[0], str):
        raise CheckpointError(f"{where}: field 'architectures' must be a non-empty list of names")
    fam = family_for(archs[0], where)
    return fam, fam.config_from_hf(d, where)


def tensor_files(path: Path) -> dict[str, Path]:
    """{HF tensor name: file} from the index (sharded) or the single model.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = field(read_json(index), "weight_map", dict, where=str(index))
        return {k: path / v for k, v in wm.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single}: not a readable safetensors file ({e})") from None


IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


def load_state(model, path: Path, dtype: torch.dtype) -> None:
    """Fill `model` from the directory's safetensors, checking presence, shapes and extras."""
    files, wanted = tensor_files(path), hf_state_names(model)
    sd = model.state_dict()
    # a tied checkpoint may still store its (identical) head: it is the embedding, nothing to load
    tied_head = translate("head.weight", family_of(model).name_map, True) \
        if getattr(model.config, "tie_word_embeddings", False) else None
    for hf in files:
        if hf not in wanted and not IGNORED_TENSORS.match(hf) and hf != tied_head:
            raise CheckpointError(f"{files[hf]}: unexpected tensor {hf!r} (not used by {model.config.architecture} "
                                  "with this config.json)")
    by_file: dict[Path, list[str]] = {}
    for hf in wanted:
        if hf not in files:
            where = path / ("model.safetensors.index.json" if (path / "model.safetensors.index.json").exists()
                            else "model.safetensors")
            raise CheckpointError(f"{where}: missing tensor {hf!r}")
        by_file.setdefault(files[hf], []).append(hf)
    for file, names in by_file.items():
        _load_file(file, names, wanted, sd, dtype)


def _load_file(file: Path, names: list[str], wanted: dict, sd: dict, dtype) -> None:
    try:
        with safe_open(file, "pt") as f, torch.no_grad():
            present = set(f.keys())
            for hf in names:
                if hf not in present:
                    raise CheckpointError(f"{file}: missing tensor {hf!r} (listed in the index)")
                t = f.get_tensor(hf)
                dst = sd[wanted[hf]]
                if tuple(t.shape) != tuple(dst.shape):
                    raise CheckpointError(f"{file}: tensor {hf!r} has shape {list(t.shape)}, "
                                          f"config.json implies {list(dst.shape)}")
                dst.copy_(t.to(dst.dtype))  # buffers kept in fp32 (router bias) stay fp32
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_model(path, device="cpu", dtype: torch.dtype = torch.float32):
    """Build the model a checkpoint directory describes and load its weights."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    fam, cfg = read_config(path)
    with torch.device("meta"):
        model = fam.model_cls(cfg)
    # weights are allocated once, uninitialised, then filled from the files
    model = model.to_empty(device=device).to(dtype)
    model.reset_buffers()  # non-persistent buffers (RoPE tables) were made on meta
    if getattr(cfg, "tie_word_embeddings", False):
        model.head.weight = model.embed.weight
    load_state(model, path, dtype)
    if (path / "generation_config.json").exists():  # the checkpoint's own sampling settings, kept for its next save
        model.generation_config = read_json(path / "generation_config.json")
    return model


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------
def save_model(model, path, shard_bytes: int = 4 << 30, dtype: torch.dtype | None = None,
               extra_config: dict | None = None, state_dict: dict | None = None) -> None:
    """Write config.json + safetensors (sharded above `shard_bytes`) into an existing directory.

    `state_dict`: the tensors to write when the model's own are shards (dist.full_state_dict).
    """
    path, fam = Path(path), family_of(model)
    names, sd = hf_state_names(model), (model.state_dict() if state_dict is None else state_dict)
    tensors = {hf: sd[ours].detach().to(dtype or sd[ours].dtype).contiguous().cpu() for hf, ours in names.items()}
    cfg = fam.config_to_hf(model.config)
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    cfg["r1kit"] = {**cfg.get("r1kit", {}), **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shards, cur, size = [], {}, 0
    for hf, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[hf], size = t, size + nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        _save_safetensors(shards[0], path / "model.safetensors", meta)
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _save_safetensors(shard, path / fname, meta)
        weight_map.update({hf: fname for hf in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save_safetensors(tensors: dict, file: Path, meta: dict) -> None:
    save_file(tensors, file, metadata=meta)
    os.chmod(file, umask_mode())  # safetensors creates 0600; a checkpoint is read by other users and tools


def atomic_dir(path) -> "AtomicDir":
    return AtomicDir(Path(path))


class AtomicDir:
    """Write into a temporary sibling, then swap it in: readers never see half a checkpoint.

    Durable as well as atomic: every file and directory of the new checkpoint is fsynced before
    the rename and the parent after it, so a power cut cannot leave a renamed-in directory of
    empty files. While it is written, the temporary directory holds an flock; temporaries that
    hold none were left by a killed writer and are removed by the next save or load of this path
    (`recover_swap`) — they are model-sized.
    """

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        parent = self.path.parent
        if not parent.is_dir():
            raise CheckpointError(f"{parent}: output directory does not exist")
        recover_swap(self.path)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=parent))
        os.chmod(self.tmp, umask_mode(0o777))  # mkdtemp's 0700 would hide the checkpoint from other users
        self.lock = _lock(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            fsync_tree(self.tmp)
            old = None
            if self.path.exists():
                old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)  # the renames themselves
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False
        finally:
            os.close(self.lock)


def _lock(directory: Path) -> int:
    """An fd on `directory` holding an exclusive flock (released when the fd closes or the process dies)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a filesystem without flock: write unlocked; _in_use then never calls it stale
        pass
    return fd


def _in_use(directory: Path) -> bool:
    """Whether a live writer holds `directory`'s flock. Unsure (no flock support) counts as in use:
    deleting a live writer's files is far worse than leaving a dead one's."""
    if fcntl is None:
        return True
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:  # BlockingIOError: held by a live writer; others: flock unsupported here
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first, `root` last) under `root`."""
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(here))


def recover_swap(path) -> None:
    """Put `path` back in order before it is read or written again.

    A crash between moving the old checkpoint aside and moving the new one in leaves `path`
    missing while `.NAME.old-PID` still holds the last good checkpoint: move it back. Temporaries
    no live writer holds (`.NAME.tmp-*`) and old copies of a completed swap are removed.
    """
    path = Path(path)
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not path.exists() and olds:
        os.replace(olds.pop(), path)
    for stale in [*olds, *(t for t in path.parent.glob(f".{path.name}.tmp-*") if t.is_dir() and not _in_use(t))]:
        shutil.rmtree(stale, ignore_errors=True)
