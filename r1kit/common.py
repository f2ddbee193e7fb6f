"""Device, dtype, rank-0 printing and seeding — the few things every stage needs."""
from __future__ import annotations

import contextlib
import importlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist


def autodetect_device() -> torch.device:
    """cuda → mps → cpu, detected rather than assumed."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | None) -> torch.device:
    """`None`/"auto" → autodetect; anything else is passed to torch.device."""
    if name in (None, "", "auto"):
        return autodetect_device()
    return torch.device(name)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" → bf16 on a GPU that supports it, fp32 elsewhere (CPU training wants fp32)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "", "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def is_distributed() -> bool:
    """True when launched by torchrun (it sets these variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes checkpoints and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, so multi-process logs stay readable."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: what open() gives a new file (0o644 under umask 022).

    Writers that create files privately (mkstemp, safetensors: 0600) chmod them to this, so a
    checkpoint is readable like any other file its user writes.
    """
    try:  # Linux reports it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return mode & ~mask


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for bf16/fp16 (weights and optimizer stay fp32); a no-op for fp32."""
    if dtype in (torch.bfloat16, torch.float16) and device.type != "cpu":
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


# optional dependency (import name) → (the distribution to install, the r1kit extra that has it)
EXTRAS = {"gguf": ("gguf", "gguf"), "math_verify": ("math-verify", "math"), "sympy": ("sympy", "math"),
          "pyarrow": ("pyarrow", "math"), "fastapi": ("fastapi", "serve"), "uvicorn": ("uvicorn", "serve"),
          "httpx": ("httpx", "serve"), "llama_cpp": ("llama-cpp-python", "llama")}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message is one line naming the extra."""


def missing_extra(module: str, feature: str) -> MissingExtra:
    top = module.split(".")[0]
    dist_name, extra = EXTRAS[top]
    return MissingExtra(f"{feature} needs the '{dist_name}' package: pip install 'r1kit[{extra}]'", name=top)


def require(module: str, feature: str):
    """Import optional dependency `module` (its top-level package a key of EXTRAS), or raise
    MissingExtra naming its extra.

    Called right before the `import` lines of a module (or inside the function) that needs it, so
    a user without the extra gets one line, and everything else in r1kit still imports.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name not in (module, module.split(".")[0]):  # installed but broken inside: not a missing extra
            raise
        raise missing_extra(module, feature) from None
