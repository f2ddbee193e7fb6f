"""training.py helpers shared by every stage: the optimizer and gradient clipping."""
import math

import torch

from r1kit.training import adamw, clip_grad_norm


def _params():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    w.grad, b.grad = torch.full((4, 3), 3.0), torch.full((4,), 4.0)
    return [w, b]


def test_grad_clip_zero_is_off_and_still_reports_the_norm():
    ps = _params()
    norm = clip_grad_norm(ps, 0.0)
    assert abs(norm.item() - math.sqrt(12 * 9 + 4 * 16)) < 1e-5
    assert torch.equal(ps[0].grad, torch.full((4, 3), 3.0)) and torch.equal(ps[1].grad, torch.full((4,), 4.0))


def test_grad_clip_scales_the_global_norm_down_to_the_bound():
    ps = _params()
    clip_grad_norm(ps, 1.0)
    total = torch.cat([p.grad.flatten() for p in ps]).norm()
    assert abs(total.item() - 1.0) < 1e-5


def test_adamw_is_fused_on_plain_tensors_and_steps_like_the_reference_loop():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ref.load_state_dict(model.state_dict())
    opt = adamw(model, 1e-2, weight_decay=0.1)
    assert opt.defaults["fused"]
    groups = [{"params": [ref[0].weight], "weight_decay": 0.1}, {"params": [ref[0].bias, *ref[1].parameters()],
                                                                    "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)
    x = torch.randn(8, 3)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
