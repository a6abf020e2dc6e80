"""The papers' diagnostics (docs/algorithms.md §9).

* 3D-properties (Yan et al., §3): per-step gradient magnitudes ``|∂loss/∂lp(y_w)|``, ``|∂loss/∂lp(y_l)|`` and
  their ratio, from the per-pair log-probs the loss already has — :func:`logp_gradient_metrics`, logged by
  the trainer as ``grad/chosen_abs``, ``grad/rejected_abs``, ``grad/ratio`` for every pipeline loss type.
* Token-level log-probability difference (Liu et al., "Understanding Reference Policies in DPO", §4.3): an
  analysis, not a training metric — :mod:`trl_refpo.research.token_analysis` (``pip install "trl-refpo[research]"``).

Policy ranking accuracy (Reference Policies §4.2, fraction of pairs with ``lp_θ(y_w) > lp_θ(y_l)``) is the
trainer's ``logps/accuracies`` metric, next to the implicit-reward ``rewards/accuracies``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------- 3D-properties


def pair_logp_gradients(loss: Tensor, chosen_logps: Tensor, rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """``∂loss/∂lp(y_w)`` and ``∂loss/∂lp(y_l)`` per pair, for a loss that is a mean over the ``B`` pairs.

    Multiplied by ``B``, so each entry is the gradient of that pair's own loss (independent of the batch
    size). The graph is kept for the training backward.
    """
    chosen, rejected = torch.autograd.grad(loss, (chosen_logps, rejected_logps), retain_graph=True, allow_unused=True)
    num_pairs = chosen_logps.size(0)
    chosen = torch.zeros_like(chosen_logps) if chosen is None else chosen
    rejected = torch.zeros_like(rejected_logps) if rejected is None else rejected
    return chosen.detach() * num_pairs, rejected.detach() * num_pairs


def completion_logp_gradients(
    loss: Tensor, per_token_logps: Tensor, completion_mask: Tensor, num_pairs: int
) -> tuple[Tensor, Tensor]:
    """Per-pair ``∂loss/∂lp(y_w)`` and ``∂loss/∂lp(y_l)`` from the per-token log-probs of the policy forward.

    ``per_token_logps`` / ``completion_mask`` are ``(R, T)`` with rows ``[chosen; rejected; extra...]``.
    The gradient with respect to a completion's log-prob is the mean of the per-token gradients over its
    tokens: exact for every loss that reads ``lp(y) = Σ_t lp_t`` (all pair losses), and for TRL's ``sft``
    term (a token mean) the derivative of its equal form ``−Σ lp(y_w) / Σ n(y_w)``. Scaled by ``B`` as in
    :func:`pair_logp_gradients`. No extra forward: only the graph from the loss down to the log-probs is
    differentiated.
    """
    (token_grads,) = torch.autograd.grad(loss, (per_token_logps,), retain_graph=True, allow_unused=True)
    if token_grads is None:
        zeros = per_token_logps.new_zeros(num_pairs)
        return zeros, zeros
    mask = completion_mask.to(token_grads.dtype)
    per_row = (token_grads * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_row[:num_pairs].detach() * num_pairs, per_row[num_pairs : 2 * num_pairs].detach() * num_pairs


def gradient_magnitude_metrics(
    chosen_grads: Tensor, rejected_grads: Tensor, gather: Callable[[Tensor], Tensor] | None = None
) -> dict[str, float]:
    """``grad/chosen_abs`` = mean |∂ℓ/∂lp(y_w)|, ``grad/rejected_abs`` = mean |∂ℓ/∂lp(y_l)| over all pairs of all
    processes, and ``grad/ratio`` = rejected_abs / chosen_abs.

    ``grad/ratio`` is left out of a step whose chosen_abs is 0 (saturated pairs, or none selected): 0/0 or x/0 has
    no value, and a NaN or inf would poison the logged mean. The logged ratio is the mean over the steps that have one.
    """
    gather = gather or (lambda tensor: tensor)
    chosen_abs = gather(chosen_grads.abs().float()).mean().item()
    rejected_abs = gather(rejected_grads.abs().float()).mean().item()
    metrics = {"grad/chosen_abs": chosen_abs, "grad/rejected_abs": rejected_abs}
    if chosen_abs > 0:
        metrics["grad/ratio"] = rejected_abs / chosen_abs
    return metrics


def logp_gradient_metrics(loss, per_token_logps, completion_mask, num_pairs, gather=None) -> dict[str, float]:
    """The trainer's 3D-properties metrics for one training micro-batch (see :func:`completion_logp_gradients`)."""
    return gradient_magnitude_metrics(
        *completion_logp_gradients(loss, per_token_logps, completion_mask, num_pairs), gather
    )
