"""CPU kernels: `linear` (= F.linear), `attention` (= SDPA), a Llama decode step's layers, RMSNorm, SwiGLU's
gate and the untruncated draw of sampling.py, in C++; and the choice of the CPU's fp32 GEMM (MKL or oneDNN).

A decode step multiplies a handful of rows (one per sequence in the batch) by every weight matrix, and
attends from one new query per row over the KV cache. Measured on the 2-core AVX2 box (one thread):
- matmuls (a weight matrix per layer, so nothing stays in cache): one core streams memory at 13 GB/s,
  but MKL's sgemm behind `F.linear` reads the weights at only ≈ 3.7 GB/s with 16 rows (≈ 30 GFLOP/s of
  the 87 a large matmul reaches) — at 16 rows a matmul needs 8 FLOP per weight byte, so neither memory
  nor the FMA units are what stops it. `csrc/skinny_linear.cpp` packs each weight once per decode session
  (`WeightPacks`: column panels, K-major) and streams the panels once per call, an outer product per k with
  no horizontal sums — on a Zen 4 core with AVX-512, 89–105 GFLOP/s at 4–64 rows on three bench shapes in
  cache where the earlier in-place dot-product kernel reached 71–90 (its 4 × 4 tiles paid a horizontal
  sum per output); the fused decode call of the medium config 1.25× faster at 16 rows, the SmolLM2 shape's
  1.20× (in-process A/B). Each panel prefetches the next, and a call's last panel the next matmul's first
  (the fused decode call passes it): weights streamed from memory at 16 rows 1.2–1.4× faster than without.
  The price: a packed copy of those weights while a session lives.
- attention: a decode query does 4 FLOP per cached float, so reading the cache is its whole cost;
  torch's CPU SDPA reads it at 2.4–4.8 GB/s, a plain pass over the same cache slices runs at 7–11.
  `csrc/decode_attention.cpp` reads each row's keys and values once for all its query heads, only up
  to the last key a query may see: ≈ 2× SDPA's speed at the race's and the SmolLM2 shape's decode.

- the layers: at these sizes most of a decode step is per-op cost (≈ 15 torch ops a layer at 5–15 µs of
  Python and dispatch each, whatever their size). `csrc/llama_decode.cpp` runs every layer of a plain
  Llama-family decode step in one call (`decode_layers`, from Llama.forward): norms, RoPE, the KV write and
  the residuals as loops around the matmul and attention kernels above — the race's tiny model decodes
  1.6–1.8× faster a step (16 and 128 rows), tokens equal to the module layers' (tests/test_kernels.py).

- the GEMM outside the decode kernel (`linear` everywhere else: trainers' forwards and backwards, prefill, the
  fused decode's matmuls past the skinny kernel's rows): MKL's sgemm takes its AVX2 code on CPUs that are not
  Intel's, oneDNN (in every torch build, `torch.ops.mkldnn._linear_pointwise`) its AVX-512 code. On a Zen 5
  core a GRPO step's shapes ran 2–3× faster forward and dx, 1.3–1.7× dW; `onednn_gemm` says which one a
  process uses (R1KIT_CPU_GEMM=auto|onednn|mkl), once, so π_θ, π_old and π_ref stay one function.
- the skinny matmul and the 16-wide CPU: where the CPU has AVX-512, `skinny_linear` runs 16-wide tiles on
  48-column panels (AVX2: 16-column panels); both widths are tested against fp64, and give the same bits.
  The width follows torch's CPU capability, so `ATEN_CPU_CAPABILITY=avx2` runs a process's CPU code as on an
  AVX2-only CPU (torch's kernels, this width, MKL's GEMM): how bench/ measures the AVX2 box on an AVX-512 one.
- sampling (`sample_untruncated`, sampling.py's greedy and untruncated rows on a CPU): one pass per row where
  the torch path is ~20 ops — 29 against 194 µs at 16 rows × 512 ids, 0.54 against 3.6 ms over 49k ids.
- SwiGLU (`swiglu`, every Llama MLP on a CPU in fp32, trainers included): silu(a)·b and its two gradients in one
  pass each, where autograd runs five elementwise passes (3–9% of the race's training forward + backward).
- RMSNorm (`rms_norm`, every RMSNorm of the Llama file on a CPU in fp32, trainers' forwards and backwards
  included, unlike the two above): torch 2.13's backward of F.rms_norm is its composite's (≈ 6 ms on a
  GRPO step's 5k × 128 activations); `csrc/rms_norm.cpp` does forward and backward in one pass each, dw
  summed in blocks fixed by the row count (the same bits on any number of threads).

The kernels are compiled on first use by torch's C++-extension loader (≈ 70 s once, cached under
TORCH_EXTENSIONS_DIR; it needs a C++ compiler and ninja — `pip install ninja` where the system has
none). They are used only where asked for and where they apply: inside `decode_kernels()` (the engine's
prefill and decode forwards, MTP speculation; per thread, so an async trainer's thread is not
affected), on the CPU, fp32, no autograd, not while torch.compile traces, and for `linear` at most
`MAX_ROWS` rows, for `attention` at most `MAX_QUERIES` queries per row. Everywhere else these are
`F.linear` and `F.scaled_dot_product_attention` — every forward of a trainer in particular, so π_θ,
π_old and π_ref stay one function, bit for bit (a ratio of exactly 1 on-policy, a KL of exactly 0 at
step 0). Each output is summed in the same order whatever the other rows, so decoding through them is
batch-invariant. No compiler, no AVX2 or `R1KIT_CPU_KERNELS=0`: one warning (none when switched off)
and the torch functions from then on.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_ROWS = 64  # above this MKL's sgemm is as fast (bench/generate.py, batch 64 at the layers' shapes)
# between SMALL_ROWS and MAX_ROWS rows MKL's blocking wins on a weight that stays in the 1 MB L2 (the kernel's
# gain is streaming a weight from memory once): at 64 rows a 128 × 128 weight runs at 66 GFLOP/s in MKL,
# 52 in the kernel; a 688 × 256 one (704 KB) at 57 in MKL, 63 in the kernel
SMALL_ROWS, CACHED_WEIGHT = 16, 1 << 17  # rows; weight elements (512 KB in fp32)
# the 16-wide kernel (AVX-512) stays ahead of MKL and oneDNN on every weight up to 48 rows (Zen 5, one thread:
# 128 × 128 at 32 rows 102 GFLOP/s against oneDNN's 57 and MKL's 76; 688 × 256 at 48 rows 140 against 153 / 85)
WIDE_SMALL_ROWS = 48
# on an Intel core MKL runs its own AVX-512 code, and it overtakes the kernel sooner, streamed weights included
# (Xeon with AVX-512, one thread, weights out of L2 — kernel / MKL GFLOP/s: 512 × 1376 at 24 rows 65 / 59, at 32
# 68 / 72, at 48 72 / 95; 49152 × 576 at 24 rows 68 / 56, at 48 84 / 75, at 64 91 / 92; 128 × 128 at 32 73 / 77)
INTEL_WIDE_ROWS = 24
MAX_QUERIES = 4  # queries per row: decode (1), MTP verification; above ≈ 8 SDPA is faster (its GEMM reuses keys)
_SOURCES = [Path(__file__).with_name("csrc") / f for f in ("module.cpp", "skinny_linear.cpp", "decode_attention.cpp",
                                                                "llama_decode.cpp", "rms_norm.cpp", "sampling.cpp",
                                                                "swiglu.cpp")]
_state: dict = {"tried": False, "module": None, "rows": (SMALL_ROWS, MAX_ROWS)}
_local = threading.local()  # .on: this thread is inside decode_kernels(); .packs: that block's WeightPacks
_PLAIN = (torch.Tensor, nn.Parameter)  # not a tensor subclass (DTensor, fake tensors): those go to torch


class WeightPacks:
    """The weights of a decode session packed for the skinny kernel (csrc/skinny_linear.cpp's column panels),
    each packed on first use and again when its version moves (an optimizer step, a load_state_dict) or the
    vector width changed. A session is the engine's Batch (a generate call, a server's running batch): the
    copies live as long as it does — as much memory again as the weights the kernel takes. A write that
    bypasses the version counter (`weight.data.copy_(…)`) during a session is not seen: start a new one."""

    def __init__(self):
        self._packs: dict[int, tuple] = {}  # id(weight) → (weakref to it, its _version, panels)

    def get(self, weight: torch.Tensor, panel: int = 0) -> torch.Tensor:
        """weight (N, K) → its panels (P, K, C) for the vector width in use (panel: its C, when the caller has it)."""
        version = -1 if weight.is_inference() else weight._version  # inference tensors keep no version
        hit = self._packs.get(id(weight))
        if hit is not None and hit[0]() is weight and hit[1] == version and hit[2].shape[2] == (panel or _panel()):
            return hit[2]
        packed = _state["module"].pack_weight(weight)
        self._packs[id(weight)] = (weakref.ref(weight), version, packed)
        return packed


def _panel() -> int:
    return 48 if _state["module"].vector_width() == 512 else 16


@contextlib.contextmanager
def decode_kernels(packs: WeightPacks | None = None):
    """Within this block, this thread's `linear` and `attention` calls take the kernels where they apply;
    `linear`'s packed weights are kept in `packs` (a session's: see WeightPacks), else in one for this block."""
    before = getattr(_local, "on", False), getattr(_local, "packs", None)
    _local.on, _local.packs = True, packs if packs is not None else WeightPacks()
    try:
        yield
    finally:
        _local.on, _local.packs = before


def _module():
    """The compiled extension, built on first call; None when it cannot be (said once)."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get("R1KIT_CPU_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.warning("r1kit: this CPU has no AVX2; decode steps use F.linear and SDPA")
        return None
    try:
        from torch.utils.cpp_extension import load
        log.info("r1kit: compiling the CPU decode kernels (once, about a minute)")
        _state["module"] = load("r1kit_cpu_kernels", [str(f) for f in _SOURCES], verbose=False,
                                # -fopenmp: at::parallel_for splits the tiles over torch's threads only
                                # when the extension itself is built with OpenMP (else one thread runs all)
                                extra_cflags=["-O3", "-mavx2", "-mfma", "-std=c++17", "-fopenmp"],
                                extra_ldflags=["-fopenmp"])
        if torch.backends.cpu.get_cpu_capability() != "AVX512":  # torch's own kernels run AVX2 code (the CPU
            _state["module"].set_vector_width(256)  # has no AVX-512, or ATEN_CPU_CAPABILITY=avx2): so do these
        _state["rows"] = row_limits(_state["module"].vector_width(), _cpu_vendor())
    except Exception as e:  # noqa: BLE001 — any build failure (no compiler, no ninja) means: use torch's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("r1kit: the CPU decode kernels did not build (%s); decode steps use F.linear and SDPA", first)
    return _state["module"]


def _switched_on(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The rules both kernels share: inside decode_kernels(), no autograd, eager, CPU fp32 plain tensors.
    Written out check by check: this runs before every matmul of a decode step (µs count there)."""
    return (getattr(_local, "on", False) and not torch.is_grad_enabled()
            and a.dtype is torch.float32 and b.dtype is torch.float32
            and type(a) in _PLAIN and type(b) in _PLAIN and a.device.type == "cpu" and b.device.type == "cpu"
            and not torch.compiler.is_compiling())


def row_limits(width: int, vendor: str) -> tuple[int, int]:
    """(rows up to which `linear` always takes the kernel, rows up to which it takes it for a weight of at least
    CACHED_WEIGHT elements), for the kernel's vector width and the CPU's vendor (whose GEMM it competes with).

    >>> row_limits(256, "AuthenticAMD"), row_limits(512, "AuthenticAMD"), row_limits(512, "GenuineIntel")
    ((16, 64), (48, 64), (24, 24))
    """
    if width != 512:
        return SMALL_ROWS, MAX_ROWS
    return (INTEL_WIDE_ROWS, INTEL_WIDE_ROWS) if vendor == "GenuineIntel" else (WIDE_SMALL_ROWS, MAX_ROWS)


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` takes the kernel (see the module docstring for the rules): up to the
    first of row_limits' rows always, up to the second only for a weight of at least CACHED_WEIGHT elements."""
    if not _switched_on(x, weight) or _module() is None:  # (built first: it sets the rows)
        return False
    return _rows_fit(x, weight)


def _rows_fit(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """uses_kernel's rules past the shared ones: the rows, K and the weight's size."""
    if x.shape[-1] < 8:
        return False
    rows = x.numel() // x.shape[-1]
    small, streamed = _state["rows"]
    return (0 < rows <= streamed and (rows <= small or weight.numel() >= CACHED_WEIGHT)
            and x.is_contiguous() and weight.is_contiguous())


def uses_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attention(q, k, v, mask)` takes the kernel: up to MAX_QUERIES queries per row with a mask
    (one without), grouped heads, head dims that are multiples of 8, contiguous last axes — the kernel's
    own check (csrc/decode_attention.cpp), which is the one that decides."""
    return _attention_on(q, k, v) and _state["module"].decode_attention_applies(q, k, v, mask, MAX_QUERIES)


def _attention_on(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The shared rules for q, k, v and a built kernel; the rest of the contract is the kernel's own check."""
    return _switched_on(q, k) and type(v) in _PLAIN and _module() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (…, K) @ weight (N, K)ᵀ + bias (N,) → (…, N); equal to F.linear up to summation order."""
    if uses_kernel(x, weight):
        return _state["module"].skinny_linear(x, _local.packs.get(weight), weight.shape[0],
                                              None if bias is None else bias.contiguous())  # (…, N)
    if (_plain_cpu_fp32(x, weight) and (bias is None or _plain_cpu_fp32(bias)) and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and onednn_gemm()):  # (no empty matmul; autocast: F.linear's)
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _plain_cpu_fp32(*tensors: torch.Tensor) -> bool:
    """fp32 plain tensors (no subclass: DTensor, fake tensors) on the CPU, outside a torch.compile trace."""
    return all(t.dtype is torch.float32 and type(t) in _PLAIN and t.device.type == "cpu" for t in tensors) and (
        not torch.compiler.is_compiling())


def onednn_gemm() -> bool:
    """Whether CPU fp32 matmuls outside the decode kernel go through oneDNN rather than MKL (F.linear).

    R1KIT_CPU_GEMM = auto (default) | onednn | mkl. auto takes oneDNN on x86 CPUs with AVX-512 that are not
    Intel's: MKL runs its AVX2 code there, oneDNN its AVX-512 code — measured on a Zen 5 core, one thread,
    a GRPO step's shapes (4930 rows × 128–352): forward and dx 160–200 GFLOP/s against MKL's 55–80, dW
    105–140 against 82–86 (bench/generate.py prints which one ran). Decided once per
    process, so every forward of a run — π_θ, π_old, π_ref — is one function."""
    if "gemm" not in _state:
        choice = os.environ.get("R1KIT_CPU_GEMM", "auto")
        if choice not in ("auto", "onednn", "mkl"):
            raise ValueError(f"R1KIT_CPU_GEMM={choice!r}: expected auto, onednn or mkl")
        usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        if choice == "auto":
            choice = "onednn" if torch.backends.cpu.get_cpu_capability() == "AVX512" and _cpu_vendor() not in (
                "GenuineIntel", "") else "mkl"
        _state["gemm"] = choice == "onednn" and usable
    return _state["gemm"]


def _cpu_vendor() -> str:
    """x86 vendor id (AuthenticAMD, GenuineIntel, …) from /proc/cpuinfo; "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _dnn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's x @ weightᵀ (+ bias): x (…, K), weight (N, K), any strides → (…, N)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with forward and both backward matmuls by oneDNN (see onednn_gemm)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dnn(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        rows = dy.reshape(-1, dy.shape[-1])  # (M, N)
        if ctx.needs_input_grad[0]:
            dx = _dnn(dy, weight.t(), None)  # (…, N) @ (N, K) → (…, K)
        if ctx.needs_input_grad[1]:
            dw = _dnn(rows.t(), x.reshape(-1, x.shape[-1]).t(), None)  # (N, M) @ (M, K) → (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = rows.sum(0)
        return dx, dw, db


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v, as F.scaled_dot_product_attention: the one attention of every forward.

    q (B, H, Tq, Dk), k (B, Hkv, Tk, Dk), v (B, Hkv, Tk, Dv) with H a multiple of Hkv (grouped-query
    heads share a KV head); mask (B, 1, Tq, Tk), additive float or boolean (True = attend), or None:
    causal over Tq > 1 queries, everything for one. scale: default 1/sqrt(Dk). → (B, H, Tq, Dv).
    """
    if _attention_on(q, k, v):
        out = _state["module"].decode_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale,
                                                MAX_QUERIES)
        if out is not None:  # None: outside the kernel's contract (uses_attention_kernel)
            return out
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def decode_layers(x: torch.Tensor, weights: list, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, heads: tuple[int, int], eps: float,
                  scale: float) -> torch.Tensor | None:
    """Every decoder layer of a Llama-family decode step in one call (csrc/llama_decode.cpp), or None where
    the kernels are off or do not apply — the caller then runs its layers. x (B, 1, d); weights: LAYER_SLOTS
    per layer (None where absent); caches (L, B, Hkv, max_len, D); pos (B, 1); cos, sin (B, 1, 1, D);
    mask (B, 1, 1, Tk) additive float; heads = (query heads, KV heads). Each matmul inside takes the skinny
    kernel exactly where `linear` would (uses_kernel on layer 0's weights: every layer has their shapes)."""
    if not (layers_apply(x, k_cache) and mask.dtype is torch.float32
            and all(w is None or (type(w) in _PLAIN and w.dtype is torch.float32 and w.is_cpu and w.is_contiguous())
                    for w in weights)):
        return None
    rows = x.view(x.shape[0], -1)
    n = len(LAYER_SLOTS)
    # layer 0's (the shared rules hold: layers_apply checked them on x, the line above on every weight)
    skinny = [w is not None and w.dim() == 2 and _rows_fit(rows, w) for w in weights[:n]]
    packs, panel = _local.packs, _panel()
    packed = [packs.get(w, panel) if skinny[i % n] else None for i, w in enumerate(weights)]
    return _state["module"].llama_decode_layers(x, weights, k_cache, v_cache, pos, cos, sin, mask, heads[0],
                                                heads[1], eps, scale, packed, onednn_gemm(), MAX_QUERIES)


def layers_apply(x: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The cheap half of decode_layers' rules, checked before a model gathers its weights for it."""
    return _switched_on(x, k_cache) and x.dim() == 3 and x.shape[1] == 1 and _module() is not None


# the order of one layer's weights in decode_layers' list (csrc/llama_decode.cpp's Slot)
LAYER_SLOTS = ("attn_norm", "wq", "bq", "wk", "bk", "wv", "bv", "q_norm", "k_norm", "wo", "bo", "ffn_norm",
               "w1", "w2", "w3")


def sample_untruncated(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                       u: torch.Tensor):
    """sampling.py's untruncated and greedy draw (csrc/sampling.cpp) → (tokens (n,), log-probs (n,)), or None
    where it does not apply: a sampled row truncated (top_p < 1 or top_k > 0: the kernel checks), or not CPU
    fp32 contiguous (n, V) plain logits, inside a torch.compile trace, not built. Not tied to
    decode_kernels(): no trainer samples, so no forward of one can tell."""
    if not (logits.dim() == 2 and _plain_cpu_fp32(logits) and logits.is_contiguous() and logits.shape[1] > 0
            and all(t.device.type == "cpu" for t in (temperature, top_p, top_k, u)) and _module() is not None):
        return None
    return tuple(_state["module"].sample_untruncated(logits, temperature, top_p, top_k, u)) or None


class _RMSNorm(torch.autograd.Function):
    """csrc/rms_norm.cpp's forward and backward (torch's backward of F.rms_norm is its composite's)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _state["module"].rms_norm_forward(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = _state["module"].rms_norm_backward(x, weight, dy.contiguous(), ctx.eps)
        return dx, dw, None


class _SwiGLU(torch.autograd.Function):
    """csrc/swiglu.cpp's silu(a) · b and its backward, one pass each."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _state["module"].swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        da, db = _state["module"].swiglu_backward(a, b, dy.contiguous())
        return da, db


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.silu(a) * b (SwiGLU's gate): by the C++ kernel for contiguous fp32 CPU plain tensors of one shape —
    every forward there, trainers' included — else torch's two ops."""
    if (_plain_cpu_fp32(a, b) and a.shape == b.shape and a.is_contiguous() and b.is_contiguous()
            and _module() is not None):
        return _SwiGLU.apply(a, b)
    return F.silu(a) * b


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (n,), weight, eps) over x's last axis, by the C++ kernel for contiguous fp32 CPU plain
    tensors — every forward there, trainers' included (π_θ, π_old and π_ref normalise alike) — else torch's."""
    if _plain_cpu_fp32(x, weight) and x.is_contiguous() and weight.is_contiguous() and _module() is not None:
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):  # no graph to record:
            return _state["module"].rms_norm_forward(x, weight, eps)  # the Function's ≈ 12 µs a call saved
        return _RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names, so checkpoints and peft see one) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
