"""r1kit/models/linear.py: the CPU decode matmul equals F.linear, is batch-invariant, is used only where it
is asked for and applies (never in a trainer's forward), and a build that fails falls back to F.linear
with one warning."""
import logging

import pytest
import torch
import torch.nn.functional as F

from r1kit.models import linear as kernels
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
    with torch.no_grad(), kernels.decode_matmuls():
        assert kernels.uses_kernel(x, w)
        for bias in (None, b):
            ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            got = kernels.linear(x, w, bias)
            assert got.shape == (rows, n) and got.dtype == torch.float32
            # fp32 rounding of a K-long dot product of N(0,1) terms: ~ sqrt(K) · 2^-24 · |terms|
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-6 * k ** 0.5 * 8)


@needs_kernel
def test_rows_are_batch_invariant_bit_for_bit():
    """A row's output does not depend on the other rows or on its place in the batch."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 576, generator=g), torch.randn(1536, 576, generator=g)
    with torch.no_grad(), kernels.decode_matmuls():
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
        with torch.no_grad(), kernels.decode_matmuls():
            torch.set_num_threads(1)
            one = kernels.linear(x, w)
            torch.set_num_threads(2)
            assert torch.equal(kernels.linear(x, w), one)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_leading_dims_and_noncontiguous_input():
    x = torch.randn(4, 1, 24).transpose(0, 1)  # (1, 4, 24), not contiguous
    w = torch.randn(10, 24)
    with torch.no_grad(), kernels.decode_matmuls():
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_dispatch_only_where_asked_and_where_it_applies():
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    with torch.no_grad():
        assert not kernels.uses_kernel(x, w)  # outside decode_matmuls: a trainer's no-grad forward (π_old, π_ref)
    with kernels.decode_matmuls():
        assert not kernels.uses_kernel(x, w)  # autograd on
    with torch.no_grad(), kernels.decode_matmuls():
        assert not kernels.uses_kernel(torch.randn(kernels.MAX_ROWS + 1, 32), w)
        assert not kernels.uses_kernel(x.double(), w.double())
        assert not kernels.uses_kernel(x, torch.randn(32, 8).t())  # a transposed view
        assert not kernels.uses_kernel(torch.randn(4, 4), torch.randn(8, 4))  # K < one vector
        assert kernels.uses_kernel(x, w) == (kernels._module() is not None)


def test_gradients_flow_through_the_linear_module_as_through_nn_linear():
    torch.manual_seed(0)
    ours = kernels.Linear(12, 5)
    ref = torch.nn.Linear(12, 5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 12)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)


def test_switched_off_means_f_linear_exactly(kernel_state, monkeypatch):
    monkeypatch.setenv("R1KIT_CPU_KERNELS", "0")
    kernel_state.update(tried=False, module=None)
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    with torch.no_grad(), kernels.decode_matmuls():
        assert not kernels.uses_kernel(x, w)
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))


def test_failed_build_warns_once_and_falls_back(kernel_state, monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    def broken(*a, **kw):
        raise RuntimeError("Error building extension 'r1kit_skinny_linear'\nlong compiler output")
    monkeypatch.setattr(ext, "load", broken)
    monkeypatch.delenv("R1KIT_CPU_KERNELS", raising=False)
    kernel_state.update(tried=False, module=None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    with caplog.at_level(logging.WARNING, logger="r1kit.models.linear"), torch.no_grad(), kernels.decode_matmuls():
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))
        kernels.linear(x, w)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["r1kit: the CPU decode kernel did not build (Error building extension "
                        "'r1kit_skinny_linear'); decode matmuls use F.linear"]


@needs_kernel
def test_engine_with_kernel_matches_engine_without(kernel_state):
    """Generation through the kernel draws the same tokens with the same log-probs as F.linear's."""
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=136, max_position_embeddings=64)
    model = Llama(cfg).init_weights(seed=0).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    with_kernel = Engine(model).generate(prompts, sp)
    kernel_state["module"] = None  # tried, not available: F.linear everywhere
    without = Engine(model).generate(prompts, sp)
    for (a,), (b,) in zip(with_kernel, without):  # one sample per prompt
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)


def test_the_switch_is_per_thread_and_restored():
    """An async trainer's thread is not switched on by the generating thread's decode_matmuls()."""
    import threading
    seen = {}
    inside, go = threading.Event(), threading.Event()

    def generate():
        with kernels.decode_matmuls():
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
def test_speculative_decoding_equals_engine_greedy_with_the_kernel():
    from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
    from r1kit.speculative import mtp_generate
    cfg = DeepseekConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
                         num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=1,
                         max_position_embeddings=64)
    model = DeepseekV3(cfg).init_weights(seed=0).eval()
    spec = mtp_generate(model, [1, 2, 3, 4], 16)
    (plain,), = Engine(model).generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=16, temperature=0.0,
                                                                       ignore_eos=True))
    assert spec.tokens == plain.tokens
