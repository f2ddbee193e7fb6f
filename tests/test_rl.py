"""r1kit.rl against hand arithmetic (written out in the comments), gradient signs and edge cases."""

import functools
import math

import pytest
import torch

from r1kit import rl

D = torch.float64  # exact-ish arithmetic so hand values can be compared tightly


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), rtol=tol, atol=tol)


def logp_pair(log_ratios, dtype=D):
    """(logp requiring grad, old_logp) with logp - old_logp == log_ratios exactly (old = 0)."""
    logp = t(log_ratios, dtype).clone().requires_grad_(True)
    return logp, torch.zeros_like(logp)


# ---------------------------------------------------------------------------- advantages


def test_grpo_advantages_sample_std_hand_values():
    # group [1,0,0,0]: mean 0.25; deviations .75, -.25 x3; squares .5625 + 3*.0625 = .75
    # sample var = .75/3 = .25 -> std .5 -> adv = [1.5, -.5, -.5, -.5]
    # group [2,4,6,8]: mean 5, squares 9+1+1+9 = 20, var 20/3, std 2.5820 -> adv = dev/std
    r = t([1, 0, 0, 0, 2, 4, 6, 8])
    s = math.sqrt(20 / 3)
    close(rl.grpo_advantages(r, 4, eps=0.0), [1.5, -.5, -.5, -.5, -3 / s, -1 / s, 1 / s, 3 / s])
    # with the default eps the denominator is std + 1e-4
    close(rl.grpo_advantages(r, 4)[:4], t([1.5, -.5, -.5, -.5]) * .5 / .5001)


def test_grpo_advantages_population_std():
    # population var of [1,0,0,0] = .75/4 = .1875, std = sqrt(3)/4 -> adv = .75/(sqrt3/4) = sqrt3
    close(rl.grpo_advantages(t([1, 0, 0, 0]), 4, eps=0.0, unbiased=False),
          [math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)])


def test_advantages_keep_shape_and_accept_2d_and_ints():
    flat = torch.tensor([1, 0, 1, 1, 0, 0])  # ints are promoted to float
    a_flat = rl.grpo_advantages(flat, 3)
    a_2d = rl.grpo_advantages(flat.view(2, 3), 3)
    assert a_flat.shape == (6,) and a_2d.shape == (2, 3) and a_flat.is_floating_point()
    close(a_flat.view(2, 3), a_2d)
    assert rl.drgrpo_advantages(flat.view(2, 3), 3).shape == (2, 3)
    with pytest.raises(ValueError):
        rl.grpo_advantages(t([1, 0, 1]), 2)  # 3 rewards cannot form groups of 2
    with pytest.raises(ValueError):
        rl.grpo_advantages(t([[1, 0, 1]]), 2)  # (B,G) width disagrees with group_size
    with pytest.raises(ValueError):
        rl.grpo_advantages(t([1.0]), 1)  # sample std of one value is undefined


def test_zero_variance_group_gives_zero_advantage_not_nan():
    a = rl.grpo_advantages(t([1, 1, 1, 0, 1, 0]), 3)
    assert torch.isfinite(a).all()
    close(a[:3], [0, 0, 0])  # 0 / (0 + eps)


def test_drgrpo_is_mean_only():
    # [1,0,0,0] - .25 ; [2,4] - 3
    close(rl.drgrpo_advantages(t([1, 0, 0, 0]), 4), [.75, -.25, -.25, -.25])
    close(rl.drgrpo_advantages(t([2, 4]), 2), [-1, 1])


def test_zero_variance_mask_and_dynamic_sampling_keep():
    r = t([1, 1, 0, 1, 0, 0, .5, .5])  # groups of 2: [1,1] [0,1] [0,0] [.5,.5]
    assert rl.zero_variance_groups(r, 2).tolist() == [True, False, True, True]
    assert rl.groups_to_keep(r, 2).tolist() == [False, True, False, False]
    assert rl.expand_group_mask(rl.groups_to_keep(r, 2), 2).tolist() == [False, False, True, True] + [False] * 4
    # atol groups near-equal graded rewards together
    assert rl.zero_variance_groups(t([.5, .5 + 1e-9]), 2, atol=1e-6).tolist() == [True]


# ---------------------------------------------------------------------------- clipped loss


def test_clipped_loss_hand_values_gradients_and_clip_counts():
    # eps = .2 -> clip range [.8, 1.2]. Per token (ratio, A) -> loss, d loss / d logp:
    #   (1.1, +1): min(1.1, 1.1) -> -1.1, grad -r*A = -1.1      (inside range)
    #   (1.5, +1): min(1.5, 1.2) -> -1.2, grad 0, high-clipped
    #   (0.5, +1): min(0.5, 0.8) -> -0.5, grad -0.5            (below range, A>0: not clipped)
    #   (0.5, -1): min(-.5, -.8) -> +0.8, grad 0, low-clipped
    #   (1.5, -1): min(-1.5,-1.2) -> +1.5, grad +1.5           (above range, A<0: not clipped)
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5]
    logp, old = logp_pair([[math.log(x)] for x in ratios])
    adv = t([1, 1, 1, -1, -1])
    mask = torch.ones(5, 1, dtype=torch.bool)
    loss, st = rl.clipped_token_loss(logp, old, adv, mask)
    close(loss.squeeze(1), [-1.1, -1.2, -0.5, 0.8, 1.5])
    loss.sum().backward()
    close(logp.grad.squeeze(1), [-1.1, 0, -0.5, 0, 1.5])
    close(st["clip_frac"], 2 / 5)
    close(st["clip_frac_high"], 1 / 5)
    close(st["clip_frac_low"], 1 / 5)
    close(st["ratio_mean"], sum(ratios) / 5)


def test_clip_boundary_is_not_clipped_and_keeps_gradient():
    # exp(log 2) == 2.0 exactly in float64, so ratio sits exactly on 1 + eps_high = 2.
    logp, old = logp_pair([[math.log(2.0)]])
    assert torch.exp(logp - old).item() == 2.0
    loss, st = rl.clipped_token_loss(logp, old, t([1.0]), torch.ones(1, 1, dtype=torch.bool), eps_high=1.0)
    loss.sum().backward()
    close(loss, [[-2.0]])
    close(logp.grad, [[-2.0]])  # full gradient: clamp is inclusive at its bounds
    close(st["clip_frac"], 0.0)
    # and an epsilon past the bound it is clipped, with zero gradient
    logp, old = logp_pair([[math.log(2.0) + 1e-6]])
    loss, st = rl.clipped_token_loss(logp, old, t([1.0]), torch.ones(1, 1, dtype=torch.bool), eps_high=1.0)
    loss.sum().backward()
    close(logp.grad, [[0.0]])
    close(st["clip_frac"], 1.0)


def test_zero_eps_on_policy_is_plain_policy_gradient():
    # ratio exactly 1 == both bounds when eps = 0: still the boundary, so nothing is clipped.
    logp = t([[-1.0, -2.0], [-0.5, -3.0]]).requires_grad_(True)
    adv = t([2.0, -3.0])
    loss, st = rl.clipped_token_loss(logp, logp.detach(), adv, torch.ones(2, 2), eps_low=0.0, eps_high=0.0)
    close(loss, [[-2.0, -2.0], [3.0, 3.0]])  # -A * 1
    loss.sum().backward()
    close(logp.grad, [[-2.0, -2.0], [3.0, 3.0]])  # -A * r
    close(st["clip_frac"], 0.0)


def test_positive_advantage_increases_logp_and_negative_decreases():
    for a, sign in ((1.0, 1.0), (-1.0, -1.0)):
        logp = t([[-1.0, -1.2, -0.7]]).requires_grad_(True)
        old = logp.detach()
        for loss_fn in (rl.clipped_token_loss, rl.dual_clip_token_loss, rl.gspo_sequence_loss):
            loss, _ = loss_fn(logp, old, t([a]), torch.ones(1, 3))
            (g,) = torch.autograd.grad(rl.token_mean(loss, torch.ones(1, 3)), logp)
            # a gradient-descent step moves logp by -lr * g
            assert (torch.sign(-g) == sign).all(), (loss_fn.__name__, a, g)


def test_clip_higher_decouples_bounds():
    # ratio 1.25 with A>0: clipped at eps_high=.2 (loss -1.2) but not at .28 (loss -1.25).
    # ratio 0.75 with A<0: clipped at eps_low=.2 (lower bound .8 -> loss +.8) in both settings.
    logp, old = logp_pair([[math.log(1.25)], [math.log(0.75)]])
    adv, mask = t([1.0, -1.0]), torch.ones(2, 1)
    sym, st_sym = rl.clipped_token_loss(logp, old, adv, mask)
    dapo, st_dapo = rl.clipped_token_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    close(sym.squeeze(1), [-1.2, 0.8])
    close(dapo.squeeze(1), [-1.25, 0.8])
    close(st_sym["clip_frac_high"], 0.5)
    close(st_dapo["clip_frac_high"], 0.0)
    close(st_dapo["clip_frac_low"], 0.5)


def test_padding_is_zero_ignored_by_stats_and_nan_safe():
    # token 2 of row 0 is padding holding a NaN log-prob and (were it real) a clippable ratio.
    logp = t([[math.log(1.1), float("nan")], [math.log(5.0), 0.0]]).requires_grad_(True)
    old = torch.zeros(2, 2, dtype=D)
    mask = torch.tensor([[True, False], [True, False]])
    for loss_fn in (rl.clipped_token_loss, rl.dual_clip_token_loss, rl.gspo_sequence_loss):
        loss, st = loss_fn(logp, old, t([1.0, 1.0]), mask, eps_low=0.2, eps_high=0.2)
        assert loss[:, 1].eq(0).all() and torch.isfinite(loss).all()
        (g,) = torch.autograd.grad(rl.token_mean(loss, mask), logp)
        assert torch.isfinite(g).all() and g[:, 1].eq(0).all()
        close(st["clip_frac"], 0.5)  # 1 of the 2 real tokens (ratio 5 > 1.2), padding not counted


def test_huge_log_ratio_is_clamped_not_inf():
    logp, old = logp_pair([[500.0, -500.0]])
    loss, st = rl.clipped_token_loss(logp, old, t([-1.0]), torch.ones(1, 2))
    assert torch.isfinite(loss).all() and torch.isfinite(st["ratio_mean"])
    close(loss[0, 0], math.exp(rl.LOG_RATIO_CLAMP))  # -A * exp(20), not inf
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()


# ---------------------------------------------------------------------------- dual clip


def test_dual_clip_hand_values():
    # c = 3, eps = .2.  (ratio, A):
    #   (4, -1): clipped surrogate max(-A*r, -A*clip) = max(4, 1.2) = 4 > cap -c*A = 3 -> 3, grad 0
    #   (2, -1): 2 < 3 -> 2, grad -A*r = 2
    #   (4, +1): ordinary high clip -> -1.2, grad 0 (cap only applies to A<0)
    #   (.5,-1): ordinary low clip -> .8, grad 0
    logp, old = logp_pair([[math.log(4.0)], [math.log(2.0)], [math.log(4.0)], [math.log(0.5)]])
    adv, mask = t([-1.0, -1.0, 1.0, -1.0]), torch.ones(4, 1)
    loss, st = rl.dual_clip_token_loss(logp, old, adv, mask, clip_c=3.0)
    close(loss.squeeze(1), [3.0, 2.0, -1.2, 0.8])
    loss.sum().backward()
    close(logp.grad.squeeze(1), [0.0, 2.0, 0.0, 0.0])
    close(st["dual_clip_frac"], 1 / 4)
    close(st["clip_frac"], 2 / 4)  # rows 3 and 4: the ordinary clip only
    with pytest.raises(ValueError):
        rl.dual_clip_token_loss(logp, old, adv, mask, clip_c=1.0)


def test_dual_clip_equals_plain_clip_when_cap_inactive():
    torch.manual_seed(0)
    logp = (torch.randn(4, 6, dtype=D) * 0.3)
    old = logp + torch.randn(4, 6, dtype=D) * 0.1  # ratios ~ exp(+-0.3) << 3
    adv, mask = torch.randn(4, dtype=D), torch.rand(4, 6) > 0.3
    a, _ = rl.clipped_token_loss(logp, old, adv, mask)
    b, st = rl.dual_clip_token_loss(logp, old, adv, mask)
    close(a, b)
    close(st["dual_clip_frac"], 0.0)


# ---------------------------------------------------------------------------- GSPO


def reference_gspo(logp, old, adv, mask, eps_low, eps_high):
    """The paper's sequence objective written directly: -(1/N) sum_i min(s_i A_i, clip(s_i) A_i)."""
    m = mask.to(logp.dtype)
    s = torch.exp(((logp - old) * m).sum(1) / m.sum(1))
    return -torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv).mean()


def test_gspo_hand_value_and_ragged_sequence_mean():
    # row 0: token log-ratios .1, .3 -> mean .2 -> s = e^.2 = 1.22140 ; row 1: .4 + padding -> s = e^.4
    logp, old = logp_pair([[0.1, 0.3], [0.4, 9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    close(rl.sequence_log_ratio(logp, old, mask), [0.2, 0.4])
    # wide eps (.5): both inside [.5, 1.5]; A = [1, -1] -> token losses -s0 (twice), +s1
    loss, st = rl.gspo_sequence_loss(logp, old, t([1.0, -1.0]), mask, eps_low=0.5, eps_high=0.5)
    close(loss, [[-math.exp(0.2), -math.exp(0.2)], [math.exp(0.4), 0.0]])
    close(st["clip_frac"], 0.0)
    # paper defaults (3e-4 / 4e-4): s0 > 1.0004 with A>0 -> clipped to -1.0004 on both tokens
    loss, st = rl.gspo_sequence_loss(logp, old, t([1.0, -1.0]), mask)
    close(loss[0], [-1.0004, -1.0004])
    close(st["clip_frac"], 2 / 3)  # 2 of the 3 real tokens belong to a clipped sequence


def test_gspo_matches_sequence_level_objective_and_gradient():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    for eps in ((0.3, 0.4), (3e-4, 4e-4)):  # unclipped regime and the paper's (mostly clipped)
        base = torch.randn(3, 4, dtype=D)
        old = base + torch.randn(3, 4, dtype=D) * 0.05
        adv = t([0.7, -1.3, 0.4])
        logp_a = base.clone().requires_grad_(True)
        loss, _ = rl.gspo_sequence_loss(logp_a, old, adv, mask, *eps)
        ours = rl.seq_mean_token_mean(loss, mask)
        ours.backward()
        logp_b = base.clone().requires_grad_(True)
        ref = reference_gspo(logp_b, old, adv, mask, *eps)
        ref.backward()
        close(ours, ref)
        close(logp_a.grad, logp_b.grad)


def test_gspo_equals_token_level_when_all_ratios_equal():
    # every token of a sequence has log-ratio d_i, so s_i = exp(d_i) = each token ratio.
    d = t([[0.1], [-0.15], [0.3], [0.05]])
    base = torch.randn(4, 5, dtype=D)
    old = base - d
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2, 3:] = False
    adv = t([1.0, -1.0, 1.0, -2.0])
    grads = []
    for loss_fn in (rl.clipped_token_loss, rl.gspo_sequence_loss):
        logp = base.clone().requires_grad_(True)
        loss, st = loss_fn(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
        rl.token_mean(loss, mask).backward()
        grads.append((loss.detach(), logp.grad, st["clip_frac"]))
    close(grads[0][0], grads[1][0])
    close(grads[0][1], grads[1][1])
    close(grads[0][2], grads[1][2])  # row 2 (ratio e^.3 > 1.2, A>0) clips in both


# ---------------------------------------------------------------------------- aggregation


VALUES = t([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]])  # row 1 padding is garbage
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_aggregations_on_ragged_mask():
    # seq means: (1+2+3)/3 = 2 and 4/1 = 4 -> (2+4)/2 = 3
    close(rl.seq_mean_token_mean(VALUES, MASK), 3.0)
    # tokens: (1+2+3+4)/4 = 2.5
    close(rl.token_mean(VALUES, MASK), 2.5)
    # sums 6 and 4, / norm 3 -> 2 and 4/3 -> mean 5/3
    close(rl.seq_mean_token_sum_norm(VALUES, MASK, 3), 5 / 3)
    with pytest.raises(ValueError):
        rl.seq_mean_token_sum_norm(VALUES, MASK, 0)


def test_aggregation_gradients_weight_tokens_as_documented():
    v = torch.zeros(2, 3, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(rl.seq_mean_token_mean(v, MASK), v)
    close(g, [[1 / 6, 1 / 6, 1 / 6], [1 / 2, 0, 0]])  # 1/(N * len_i): short rows weigh more
    (g,) = torch.autograd.grad(rl.token_mean(v, MASK), v)
    close(g, [[.25, .25, .25], [.25, 0, 0]])  # every token equal
    (g,) = torch.autograd.grad(rl.seq_mean_token_sum_norm(v, MASK, 4), v)
    close(g, [[1 / 8, 1 / 8, 1 / 8], [1 / 8, 0, 0]])  # 1/(N * norm): length-independent


def test_aggregation_empty_rows_and_empty_batch():
    m = torch.tensor([[1, 1], [0, 0]])
    close(rl.seq_mean_token_mean(t([[2.0, 4.0], [9.0, 9.0]]), m), 1.5)  # (3 + 0) / 2
    close(rl.token_mean(t([[2.0, 4.0], [9.0, 9.0]]), m), 3.0)
    close(rl.token_mean(t([[2.0]]), torch.zeros(1, 1)), 0.0)  # no tokens at all: 0, not NaN


def test_registries_name_the_functions():
    assert rl.ADVANTAGES["drgrpo"] is rl.drgrpo_advantages
    assert rl.POLICY_LOSSES["gspo"] is rl.gspo_sequence_loss
    assert rl.KL_ESTIMATORS["k3"] is rl.kl_k3
    agg = functools.partial(rl.AGGREGATIONS["seq_mean_token_sum_norm"], norm=3)
    close(agg(VALUES, MASK), 5 / 3)


# ---------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    # pi_theta = .5, pi_ref = .25 -> r = pi_ref/pi_theta = .5, log r = -ln 2
    # k1 = -log r = ln2 ; k2 = (ln2)^2/2 ; k3 = r - 1 - log r = -.5 + ln2
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    ln2 = math.log(2)
    close(rl.kl_k1(logp, ref), [ln2])
    close(rl.kl_k2(logp, ref), [ln2 ** 2 / 2])
    close(rl.kl_k3(logp, ref), [ln2 - 0.5])


def test_k1_and_k3_are_unbiased_for_kl_policy_to_ref():
    # E_{x~pi}[k(x)] over the full support equals KL(pi || ref) exactly for k1 and k3.
    pi, ref = t([0.5, 0.3, 0.2]), t([0.2, 0.2, 0.6])
    kl = (pi * (pi / ref).log()).sum()
    for k in (rl.kl_k1, rl.kl_k3):
        close((pi * k(pi.log(), ref.log())).sum(), kl)


# A small categorical policy pi = softmax(theta) far from its reference, and the exact gradients
# (w.r.t. theta) of the two KLs an estimator can claim.
THETA = [1.0, -0.5, 0.3, 2.0, -1.2]
REF = [0.1, 0.3, 0.25, 0.05, 0.3]


def kl_gradients():
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    logpi, logref = torch.log_softmax(theta, 0), torch.tensor(REF, dtype=torch.float64).log()
    reverse = torch.autograd.grad((logpi.exp() * (logpi - logref)).sum(), theta, retain_graph=True)[0]  # KL(pi || ref)
    forward = torch.autograd.grad((logref.exp() * (logref - logpi)).sum(), theta)[0]  # KL(ref || pi)
    return reverse, forward


def estimator_gradient(name, n=None, sample_from=None, seed=0):
    """E_{x ~ q}[grad_theta k(x)]: exactly over the support (n None) or by Monte Carlo over n draws.

    q is the policy itself (on-policy) or `sample_from` (an old policy; log-probs passed as old_logp).
    """
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    logpi, logref = torch.log_softmax(theta, 0), torch.tensor(REF, dtype=torch.float64).log()
    logq = logpi.detach() if sample_from is None else torch.tensor(sample_from, dtype=torch.float64).log()
    old = None if sample_from is None else logq
    if n is None:  # exact: weight every outcome by its sampling probability
        expected = (logq.exp() * rl.KL_ESTIMATORS[name](logpi, logref, old)).sum()
        return torch.autograd.grad(expected, theta)[0], expected.detach()
    x = torch.multinomial(logq.exp(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    mean = rl.KL_ESTIMATORS[name](logpi[x], logref[x], None if old is None else old[x]).mean()
    return torch.autograd.grad(mean, theta)[0], mean.detach()


@pytest.mark.parametrize("name,claim", [("k1", "reverse"), ("k2", "reverse"), ("k3", "forward"),
                                        ("k3_iw", "reverse")])
def test_kl_estimator_gradients_are_those_of_the_kl_they_claim(name, claim):
    reverse, forward = kl_gradients()
    want, other = (reverse, forward) if claim == "reverse" else (forward, reverse)
    assert (want - other).norm() > 0.4 * want.norm()  # the setting tells the two KLs apart
    exact, _ = estimator_gradient(name)
    close(exact, want, tol=1e-9)
    mc, _ = estimator_gradient(name, n=200_000)  # what a training batch actually differentiates
    assert (mc - want).norm() < 0.05 * want.norm() < (mc - other).norm(), (mc, want, other)


def test_raw_k1_as_a_loss_has_zero_expected_gradient():
    """Why kl_k1 is the score-function form: differentiating log pi - log ref itself is noise."""
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    logpi, logref = torch.log_softmax(theta, 0), torch.tensor(REF, dtype=torch.float64).log()
    raw = logpi - logref
    close(torch.autograd.grad((logpi.exp().detach() * raw).sum(), theta)[0], torch.zeros(5), tol=1e-12)


def test_importance_weighted_k3_is_unbiased_off_policy():
    """DeepSeek-V3.2: samples from pi_old, (pi/pi_old) k3 still estimates KL(pi || ref) and its gradient."""
    reverse, _ = kl_gradients()
    pi = torch.softmax(torch.tensor(THETA, dtype=torch.float64), 0)
    kl = (pi * (pi / torch.tensor(REF, dtype=torch.float64)).log()).sum()
    old = [0.3, 0.1, 0.2, 0.25, 0.15]
    g, value = estimator_gradient("k3_iw", sample_from=old)
    close(g, reverse, tol=1e-9)
    close(value, kl, tol=1e-9)
    _, plain = estimator_gradient("k3", sample_from=old)  # without the weight: biased off-policy
    assert abs(float(plain - kl)) > 0.1


def test_k3_nonnegative_zero_at_equality_finite_and_pulls_toward_ref():
    torch.manual_seed(2)
    logp, ref = torch.randn(64, 16) * 5, torch.randn(64, 16) * 5
    k3 = rl.kl_k3(logp, ref)
    assert (k3 >= 0).all() and torch.isfinite(k3).all()
    close(rl.kl_k3(ref, ref), torch.zeros(64, 16))
    # extreme gaps are clamped, not inf
    assert torch.isfinite(rl.kl_k3(t([-1000.0, 0.0]), t([0.0, -1000.0]))).all()
    # d k3 / d logp = 1 - r: positive when the policy is above the reference, so descent lowers it
    logp = t([-0.5, -3.0]).requires_grad_(True)
    rl.kl_k3(logp, t([-2.0, -1.0])).sum().backward()
    assert logp.grad[0] > 0 and logp.grad[1] < 0
    close(logp.grad, [1 - math.exp(-1.5), 1 - math.exp(2.0)])


# ---------------------------------------------------------------------------- logits helpers


def test_entropy_hand_values_and_stability():
    close(rl.entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]], tol=1e-6)
    # banned tokens (-inf): uniform over the 2 live tokens -> ln 2, finite gradient
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]], requires_grad=True)
    h = rl.entropy_from_logits(logits)
    close(h, [[math.log(2)]], tol=1e-6)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # huge logits do not overflow; a near one-hot has ~0 entropy
    assert rl.entropy_from_logits(torch.tensor([[[1e4, 0.0, 0.0]]])).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 7, dtype=D)
    p = x.softmax(-1)
    close(rl.entropy_from_logits(x), -(p * p.log()).sum(-1), tol=1e-6)


def test_token_logprobs_matches_log_softmax_and_ignores_negative_targets():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5)
    tgt = torch.tensor([[0, 4, 2], [1, -100, 3]])
    lp = rl.token_logprobs(x, tgt)
    ref = x.log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp[tgt >= 0], ref[tgt >= 0])
    assert lp[1, 1].item() == 0.0
    assert rl.token_logprobs(torch.randn(1, 2, 5, dtype=torch.bfloat16), torch.zeros(1, 2, dtype=torch.long)).dtype == torch.float32


def test_half_precision_inputs_are_upcast_so_gspo_can_resolve_its_clip_range():
    # bf16 steps by 2^-7 ~ 8e-3 just above 1: any ratio it can tell from 1 is outside GSPO's
    # [1-3e-4, 1+4e-4]. Formed in fp32, a 1e-4 sequence log-ratio stays inside, unclipped.
    logp = torch.full((2, 8), -2.0, dtype=torch.bfloat16, requires_grad=True)
    old = (logp.detach().float() - 1e-4)  # fp32 old log-probs, as stored at rollout time
    loss, st = rl.gspo_sequence_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 8))
    assert loss.dtype == torch.float32
    assert st["clip_frac"].item() == 0.0
    close(loss[0, 0].double(), -math.exp(1e-4), tol=1e-6)
    rl.token_mean(loss, torch.ones(2, 8)).backward()
    assert logp.grad.dtype == torch.bfloat16 and torch.isfinite(logp.grad).all()
    assert rl.kl_k3(logp, old).dtype == torch.float32


# ============================================================================ the 2025–26 family
# A shared small batch: 2 sequences x 3 tokens, the second padded at t = 2 where the log-probs
# hold NaN (garbage a real forward can leave there); the NaN must reach neither loss nor gradient.
FMASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
FLOG_R = [[0.0, math.log(8.0), math.log(0.5)], [math.log(1.1), math.log(0.7), float("nan")]]
FOLD = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, float("nan")]])
FADV = t([1.0, -2.0])  # per sequence


def family_batch():
    """(logp requiring grad, old_logp, ratio r (1 at padding)) with logp - old = FLOG_R."""
    logp = (FOLD + t(FLOG_R)).clone().requires_grad_(True)
    r = torch.where(FMASK.bool(), t(FLOG_R).exp(), t(1.0))
    return logp, FOLD, r


def grad_of(loss):
    """d sum(loss) / d logp for a per-token loss, and checks NaN stayed out of value and gradient."""
    per_tok, logp = loss
    assert torch.isfinite(per_tok).all() and (per_tok[1, 2] == 0)
    (g,) = torch.autograd.grad(per_tok.sum(), logp)
    assert torch.isfinite(g).all() and g[1, 2] == 0
    return g


def adv_tok():
    return FADV[:, None].expand(2, 3)


def test_cispo_value_and_gradient_are_the_clipped_weight_times_the_policy_gradient():
    logp, old, r = family_batch()
    loss, st = rl.cispo_token_loss(logp, old, FADV, FMASK, eps_low=0.2, eps_high=0.5)
    w = r.clamp(0.8, 1.5)  # ratios 1, 8, .5 | 1.1, .7 -> weights 1, 1.5, .8 | 1.1, .8
    close(w[0], [1.0, 1.5, 0.8])
    close(loss[FMASK.bool()], (-w * adv_tok() * logp.detach())[FMASK.bool()])
    # the paper's gradient: -sg(clip(r)) * A * grad log pi -- nonzero on every token, clipped or not
    close(grad_of((loss, logp)), torch.where(FMASK.bool(), -w * adv_tok(), t(0.0)))
    close(st["clip_frac"], 3 / 5)  # 8 and .5 in row 0, .7 in row 1
    # defaults: no lower bound (eps_low = 1): a tiny ratio keeps its own weight
    logp2 = t([[math.log(0.01)]]).requires_grad_(True)
    l2, _ = rl.cispo_token_loss(logp2, t([[0.0]]), t([-1.0]), torch.ones(1, 1))
    close(torch.autograd.grad(l2.sum(), logp2)[0], [[0.01]])


def test_sapo_value_and_gradient_match_the_soft_gate():
    logp, old, r = family_batch()
    tp, tn = 1.0, 1.05
    loss, st = rl.sapo_token_loss(logp, old, FADV, FMASK, tau_pos=tp, tau_neg=tn)
    tau = t([[tp] * 3, [tn] * 3])  # row 0 has A > 0, row 1 A < 0
    s = torch.sigmoid(tau * (r - 1))
    close(loss[FMASK.bool()], (-s * 4 / tau * adv_tok())[FMASK.bool()])
    # hand value, token (0, 0): r = 1 -> sigmoid(0) * 4 = 2 -> loss -2 * A = -2
    close(loss[0, 0], -2.0)
    # SAPO's gradient: -4 s (1 - s) r A grad log pi; at r = 1 exactly the policy gradient -A
    g = grad_of((loss, logp))
    close(g, torch.where(FMASK.bool(), -4 * s * (1 - s) * r * adv_tok(), t(0.0)))
    close(g[0, 0], -1.0)
    with pytest.raises(ValueError, match="positive"):
        rl.sapo_token_loss(logp, old, FADV, FMASK, tau_neg=0.0)


def test_dppo_tv_masks_on_the_probability_change_in_the_advantage_direction():
    logp, old, r = family_batch()
    loss, st = rl.dppo_tv_token_loss(logp, old, FADV, FMASK, delta=0.15)
    # row 0 (A > 0): pi - pi_old = e^-1 - e^-1 = 0 ; 8e^-2 - e^-2 = .947 > .15 -> masked ;
    #                .5e^-.5 - e^-.5 = -.303 (moved against A: never masked for A > 0)
    # row 1 (A < 0): 1.1e^-.3 - e^-.3 = +.074 ; .7e^-1.2 - e^-1.2 = -.090 > -.15 -> kept
    keep = t([[1, 0, 1], [1, 1, 0]])
    close(loss[FMASK.bool()], (-adv_tok() * r)[FMASK.bool()])  # masked tokens keep the surrogate's value
    # gradient: -r A on kept tokens, 0 on masked ones (the paper's masked policy gradient)
    close(grad_of((loss, logp)), -r * adv_tok() * keep)
    close(st["clip_frac"], 1 / 5)
    # the same move on a rare token (1e-4 -> 8e-4, ratio 8) is far inside the TV region
    lp = t([[math.log(8e-4)]]).requires_grad_(True)
    l3, s3 = rl.dppo_tv_token_loss(lp, t([[math.log(1e-4)]]), t([1.0]), torch.ones(1, 1))
    assert s3["clip_frac"] == 0 and torch.autograd.grad(l3.sum(), lp)[0].item() == pytest.approx(-8.0)


def test_token_covariance_hand_values_and_padding():
    logp = t([[-1.0, -3.0], [-2.0, float("nan")]])
    cov = rl.token_covariance(logp, t([1.0, -2.0]), torch.tensor([[1, 1], [1, 0]]))
    # valid logp -1, -3, -2: mean -2 ; A per token 1, 1, -2: mean 0 -> cov 1*1, -1*1, 0*-2
    close(cov, [[1.0, -1.0], [0.0, 0.0]])


def test_clip_cov_detaches_the_picked_band_token_only():
    logp, old, r = family_batch()
    cov = rl.token_covariance(logp, FADV, FMASK)
    lo, hi = sorted(cov[FMASK.bool()].tolist())[-2:]  # band = [second highest, highest]: 2 candidates
    g = torch.Generator().manual_seed(0)
    loss, st = rl.clip_cov_token_loss(logp, old, FADV, FMASK, ratio=0.2, cov_low=lo, cov_high=hi, generator=g)
    # max(1, int(.2 * 5)) = 1 token detached, one of the two in the band
    picked = st["cov_frac"] * 5
    close(picked, 1.0)
    grad = grad_of((loss, logp))
    full = torch.where(FMASK.bool(), -r * adv_tok(), t(0.0))  # the unclipped policy gradient elsewhere
    zeroed = (grad == 0) & FMASK.bool()
    assert int(zeroed.sum()) == 1 and lo <= cov[zeroed].item() <= hi
    close(grad[~zeroed], full[~zeroed])
    close(loss[FMASK.bool()], (-r * adv_tok())[FMASK.bool()])


def test_kl_cov_penalises_the_top_covariance_token():
    logp, old, r = family_batch()
    cov = rl.token_covariance(logp, FADV, FMASK)
    top = cov.masked_fill(~FMASK.bool(), -1e9).flatten().argmax()
    loss, st = rl.kl_cov_token_loss(logp, old, FADV, FMASK, ratio=0.2, coef=0.5)  # k = max(1, int(1)) = 1
    pen = torch.zeros(6, dtype=D)
    pen[top] = 1.0
    pen = pen.view(2, 3)
    lr = torch.where(FMASK.bool(), t(FLOG_R), t(0.0))
    close(loss, torch.where(FMASK.bool(), -r * adv_tok() + 0.5 * lr.abs() * pen, t(0.0)))
    # gradient: -r A + coef * sign(logp - old) on the penalised token
    close(grad_of((loss, logp)), torch.where(FMASK.bool(), -r * adv_tok() + 0.5 * lr.sign() * pen, t(0.0)))
    close(st["cov_frac"], 1 / 5)


def test_new_losses_reduce_to_the_policy_gradient_on_policy():
    # one update per batch (old = logp.detach()): every loss's gradient is -A (Clip-Cov apart from
    # its detached token, CISPO's value aside) -- switching losses changes nothing until mu > 1
    for name in ("cispo", "sapo", "dppo_tv", "kl_cov"):
        logp = t([[-1.0, -2.0], [-0.5, float("nan")]]).requires_grad_(True)
        loss, _ = rl.POLICY_LOSSES[name](logp, logp.detach(), t([1.0, -1.0]), torch.tensor([[1, 1], [1, 0]]))
        (g,) = torch.autograd.grad(loss.sum(), logp)
        close(g, [[-1.0, -1.0], [1.0, 0.0]])


# ---------------------------------------------------------------------------- new advantages


def test_rloo_is_leave_one_out_and_a_rescaled_group_mean():
    # [1, 0, 0, 0]: baselines (0+0+0)/3 = 0 for the first, (1+0+0)/3 for the others
    close(rl.rloo_advantages(t([1, 0, 0, 0]), 4), [1.0, -1 / 3, -1 / 3, -1 / 3])
    r = t([0.3, 1.0, 0.2, 0.9, 0.0, 0.5])
    close(rl.rloo_advantages(r, 3), 3 / 2 * rl.drgrpo_advantages(r, 3))
    with pytest.raises(ValueError):
        rl.rloo_advantages(t([1.0]), 1)


def test_reinforce_pp_baseline_and_liteppo_use_batch_scale():
    r = t([1, 0, 0, 0, 1, 1, 1, 0])  # groups of 4: dev [.75,-.25,-.25,-.25] and [.25,.25,.25,-.75]
    dev = t([.75, -.25, -.25, -.25, .25, .25, .25, -.75])
    # REINFORCE++-baseline: whitened over the batch: mean 0, population std sqrt(mean(dev^2)) = sqrt(.1875)
    close(rl.reinforce_pp_baseline_advantages(r, 4, eps=0.0), dev / math.sqrt(0.1875))
    # LitePPO: group mean, sample std of the raw rewards over the batch: 4 ones of 8 -> var 2/7
    close(rl.liteppo_advantages(r, 4, eps=0.0), dev / math.sqrt(2 / 7))


def test_maxrl_divides_by_the_success_rate():
    # group [1,0,0,0]: mean .25 -> (1-.25)/.25 = 3, -1 ; group [1,1,1,0]: mean .75 -> 1/3, -1
    close(rl.maxrl_advantages(t([1, 0, 0, 0, 1, 1, 1, 0]), 4, eps=0.0), [3, -1, -1, -1, 1 / 3, 1 / 3, 1 / 3, -1])
    a = rl.maxrl_advantages(t([0, 0, 0, 0]), 4)  # never solved: 0, not 0/0
    assert torch.isfinite(a).all() and (a == 0).all()
    with pytest.raises(ValueError, match="non-negative"):
        rl.maxrl_advantages(t([-1.0, 1.0]), 2)


def test_gdpo_normalises_each_component_before_summing():
    # component a: [1,0 | 1,1], component b: [0,1 | 1,0]
    parts = t([[1, 0], [0, 1], [1, 1], [1, 0]])
    # s = (1 - .5) / sample std .7071 of [1, 0] = 1/sqrt2 per part
    # group 1: a -> [s, -s], b -> [-s, s]: sums 0, 0 ; group 2: a constant -> 0, b -> [s, -s]
    # sum [0, 0, s, -s]; whitened: mean 0, pop std s/sqrt(2) -> [0, 0, sqrt2, -sqrt2]
    close(rl.gdpo_advantages(parts, 2, eps=0.0), [0, 0, math.sqrt(2), -math.sqrt(2)])
    # weights apply after the normalisation: b x 3 -> sums [-2s, 2s, 3s, -3s], pop std s*sqrt(6.5)
    close(rl.gdpo_advantages(parts, 2, eps=0.0, weights=t([1.0, 3.0])), t([-2, 2, 3, -3]) / math.sqrt(6.5))
    # the point of GDPO: a wide component no longer drowns a narrow one. a = [0, 10], b = [1, 0]:
    # GRPO on the sums [1, 10] prefers the second sample; GDPO sees one win each -> a tie
    # (a second group with signal sets the batch scale)
    wide = t([[0, 1], [10, 0], [1, 0], [0, 0]])
    assert rl.grpo_advantages(wide.sum(1), 2)[1] > 0.7
    close(rl.gdpo_advantages(wide, 2), [0, 0, math.sqrt(2), -math.sqrt(2)], tol=1e-3)
    with pytest.raises(ValueError, match="reward parts"):
        rl.gdpo_advantages(t([1.0, 0.0]), 2)


# ---------------------------------------------------------------------------- mismatch corrections

from r1kit import offpolicy  # noqa: E402

# trainer vs sampler log-probs of the same tokens; the padded slot holds NaN on both sides
TRAIN = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, float("nan")]])
ROLL = TRAIN + t([[0.0, math.log(0.25), math.log(4.0)], [math.log(0.1), -0.3, float("nan")]])  # rollout side
# pi_train / pi_rollout = 1, 4, .25 | 10, e^.3 = 1.35


def with_weights(w):
    """Gradient of a token-mean clipped loss on policy (grad -A/n per token), each token scaled by w."""
    logp = TRAIN.clone().requires_grad_(True)
    loss, _ = rl.clipped_token_loss(logp, logp.detach(), FADV, FMASK)
    (g,) = torch.autograd.grad(rl.token_mean(loss * w, FMASK), logp)
    assert torch.isfinite(g).all()
    return g


def test_mismatch_stat_is_the_mean_absolute_log_ratio():
    s = offpolicy.mismatch_stats(TRAIN, ROLL, FMASK)
    close(s["mismatch_abs_logp"], (math.log(4) * 2 + math.log(10) + 0.3) / 5, tol=1e-7)


def test_tis_weights_truncate_the_ratio_and_scale_the_gradient():
    w, s = offpolicy.tis_weights(TRAIN, ROLL, FADV, FMASK, cap=2.0)
    close(w, [[1, 2, .25], [2, math.exp(.3), 0]], tol=1e-12)  # 4 and 10 truncated at C = 2
    close(s["tis_clip_frac"], 2 / 5)
    # the corrected policy gradient: -min(ratio, C) * A / n on every token
    close(with_weights(w), -w * FADV[:, None] / 5)


def test_icepop_drops_tokens_outside_the_band():
    w, s = offpolicy.icepop_weights(TRAIN, ROLL, FADV, FMASK, low=0.5, high=5.0)
    close(w, [[1, 1, 0], [0, 1, 0]])  # .25 < .5 and 10 > 5 dropped
    close(s["icepop_mask_frac"], 2 / 5)
    g = with_weights(w)
    assert g[0, 2] == 0 and g[1, 0] == 0 and g[0, 0] == pytest.approx(-1 / 5)
    with pytest.raises(ValueError):
        offpolicy.icepop_weights(TRAIN, ROLL, FADV, FMASK, low=2.0, high=5.0)


def test_offpolicy_sequence_mask_drops_only_drifted_negative_sequences():
    # roles swapped here (ROLL as the trainer's) so the sampler liked its tokens more than the trainer
    # now does: mean log(pi_rollout / pi_train) row 0 (0 - ln4 + ln4)/3 = 0 ; row 1 (ln10 + .3)/2 = 1.30
    w, s = offpolicy.offpolicy_sequence_weights(ROLL, TRAIN, t([1.0, -1.0]), FMASK, delta=1.0)
    close(w, [[1, 1, 1], [0, 0, 0]])
    close(s["seqmask_frac"], 0.5)
    w_pos, _ = offpolicy.offpolicy_sequence_weights(ROLL, TRAIN, t([1.0, 1.0]), FMASK, delta=1.0)
    close(w_pos, FMASK)  # a positive sequence is kept however far it drifted
    w_hi, _ = offpolicy.offpolicy_sequence_weights(ROLL, TRAIN, t([1.0, -1.0]), FMASK, delta=1.5)
    close(w_hi, FMASK)
    w_rev, _ = offpolicy.offpolicy_sequence_weights(TRAIN, ROLL, t([1.0, -1.0]), FMASK, delta=1.0)
    close(w_rev, FMASK)  # the trainer likes them more than the sampler did: not off-policy in the harmful way
    assert with_weights(w)[1].abs().sum() == 0


def test_high_entropy_selection_keeps_the_top_share_of_valid_tokens():
    ent = t([[0.1, 2.0, 0.5], [1.0, 0.2, float("nan")]])
    w, s = offpolicy.high_entropy_weights(ent, FMASK, top_frac=0.2)  # ceil(.2 * 5) = 1 token
    close(w, [[0, 1, 0], [0, 0, 0]])
    close(s["entropy_threshold"], 2.0)
    w, _ = offpolicy.high_entropy_weights(ent, FMASK, top_frac=0.5)  # ceil(2.5) = 3
    close(w, [[0, 1, 1], [1, 0, 0]])
    g = with_weights(w)
    assert (g[w == 0] == 0).all() and (g[w == 1] != 0).all()
    with pytest.raises(ValueError):
        offpolicy.high_entropy_weights(ent, FMASK, top_frac=0.0)


def test_every_registered_option_is_wired_into_the_trainer():
    from r1kit.stages import grpo
    assert set(grpo.LOSS_ARGS) == set(rl.POLICY_LOSSES)
    assert set(grpo.ADVANTAGE_ARGS) == set(rl.ADVANTAGES)
    assert set(grpo.CORRECTION_ARGS) == set(offpolicy.CORRECTIONS)
    cfg = grpo.GRPOConfig()
    for table in (grpo.LOSS_ARGS, grpo.ADVANTAGE_ARGS, grpo.CORRECTION_ARGS):
        for name in table:
            grpo.option_kwargs(cfg, table, name)  # every named field exists
    from r1kit.config import ConfigError
    with pytest.raises(ConfigError, match="grpo.corrections"):
        grpo.GRPOConfig(corrections=["tiss"])
