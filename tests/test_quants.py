"""GGUF quantizers and mixes: round trips through gguf's dequantizer, llama.cpp's per-tensor rules,
and byte identity with llama.cpp's own quantizer (skipped when llama_cpp is not installed)."""

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize
from gguf_fixtures import TinySpec, write_tiny_gguf

from r1kit.formats.gguf_file import GGUFHeader
from r1kit.formats.kquants import _seq_sum, nearest_int, quantize_k
from r1kit.formats.quants import (MIXES, SUPPORTED_TYPES, ArchInfo, plan_types, quantize,
                                 quantize_gguf, tensor_type)

# relative RMS error bounds on Gaussian data (measured values are ~20-40% below these)
RT_BOUND = {QT.F32: 0.0, QT.F16: 1e-3, QT.BF16: 5e-3, QT.Q8_0: 0.008, QT.Q6_K: 0.025,
            QT.Q5_K: 0.05, QT.Q5_1: 0.05, QT.Q5_0: 0.06, QT.Q4_K: 0.095, QT.Q4_1: 0.1, QT.Q4_0: 0.11}


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_round_trip_through_gguf_dequantizer(qtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 512)).astype(np.float32)
    x[1] = 0.0
    x[2] = -0.37
    x[3] *= 1e-3  # small rows are scaled by their own blocks' scales
    q = quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape[0] == 48
    y = dequantize(q, qtype)
    assert y.shape == x.shape
    rel = np.sqrt(((y - x) ** 2).mean()) / np.sqrt((x ** 2).mean())
    assert rel <= RT_BOUND[qtype], (qtype.name, rel)
    assert np.all(y[1] == 0)
    np.testing.assert_allclose(y[2], -0.37, rtol=0.02)
    rel3 = np.sqrt(((y[3] - x[3]) ** 2).mean()) / np.sqrt((x[3] ** 2).mean())
    assert rel3 <= 1.5 * RT_BOUND[qtype] + 1e-6, (qtype.name, rel3)


def test_nearest_int_is_round_half_even_and_keeps_the_magic_trick_for_huge_values():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, 1e-9], dtype=np.float32)
    np.testing.assert_array_equal(nearest_int(v), [0, 2, 2, -0, -2, 3, 0])
    # past 2**22 the bit trick wraps instead of rounding; clamping must see the same garbage
    assert nearest_int(np.array([5e6], np.float32))[0] != 5e6


def test_bad_row_length_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 100), np.float32), QT.Q4_K)
    with pytest.raises(ValueError, match="not supported"):
        quantize(np.zeros((2, 256), np.float32), QT.IQ2_XXS)


def _dense(n_layer=8, **kw):
    return ArchInfo(arch="llama", n_layer=n_layer, n_head=8, n_head_kv=4, **kw)


def test_more_bits_for_attn_v_and_ffn_down_by_layer():
    info = _dense()
    more = {0, 3, 6, 7}  # use_more_bits for 8 layers: first/last eighth and every third between
    for mix, base in (("Q4_K_M", QT.Q4_K), ("Q5_K_M", QT.Q5_K)):
        for i in range(8):
            want = QT.Q6_K if i in more else base
            assert tensor_type(f"blk.{i}.attn_v.weight", (256, 512), mix, info) == want
            assert tensor_type(f"blk.{i}.ffn_down.weight", (512, 1024), mix, info) == want
            assert tensor_type(f"blk.{i}.attn_q.weight", (512, 512), mix, info) == base
    assert tensor_type("blk.5.attn_v.weight", (256, 512), "q6_k", info) == QT.Q6_K


def test_output_embeddings_norms_and_fallbacks():
    info = _dense()
    assert tensor_type("output.weight", (320, 512), "Q4_K_M", info) == QT.Q6_K
    assert tensor_type("output.weight", (320, 512), "Q8_0", info) == QT.Q8_0
    assert tensor_type("token_embd.weight", (320, 512), "Q4_K_M", info) == QT.Q4_K
    tied = _dense(tied_embeddings=True)
    assert tensor_type("token_embd.weight", (320, 512), "Q4_K_M", tied) == QT.Q6_K
    assert tensor_type("token_embd.weight", (320, 96), "Q4_K_M", tied) == QT.Q8_0
    for name, shape in (("blk.0.attn_norm.weight", (512,)), ("blk.0.attn_q.bias", (512,))):
        assert tensor_type(name, shape, "Q4_K_M", info) == QT.F32
        assert tensor_type(name, shape, "F16", info) == QT.F32
    assert tensor_type("blk.1.attn_q.weight", (512, 96), "Q4_K_M", info) == QT.Q5_0
    assert tensor_type("blk.1.attn_q.weight", (512, 96), "Q5_K_M", info) == QT.Q5_1
    assert tensor_type("blk.0.attn_v.weight", (256, 96), "Q4_K_M", info) == QT.Q8_0  # Q6_K -> Q8_0
    assert tensor_type("blk.1.ffn_down.weight", (512, 176), "Q4_K_M", info) == QT.F16
    assert tensor_type("blk.1.ffn_down.weight", (512, 176), "F16", info) == QT.F16


def test_moe_and_mla_rules():
    info = ArchInfo(arch="deepseek2", n_layer=4, n_expert=8, n_head=4, n_head_kv=4)
    assert tensor_type("blk.1.attn_kv_b.weight", (512, 256), "Q4_K_M", info) == QT.Q8_0
    assert tensor_type("blk.1.attn_output.weight", (256, 256), "Q4_K_M", info) == QT.Q5_K
    assert tensor_type("blk.1.attn_q_b.weight", (256, 256), "Q4_K_M", info) == QT.Q4_K
    assert tensor_type("blk.1.ffn_gate_inp.weight", (8, 256), "Q4_K_M", info) == QT.F32
    # 4 layers: use_more_bits picks layers 2 and 3 (layer read off the name, not a counter)
    assert tensor_type("blk.2.ffn_down_exps.weight", (8, 256, 256), "Q4_K_M", info) == QT.Q6_K
    assert tensor_type("blk.1.ffn_down_exps.weight", (8, 256, 256), "Q4_K_M", info) == QT.Q4_K
    assert tensor_type("blk.3.ffn_down_shexp.weight", (256, 256), "Q5_K_M", info) == QT.Q6_K
    with pytest.raises(ValueError, match="blk.9.ffn_down_exps.weight"):
        tensor_type("blk.9.ffn_down_exps.weight", (8, 256, 256), "Q4_K_M", info)


def test_plan_counts_like_llama_cpp_and_rejects_unknown_mixes():
    # attn_v in every other layer: llama.cpp counts the attn_v tensors it meets (in layer order,
    # "blk.10" after "blk.2"), so the 4 of them get the pattern of a 4-layer model
    info = _dense(n_layer=12)
    tensors = [(f"blk.{i}.attn_v.weight", (256, 512), QT.F32) for i in (10, 2, 6, 0)]
    plan = plan_types(tensors, "Q4_K_M", info)
    assert list(plan) == [f"blk.{i}.attn_v.weight" for i in (0, 2, 6, 10)]
    assert list(plan.values()) == [QT.Q4_K, QT.Q4_K, QT.Q6_K, QT.Q6_K]
    with pytest.raises(ValueError, match="unknown quantization mix 'Q3_X'"):
        plan_types(tensors, "Q3_X", info)


def test_quantize_gguf_names_a_bad_tensor_and_leaves_nothing_behind(tmp_path):
    src = tmp_path / "f32.gguf"
    write_tiny_gguf(src, TinySpec(n_layer=1))
    reader = GGUFReader(src, "r+")
    bad = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    bad.data[3, 7] = np.nan
    del reader
    out = tmp_path / "q.gguf"
    with pytest.raises(ValueError, match="blk.0.ffn_up.weight"):
        quantize_gguf(src, out, "Q4_K_M")
    assert sorted(os.listdir(tmp_path)) == ["f32.gguf"]


# ---------------------------------------------------------------------------------------------
# byte identity with llama.cpp's quantizer
# ---------------------------------------------------------------------------------------------

MODELS = {
    "llama-h256-ffn512": TinySpec(hidden=256, ffn=512, vocab=320, n_layer=8, n_head=4, n_kv=2),
    "llama-h96-ffn160-tied": TinySpec(hidden=96, ffn=160, vocab=301, n_layer=4, n_head=4, n_kv=2,
                                      tied=True, seed=1),
    "qwen2-ffn176-bias": TinySpec(arch="qwen2", hidden=256, ffn=176, n_layer=3, seed=2),
    "qwen3-tied": TinySpec(arch="qwen3", hidden=256, ffn=768, n_layer=3, tied=True, seed=3),
    "deepseek2-moe8": TinySpec(arch="deepseek2", hidden=256, ffn=512, n_layer=4, n_head=4, n_kv=4,
                               n_expert=8, expert_ffn=256, seed=4),
    "deepseek2-moe4-eff96": TinySpec(arch="deepseek2", hidden=256, ffn=512, n_layer=9, n_head=4,
                                     n_kv=4, n_expert=4, expert_ffn=96, seed=5),
}
MAIN_MIXES = ("F16", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K")
CASES = [(m, x) for m in MODELS for x in (MIXES if m.startswith("llama-h256") else MAIN_MIXES)]


@pytest.fixture(scope="module")
def llama_cpp():
    try:  # a broken build raises ImportError (not ModuleNotFoundError): skip on either
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama_cpp not importable: {e}")
    return llama_cpp


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_src")
    paths = {}
    for name, spec in MODELS.items():
        paths[name] = root / f"{name}.gguf"
        write_tiny_gguf(paths[name], spec)
    return paths


def _llama_quantize(llama_cpp, src, dst, mix):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(MIXES[mix].ftype)
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0


@pytest.mark.parametrize("model,mix", CASES, ids=[f"{m}-{x}" for m, x in CASES])
def test_byte_identical_to_llama_cpp(llama_cpp, sources, tmp_path, model, mix):
    src, ref, ours = sources[model], tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    _llama_quantize(llama_cpp, src, ref, mix)
    plan = quantize_gguf(src, ours, mix)
    want, got = GGUFReader(ref), GGUFReader(ours)
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors]
    info = ArchInfo.from_header(GGUFHeader(src))
    for w, g in zip(want.tensors, got.tensors):
        assert g.tensor_type == w.tensor_type == plan[w.name], w.name
        shape = tuple(int(s) for s in reversed(w.shape))
        assert tensor_type(w.name, shape, mix, info) == w.tensor_type, w.name
        wb, gb = np.asarray(w.data).view(np.uint8), np.asarray(g.data).view(np.uint8)
        assert np.array_equal(wb, gb), f"{w.name} ({w.tensor_type.name}): bytes differ"
    assert ours.read_bytes() == ref.read_bytes(), "tensors match but the files differ (metadata?)"


# ---------------------------------------------------------------------------------------------
# K-quant search against ggml's own row quantizers, on inputs that reach its corner cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 1), (16, 8192), (32, 7), (32, 8192)])
def test_seq_sum_adds_rows_one_after_another(shape):
    # the searches' byte identity rests on this: ggml sums a sub-block's values in a C loop
    rng = np.random.default_rng(shape[1])
    a = (rng.standard_normal(shape) * 10.0 ** rng.integers(-7, 8, shape)).astype(np.float32)
    want = a[0].copy()
    for row in a[1:]:
        want += row
    assert np.array_equal(_seq_sum(a), want)
    if shape[1] > 1:  # the data tells orders apart: pairwise sums of the same rows differ
        pairwise = np.add.reduce(np.ascontiguousarray(a.T), axis=1)
        assert not np.array_equal(pairwise, want)


def _hard_inputs():
    """Named float32 inputs of 64 super-blocks that drive the K-quant searches off the easy path."""
    rng = np.random.default_rng(7)
    n = 256 * 64
    gauss = rng.standard_normal(n)
    zeros_consts = gauss.copy()
    zeros_consts[: n // 2] = 0  # all-zero super-blocks, then constant sub-blocks in live ones
    zeros_consts[n // 2: n // 2 + 32 * 7] = 0.25
    spikes = gauss.copy()
    spikes[::32] *= 1e4  # one huge value per sub-block
    beside = gauss.copy()
    beside[rng.random(n // 32).repeat(32) < 0.3] *= 1e-40  # subnormal sub-blocks in normal ones
    sparse = np.zeros(n)
    sparse[::97] = 1.0
    return {
        "gauss": gauss,
        "outliers": np.where(rng.random(n) < 0.003, gauss * 50, rng.laplace(size=n)),
        "zeros_and_constants": zeros_consts,
        "all_positive": np.abs(gauss) + 0.5,
        "all_negative": -np.abs(gauss) - 0.5,
        "tiny_1e-30": gauss * 1e-30,  # fp16 scales flush to zero: levels come from the search
        "subnormal": gauss * 1e-40,  # iscale overflows to inf: ggml's nearest_int garbage
        "subnormal_beside_normal": beside,  # ... and that garbage is what gets stored
        "spikes": spikes,
        # sub-blocks 1e-8..1e4 apart inside a super-block: small ones get a stored scale of 0
        "mixed_magnitudes": gauss * 10.0 ** rng.integers(-8, 5, n // 32).repeat(32),
        "sparse": sparse,
        "gridded": np.round(gauss * 4) / 4,  # many ties for the rounding
        "narrow_range": 1.0 + gauss * 1e-7,
    }


HARD = _hard_inputs()


@pytest.fixture(scope="module")
def ggml_quantize(llama_cpp):
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib_dir.glob("libggml-base.*"))
    if not found:
        pytest.skip(f"no libggml-base in {lib_dir}")
    lib = ctypes.CDLL(str(found[0]))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def run(x, qtype, block_bytes):
        rows = x.reshape(-1, 256)
        out = np.empty((rows.shape[0], block_bytes), np.uint8)
        fn(int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], 256, None)  # no imatrix
        return out

    return run


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("case", list(HARD))
def test_k_quants_byte_identical_to_ggml_on_hard_inputs(ggml_quantize, case, kind):
    x = np.ascontiguousarray(HARD[case], dtype=np.float32)
    with np.errstate(all="ignore"):
        ours = quantize_k(x, kind)
    want = ggml_quantize(x, QT[kind], ours.shape[1])
    differ = np.flatnonzero((ours != want).any(axis=1))
    assert differ.size == 0, f"{case}/{kind}: super-blocks {differ[:8].tolist()} differ"


def test_hard_inputs_reach_zero_stored_scales():
    # the levels a search picked survive only where a sub-block's stored scale is 0; the
    # inputs above must reach that path for every K-type, or the identity test misses it
    q4 = quantize_k(HARD["mixed_magnitudes"].astype(np.float32), "Q4_K")
    sc = q4[:, 4:8] & 63  # first four 6-bit sub-block scales
    assert ((sc == 0) & (q4[:, 0:2].view(np.uint16) != 0)).any()
    q6 = quantize_k(HARD["mixed_magnitudes"].astype(np.float32), "Q6_K")
    assert ((q6[:, 192:208] == 0).any(axis=1) & (q6[:, 208:210].view(np.uint16)[:, 0] != 0)).any()
