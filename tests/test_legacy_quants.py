"""The 32-value block quantizers against the gguf package's (checked against ggml's reference)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize as gguf_quantize

from r1kit.formats.legacy_quants import BLOCK_BYTES, CHUNK_BLOCKS, quantize_legacy


def hard_cases() -> np.ndarray:
    """Rows that reach every branch: zero blocks, ties for the largest magnitude, scaled values a hair
    below .5 (where float32 roundf shortcuts go wrong), constant blocks, huge and tiny scales."""
    rng = np.random.default_rng(0)
    rows = [np.zeros(32), np.full(32, 0.75), np.linspace(-1, 1, 32), -np.linspace(-1, 1, 32)]
    near_half = np.nextafter(np.float32(np.arange(31) + 0.5), np.float32(0))
    rows.append(np.concatenate([[127.0], near_half]))
    rows.append(np.concatenate([[-127.0], -near_half]))
    tie = rng.standard_normal(32)
    tie[3], tie[9] = 2.5, -2.5  # |max| tie: the first one sets the sign
    rows += [tie, rng.standard_normal(32) * 1e-30, rng.standard_normal(32) * 1e30]
    rows += list(rng.standard_normal((40, 32)) * rng.uniform(1e-3, 10, (40, 1)))
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("qtype", list(BLOCK_BYTES))
def test_byte_identical_to_gguf(qtype):
    rng = np.random.default_rng(1)
    big = rng.standard_normal((CHUNK_BLOCKS // 8 + 3, 8 * 32)).astype(np.float32) * 0.02  # > one chunk
    for x in (hard_cases(), big, rng.laplace(size=(7, 96)).astype(np.float32)):
        want = np.asarray(gguf_quantize(x, QT[qtype])).reshape(-1, BLOCK_BYTES[qtype])
        assert np.array_equal(quantize_legacy(x, qtype), want)
