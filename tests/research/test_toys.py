"""The papers' toy experiments reproduce their qualitative claims (fixed seeds, margins well above the noise)."""

import math

import pytest
import torch

from trl_refpo.research import toys


PI_STAR = torch.tensor(toys.INTERPOLATION_PI_STAR, dtype=torch.float64)
PI_REF = torch.tensor(toys.INTERPOLATION_PI_REF, dtype=torch.float64)
SWEEP = (1e-5, 0.1, 1.0, 100.0)


@pytest.fixture(scope="module")
def bandit():
    """One batched run: the λ = 1e-5 interpolation test from π_ref and a λ sweep from the uniform policy."""
    methods = [*toys.BANDIT_METHODS, *(m for m in toys.BANDIT_METHODS for _ in SWEEP)]
    lambdas = [1e-5] * 3 + [lam for _ in toys.BANDIT_METHODS for lam in SWEEP]
    inits = ["reference"] * 3 + ["uniform"] * (len(methods) - 3)
    result = toys.train_bandit(methods, lambdas, init=inits, seed=0)
    return result, {  # (method, λ, init) -> final policy (3,)
        (method, lam, init): result.final[run, 0]
        for run, (method, lam, init) in enumerate(zip(methods, lambdas, inits, strict=True))
    }


def test_interpolation_typo_reaches_bt_optimum_dpo_ipo_the_mode(bandit):
    _, final = bandit
    typo = final["typo", 1e-5, "reference"]
    assert (typo - PI_STAR).abs().max() < 0.05, typo
    for method in ("dpo", "ipo"):
        policy = final[method, 1e-5, "reference"]
        assert policy[0] >= 0.9, (method, policy)
        assert policy[2] < 0.01, (method, policy)


def test_interpolation_trajectory_starts_at_reference(bandit):
    result, _ = bandit
    torch.testing.assert_close(result.trajectory[0, :3, 0], PI_REF.expand(3, 3), atol=0.01, rtol=0)


def test_lambda_sweep_small_lambda_typo_at_optimum_others_at_mode(bandit):
    _, final = bandit
    assert (final["typo", 1e-5, "uniform"] - PI_STAR).abs().max() < 0.05
    assert final["dpo", 1e-5, "uniform"][0] >= 0.9
    assert final["ipo", 1e-5, "uniform"][0] >= 0.9


def test_lambda_sweep_large_lambda_every_method_at_reference(bandit):
    _, final = bandit
    for method in toys.BANDIT_METHODS:
        distances = [(final[method, lam, "uniform"] - PI_REF).abs().max().item() for lam in SWEEP]
        assert distances[-1] < 0.02, (method, distances)  # λ = 100 ends at π_ref, from a uniform start
        assert distances[0] > 0.15, (method, distances)  # λ = 1e-5 does not


def test_lambda_sweep_matches_population_optima(bandit):
    """TYPO interpolates between π* and π_ref (paper Prop. 4.2); DPO ends at π_ref·π*^{1/λ} (Eq. 5) where it converges."""
    _, final = bandit
    typo_optimum = toys.typo_population_optimum(PI_STAR, PI_REF, 1.0)[0]
    assert ((typo_optimum - PI_STAR).abs().max() > 0.1) and ((typo_optimum - PI_REF).abs().max() > 0.05)
    assert (final["typo", 1.0, "uniform"] - typo_optimum).abs().max() < 0.03
    dpo_optimum = toys.dpo_population_optimum(PI_STAR, PI_REF, 1.0)[0]
    assert (final["dpo", 1.0, "uniform"] - dpo_optimum).abs().max() < 0.03
    torch.testing.assert_close(toys.typo_population_optimum(PI_STAR, PI_REF, 1e-6)[0], PI_STAR, atol=1e-3, rtol=0)
    torch.testing.assert_close(toys.typo_population_optimum(PI_STAR, PI_REF, 1e4)[0], PI_REF, atol=1e-3, rtol=0)


def test_bradley_terry_labels_follow_pi_star():
    pi_star = PI_STAR.expand(3, 3)
    p = toys.bradley_terry_preference(pi_star, torch.tensor([[0], [1], [0]]), torch.tensor([[1], [2], [2]]))
    torch.testing.assert_close(p.flatten(), torch.tensor([2 / 3, 3 / 4, 6 / 7], dtype=torch.float64))


@pytest.fixture(scope="module")
def preservation():
    result = toys.preservation_test(seed=0)
    reference_error = toys.total_variation(result.pi_ref, result.pi_star)
    errors = {
        (method, lam): toys.total_variation(result.policy(method, lam), result.pi_star)
        for method in toys.BANDIT_METHODS
        for lam in toys.PRESERVATION_LAMBDAS
    }
    return errors, reference_error


def test_preservation_only_typo_keeps_good_prompt_and_improves_bad(preservation):
    errors, reference_error = preservation
    assert reference_error[0] == 0 and reference_error[1] == pytest.approx(0.2)
    for lam in toys.PRESERVATION_LAMBDAS:
        good, bad = errors["typo", lam]
        assert good < 0.03, (lam, good)
        if lam <= 1.0:
            assert bad < reference_error[1] - 0.05, (lam, bad)
        else:  # λ = 10: the optimum improves by only 0.011 (TV 0.189), within the sampling noise
            assert bad < reference_error[1] + 0.01, (lam, bad)
    for method in ("dpo", "ipo"):
        for lam in toys.PRESERVATION_LAMBDAS:
            good, bad = errors[method, lam]
            preserves, improves = good < 0.03, bad < reference_error[1] - 0.02
            assert not (preserves and improves), (method, lam, good, bad)


@pytest.fixture(scope="module")
def three_d():
    return {
        "dpo": toys.three_d_properties_toy(scenario=1),
        "dpo_rejected_off_policy": toys.three_d_properties_toy(scenario=3),
        "flex": toys.three_d_properties_toy(scenario=1, objective="flex_dpo", beta_rejected=0.02),
        "sft": toys.three_d_properties_toy(scenario=1, objective="sft_dpo", sft_weight=0.1),
    }


def nats(before, after):
    return math.log(max(after, 1e-300)) - math.log(before)


def test_3d_initialisation_matches_scenarios(three_d):
    torch.testing.assert_close(three_d["dpo"].initial, toys.scenario_distribution(1), atol=0.01, rtol=0)
    torch.testing.assert_close(
        three_d["dpo_rejected_off_policy"].initial, toys.scenario_distribution(3), atol=0.01, rtol=0
    )


def test_3d_property_1_drastic_drop_of_rejected_likelihood(three_d):
    run = three_d["dpo"]
    assert nats(run.rejected_mean[0], run.rejected_mean[-1]) < -50
    assert nats(run.chosen_mean[0], max(run.chosen_mean)) < 1.5
    # Corollary 1: |∂ℓ/∂π(y_l)| / |∂ℓ/∂π(y_w)| = π(y_w)/π(y_l) starts near 1 and explodes.
    first = run.grad_rejected_prob[0] / run.grad_chosen_prob[0]
    last = run.grad_rejected_prob[-1] / run.grad_chosen_prob[-1]
    assert 0.5 < first < 2 and last > 1e10


def test_3d_property_2_chosen_likelihood_rises_then_falls(three_d):
    run = three_d["dpo"]
    peak = run.peak_chosen_epoch()
    assert run.chosen_mean[peak] > run.chosen_mean[0] + 0.1
    assert peak < 100
    assert run.chosen_mean[-1] < run.chosen_mean[peak] - 0.02
    assert run.chosen_min[-1] < run.chosen_min[0] - 0.03  # some prompt ends below where it started
    assert run.grad_chosen_logp[-1] < 1e-3 * run.grad_chosen_logp[0]  # the chosen gradient vanishes


def test_3d_property_3_mass_moves_outside_the_preference_pairs(three_d):
    run = three_d["dpo"]
    assert run.out_of_pair_mass[-1] > run.out_of_pair_mass[0] + 0.2


def test_3d_off_policy_rejected_collapses_faster_and_hurts_chosen(three_d):
    on, off = three_d["dpo"], three_d["dpo_rejected_off_policy"]
    assert nats(off.rejected_mean[0], off.rejected_mean[9]) < nats(on.rejected_mean[0], on.rejected_mean[9]) - 1
    assert off.chosen_min[-1] < on.chosen_min[-1] - 0.03


def test_3d_flex_dpo_and_sft_regularisation_mitigate(three_d):
    dpo, flex, sft = three_d["dpo"], three_d["flex"], three_d["sft"]
    assert flex.chosen_mean[-1] > dpo.chosen_mean[-1] + 0.2
    assert flex.out_of_pair_mass[-1] < dpo.out_of_pair_mass[-1] - 0.2
    assert flex.grad_rejected_logp[0] / flex.grad_chosen_logp[0] == pytest.approx(0.02 / 0.1, rel=1e-6)
    assert sft.chosen_mean[-1] > 0.9 and sft.out_of_pair_mass[-1] < 0.05
    assert sft.grad_chosen_logp[-1] > 0.05  # the SFT term keeps the chosen gradient alive (App. B.2.2)
