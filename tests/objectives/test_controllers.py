"""The controllers: training-time state of the loss types (ε-DPO's β, α-DPO / β-DPO running moments)."""

import json
import math

import pytest
import torch

from trl_refpo.objectives.controllers import BetaDPOController, EpsilonBetaController, RunningMoments


def identity(tensor):
    return tensor


def test_epsilon_beta_moves_once_per_optimizer_step_by_the_mean_step_of_all_processes():
    controller = EpsilonBetaController(beta=0.1, epsilon=0.5)
    controller.accumulate(torch.tensor([1, 1, 0, -1]))  # this process: sum 1 over 4 pairs
    assert controller.beta == 0.1  # nothing moves before the optimizer step
    other_process = torch.tensor([2.0, 4.0], dtype=torch.float64)  # sum 2 over 4 pairs on a second process
    controller.on_optimizer_step(lambda totals: totals + other_process)
    assert controller.beta == pytest.approx(0.1 / (1 + 0.5 * 3 / 8), rel=1e-12)
    assert (controller.step_sum, controller.step_count) == (0.0, 0.0)
    controller.on_optimizer_step(identity)  # an optimizer step without pairs leaves β
    assert controller.beta == pytest.approx(0.1 / (1 + 0.5 * 3 / 8), rel=1e-12)


@pytest.mark.parametrize("cls", [EpsilonBetaController, RunningMoments, BetaDPOController])
def test_state_round_trips_through_json_mid_step(cls):
    """A checkpoint taken between micro-batches (pending sums included) resumes to the same trajectory."""
    make = (
        (lambda: cls(beta=0.1, epsilon=0.01))
        if cls is EpsilonBetaController
        else (lambda: cls(momentum=0.8, update_every="optimizer_step"))
    )
    values = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    straight, first = make(), make()

    def feed(controller, chunk):
        if isinstance(controller, EpsilonBetaController):
            controller.accumulate(chunk.sign())
        else:
            controller.observe(chunk)

    for controller in (straight, first):
        feed(controller, values[0])
        controller.on_optimizer_step(identity)
        feed(controller, values[1][:3])
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for controller in (straight, resumed):
        feed(controller, values[1][3:])
        controller.on_optimizer_step(identity)
        feed(controller, values[2])
        controller.on_optimizer_step(identity)
    assert resumed.state_dict() == straight.state_dict()


def test_micro_batch_moments_follow_the_authors_update():
    moments = RunningMoments(momentum=0.9)
    batches = [torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([2.0, 2.0, 8.0], dtype=torch.float64)]
    mu = sigma = 0.0
    for batch in batches:
        moments.observe(batch)
        mu = 0.9 * mu + 0.1 * float(batch.mean())
        sigma = 0.9 * sigma + 0.1 * float(batch.std())
        assert (moments.mu, moments.sigma) == (pytest.approx(mu, rel=1e-12), pytest.approx(sigma, rel=1e-12))
    moments.on_optimizer_step(identity)  # micro-batch mode: the optimizer step changes nothing
    assert moments.mu == pytest.approx(mu, rel=1e-12)


def test_optimizer_step_mode_pools_every_micro_batch():
    values = torch.randn(12, generator=torch.Generator().manual_seed(0))
    per_step, pooled = RunningMoments(update_every="optimizer_step"), RunningMoments()
    for _ in range(2):
        before = per_step.state_dict()
        for chunk in values.split(4):  # three micro-batches (gathered) of one optimizer step
            per_step.observe(chunk)
        assert (per_step.mu, per_step.sigma) == (before["mu"], before["sigma"])  # nothing moves before the step
        per_step.on_optimizer_step(identity)
        pooled.observe(values)
    assert per_step.mu == pytest.approx(pooled.mu, rel=1e-12)
    assert per_step.sigma == pytest.approx(pooled.sigma, rel=1e-12)
    assert per_step.pending_count == 0


def test_bias_correction_recovers_constant_moments():
    values = torch.tensor([1.0, 2.0, 4.0])
    corrected, raw = RunningMoments(bias_correction=True), RunningMoments()
    for _ in range(3):
        corrected.observe(values)
        raw.observe(values)
    mu, sigma = corrected.estimate()
    assert mu == pytest.approx(float(values.mean())) and sigma == pytest.approx(float(values.std()))
    assert raw.estimate() == (raw.mu, raw.sigma) and raw.mu == pytest.approx((1 - 0.9**3) * mu)
    assert corrected.mu == raw.mu  # the stored (checkpointed) moments are the authors'
    single = RunningMoments(bias_correction=True)
    single.observe(torch.tensor([3.0]))  # one value: σ undefined, never updated, stays 0
    assert single.estimate() == (pytest.approx(3.0), 0.0)


def test_beta_dpo_sampling_generator_depends_on_seed_and_batch_count_only():
    first, second = BetaDPOController(), BetaDPOController()
    first.batches = second.batches = 5
    assert torch.equal(
        torch.rand(4, generator=first.sampling_generator(3)), torch.rand(4, generator=second.sampling_generator(3))
    )
    second.batches = 6
    assert not torch.equal(
        torch.rand(4, generator=first.sampling_generator(3)), torch.rand(4, generator=second.sampling_generator(3))
    )


def test_state_from_the_former_beta_dpo_is_refused():
    with pytest.raises(ValueError, match=r"BetaDPOController state lacks \['mu', 'sigma'.*cannot resume exactly"):
        BetaDPOController().load_state_dict({"baseline": 0.3})


def test_unknown_update_mode_is_refused():
    with pytest.raises(ValueError, match="update_every must be one of"):
        RunningMoments(update_every="epoch")
    assert math.isfinite(RunningMoments().estimate()[0])
