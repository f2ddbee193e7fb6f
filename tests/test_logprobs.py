"""Vocabulary-chunked log-probs and entropy: values and gradients equal the full-logits reference."""
import pytest
import torch

from r1kit.models.logprobs import chunked_logprobs


def reference(h, w, b, y, temperature):
    z = torch.nn.functional.linear(h, w, b)
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / (temperature if temperature > 0 else 1.0)
    logp = torch.log_softmax(z, -1)
    lp = torch.where(y >= 0, logp.gather(-1, y.clamp(min=0)[..., None])[..., 0], torch.zeros(()))
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


@pytest.mark.parametrize("temperature,chunk,bias", [(1.0, 3, False), (0.7, 1, True), (0.0, 64, False)])
def test_values_and_gradients_match_full_logits(temperature, chunk, bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(50, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, 50, (2, 7), generator=g)
    y[0, 2] = y[1, 6] = -100  # ignored positions: no gradient through their log-prob
    c_lp, c_ent = torch.randn(2, 7, generator=g, dtype=torch.float64), torch.randn(2, 7, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda *a: chunked_logprobs(*a[:2], a[3], a[4], bias=a[2], chunk=chunk), reference):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        bb = b.clone().requires_grad_() if b is not None else None
        lp, ent = fn(hh, ww, bb, y, temperature)
        ((lp * c_lp).sum() + (ent * c_ent).sum()).backward()
        grads.append((lp.detach(), ent.detach(), hh.grad, ww.grad, bb.grad if bb is not None else None))
    for ours, ref in zip(*grads):
        if ref is None:
            continue
        assert (ours.double() - ref.double()).abs().max() <= 1e-6


def test_gradient_of_logprob_only_float32_matches():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (40,), generator=g)
    lp, _ = chunked_logprobs(h, w, y, chunk=7)
    lp.sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    reference(h, w, None, y, 1.0)[0].sum().backward()
    assert (gh - h.grad).abs().max() <= 1e-5 and (gw - w.grad).abs().max() <= 1e-5


def test_token_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="disagree on the token count"):
        chunked_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
