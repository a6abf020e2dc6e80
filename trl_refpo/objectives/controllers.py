"""Small stateful objects that change during training: adaptive β and running margin statistics.

Each controller holds plain Python floats, exposes ``state_dict``/``load_state_dict`` (saved in every
checkpoint by the trainer and restored on resume) and is updated at a well-defined point:

* :class:`EpsilonBetaController` — once per optimizer step (after gradient accumulation);
* :class:`RunningMoments` (α-DPO) and :class:`BetaDPOController` (β-DPO) — on every training micro-batch
  (the authors' codes), or once per optimizer step (``moments_update="optimizer_step"``).

Evaluation never changes any of them. Statistics that must agree across processes are computed from
values that the caller has already gathered / reduced over all processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


ReduceSum = Callable[[Tensor], Tensor]
MOMENTS_UPDATES = ("micro_batch", "optimizer_step")


class Controller:
    """Base class: a named bag of floats that is checkpointed."""

    _state_fields: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._state_fields}

    def load_state_dict(self, state: dict) -> None:
        missing = [name for name in self._state_fields if name not in state]
        if missing:
            raise ValueError(
                f"The saved {type(self).__name__} state lacks {missing} (written by another trl-refpo version), so "
                "training cannot resume exactly. Resume with the version that wrote the checkpoint, or start a new run."
            )
        for name in self._state_fields:
            setattr(self, name, state[name])

    def on_optimizer_step(self, reduce_sum: ReduceSum) -> None:
        """Called once per optimizer step on every process; ``reduce_sum`` sums a tensor over processes."""


class EpsilonBetaController(Controller):
    """ε-DPO's baseline β (docs/algorithms.md §1).

    Micro-batches add their per-pair step decisions with :meth:`accumulate`; after the optimizer step
    ``β ← β / (1 + ε·m)`` where ``m`` is the mean step over every pair of that optimizer step on all
    processes. The result is identical on every process because the sums are all-reduced.
    """

    _state_fields = ("beta", "step_sum", "step_count")

    def __init__(self, beta: float, epsilon: float):
        self.beta = float(beta)
        self.epsilon = float(epsilon)
        self.step_sum = 0.0
        self.step_count = 0.0

    def accumulate(self, steps: Tensor) -> None:
        self.step_sum += float(steps.sum())
        self.step_count += float(steps.numel())

    def on_optimizer_step(self, reduce_sum: ReduceSum) -> None:
        totals = reduce_sum(torch.tensor([self.step_sum, self.step_count], dtype=torch.float64))
        step_sum, step_count = (float(v) for v in totals.cpu())
        if step_count > 0:
            self.beta = self.beta / (1.0 + self.epsilon * step_sum / step_count)
        self.step_sum = 0.0
        self.step_count = 0.0


class RunningMoments(Controller):
    """Exponential moving mean μ and std σ of a per-pair statistic: α-DPO's gap ``g``, β-DPO's logit Δ
    (docs/algorithms.md §4 and §8; both authors' codes).

    ``μ ← m·μ + (1 − m)·mean(x)``, ``σ ← m·σ + (1 − m)·std(x)`` (unbiased std), both starting at 0, computed
    from values already gathered over all processes. With fewer than two values the std is undefined: μ is
    updated, σ is left unchanged.

    ``update_every``: ``"micro_batch"`` (the authors' code) updates on every training micro-batch, before the
    batch uses μ, σ; ``"optimizer_step"`` pools every pair of an optimizer step (every micro-batch, every
    process) and updates once after it, so gradient accumulation does not change the trajectory; the pairs of a
    step then use the moments of the steps before it. ``bias_correction`` divides by ``1 − m^t`` (t = number of
    updates of that moment), as Adam corrects its moments; it leaves the stored μ, σ as they are.
    """

    _state_fields = ("mu", "sigma", "mu_updates", "sigma_updates", "pending_sum", "pending_sum_sq", "pending_count")

    def __init__(self, momentum: float = 0.9, update_every: str = "micro_batch", bias_correction: bool = False):
        if update_every not in MOMENTS_UPDATES:
            raise ValueError(f"update_every must be one of {MOMENTS_UPDATES}, got {update_every!r}.")
        self.momentum = float(momentum)
        self.update_every = update_every
        self.bias_correction = bias_correction
        self.mu = 0.0
        self.sigma = 0.0
        self.mu_updates = 0
        self.sigma_updates = 0
        self.pending_sum = 0.0
        self.pending_sum_sq = 0.0
        self.pending_count = 0

    def observe(self, gathered: Tensor) -> None:
        """A training micro-batch's values, gathered over all processes (identical on every process)."""
        values = gathered.detach().double().flatten()
        if values.numel() == 0:
            return
        if self.update_every == "micro_batch":
            self._update(float(values.mean()), float(values.std()) if values.numel() >= 2 else None)
        else:
            self.pending_sum += float(values.sum())
            self.pending_sum_sq += float(values.square().sum())
            self.pending_count += values.numel()

    def on_optimizer_step(self, reduce_sum: ReduceSum) -> None:
        # The pending sums come from gathered values: already the same on every process, nothing to reduce.
        count = self.pending_count
        if self.update_every != "optimizer_step" or count == 0:
            return
        mean = self.pending_sum / count
        std = math.sqrt(max(self.pending_sum_sq - count * mean * mean, 0.0) / (count - 1)) if count >= 2 else None
        self._update(mean, std)
        self.pending_sum, self.pending_sum_sq, self.pending_count = 0.0, 0.0, 0

    def _update(self, mean: float, std: float | None) -> None:
        self.mu = self.momentum * self.mu + (1 - self.momentum) * mean
        self.mu_updates += 1
        if std is not None:
            self.sigma = self.momentum * self.sigma + (1 - self.momentum) * std
            self.sigma_updates += 1

    def estimate(self) -> tuple[float, float]:
        """(μ, σ) for the loss: the stored moments, or their bias-corrected estimates."""
        if not self.bias_correction:
            return self.mu, self.sigma
        return self._corrected(self.mu, self.mu_updates), self._corrected(self.sigma, self.sigma_updates)

    def _corrected(self, value: float, updates: int) -> float:
        return value / (1 - self.momentum**updates) if updates else value


class BetaDPOController(RunningMoments):
    """β-DPO's running μ, σ of the DPO logit Δ (Wu et al., 2024; docs/algorithms.md §8), plus the count of
    training micro-batches, which seeds the data-filter sampling so that it is reproducible and survives resume.
    """

    _state_fields = (*RunningMoments._state_fields, "batches")

    def __init__(self, momentum: float = 0.9, update_every: str = "micro_batch", bias_correction: bool = False):
        super().__init__(momentum, update_every, bias_correction)
        self.batches = 0

    def sampling_generator(self, seed: int) -> torch.Generator:
        """The same generator on every process for the same (seed, training micro-batch count)."""
        return torch.Generator().manual_seed(seed + self.batches)
