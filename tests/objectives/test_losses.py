"""Each pure loss against the formula of docs/algorithms.md, computed independently here, with gradients."""

import math

import pytest
import torch

from trl_refpo import losses


torch.manual_seed(0)
B = 7


def random_logps(dtype=torch.float64, requires_grad=False):
    return [(-20 * torch.rand(B, dtype=dtype)).requires_grad_(requires_grad) for _ in range(4)]


def log_sigmoid(x):
    return -(torch.clamp(-x, min=0) + torch.log1p(torch.exp(-x.abs())))


def test_sigmoid_dpo_matches_formula():
    pc, pr, rc, rr = random_logps()
    expected = -log_sigmoid(0.3 * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(losses.sigmoid_dpo_loss(pc, pr, rc, rr, 0.3), expected, atol=1e-6, rtol=0)


def test_sigmoid_dpo_accepts_per_pair_beta():
    pc, pr, rc, rr = random_logps()
    beta = torch.rand(B, dtype=torch.float64) + 0.01
    expected = torch.stack([-log_sigmoid(beta[i] * ((pc[i] - rc[i]) - (pr[i] - rr[i]))) for i in range(B)])
    torch.testing.assert_close(losses.sigmoid_dpo_loss(pc, pr, rc, rr, beta), expected, atol=1e-6, rtol=0)


def test_flex_dpo_matches_formula_and_reduces_to_dpo():
    pc, pr, rc, rr = random_logps()
    expected = -log_sigmoid(0.1 * (pc - rc) - 0.08 * (pr - rr))
    torch.testing.assert_close(losses.flex_dpo_loss(pc, pr, rc, rr, 0.1, 0.08), expected, atol=1e-6, rtol=0)
    # β·a − β·b vs β·(a − b): equal up to the last bit (SIMD and scalar paths round differently).
    torch.testing.assert_close(
        losses.flex_dpo_loss(pc, pr, rc, rr, 0.2, 0.2),
        losses.sigmoid_dpo_loss(pc, pr, rc, rr, 0.2),
        atol=1e-12,
        rtol=0,
    )


def test_epsilon_dpo_steps_and_beta():
    s = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    weaker = torch.tensor([1.0, -1.0, 1.0, 0.0, 2.0])
    stronger = torch.tensor([-1.0, 1.0, 2.0, 0.0, 0.5])
    steps = losses.epsilon_dpo_steps(s, weaker, stronger)
    assert steps.tolist() == [1, -1, 0, 0, 1]
    beta = losses.epsilon_dpo_pair_beta(0.1, 0.01, steps)
    torch.testing.assert_close(beta, torch.tensor([0.1 / 1.01, 0.1 / 0.99, 0.1, 0.1, 0.1 / 1.01]))


def alpha_dpo_reference(pc, pr, rc, rr, beta, gamma_beta_ratio, alpha, mu, sigma):
    u = pc - pr
    g = u - (rc - rr)
    z = (g - mu) / sigma
    margin = gamma_beta_ratio + alpha * z
    return -log_sigmoid(beta * (u - margin))


def test_alpha_dpo_matches_formula():
    pc, pr, rc, rr = random_logps()
    expected = alpha_dpo_reference(pc, pr, rc, rr, 2.5, 0.6, 0.2, 0.3, 1.7)
    got = losses.alpha_dpo_loss(pc, pr, rc, rr, 2.5, 0.6, 0.2, 0.3, 1.7)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_alpha_dpo_margin_is_stop_gradient():
    pc, pr, rc, rr = random_logps(requires_grad=True)
    losses.alpha_dpo_loss(pc, pr, rc, rr, 2.5, 0.6, 0.2, 0.3, 1.7).sum().backward()
    assert rc.grad is None and rr.grad is None  # the reference enters only through the stop-gradient margin
    u = (pc - pr).detach()
    expected = -2.5 * torch.sigmoid(-2.5 * (u - (0.6 + 0.2 * ((u - (rc - rr).detach()) - 0.3) / 1.7)))
    torch.testing.assert_close(pc.grad, expected, atol=1e-6, rtol=0)


def test_alpha_zero_is_simpo_exactly():
    pc, pr, rc, rr = random_logps()
    for mu, sigma in [(0.0, 0.0), (0.4, 2.0)]:
        alpha0 = losses.alpha_dpo_loss(pc, pr, rc, rr, 2.0, 0.5, 0.0, mu, sigma)
        simpo = losses.simpo_loss(pc, pr, 2.0, 0.5)
        assert torch.equal(alpha0, simpo)
    expected = -log_sigmoid(2.0 * (pc - pr) - 2.0 * 0.5)
    torch.testing.assert_close(losses.simpo_loss(pc, pr, 2.0, 0.5), expected, atol=1e-6, rtol=0)


def test_alpha_dpo_zero_sigma_gives_finite_loss():
    pc, pr, rc, rr = random_logps()
    got = losses.alpha_dpo_loss(pc, pr, rc, rr, 2.5, 0.6, 0.2, 0.0, 0.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, losses.simpo_loss(pc, pr, 2.5, 0.6))


def test_probability_matches_formula():
    pc, pr, _, _ = random_logps()
    torch.testing.assert_close(
        losses.probability_loss(pc, pr, 100.0), -log_sigmoid(100.0 * (pc - pr)), atol=1e-6, rtol=0
    )


def test_typo_matches_formula():
    pc, pr, ps, _ = random_logps()
    expected = torch.log1p(torch.exp(pr) / torch.exp(pc)) - 0.05 * ps
    torch.testing.assert_close(losses.typo_loss(pc, pr, ps, 0.05), expected, atol=1e-6, rtol=0)


def test_beta_dpo_batch_beta_and_clamp():
    beta = losses.beta_dpo_batch_beta(torch.tensor(0.5), 0.1, 0.6, torch.tensor(0.2))
    assert math.isclose(float(beta), 0.1 * (1 + 0.6 * 0.3), rel_tol=1e-6)
    clamped = losses.beta_dpo_batch_beta(torch.tensor(-100.0), 0.1, 0.6, torch.tensor(0.0))
    assert math.isclose(float(clamped), 1e-3, rel_tol=1e-6)  # absolute, as the authors' clamp(min=1e-3)


def test_sft_loss_is_token_mean_nll():
    token_logps = -torch.rand(3, 5, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    expected = -(token_logps * mask).sum() / mask.sum()
    torch.testing.assert_close(losses.sft_loss(token_logps, mask), expected)


@pytest.mark.parametrize(
    "fn",
    [
        lambda pc, pr, rc, rr: losses.sigmoid_dpo_loss(pc, pr, rc, rr, 0.3),
        lambda pc, pr, rc, rr: losses.flex_dpo_loss(pc, pr, rc, rr, 0.1, 0.05),
        lambda pc, pr, rc, rr: losses.simpo_loss(pc, pr, 2.0, 0.5),
        lambda pc, pr, rc, rr: losses.probability_loss(pc, pr, 1.5),
        lambda pc, pr, rc, rr: losses.typo_loss(pc, pr, rc, 0.05),
    ],
    ids=["sigmoid", "flex_dpo", "simpo", "probability", "typo"],
)
def test_gradcheck(fn):
    # α-DPO is left out: its margin is a stop-gradient of the inputs, which finite differences cannot see;
    # test_alpha_dpo_margin_is_stop_gradient checks its analytic gradient instead.
    inputs = [(-3 * torch.rand(B, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs).sum(), inputs)


def test_label_smoothing_is_the_authors_conservative_loss():
    """Transcriptions of α-DPO's `dpo_trainer.py` (junkangwu/alpha-DPO) and SimPO's `simpo_trainer.py` arithmetic."""
    pc, pr, rc, rr = random_logps()
    beta, ratio, alpha, mu, sigma, ls = 2.5, 0.6, 0.2, 0.3, 1.7, 0.1
    pi_logratios = pc - pr
    gap = pi_logratios - (rc - rr)
    logits = pi_logratios - ((gap - mu) / sigma * alpha + ratio)
    authors_alpha = -log_sigmoid(beta * logits) * (1 - ls) - log_sigmoid(-beta * logits) * ls
    ours = losses.alpha_dpo_loss(pc, pr, rc, rr, beta, ratio, alpha, mu, sigma, label_smoothing=ls)
    torch.testing.assert_close(ours, authors_alpha, atol=1e-10, rtol=0)
    simpo_logits = pi_logratios - ratio
    authors_simpo = -log_sigmoid(beta * simpo_logits) * (1 - ls) - log_sigmoid(-beta * simpo_logits) * ls
    ours_simpo = losses.simpo_loss(pc, pr, beta, ratio, label_smoothing=ls)
    torch.testing.assert_close(ours_simpo, authors_simpo, atol=1e-10, rtol=0)
    # ls = 0 is the plain loss, and smoothing changes it: a silently ignored setting would not.
    plain = losses.simpo_loss(pc, pr, beta, ratio)
    torch.testing.assert_close(losses.simpo_loss(pc, pr, beta, ratio, label_smoothing=0.0), plain)
    assert (ours - losses.alpha_dpo_loss(pc, pr, rc, rr, beta, ratio, alpha, mu, sigma)).abs().max() > 0.05
