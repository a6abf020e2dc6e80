"""Preference objectives as pure functions of per-pair log-probabilities.

Every function takes per-pair tensors of shape ``(B,)`` (sums of completion-token log-probs unless a
docstring says otherwise) and hyperparameters, and returns the per-pair losses ``(B,)``. Nothing here
reads a model, a batch dict or trainer state: the trainer (or your own loop) computes the log-probs,
the controllers in :mod:`trl_refpo.objectives.controllers` supply the adaptive β / margins, and these functions
apply the paper's formula. The mathematics, and every deliberate difference from the authors' code, is
``docs/algorithms.md``.

Notation: ``lp(y) = Σ_t log π(y_t | x, y_<t)``; the DPO logit is
``Δ = [lp_θ(y_w) − lp_ref(y_w)] − [lp_θ(y_l) − lp_ref(y_l)]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


Scalar = float | Tensor


def dpo_logits(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    """The DPO logit Δ = [lp_θ(y_w) − lp_ref(y_w)] − [lp_θ(y_l) − lp_ref(y_l)]."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def sigmoid_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: Scalar,
) -> Tensor:
    """DPO (Rafailov et al., 2023, Eq. 7): ``−log σ(β·Δ)``.

    ``beta`` may be a float or a per-pair tensor; ε-DPO and β-DPO are this loss with their own β.
    """
    logits = dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * logits)


def epsilon_dpo_pair_beta(beta: Scalar, epsilon: float, steps: Tensor) -> Tensor:
    """ε-DPO (Lee et al., 2025, "KL Penalty Control via Perturbation for DPO", §4): per-pair β.

    ``β_i = β / (1 + ε·step_i)`` with ``step_i ∈ {−1, 0, +1}`` from
    :func:`epsilon_dpo_steps`. The loss is then :func:`sigmoid_dpo_loss` with ``beta=β_i``.
    """
    return beta / (1.0 + epsilon * steps.to(torch.get_default_dtype() if not torch.is_tensor(beta) else beta.dtype))


def epsilon_dpo_steps(logratio: Tensor, logratio_weaker_kl: Tensor, logratio_stronger_kl: Tensor) -> Tensor:
    """ε-DPO step decision per pair (docs/algorithms.md §1; the authors' released code).

    ``s = lp_θ(y_w) − lp_θ(y_l)``; ``s⁻`` / ``s⁺`` the same under the perturbed policies
    ``log_softmax((1+ε)·h_θ − ε·h_ref)`` (weaker KL, β/(1+ε)) and ``log_softmax((1−ε)·h_θ + ε·h_ref)``
    (stronger KL, β/(1−ε)). ``+1`` if ``s⁻ > s > s⁺`` (weaker KL is better: lower β), ``−1`` if
    ``s⁺ > s > s⁻`` (raise β), ``0`` otherwise.
    """
    increase = (logratio_weaker_kl > logratio) & (logratio > logratio_stronger_kl)
    decrease = (logratio_stronger_kl > logratio) & (logratio > logratio_weaker_kl)
    return increase.long() - decrease.long()


def flex_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta_chosen: Scalar,
    beta_rejected: Scalar,
) -> Tensor:
    """Flex-DPO (Yan et al., "3D-Properties of DPO", §4): separate β for chosen and rejected.

    ``−log σ(β⁺·[lp_θ(y_w) − lp_ref(y_w)] − β⁻·[lp_θ(y_l) − lp_ref(y_l)])``; β⁺ = β⁻ is DPO.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    return -F.logsigmoid(beta_chosen * chosen_logratios - beta_rejected * rejected_logratios)


def conservative_logsigmoid_loss(logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``−(1 − ls)·log σ(x) − ls·log σ(−x)``: the conservative DPO loss (Mitchell, 2023, "A note on DPO with noisy
    preferences") with ``ls`` the probability that a label is flipped, as the SimPO and α-DPO authors' code applies
    ``label_smoothing``; ``ls = 0`` is ``−log σ(x)``."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def alpha_dpo_z(gap: Tensor, mu: Scalar, sigma: Scalar, eps: float = 1e-8) -> Tensor:
    """α-DPO's z-normalised gap ``z = (g − μ)/σ``; ``z := 0`` where σ ≈ 0 (a guard the authors' code lacks)."""
    sigma = torch.as_tensor(sigma, dtype=gap.dtype, device=gap.device)
    if sigma.abs() < eps:
        return torch.zeros_like(gap)
    return (gap - mu) / sigma


def alpha_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: Scalar,
    gamma_beta_ratio: float,
    alpha: float,
    mu: Scalar,
    sigma: Scalar,
    label_smoothing: float = 0.0,
) -> Tensor:
    """α-DPO (Wu et al., 2025, "α-DPO: Adaptive Reward Margin", Eq. 12 as in the authors' code).

    Inputs are length-normalised log-probs ``ln(y) = lp(y)/n(y)`` when ``ln=True`` (the default), raw
    ``lp`` otherwise (paper Table 5). With ``u = ln_θ(y_w) − ln_θ(y_l)``, ``r = ln_ref(y_w) − ln_ref(y_l)``,
    ``g = u − r`` and running moments μ, σ of ``g``:

        margin = stopgrad(γ/β + α·(g − μ)/σ),   loss = −log σ(β·(u − margin)).

    The paper's Eq. 12 writes the margin as ``γ + α·M*`` outside the β factor; the authors' code
    multiplies ``α·z`` by β, which is what this function (and docs/algorithms.md §4) follows.
    ``alpha=0`` is exactly :func:`simpo_loss`. ``label_smoothing`` > 0 gives the conservative loss of the authors'
    code (:func:`conservative_logsigmoid_loss` of ``β·(u − margin)``).
    """
    policy_margin = policy_chosen_logps - policy_rejected_logps
    gap = policy_margin - (ref_chosen_logps - ref_rejected_logps)
    margin = (gamma_beta_ratio + alpha * alpha_dpo_z(gap, mu, sigma)).detach()
    return conservative_logsigmoid_loss(beta * (policy_margin - margin), label_smoothing)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: Scalar,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO (Meng et al., 2024, Eq. 6): ``−log σ(β·(ln_θ(y_w) − ln_θ(y_l)) − γ)`` with ``γ = β·gamma_beta_ratio``.

    Reference-free; it is α-DPO with α = 0. Pass length-normalised log-probs for the paper's loss.
    ``label_smoothing`` > 0: the conservative loss, as the authors' ``simpo_trainer.py`` applies it.
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps - gamma_beta_ratio)
    return conservative_logsigmoid_loss(logits, label_smoothing)


def probability_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: Scalar) -> Tensor:
    """Probability reward parameterisation (Liu et al., "Understanding Reference Policies in DPO", Eq. 10).

    ``−log σ(β·[lp_θ(y_w) − lp_θ(y_l)])``: DPO with the reference removed. Paper optimum β = 100.
    """
    return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps))


def typo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    policy_ref_sample_logps: Tensor,
    typo_lambda: float,
) -> Tensor:
    """TYPO (Hu, He and Wipf, "New Desiderata for Direct Preference Optimization", Eq. 14–17).

    ``log(1 + π_θ(y_l|x)/π_θ(y_w|x)) − λ·log π_θ(y_ref|x) = softplus(lp_θ(y_l) − lp_θ(y_w)) − λ·lp_θ(y_ref)``
    where ``y_ref`` is a completion sampled from the reference policy for the same prompt.
    """
    return F.softplus(policy_rejected_logps - policy_chosen_logps) - typo_lambda * policy_ref_sample_logps


def beta_dpo_selection(
    logits: Tensor, mu: Scalar, sigma: Scalar, filter_ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    """β-DPO's data filter (Wu et al., 2024, "β-DPO: DPO with Dynamic β"; the authors' ``trainers.py``).

    Each pair gets the weight ``w_i = exp(−½((Δ_i − μ)/σ)²)`` (Δ_i the raw DPO logit, μ, σ its running moments);
    ``⌊(1 − ρ)·N⌋`` pairs are drawn without replacement with probabilities ∝ w. Returns the boolean mask of the
    selected pairs. Guards where the authors' code fails: at least one pair is kept (their ``⌊0.8·1⌋ = 0`` gives
    a NaN β); σ ≈ 0 or non-finite weights (Δ ≡ 0 at the first step: ``0/0``) give uniform weights; pairs whose
    weight underflows to 0 are drawn, uniformly, only after every other pair.
    """
    count = logits.numel()
    keep = max(1, int(count * (1 - filter_ratio)))
    selected = torch.zeros(count, dtype=torch.bool, device=logits.device)
    if keep >= count:
        return selected.fill_(True)
    values = logits.detach().float().cpu()  # float32 like the authors': multinomial's draws depend on the dtype
    weights = torch.exp(-0.5 * ((values - float(mu)) / float(sigma)).square())
    if abs(float(sigma)) < 1e-8 or not torch.isfinite(weights).all():
        weights = torch.ones_like(values)
    positive = (weights > 0).nonzero().flatten()
    if positive.numel() >= keep:
        index = torch.multinomial(weights, keep, replacement=False, generator=generator)
    else:
        zero = (weights == 0).nonzero().flatten()
        extra = torch.multinomial(
            torch.ones(zero.numel()), keep - positive.numel(), replacement=False, generator=generator
        )
        index = torch.cat([positive, zero[extra]])
    selected[index.to(logits.device)] = True
    return selected


def beta_dpo_batch_beta(selected_logit_mean: Scalar, beta: float, beta_dpo_alpha: float, mu: Scalar) -> Tensor:
    """β-DPO (Wu et al., 2024, in the units of the authors' code): the batch's β.

    ``β = max(β₀·[1 + a·(mean of Δ_i over the selected pairs − μ)], 1e-3)`` with Δ the raw DPO logit and μ its
    running mean. The loss is :func:`sigmoid_dpo_loss` with this β, averaged over the selected pairs.
    """
    return torch.clamp(beta * (1.0 + beta_dpo_alpha * (torch.as_tensor(selected_logit_mean) - mu)), min=1e-3)


def sft_loss(chosen_token_logps: Tensor, chosen_token_mask: Tensor) -> Tensor:
    """Token-mean NLL of the chosen completions over the batch (TRL's ``sft`` term; 3D-properties Eq. 6).

    Takes per-token log-probs ``(B, T)`` and the completion mask; returns a scalar.
    """
    return -chosen_token_logps[chosen_token_mask.bool()].mean()
