"""CPU decode matmuls: `linear(x, W, b)` = F.linear, by an AVX2 kernel when a step has few rows.

A decode step multiplies a handful of rows (one per sequence in the batch) by every weight matrix.
Measured on the 2-core AVX2 box (one thread, a weight matrix per layer so nothing stays in cache):
one core streams memory at 13 GB/s, but MKL's sgemm behind `F.linear` reads the weights at only
≈ 3.7 GB/s with 16 rows (≈ 30 GFLOP/s of the 87 a large matmul reaches) — at 16 rows a matmul needs
8 FLOP per weight byte, so neither memory nor the FMA units are what stops it. `csrc/skinny_linear.cpp`
uses the weight in place and streams it once per call: 45–51 GFLOP/s at 16 rows over the bench
configs' weights against MKL's 21–31, about equal at 64 (bench/generate.py measures both in the engine).

The kernel is compiled on first use by torch's C++-extension loader (≈ 45 s once, cached under
TORCH_EXTENSIONS_DIR; it needs a C++ compiler and ninja — `pip install ninja` where the system has
none). It is used only where it is asked for and pays: inside `decode_matmuls()` (the engine's prefill
and decode forwards, MTP speculation; per thread, so an async trainer's thread is not affected), on the
CPU, fp32, no autograd, at most `MAX_ROWS` rows, not while torch.compile traces. Everywhere else this
is `F.linear` — every forward of a trainer in particular, so π_θ, π_old and π_ref stay one function,
bit for bit (a ratio of exactly 1 on-policy, a KL of exactly 0 at step 0). Each output is summed in
the same order whatever the other rows, so decoding through it is batch-invariant. No compiler, no
AVX2 or `R1KIT_CPU_KERNELS=0`: one warning (none when switched off) and `F.linear` from then on.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_ROWS = 64  # above this MKL's sgemm is as fast (bench/generate.py, batch 64 at the layers' shapes)
_SOURCE = Path(__file__).with_name("csrc") / "skinny_linear.cpp"
_state: dict = {"tried": False, "module": None}
_local = threading.local()  # .on: this thread is inside decode_matmuls()


@contextlib.contextmanager
def decode_matmuls():
    """Within this block, this thread's `linear` calls take the kernel where it applies."""
    before = getattr(_local, "on", False)
    _local.on = True
    try:
        yield
    finally:
        _local.on = before


def _module():
    """The compiled extension, built on first call; None when it cannot be (said once)."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get("R1KIT_CPU_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.warning("r1kit: this CPU has no AVX2; decode matmuls use F.linear")
        return None
    try:
        from torch.utils.cpp_extension import load
        log.info("r1kit: compiling the CPU decode kernel (once, about a minute)")
        _state["module"] = load("r1kit_skinny_linear", [str(_SOURCE)], verbose=False,
                                # -fopenmp: at::parallel_for splits the tiles over torch's threads only
                                # when the extension itself is built with OpenMP (else one thread runs all)
                                extra_cflags=["-O3", "-mavx2", "-mfma", "-std=c++17", "-fopenmp"],
                                extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 — any build failure (no compiler, no ninja) means: use F.linear
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("r1kit: the CPU decode kernel did not build (%s); decode matmuls use F.linear", first)
    return _state["module"]


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` takes the kernel (see the module docstring for the rules)."""
    return (getattr(_local, "on", False) and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and x.shape[-1] >= 8
            and 0 < x.numel() // x.shape[-1] <= MAX_ROWS
            and type(weight) in (torch.Tensor, nn.Parameter) and weight.is_contiguous()
            and not torch.compiler.is_compiling() and _module() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (…, K) @ weight (N, K)ᵀ + bias (N,) → (…, N); equal to F.linear up to summation order."""
    if not uses_kernel(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    y = _state["module"].skinny_linear(rows, weight, None if bias is None else bias.contiguous())  # (M, N)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and names, so checkpoints and peft see one) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
