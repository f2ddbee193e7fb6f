"""Activation checkpointing and hidden-state outputs: same numbers as the plain forward, less kept."""
import pytest
import torch

from r1kit.models.logprobs import chunked_logprobs
from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.rl import token_logprobs


def dense():
    cfg = LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2)
    return Llama(cfg).init_weights(seed=0, std=0.1)


def moe():
    cfg = DeepseekConfig(vocab_size=80, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=3, num_attention_heads=2, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                         num_nextn_predict_layers=1)
    return DeepseekV3(cfg).init_weights(0, 0.1)


IDX = torch.randint(0, 80, (2, 12), generator=torch.Generator().manual_seed(0))


def grads(model, ckpt: bool):
    model.zero_grad(set_to_none=True)
    model.train()
    model.grad_checkpointing = ckpt
    loss = model(IDX, targets=IDX.roll(-1, 1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [dense, moe], ids=["dense", "deepseek"])
def test_checkpointing_gives_the_same_loss_and_gradients(build):
    m = build()
    loss0, g0 = grads(m, False)
    loads0 = [g.load.clone() for g in getattr(m, "gates", list)()]
    for g in getattr(m, "gates", list)():
        g.load.zero_()
    loss1, g1 = grads(m, True)
    assert torch.equal(loss0, loss1) and g0.keys() == g1.keys()
    assert all((g0[n] - g1[n]).abs().max() <= 1e-6 for n in g0)
    # the recomputation in backward must not count a token's routing a second time
    assert all(torch.equal(a, g.load) for a, g in zip(loads0, getattr(m, "gates", list)()))


@pytest.mark.parametrize("build", [dense, moe], ids=["dense", "deepseek"])
def test_hidden_output_with_chunked_logprobs_equals_logits_path(build):
    m = build().eval()
    pos = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    targets = IDX.gather(1, pos + 1)
    with torch.no_grad():
        want = token_logprobs(m(IDX, logit_pos=pos) / 0.7, targets)
        h = m(IDX, logit_pos=pos, return_hidden=True)
        got, _ = chunked_logprobs(h, m.head.weight, targets, temperature=0.7, chunk=3)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("build", [dense, moe], ids=["dense", "deepseek"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_losses_equal_full_logits_with_gradients(build, reduction):
    targets = IDX.roll(-1, 1)
    targets[0, :3] = -100
    out = []
    for chunk in (0, 5):
        m = build().train()
        m.logprob_chunk = chunk
        loss = m(IDX, targets=targets, loss_reduction=reduction)
        loss.sum().backward()
        out.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = out
    assert (l0 - l1).abs().max() <= 1e-5 and g0.keys() == g1.keys()
    assert all((g0[n] - g1[n]).abs().max() <= 1e-5 for n in g0)
