"""Small stateful objects that change during training: adaptive β and running margin statistics.

Each controller holds plain Python floats, exposes ``state_dict``/``load_state_dict`` (saved in every
checkpoint by the trainer and restored on resume) and is updated at a well-defined point:

* :class:`EpsilonBetaController` — once per optimizer step (after gradient accumulation);
* :class:`RunningMoments` (α-DPO) and :class:`BetaDPOController` — on every training micro-batch.

Evaluation never changes any of them. Statistics that must agree across processes are computed from
values that the caller has already gathered / reduced over all processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ReduceSum = Callable[[Tensor], Tensor]


class Controller:
    """Base class: a named bag of floats that is checkpointed."""

    _state_fields: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._state_fields}

    def load_state_dict(self, state: dict) -> None:
        for name in self._state_fields:
            setattr(self, name, state[name])

    def on_optimizer_step(self, reduce_sum: ReduceSum) -> None:
        """Called once per optimizer step on every process; ``reduce_sum`` sums a tensor over processes."""


class EpsilonBetaController(Controller):
    """ε-DPO's baseline β (ALGORITHMS.md §1).

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
    """α-DPO's exponential moving mean μ and std σ of the gap ``g`` (ALGORITHMS.md §4, authors' code).

    ``μ ← m·μ + (1 − m)·mean(g)``, ``σ ← m·σ + (1 − m)·std(g)`` (unbiased std), both starting at 0.
    With fewer than two values the std is undefined: μ is updated, σ is left unchanged.
    """

    _state_fields = ("mu", "sigma")

    def __init__(self, momentum: float = 0.9):
        self.momentum = float(momentum)
        self.mu = 0.0
        self.sigma = 0.0

    def update(self, gathered_gap: Tensor) -> None:
        values = gathered_gap.detach().double().flatten()
        if values.numel() == 0:
            return
        self.mu = self.momentum * self.mu + (1 - self.momentum) * float(values.mean())
        if values.numel() >= 2:
            self.sigma = self.momentum * self.sigma + (1 - self.momentum) * float(values.std(unbiased=True))


class BetaDPOController(Controller):
    """β-DPO's batch-level β (Wu et al., 2024; ALGORITHMS.md §8).

    ``M₀`` starts at the first training batch's ``M_batch`` (so the first β is β₀) and is updated on
    training batches only: ``M₀ ← m·M₀ + (1 − m)·M_batch``.
    """

    _state_fields = ("baseline",)

    def __init__(self, momentum: float = 0.9):
        self.momentum = float(momentum)
        self.baseline: float | None = None

    def baseline_for(self, batch_mean: float) -> float:
        """The M₀ to use for this batch (the batch's own mean before the first training batch)."""
        return batch_mean if self.baseline is None else self.baseline

    def update(self, batch_mean: float) -> None:
        if self.baseline is None:
            self.baseline = batch_mean
        else:
            self.baseline = self.momentum * self.baseline + (1 - self.momentum) * batch_mean
