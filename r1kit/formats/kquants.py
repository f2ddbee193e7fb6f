"""K-quant block maths (Q4_K, Q5_K, Q6_K), vectorised with NumPy.

The goal is byte identity with llama.cpp's reference quantizers (the path
``llama_model_quantize`` takes when no importance matrix is given), so every
quantity is computed with the same float32 operations in the same order:

* Products like ``w*l*x`` are evaluated left to right, one float32 rounding per
  operation (ggml-base is built without FMA contraction).
* Sums over the 32 (or 16) values of a sub-block are sequential. Sub-blocks are
  stored *column-wise* — shape ``(block_len, n_subblocks)`` — because NumPy reduces
  along axis 0 by adding rows one after another, which is exactly the C loop's
  order; a reduction along the contiguous last axis would use pairwise summation
  and drift by an ulp now and then, enough to flip a rounding decision.
* ``nearest_int`` (the 1.5*2**23 magic-number trick) is round-half-to-even below
  2**22, where ``np.rint`` is used; where a value can be arbitrarily large (after
  dividing by a tiny scale, or an iscale that overflowed) the bit trick itself is
  reproduced, garbage and all, so clamping gives the same answer.

Speed (one thread; the reference runs each sub-block's search as a C loop whose
sequential sums are bound by float-add latency, ~3.5 ns per value and step on the
bench machine for make_qkx2_quants, ~1.7 for make_qx_quants): here each search step is
~15 (Q4_K/Q5_K) or ~8 (Q6_K) whole-array NumPy passes vectorised across sub-blocks,
so what counts is the number of passes and of calls:

* A search step's levels are a pure function of its (iscale, shift) per column, so an
  improvement records those two numbers and levels are rebuilt once at the end, and
  only for sub-blocks whose stored scale is 0 (elsewhere the second pass re-quantises).
* ``fl(iscale*fl(x - mn))`` is monotone in x, so each column's min and max give the
  exact range of a step's values: the clamps, and the bit-exact ``nearest_int``, run
  only when some column reaches them.
* Per-column bookkeeping (a few thousand values) costs more in call overhead than in
  arithmetic: few calls per step, updates through index lists rather than masks.
* Chunks of 1024 super-blocks: smaller ones fit the L2 cache but pay more calls per
  value, which measured slower on this machine.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QK_K", "nearest_int", "quantize_k"]

QK_K = 256
_CHUNK_SUPERBLOCKS = 1024

_F32 = np.float32
_MAGIC = _F32(12582912.0)  # 1.5 * 2**23: adding it leaves round(v) in the low mantissa bits
_RINT_SAFE = _F32(4194304.0)  # beyond 2**22 the magic trick stops matching plain rounding
_GROUP_MAX_EPS = _F32(1e-15)

Q4_K_BYTES = 2 + 2 + 12 + QK_K // 2
Q5_K_BYTES = 2 + 2 + 12 + QK_K // 8 + QK_K // 2
Q6_K_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int`` bit for bit (also for huge / non-finite input), as float32."""
    bits = (np.asarray(v, dtype=_F32) + _MAGIC).view(np.int32)
    return ((bits & 0x007FFFFF) - 0x00400000).astype(_F32)


def _fp16_round_trip(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes as uint16, the fp16 value back in float32). NumPy's cast rounds to
    nearest even, as ggml's FP32_TO_FP16 does."""
    h = v.astype(np.float16)
    return h.view(np.uint16), h.astype(_F32)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    return np.add.reduce(a, axis=0)


def _columns(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """x (nb, 256) -> (xs, ext): xs (n, nb*256/n) with one sub-block of n values per column, and
    ext (2, columns), each column's min and max.

    The transpose is copied in slabs of 256 sub-blocks: one slab's source and destination stay
    in cache, where a whole-array copy re-reads each source line n times (2-3x slower).
    """
    rows = x.reshape(-1, n)  # (columns, n)
    xs = np.empty((n, rows.shape[0]), dtype=_F32)
    for j in range(0, rows.shape[0], 256):
        xs[:, j:j + 256] = rows[j:j + 256].T
    return xs, np.stack([xs.min(axis=0), xs.max(axis=0)])


def _rows_u8(L: np.ndarray) -> np.ndarray:
    """Levels L (n, m) in 0..255, one sub-block per column -> uint8 (m, n), one per row.

    Four levels are packed into a little-endian uint32 first, so the transpose moves a quarter
    as many elements: a byte-wise transpose is the slowest copy NumPy makes (~4x slower here).
    """
    n, m = L.shape
    w = L.astype("<u4").reshape(n // 4, 4, m)
    words = w[:, 0] | (w[:, 1] << 8) | (w[:, 2] << 16) | (w[:, 3] << 24)  # (n/4, m)
    return np.ascontiguousarray(words.T).view(np.uint8)  # (m, n)


def _qkx2_search(x, ext, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants for every column of x (block_len, m) at once; ext (2, m) holds each
    column's min and max.

    Returns (scale, the_min, levels): per column the scale and the (positive) offset, and
    `levels(cols)`, which rebuilds the winning step's levels in [0, nmax] for those columns (the
    caller needs them only where its second pass cannot re-quantise). A step's levels are a pure
    function of its (iscale, shift), so improvements record those two numbers instead of
    copying levels. Per-column work is kept to few NumPy calls: at a few thousand columns a
    call costs more than its arithmetic.
    """
    fnmax = _F32(nmax)
    mn = np.minimum(ext[0], _F32(0))
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    dead = ext[1] == mn  # all-equal columns: the reference returns L = 0, scale 0
    t, wl, wl2, wlx = (np.empty_like(x) for _ in range(4))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = ext[1] - mn
        iscale = fnmax / span
        scale = _F32(1) / iscale
        span[dead] = np.inf  # iscale 0 there: levels 0, so D = 0 and the column never improves
        iscale = fnmax / span
        lev_iscale, lev_shift = iscale.copy(), mn.copy()
        _levels(x, mn, iscale, ext, fnmax, t)
        best = _weighted_sq_err(scale, t, mn, x, w, out=wl)
        for step in range(nstep + 1):
            # `mn` may have moved to an earlier step's fitted min: the reference reuses it here
            iscale = np.divide(_F32(rmin) + _F32(rdelta) * _F32(step) + fnmax, span)
            _levels(x, mn, iscale, ext, fnmax, t)
            np.multiply(w, t, out=wl)
            np.multiply(wl, t, out=wl2)
            np.multiply(wl, x, out=wlx)
            sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl2), _seq_sum(wlx)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = np.flatnonzero(this_min > 0)
            if pos.size:
                this_min[pos] = 0
                this_scale[pos] = sum_xl[pos] / sum_l2[pos]
            cur = _weighted_sq_err(this_scale, t, this_min, x, w, out=wl)
            better = np.flatnonzero((D > 0) & (cur < best))
            if better.size:
                best[better] = cur[better]
                scale[better] = this_scale[better]
                lev_iscale[better] = iscale[better]
                lev_shift[better] = mn[better]  # the shift these levels were made with
                mn[better] = this_min[better]
                span[better] = ext[1, better] - mn[better]
    scale[dead] = 0

    def levels(cols):
        xc = x[:, cols]
        return _levels(xc, lev_shift[cols], lev_iscale[cols], ext[:, cols], fnmax, np.empty_like(xc))

    return scale, -mn, levels


def _levels(x, mn, iscale, ext, fnmax, out):
    """clamp(nearest_int(iscale*(x - mn)), 0, nmax) into `out`, for x (n, m) whose columns have
    minimum and maximum ext (2, m)."""
    np.subtract(x, mn, out=out)
    out *= iscale
    # fl(iscale*fl(x - mn)) is monotone in x: the columns' ends give its exact range
    ends = ext - mn
    ends *= iscale
    return _round_clamp(out, ends, _F32(0), fnmax)


def _round_clamp(v, ends, qmin, qmax):
    """clamp(nearest_int(v), qmin, qmax) in place, for v whose every value lies between the
    least and the largest of `ends`.

    The clamps, and the bit-exact nearest_int for values past 2**22, run only when some value
    reaches them; on the rest of the range rint is nearest_int and a clamp changes nothing.
    """
    lo, hi = ends.min(), ends.max()
    if not (lo > -_RINT_SAFE and hi < _RINT_SAFE):  # also catches NaN
        v[...] = nearest_int(v)
        return np.clip(v, qmin, qmax, out=v)
    np.rint(v, out=v)
    # rint may leave -0.0 where the reference has the integer 0: a zero level contributes a
    # zero product either way, and a column whose levels are all 0 has D = 0 and is skipped.
    # (One clip with float32 bounds: a one-sided np.minimum measured 2.5x slower.)
    if np.rint(lo) < qmin or np.rint(hi) > qmax:
        np.clip(v, qmin, qmax, out=v)
    return v


def _weighted_sq_err(scale, L, mn, x, w, out):
    # sum_i w_i * ((scale*L_i + mn) - x_i)**2, in the reference's operation order
    d = np.multiply(L, scale, out=out)
    d += mn
    d -= x
    d *= d
    d *= w
    return _seq_sum(d)


def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block -> the 12-byte K_SCALE layout."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _to_u6(v: np.ndarray) -> np.ndarray:
    # the reference stores nearest_int(...) into a uint8 (wrapping mod 256) and caps it at 63
    return np.minimum(v.astype(np.int32).astype(np.uint8), 63)


def _q45k_chunk(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K/Q5_K maths for x of shape (nb, 256): returns (d16, dmin16, scales12, L)."""
    nb = x.shape[0]
    xs, ext = _columns(x, 32)  # (32, nb*8), column = sub-block
    sum_x2 = _seq_sum(xs * xs)
    av_x = np.sqrt(sum_x2 / _F32(32))
    w = np.abs(xs)
    w += av_x
    scales, mins, levels = _qkx2_search(xs, ext, w, nmax, rmin, 0.1, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32)
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32)
    ls = _to_u6(nearest_int(inv_scale[:, None] * scales))
    lm = _to_u6(nearest_int(inv_min[:, None] * mins))
    d16, d = _fp16_round_trip(max_scale / _F32(63))
    dmin16, dmin = _fp16_round_trip(max_min / _F32(63))
    # second pass: re-quantise each value against the scale/min actually stored
    sub_d = (d[:, None] * ls.astype(_F32)).reshape(-1)
    sub_m = (dmin[:, None] * lm.astype(_F32)).reshape(-1)
    unscaled = np.flatnonzero(sub_d == 0)  # a zero stored scale keeps the search's own levels
    sub_d[unscaled] = np.inf  # (their values become 0 here, and are replaced below)
    L = _requantize(xs, ext, sub_m, sub_d, _F32(0), _F32(nmax))
    if unscaled.size:
        L[:, unscaled] = levels(unscaled)
    L8 = _rows_u8(L).reshape(nb, 4, 2, 32)
    return d16, dmin16, _pack_scales_mins(ls, lm), L8


def _requantize(xs, ext, shift, d, qmin, qmax):
    """clamp(nearest_int((x + shift)/d), qmin, qmax) per column of xs (n, m), as float32; no
    shift when `shift` is None."""
    if shift is None:
        return _round_clamp(xs / d, ext / d, qmin, qmax)  # fl(x/d) is monotone in x
    v = xs + shift
    v /= d
    return _round_clamp(v, (ext + shift) / d, qmin, qmax)


def _q4k_chunk(x: np.ndarray) -> np.ndarray:
    d16, dmin16, sc, L8 = _q45k_chunk(x, 15, -1.0, 20)
    nb = x.shape[0]
    qs = (L8[:, :, 0] | (L8[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2),
                           sc, qs], axis=1)


def _q5k_chunk(x: np.ndarray) -> np.ndarray:
    d16, dmin16, sc, L8 = _q45k_chunk(x, 31, -0.5, 15)
    nb = x.shape[0]
    qs = ((L8[:, :, 0] & 0xF) | ((L8[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    hi = L8 >> 4  # (nb, 4, 2, 32): bit for pair k, half h goes to bit 2k+h of qh
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.bitwise_or.reduce(hi << shifts[None, :, :, None], axis=(1, 2)).astype(np.uint8)
    return np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2),
                           sc, qh, qs], axis=1)


def _qx_search(x: np.ndarray, ext: np.ndarray):
    """make_qx_quants(16, 32, rmse_type=1) for every column of x (16, m); ext (2, m) holds each
    column's min and max.

    Returns (scale, levels): per column the scale, and `levels(cols)`, the winning step's levels
    in [0, 63] for those columns (recorded as that step's iscale, as in `_qkx2_search`).
    """
    nmax = _F32(32)
    # the value of largest |x| (the first one on ties, like the strict '>' scan): the column's
    # max or min, unless both have that magnitude (argmax along axis 0 is 30x slower than max)
    xmax = np.where(ext[1] > -ext[0], ext[1], ext[0])
    tie = np.flatnonzero(ext[1] == -ext[0])
    if tie.size:
        xt = x[:, tie]
        xmax[tie] = np.take_along_axis(xt, np.abs(xt).argmax(axis=0)[None, :], axis=0)[0]
    zero = np.abs(xmax) < _GROUP_MAX_EPS  # the reference returns L = 0, scale 0 for these
    t, p, q = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w = x * x
        wx = w * x  # w = x*x, then (w*x): the reference's two roundings of w*x[i]

        def sums(iscale):
            np.multiply(x, iscale, out=t)
            _round_clamp(t, ext * iscale, -nmax, nmax - 1)  # fl(iscale*x) is monotone in x
            np.multiply(wx, t, out=p)
            np.multiply(np.multiply(w, t, out=q), t, out=q)
            return _seq_sum(p), _seq_sum(q)

        xmax[zero] = np.inf  # iscale 0: levels 0, sums 0, so a zero column never improves
        iscale = -nmax / xmax
        sumlx, suml2 = sums(iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
        best = scale * sumlx
        lev_iscale = iscale.copy()
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = np.divide(-(nmax + _F32(0.1) * _F32(step)), xmax)
            sumlx, suml2 = sums(iscale)
            better = np.flatnonzero((suml2 > 0) & (sumlx * sumlx > best * suml2))
            if better.size:
                scale[better] = sumlx[better] / suml2[better]
                best[better] = scale[better] * sumlx[better]
                lev_iscale[better] = iscale[better]
    scale[zero] = 0

    def levels(cols):
        ic = lev_iscale[cols]
        lc = _round_clamp(x[:, cols] * ic, ext[:, cols] * ic, -nmax, nmax - 1)
        lc += nmax
        lc[:, zero[cols]] = 0
        return lc

    return scale, levels


def _q6k_chunk(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs, ext = _columns(x, 16)  # (16, nb*16), column = sub-block
    scales, levels = _qx_search(xs, ext)
    scales = scales.reshape(nb, 16)
    # the signed scale of largest magnitude (first one on ties) sets the super-block scale
    pick = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, pick[:, None], axis=1)[:, 0]
    empty = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F32(-128) / max_scale
        d16, d = _fp16_round_trip(_F32(1) / iscale)
        # MIN(127, nearest_int(..)) stored into an int8: wrap like the C assignment does
        sc = np.minimum(nearest_int(iscale[:, None] * scales), _F32(127))
        sc8 = sc.astype(np.int32).astype(np.int8)
        sub_d = (d[:, None] * sc8.astype(_F32)).reshape(-1)
        unscaled = np.flatnonzero(sub_d == 0)  # a zero stored scale keeps the search's levels
        sub_d[unscaled] = np.inf  # (their values become 0 here, and are replaced below)
        L = _requantize(xs, ext, None, sub_d, _F32(-32), _F32(31))
        L += _F32(32)
    if unscaled.size:
        L[:, unscaled] = levels(unscaled)
    L8 = _rows_u8(L).reshape(nb, 2, 4, 32)
    ql = ((L8[:, :, 0:2] & 0xF) | ((L8[:, :, 2:4] & 0xF) << 4)).reshape(nb, 128)
    hi = L8 >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc8.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)], axis=1)
    out[empty] = 0  # all-zero super-block: the reference writes zeros throughout
    return out


_CHUNK_FNS = {"Q4_K": (_q4k_chunk, Q4_K_BYTES), "Q5_K": (_q5k_chunk, Q5_K_BYTES),
              "Q6_K": (_q6k_chunk, Q6_K_BYTES)}


def quantize_k(x: np.ndarray, kind: str) -> np.ndarray:
    """Quantize float32 values (any shape, size a multiple of 256) to `kind` in {"Q4_K", "Q5_K",
    "Q6_K"}; returns uint8 of shape (n_superblocks, block_bytes) in GGUF order."""
    fn, nbytes = _CHUNK_FNS[kind]
    flat = np.ascontiguousarray(x, dtype=_F32).reshape(-1)
    if flat.size % QK_K:
        raise ValueError(f"{kind} needs a multiple of {QK_K} values, got {flat.size}")
    blocks = flat.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], nbytes), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_SUPERBLOCKS):
        stop = start + _CHUNK_SUPERBLOCKS
        out[start:stop] = fn(blocks[start:stop])
    return out
