"""The 32-value block quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), byte-identical to ggml's reference.

These are what llama.cpp falls back to when a row is not a multiple of 256 (SmolLM2's 576-wide
rows: two thirds of its tensors), so they set the export time of most small real models. The
`gguf` package implements them in NumPy over the whole tensor at once; the same float32 maths in
torch, a few thousand blocks at a time so temporaries stay in cache, runs 2–3× faster on one core.

Every step is ggml's `quantize_row_*_ref` arithmetic in float32 (no reduction here sums floats,
so order cannot change a result):
    Q8_0  d = amax/127,            q = roundf(x/d)                       (roundf: halves away from 0)
    Q5_0  d = x[argmax |x|] / -16, q = min(31, (int)(x/d + 16.5))
    Q5_1  d = (max−min)/31,        q = (int)((x−min)/d + 0.5),  m = min
    Q4_0  d = x[argmax |x|] / -8,  q = min(15, (int)(x/d + 8.5))
    Q4_1  d = (max−min)/15,        q = min(15, (int)((x−min)/d + 0.5)), m = min
with 1/d taken as 0 for an all-zero block, (int) truncating toward zero, and d, m stored as fp16
(round to nearest even, like ggml's FP32_TO_FP16). roundf is computed as trunc(v ± 0.5) in
float64, where the addition is exact — in float32, v = 0.49999997 would round up.
"""
from __future__ import annotations

import numpy as np
import torch

CHUNK_BLOCKS = 4096  # 128 K floats per chunk
BLOCK_BYTES = {"Q8_0": 34, "Q5_0": 22, "Q5_1": 24, "Q4_0": 18, "Q4_1": 20}
_SHIFTS = torch.arange(32, dtype=torch.int64)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.half().view(torch.uint8)  # (n, 1) → (n, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (n, 32) in 0..15 (low bits used) → (n, 16): value j in the low nibble, j + 16 in the high."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """q (n, 32) in 0..31 → (n, 4): bit 4 of value j at bit j of a little-endian uint32."""
    word = ((q >> 4).to(torch.int64) << _SHIFTS).sum(1)  # (n,) < 2^32
    return word.to(torch.int32).view(torch.uint8).view(-1, 4)  # x86 and ARM are little-endian, as GGUF is


def _abs_max_signed(c: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per block, sign kept (first one on ties, like ggml's loop)."""
    return c.gather(1, c.abs().argmax(1, keepdim=True))


def _q8_0(c, out):
    d = c.abs().amax(1, keepdim=True) / 127
    v = (c * _inverse(d)).double()
    v += torch.copysign(torch.tensor(0.5, dtype=torch.float64), v)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:] = v.to(torch.int8).view(torch.uint8)


def _q5_0(c, out):
    d = _abs_max_signed(c) / -16
    q = (c * _inverse(d) + 16.5).to(torch.uint8).clamp_(max=31)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:6] = _high_bits(q)
    out[:, 6:] = _nibbles(q)


def _q5_1(c, out):
    lo, hi = c.amin(1, keepdim=True), c.amax(1, keepdim=True)
    d = (hi - lo) / 31
    q = ((c - lo) * _inverse(d) + 0.5).to(torch.uint8)
    out[:, :2], out[:, 2:4] = _fp16_bytes(d), _fp16_bytes(lo)
    out[:, 4:8] = _high_bits(q)
    out[:, 8:] = _nibbles(q)


def _q4_0(c, out):
    d = _abs_max_signed(c) / -8
    q = (c * _inverse(d) + 8.5).to(torch.uint8).clamp_(max=15)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:] = _nibbles(q)


def _q4_1(c, out):
    lo, hi = c.amin(1, keepdim=True), c.amax(1, keepdim=True)
    d = (hi - lo) / 15
    q = ((c - lo) * _inverse(d) + 0.5).to(torch.uint8).clamp_(max=15)
    out[:, :2], out[:, 2:4] = _fp16_bytes(d), _fp16_bytes(lo)
    out[:, 4:] = _nibbles(q)


_KERNELS = {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_0": _q4_0, "Q4_1": _q4_1}


def quantize_legacy(x: np.ndarray, qtype: str) -> np.ndarray:
    """float32 (..., n) with n % 32 == 0 → uint8 (n_blocks, block bytes), ggml's block layout.

    >>> x = np.linspace(-1, 1, 64, dtype=np.float32)
    >>> from gguf.quants import quantize
    >>> from gguf import GGMLQuantizationType as QT
    >>> all(np.array_equal(quantize_legacy(x, t).ravel(), quantize(x, QT[t]).ravel()) for t in BLOCK_BYTES)
    True
    """
    kernel = _KERNELS[qtype]
    blocks = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 32)
    out = torch.empty((blocks.shape[0], BLOCK_BYTES[qtype]), dtype=torch.uint8)
    for a in range(0, blocks.shape[0], CHUNK_BLOCKS):
        kernel(blocks[a:a + CHUNK_BLOCKS], out[a:a + CHUNK_BLOCKS])
    return out.numpy()
