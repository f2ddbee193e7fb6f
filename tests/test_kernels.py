"""r1kit/models/kernels.py: the CPU decode matmul equals F.linear and the decode attention equals SDPA, both
are batch-invariant, used only where asked for and where they apply (never in a trainer's forward), and a
build that fails falls back to torch's functions with one warning."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from r1kit.models import kernels
from r1kit.engine import Engine, SamplingParams
from r1kit.models.llama import Llama, LlamaConfig

needs_kernel = pytest.mark.skipif(kernels._module() is None, reason="the CPU decode kernel did not build here "
                                  "(no compiler or no AVX2); F.linear is used instead")


@pytest.fixture
def kernel_state():
    """Restore the loader's state after a test that switches the kernel off or breaks its build."""
    saved = dict(kernels._state)
    yield kernels._state
    kernels._state.clear()
    kernels._state.update(saved)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17, 64])
@pytest.mark.parametrize("n,k", [(1, 8), (2, 9), (5, 13), (7, 64), (193, 576), (577, 1537)])
def test_kernel_equals_float64_matmul(rows, n, k):
    """Every row / column / K-tail combination of the tiles, with and without bias, against fp64."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    mod = kernels._module()  # the kernel itself: linear() sends some of these to MKL
    for bias in (None, b):
        ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        got = mod.skinny_linear(x, mod.pack_weight(w), n, bias)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        # fp32 rounding of a K-long dot product of N(0,1) terms: ~ sqrt(K) · 2^-24 · |terms|
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6 * k ** 0.5 * 8)


@needs_kernel
def test_rows_are_batch_invariant_bit_for_bit():
    """A row's output does not depend on the other rows or on its place in the batch."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 576, generator=g), torch.randn(1536, 576, generator=g)
    with torch.no_grad(), kernels.decode_kernels():
        full = kernels.linear(x, w)
        for i in (0, 3, 5, 15):
            assert torch.equal(kernels.linear(x[i:i + 1], w), full[i:i + 1])
            assert torch.equal(kernels.linear(x[i:], w)[0], full[i])


@needs_kernel
def test_threads_split_the_columns_without_changing_a_bit():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(16, 576, generator=g), torch.randn(1537, 576, generator=g)
    before = torch.get_num_threads()
    try:
        with torch.no_grad(), kernels.decode_kernels():
            torch.set_num_threads(1)
            one = kernels.linear(x, w)
            torch.set_num_threads(2)
            assert torch.equal(kernels.linear(x, w), one)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_leading_dims_and_noncontiguous_input():
    """The leading axes are the rows, in the kernel too; a non-contiguous input goes to F.linear."""
    w = torch.randn(10, 24)
    x = torch.randn(2, 3, 24)
    strided = torch.randn(1, 4, 48)[..., :24]  # (1, 4, 24), rows 48 apart
    with torch.no_grad(), kernels.decode_kernels():
        assert kernels.uses_kernel(x, w) and not kernels.uses_kernel(strided, w)
        for inp in (x, strided):
            got = kernels.linear(inp, w)
            assert got.shape == (*inp.shape[:-1], 10)
            torch.testing.assert_close(got, F.linear(inp, w), rtol=1e-5, atol=1e-5)


def test_dispatch_only_where_asked_and_where_it_applies():
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    with torch.no_grad():
        assert not kernels.uses_kernel(x, w)  # outside decode_kernels: a trainer's no-grad forward (π_old, π_ref)
    with kernels.decode_kernels():
        assert not kernels.uses_kernel(x, w)  # autograd on
    with torch.no_grad(), kernels.decode_kernels():
        assert not kernels.uses_kernel(torch.randn(kernels.MAX_ROWS + 1, 32), w)
        # above row_limits' first count, only a weight too big to stay in cache (up to the second count): MKL's /
        # oneDNN's blocking wins on a cached one
        built = kernels._module() is not None
        small, streamed = kernels._state["rows"]
        assert (small, streamed) == (kernels.row_limits(kernels._module().vector_width(), kernels._cpu_vendor())
                                     if built else (kernels.SMALL_ROWS, kernels.MAX_ROWS))
        cached, big = torch.randn(kernels.CACHED_WEIGHT // 64 - 1, 64), torch.randn(kernels.CACHED_WEIGHT // 64, 64)
        assert not kernels.uses_kernel(torch.randn(small + 1, 64), cached)
        assert kernels.uses_kernel(torch.randn(small + 1, 64), big) == (built and streamed > small)
        assert not kernels.uses_kernel(torch.randn(streamed + 1, 64), big)
        assert kernels.uses_kernel(torch.randn(small, 64), cached) == built
        assert not kernels.uses_kernel(x.double(), w.double())
        assert not kernels.uses_kernel(x, torch.randn(32, 8).t())  # a transposed view
        assert not kernels.uses_kernel(torch.randn(4, 4), torch.randn(8, 4))  # K < one vector
        assert kernels.uses_kernel(x, w) == (kernels._module() is not None)


onednn_usable = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                         and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                                    reason="this torch has no oneDNN matmul")


@pytest.mark.parametrize("gemm", ["mkl", pytest.param("onednn", marks=onednn_usable)])
@pytest.mark.parametrize("shape", [(3, 12), (2, 7, 12), (0, 12)])
def test_gradients_flow_through_the_linear_module_as_through_nn_linear(kernel_state, gemm, shape):
    """MKL's path is F.linear, bit for bit; oneDNN's forward, dx, dW and db equal it to fp32 rounding — on a
    strided input too (a transposed activation), with a frozen weight (LoRA's base: no dW asked for)."""
    kernel_state["gemm"] = gemm == "onednn"
    torch.manual_seed(0)
    ours, ref = kernels.Linear(12, 5), torch.nn.Linear(12, 5)
    ref.load_state_dict(ours.state_dict())
    for x in (torch.randn(*shape), torch.randn(*reversed(shape)).transpose(0, -1)):
        for m in (ours, ref):
            m.zero_grad()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        (ya.square().sum() + ya.sum()).backward()
        (yb.square().sum() + yb.sum()).backward()
        pairs = [(ya, yb), (xa.grad, xb.grad), (ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)]
        for a, b in pairs:
            if gemm == "mkl":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ours.weight.requires_grad_(False)
    ours.weight.grad = None
    x = torch.randn(*shape, requires_grad=True)
    ours(x).sum().backward()
    assert ours.weight.grad is None and x.grad.shape == x.shape


@onednn_usable
def test_cpu_autocast_keeps_f_linears_bf16_matmul(kernel_state):
    """Under CPU autocast the matmul is F.linear's (bf16), not oneDNN's fp32 one."""
    kernel_state["gemm"] = True
    x, w = torch.randn(5, 16), torch.randn(7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.linear(x, w).dtype == torch.bfloat16 == F.linear(x, w).dtype
    assert kernels.linear(x, w).dtype == torch.float32


def test_the_cpu_gemm_is_chosen_once_by_the_environment_or_the_cpu(kernel_state, monkeypatch):
    """R1KIT_CPU_GEMM picks MKL or oneDNN; auto takes oneDNN only on a non-Intel CPU with AVX-512 (where MKL
    runs its AVX2 code); a bad value is an error that names the variable. The choice is made once a process."""
    usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    cases = [("mkl", "AuthenticAMD", "AVX512", False), ("onednn", "GenuineIntel", "AVX2", usable),
             ("auto", "AuthenticAMD", "AVX512", usable), ("auto", "GenuineIntel", "AVX512", False),
             ("auto", "AuthenticAMD", "AVX2", False), ("auto", "", "AVX512", False)]
    for env, vendor, isa, expected in cases:
        monkeypatch.setenv("R1KIT_CPU_GEMM", env)
        monkeypatch.setattr(kernels, "_cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda i=isa: i)
        kernel_state.pop("gemm", None)
        assert kernels.onednn_gemm() is expected, (env, vendor, isa)
        monkeypatch.setenv("R1KIT_CPU_GEMM", "onednn" if not expected else "mkl")
        assert kernels.onednn_gemm() is expected  # decided once
    monkeypatch.setenv("R1KIT_CPU_GEMM", "openblas")
    kernel_state.pop("gemm", None)
    with pytest.raises(ValueError, match="R1KIT_CPU_GEMM='openblas'"):
        kernels.onednn_gemm()


@needs_kernel
@pytest.mark.parametrize("width", [256, 512])
def test_both_vector_widths_equal_float64_and_stay_batch_invariant(width):
    """The AVX2 and the AVX-512 skinny kernels (the latter where this CPU has it) on the tiles' edge cases:
    each output is summed in k order in its own lane, so the two widths also give the same bits."""
    mod = kernels._module()
    before = mod.vector_width()
    if mod.set_vector_width(width) != width:
        mod.set_vector_width(before)
        pytest.skip("no AVX-512 on this CPU")
    try:
        for rows, n, k in [(1, 1, 8), (3, 5, 13), (5, 7, 17), (16, 193, 576), (17, 9, 33), (64, 577, 1537)]:
            g = torch.Generator().manual_seed(rows + n + k)
            x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            packed = mod.pack_weight(w)
            panel = 48 if width == 512 else 16
            assert packed.shape == (-(-n // panel), k, panel)
            got = mod.skinny_linear(x, packed, n, b)
            ref = F.linear(x.double(), w.double(), b.double())
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6 * k ** 0.5 * 8)
            if rows > 1:  # a row alone gives the bits it gives in the batch
                assert torch.equal(mod.skinny_linear(x[1:2], packed, n, b)[0], got[1])
            then = mod.pack_weight(torch.randn(n + 50, 2 * k, generator=g))  # the next matmul's panels: prefetched only
            assert torch.equal(mod.skinny_linear(x, packed, n, b, then), got)
            mod.set_vector_width(256)  # the narrow kernel: the same bits
            assert torch.equal(mod.skinny_linear(x, mod.pack_weight(w), n, b), got)
            mod.set_vector_width(width)
    finally:
        mod.set_vector_width(before)


@needs_kernel
def test_the_kernels_follow_torchs_cpu_capability():
    """ATEN_CPU_CAPABILITY=avx2 (torch's own kernels at AVX2) also narrows r1kit's: the 256-bit matmul tiles, their
    row limits and MKL's GEMM, so one variable runs a process as on an AVX2-only CPU."""
    code = ("from r1kit.models import kernels; m = kernels._module(); "
            "print(m.vector_width(), kernels._state['rows'], kernels.onednn_gemm())")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop("R1KIT_CPU_GEMM", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["256", "(16,", "64)", "False"]


@needs_kernel
def test_weight_packs_follow_the_weight_and_the_vector_width():
    """A session's packed copy is used until the weight changes in place (its version moves) or the width does."""
    mod = kernels._module()
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(16, 64, generator=g), torch.randn(100, 64, generator=g)
    packs = kernels.WeightPacks()
    with torch.no_grad(), kernels.decode_kernels(packs):
        first = kernels.linear(x, w)
        assert packs.get(w) is packs.get(w)  # packed once
        w.mul_(-2.0)  # an optimizer-like in-place update
        torch.testing.assert_close(kernels.linear(x, w), -2.0 * first, rtol=1e-6, atol=1e-5)
        other = torch.randn(100, 64, generator=g)
        torch.testing.assert_close(kernels.linear(x, other), F.linear(x, other), rtol=1e-5, atol=1e-4)
    before = mod.vector_width()
    try:
        mod.set_vector_width(256)
        with torch.no_grad(), kernels.decode_kernels(packs):
            assert packs.get(w).shape[2] == 16  # repacked for the narrow kernel
            torch.testing.assert_close(kernels.linear(x, w), -2.0 * first, rtol=1e-6, atol=1e-5)
    finally:
        mod.set_vector_width(before)


@needs_kernel
def test_weight_packs_take_inference_tensors():
    """Weights made under inference_mode keep no version counter: packed once for the session."""
    with torch.inference_mode():
        x, w = torch.randn(4, 64), torch.randn(30, 64)
    packs = kernels.WeightPacks()
    with torch.no_grad(), kernels.decode_kernels(packs):
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
        assert packs.get(w) is packs.get(w)


@needs_kernel
def test_packed_panels_are_refused_where_they_do_not_fit():
    mod = kernels._module()
    x, w = torch.randn(4, 64), torch.randn(30, 64)
    packed = mod.pack_weight(w)
    with pytest.raises(RuntimeError, match="panels of N columns"):
        mod.skinny_linear(x, packed, 31 + packed.shape[2], None)  # more columns than the panels hold
    with pytest.raises(RuntimeError, match="panels of N columns"):
        mod.skinny_linear(torch.randn(4, 63), packed, 30, None)  # another K
    with pytest.raises(RuntimeError, match="`then` must be"):
        mod.skinny_linear(x, packed, 30, None, torch.randn(2, 64, packed.shape[2] + 1))  # another panel width


def test_switched_off_means_f_linear_exactly(kernel_state, monkeypatch):
    monkeypatch.setenv("R1KIT_CPU_KERNELS", "0")
    kernel_state.update(tried=False, module=None, gemm=False)
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    with torch.no_grad(), kernels.decode_kernels():
        assert not kernels.uses_kernel(x, w)
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))


def test_failed_build_warns_once_and_falls_back(kernel_state, monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    def broken(*a, **kw):
        raise RuntimeError("Error building extension 'r1kit_cpu_kernels'\nlong compiler output")
    monkeypatch.setattr(ext, "load", broken)
    monkeypatch.delenv("R1KIT_CPU_KERNELS", raising=False)
    kernel_state.update(tried=False, module=None, gemm=False)  # the CPU GEMM: F.linear (see the test above)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with caplog.at_level(logging.WARNING, logger="r1kit.models.kernels"), torch.no_grad(), kernels.decode_kernels():
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))
        kernels.linear(x, w)
        assert torch.equal(kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["r1kit: the CPU decode kernels did not build (Error building extension "
                        "'r1kit_cpu_kernels'); decode steps use F.linear and SDPA"]


def tiny_deepseek(attn_impl="absorb"):
    from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
    cfg = DeepseekConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
                         num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=1,
                         max_position_embeddings=64)
    return DeepseekV3(cfg, attn_impl=attn_impl).init_weights(seed=0).eval()


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "deepseek-naive"])
def test_engine_with_kernel_matches_engine_without(kernel_state, family):
    """Generation through the kernels draws the same tokens with the same log-probs as F.linear's and SDPA's
    (ragged prompts: each row's decode mask ends at its own length)."""
    if family == "llama":
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=136, max_position_embeddings=64)
        model = Llama(cfg).init_weights(seed=0).eval()
    else:  # per-head K (d_nope + d_rope = 16) and V (8) of different widths through the same attention
        model = tiny_deepseek("naive")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    with_kernel = Engine(model).generate(prompts, sp)
    kernel_state["module"] = None  # tried, not available: F.linear everywhere
    without = Engine(model).generate(prompts, sp)
    for (a,), (b,) in zip(with_kernel, without):  # one sample per prompt
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)


def test_the_switch_is_per_thread_and_restored():
    """An async trainer's thread is not switched on by the generating thread's decode_kernels()."""
    import threading
    seen = {}
    inside, go = threading.Event(), threading.Event()

    def generate():
        with kernels.decode_kernels():
            seen["generator"] = kernels._local.on
            inside.set()
            go.wait(5)
        seen["generator after"] = getattr(kernels._local, "on", False)
    t = threading.Thread(target=generate)
    t.start()
    inside.wait(5)
    seen["trainer"] = getattr(kernels._local, "on", False)
    go.set()
    t.join()
    assert seen == {"generator": True, "trainer": False, "generator after": False}


@needs_kernel
@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_speculative_decoding_equals_engine_greedy_with_the_kernel(attn_impl):
    from r1kit.speculative import mtp_generate
    model = tiny_deepseek(attn_impl)
    spec = mtp_generate(model, [1, 2, 3, 4], 16)
    (plain,), = Engine(model).generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=16, temperature=0.0,
                                                                       ignore_eos=True))
    assert spec.tokens == plain.tokens


# ---------------------------------------------------------------------------------------------
# the fused decode layers (csrc/llama_decode.cpp)
# ---------------------------------------------------------------------------------------------
def counting_fused(monkeypatch):
    """Count the decode steps whose layers ran as one kernel call."""
    calls = {"fused": 0, "asked": 0}
    real = kernels.decode_layers

    def counted(*a, **k):
        out = real(*a, **k)
        calls["asked"] += 1
        calls["fused"] += out is not None
        return out
    monkeypatch.setattr(kernels, "decode_layers", counted)
    return calls


def generate_both_ways(monkeypatch, model, prompts, sp, **engine):
    from r1kit.models import llama
    calls = counting_fused(monkeypatch)
    fused = Engine(model, **engine).generate(prompts, sp)
    with monkeypatch.context() as mp:
        mp.setattr(llama.Llama, "_fused_decode", lambda *a, **k: None)  # the layers as modules
        layered = Engine(model, **engine).generate(prompts, sp)
    return fused, layered, calls


@needs_kernel
@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "o_bias"])
@pytest.mark.parametrize("n,static", [(1, False), (24, True), (24, False)], ids=["3-rows", "72-rows-static", "72-rows"])
def test_fused_decode_layers_equal_the_module_layers(monkeypatch, family, n, static):
    """Every decode step of a plain Llama-family model runs its layers in one kernel call, and draws what
    the modules draw: the same tokens, log-probs within float rounding — GQA, q/k/v and o biases, Qwen3's
    per-head norms, llama3 RoPE scaling, ragged rows, a fixed key span (static_decode), and 72 rows (the
    matmuls past the skinny kernel's rows go to torch's)."""
    from model_fixtures import FAMILIES, make_model
    if family == "o_bias":
        FAMILIES = {**FAMILIES, "o_bias": dict(attention_bias=True, o_bias=True)}  # noqa: N806
        monkeypatch.setattr("model_fixtures.FAMILIES", FAMILIES)
    model = make_model(family)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, n=n, seed=5, ignore_eos=True)
    fused, layered, calls = generate_both_ways(monkeypatch, model, prompts, sp, static_decode=static)
    assert calls["fused"] == calls["asked"] >= 9  # every decode step, none fell back
    for ga, gb in zip(fused, layered):
        for a, b in zip(ga, gb):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)


@needs_kernel
def test_fused_decode_only_for_plain_layers_without_hooks(monkeypatch, kernel_state):
    """LoRA-wrapped projections, a hook on a layer, autograd, or the kernels switched off: the layers run as
    modules (the kernel is not asked, or says None), and generation is what it is without the kernel."""
    from model_fixtures import make_model
    from r1kit.models import lora
    prompts, sp = [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    model = make_model("llama3")
    calls = counting_fused(monkeypatch)
    handle = model.layers[1].ffn.register_forward_hook(lambda *a: None)
    Engine(model).generate(prompts, sp)
    handle.remove()
    assert calls["fused"] == 0 and calls["asked"] == 0
    cache = model.new_cache(1, 8)
    with kernels.decode_kernels():
        model(torch.tensor([[1, 2]]), kv_cache=cache)
        model(torch.tensor([[3]]), kv_cache=cache)  # grad enabled: never the kernels
    assert calls["fused"] == 0 and calls["asked"] == 0
    lora.apply_lora(model, rank=2)
    Engine(model).generate(prompts, sp)
    assert calls["fused"] == 0 and calls["asked"] == 0
    kernel_state["module"] = None
    assert kernels.decode_layers(torch.zeros(1, 1, 64), [], cache.k, cache.v, cache.lens[:, None],
                                 torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 3),
                                 (4, 2), 1e-5, 0.25) is None


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 37), (4930, 128), (2, 300, 576)])
def test_rms_norm_kernel_equals_torch_forward_and_backward(shape):
    """kernels.rms_norm = F.rms_norm, and its gradients (dx, dw) = autograd's through F.rms_norm."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    ours = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    theirs = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    y = kernels.rms_norm(ours[0], ours[1], 1e-5)
    ref = F.rms_norm(theirs[0], (shape[-1],), theirs[1], 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(ours[0].grad, theirs[0].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1].grad, theirs[1].grad, rtol=1e-4, atol=1e-3 * (x.numel() / shape[-1]) ** 0.5)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_RMSNormBackward"  # the kernel's own backward


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 7), (5, 352), (3, 4, 1537)])
def test_swiglu_kernel_equals_silu_times_up_forward_and_backward(shape):
    """silu(a) · b and both gradients against torch's two ops, tails shorter than a vector included."""
    g = torch.Generator().manual_seed(sum(shape))
    a, b, dy = (torch.randn(*shape, generator=g) * 4 for _ in range(3))
    outs = []
    for fn in (kernels.swiglu, lambda x, y: F.silu(x) * y):
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(xa, xb)
        y.backward(dy)
        outs.append((y.detach(), xa.grad, xb.grad))
    assert outs[0][0].shape == shape
    for got, want in zip(outs[0], outs[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_swiglu_falls_back_to_torch_exactly_off_its_contract():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    for x, y in ((a.t(), b.t()), (a.double(), b.double()), (a[:, :1], b)):  # strided, fp64, broadcast
        assert torch.equal(kernels.swiglu(x, y), F.silu(x) * y)



@needs_kernel
def test_rms_norm_kernel_is_thread_invariant_and_falls_back_to_torch():
    g = torch.Generator().manual_seed(1)
    x, w, dy = torch.randn(2000, 96, generator=g), torch.randn(96, generator=g), torch.randn(2000, 96, generator=g)
    outs = []
    before = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            outs.append(kernels._state["module"].rms_norm_backward(x, w, dy, 1e-6))
        finally:
            torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))  # dx and dw: the same bits on 1 and 2 threads
    strided = x.t()  # not contiguous: torch's own function, exactly
    assert torch.equal(kernels.rms_norm(strided, torch.ones(2000), 1e-6),
                       F.rms_norm(strided, (2000,), torch.ones(2000), 1e-6))
    half = x.bfloat16()
    assert torch.equal(kernels.rms_norm(half, w.bfloat16(), 1e-6), F.rms_norm(half, (96,), w.bfloat16(), 1e-6))


# ---------------------------------------------------------------------------------------------
# decode attention
# ---------------------------------------------------------------------------------------------
def attention_case(B, H, Hkv, Tq, Tk, Dk, Dv, mask_kind, seed):
    """q, k, v as the engine passes them (k, v: [:Tk] views of a longer cache buffer) and a mask with
    ragged ends, holes, and one row that sees nothing."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, Dk, generator=g).transpose(1, 2)  # (B, H, Tq, Dk), strided as the model's
    k = torch.randn(B, Hkv, Tk + 7, Dk, generator=g)[:, :, :Tk]
    v = torch.randn(B, Hkv, Tk + 7, Dv, generator=g)[:, :, :Tk]
    see = torch.rand(B, 1, Tq, Tk, generator=g) < 0.8
    lens = torch.randint(1, Tk + 1, (B,), generator=g)
    see &= torch.arange(Tk) < lens[:, None, None, None]  # ragged rows: nothing past a row's length
    see[0, :, -1] = False  # a query with no key: zeros, as SDPA gives
    if mask_kind == "bool":
        return q, k, v, see
    if mask_kind == "float":
        return q, k, v, torch.zeros(see.shape).masked_fill_(~see, float("-inf"))
    return q, k, v, None


@needs_kernel
@pytest.mark.parametrize("mask_kind", ["float", "bool", None])
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,Dk,Dv", [(1, 1, 1, 1, 1, 8, 8), (3, 4, 2, 1, 13, 16, 8), (2, 6, 3, 3, 37, 64, 64),
                                                 (4, 2, 2, 1, 9, 32, 128), (2, 9, 3, 2, 21, 64, 72),
                                                 (5, 4, 4, 4, 70, 32, 32)])
def test_attention_kernel_equals_sdpa(B, H, Hkv, Tq, Tk, Dk, Dv, mask_kind):
    """Grouped heads, several queries, K and V of different widths (MLA's naive path), ragged and holed masks,
    an empty row, strided cache views — against SDPA in float64."""
    if mask_kind is None and Tq > 1:
        Tq = 1  # several queries without a mask mean causal: SDPA's own path (below)
    q, k, v, mask = attention_case(B, H, Hkv, Tq, Tk, Dk, Dv, mask_kind, seed=B * 100 + Tk)
    with torch.no_grad(), kernels.decode_kernels():
        assert kernels.uses_attention_kernel(q, k, v, mask)
        got = kernels.attention(q, k, v, mask, scale=0.3)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3, enable_gqa=H != Hkv,
                                         attn_mask=None if mask is None else mask if mask.dtype == torch.bool
                                         else mask.double())
    assert got.shape == (B, H, Tq, Dv) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
    if mask is not None:
        assert torch.equal(got[0, :, -1], torch.zeros(H, Dv))  # the query that sees nothing


@needs_kernel
def test_attention_kernel_is_batch_invariant_and_thread_invariant():
    """A row's output does not depend on the other rows or on how many threads split the work: bit for bit."""
    q, k, v, mask = attention_case(6, 9, 3, 1, 50, 64, 64, "float", seed=1)
    with torch.no_grad(), kernels.decode_kernels():
        full = kernels.attention(q, k, v, mask)
        for r in range(6):
            assert torch.equal(kernels.attention(q[r:r + 1], k[r:r + 1], v[r:r + 1], mask[r:r + 1]), full[r:r + 1])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            assert torch.equal(kernels.attention(q, k, v, mask), full)
        finally:
            torch.set_num_threads(threads)


def test_attention_dispatch_only_where_asked_and_where_it_applies():
    q, k, v, mask = attention_case(2, 4, 2, 1, 10, 16, 16, "float", seed=2)
    on = kernels._module() is not None
    with torch.no_grad():
        assert not kernels.uses_attention_kernel(q, k, v, mask)  # outside decode_kernels: a trainer's forward
    with kernels.decode_kernels():
        assert not kernels.uses_attention_kernel(q.requires_grad_(), k, v, mask)  # autograd on
    q = q.detach()
    with torch.no_grad(), kernels.decode_kernels():
        many = torch.randn(2, 4, kernels.MAX_QUERIES + 1, 16)
        assert not kernels.uses_attention_kernel(many, k, v, torch.zeros(2, 1, kernels.MAX_QUERIES + 1, 10))  # prefill
        assert not kernels.uses_attention_kernel(torch.randn(2, 4, 2, 16), k, v, None)  # several queries, causal
        assert not kernels.uses_attention_kernel(q, k, v, mask[:1])  # a broadcast mask
        assert not kernels.uses_attention_kernel(q, k, v, mask.half())
        assert not kernels.uses_attention_kernel(q.double(), k.double(), v.double(), mask.double())
        assert not kernels.uses_attention_kernel(torch.randn(2, 4, 1, 12), torch.randn(2, 2, 10, 12), v, mask)  # Dk % 8
        assert not kernels.uses_attention_kernel(torch.randn(2, 4, 1, 16), torch.randn(2, 3, 10, 16),
                                                 torch.randn(2, 3, 10, 16), mask)  # 4 heads over 3 KV heads
        assert not kernels.uses_attention_kernel(q, k, torch.randn(2, 1, 10, 16), mask)  # v's heads are not k's
        assert not kernels.uses_attention_kernel(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, mask)
        assert kernels.uses_attention_kernel(q, k, v, mask) == on
        assert kernels.uses_attention_kernel(q, k, v, None) == on  # one query, no mask: every key
        # whichever path runs, the result is SDPA's (the causal case included)
        q3 = torch.randn(2, 4, 3, 16)
        torch.testing.assert_close(kernels.attention(q3, k[:, :, :3], v[:, :, :3]),
                                   F.scaled_dot_product_attention(q3, k[:, :, :3], v[:, :, :3], is_causal=True,
                                                                  enable_gqa=True))


@needs_kernel
@pytest.mark.parametrize("V", [7, 256, 1000])
def test_sampling_kernel_draws_what_the_torch_path_draws(V):
    """The one-pass draw (csrc/sampling.cpp) against sampling.py's torch draw, row by row: greedy rows take the
    first largest logit, sampled rows the inverse-CDF token for the same u, with the same log-probs; a
    truncated sampled row (top-p < 1 or top-k > 0) leaves the whole batch to the torch path."""
    from r1kit import sampling
    g = torch.Generator().manual_seed(V)
    n = 12
    logits = torch.randn(n, V, generator=g) * 3
    logits[0, :3] = logits[0].max() + 1  # a tie for the largest: the first one wins
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3] * 3)
    u = torch.rand(n, generator=g)
    top_p, top_k = torch.ones(n), torch.zeros(n, dtype=torch.long)
    tokens, logp = kernels.sample_untruncated(logits, temp, top_p, top_k, u)
    greedy = temp == 0
    ref_lp = torch.log_softmax(logits / torch.where(greedy, 1.0, temp)[:, None], dim=-1)
    t_g, lp_g = sampling._draw_greedy(ref_lp[greedy])
    t_s, lp_s = sampling._draw_full(ref_lp[~greedy], u[~greedy])
    assert tokens[0] == 0 and torch.equal(tokens[greedy], t_g) and torch.equal(tokens[~greedy], t_s)
    torch.testing.assert_close(logp[greedy], lp_g, rtol=0, atol=1e-5)
    torch.testing.assert_close(logp[~greedy], lp_s, rtol=0, atol=1e-5)
    for p5, k5 in ((0.9, 0), (1.0, 4)):  # row 5 samples, truncated by top-p, then by top-k
        p, k = top_p.clone(), top_k.clone()
        p[5], k[5] = p5, k5
        assert kernels.sample_untruncated(logits, temp, p, k, u) is None
    p, k = top_p.clone(), top_k.clone()
    p[4], k[4] = 0.5, 3  # row 4 is greedy: its truncation changes nothing
    assert kernels.sample_untruncated(logits, temp, p, k, u) is not None
    assert torch.equal(sampling.sample(logits, temp, top_p, top_k, u)[0], tokens)  # sampling.py takes it
