"""The ``loss_type`` registry: each entry binds a pure loss from :mod:`trl_refpo.losses` to its config
fields and, where the paper needs one, to a controller from :mod:`trl_refpo.controllers`.

The trainer sees only the :class:`Objective` interface: it builds one :class:`PairBatch` per
micro-batch (policy log-probs, reference log-probs from whichever reference source is configured),
calls every objective of the ``loss_type`` list on it and sums ``weight × mean(loss)``. Adding a loss
type means adding one small class here; the trainer has no per-loss branches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from . import losses, ref_completions
from .controllers import BetaDPOController, Controller, EpsilonBetaController, RunningMoments
from .trl_losses import TRL_PAIR_LOSSES

logger = logging.getLogger(__name__)


@dataclass
class PairBatch:
    """Per-pair quantities of one micro-batch; every tensor is ``(B,)`` unless noted."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_token_logps: Tensor  # (B, T) per-token log-probs of the chosen rows (0 outside the completion)
    chosen_token_mask: Tensor  # (B, T)
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    ref_chosen_lengths: Tensor | None = None  # the reference's own completion token counts
    ref_rejected_lengths: Tensor | None = None
    extra_logps: dict[str, Tensor] = field(default_factory=dict)  # e.g. TYPO's reference sample
    perturbed_logratios: dict[str, Tensor] = field(default_factory=dict)  # ε-DPO: "weaker_kl", "stronger_kl"

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen_logps is not None

    def reference(self) -> tuple[Tensor, Tensor]:
        if self.ref_chosen_logps is None:
            raise RuntimeError("This loss type needs reference log-probs but none were computed.")
        return self.ref_chosen_logps, self.ref_rejected_logps


@dataclass
class StepContext:
    training: bool
    gather: Callable[[Tensor], Tensor]  # concatenates a tensor over all processes, in process order
    process_index: int = 0  # this process's block in what ``gather`` returns


@dataclass
class ObjectiveOutput:
    losses: Tensor  # (B,)
    chosen_rewards: Tensor | None  # (B,) implicit rewards for logging; None for terms without one (sft)
    rejected_rewards: Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)  # already global (same on all processes)


class Objective:
    """One ``loss_type``. Subclasses set the class attributes and implement :meth:`__call__`."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = True
    needs_perturbation: ClassVar[bool] = False  # ε-DPO: perturbed log-ratios from hidden states
    supports_label_smoothing: ClassVar[bool] = False  # the authors' code applies conservative label smoothing
    samples_from_reference: bool = False  # uses the reference model before training (TYPO's generation)
    controller: Controller | None = None

    def __init__(self, args):
        self.args = args

    def extra_completion_columns(self) -> tuple[str, ...]:
        """Token-id columns of extra completions scored in the same policy forward (TYPO).

        Their per-pair log-probs arrive in ``PairBatch.extra_logps[column]``.
        """
        return ()

    def prepare_dataset(self, dataset, processing_class, args, dataset_name: str):
        """Add the columns this objective needs to TRL's tokenised dataset (default: none)."""
        return dataset

    def prepare_dataset_with_reference(self, dataset, dataset_name: str, trainer, reference_model):
        """Complete a dataset with what only the reference model can give (TYPO: completions sampled from it).

        Called once per dataset at the end of the trainer's construction, before any training step, with
        ``reference_model`` = the ``ref_model`` passed to the trainer or else the (still untrained) policy.
        """
        return dataset

    def __call__(self, pairs: PairBatch, ctx: StepContext) -> ObjectiveOutput:
        raise NotImplementedError


def _logratio_rewards(pairs: PairBatch, beta_chosen, beta_rejected) -> tuple[Tensor, Tensor]:
    ref_chosen, ref_rejected = pairs.reference()
    return (
        (beta_chosen * (pairs.chosen_logps - ref_chosen)).detach(),
        (beta_rejected * (pairs.rejected_logps - ref_rejected)).detach(),
    )


class TRLBuiltin(Objective):
    """A TRL loss type used inside a list that also holds trl-refpo types (see :mod:`trl_refpo.trl_losses`)."""

    def __init__(self, args, name: str):
        super().__init__(args)
        self.name = name
        self.needs_reference = name != "sft"

    def __call__(self, pairs: PairBatch, ctx: StepContext) -> ObjectiveOutput:
        beta = self.args.beta
        if self.name == "sft":
            loss = losses.sft_loss(pairs.chosen_token_logps, pairs.chosen_token_mask)
            return ObjectiveOutput(loss.expand_as(pairs.chosen_logps), None, None)
        ref_chosen, ref_rejected = pairs.reference()
        chosen_logratios = pairs.chosen_logps - ref_chosen
        rejected_logratios = pairs.rejected_logps - ref_rejected
        per_pair = TRL_PAIR_LOSSES[self.name](
            chosen_logratios=chosen_logratios,
            rejected_logratios=rejected_logratios,
            beta=beta,
            label_smoothing=self.args.label_smoothing,
            discopop_tau=self.args.discopop_tau,
            chosen_lengths=pairs.chosen_lengths,
            rejected_lengths=pairs.rejected_lengths,
            policy_logratios=pairs.chosen_logps - pairs.rejected_logps,
            ref_logratios=ref_chosen - ref_rejected,
        )
        return ObjectiveOutput(per_pair, *_logratio_rewards(pairs, beta, beta))


class FlexDPO(Objective):
    name = "flex_dpo"

    def __call__(self, pairs, ctx):
        beta_chosen = self.args.beta_chosen if self.args.beta_chosen is not None else self.args.beta
        beta_rejected = self.args.beta_rejected if self.args.beta_rejected is not None else self.args.beta
        ref_chosen, ref_rejected = pairs.reference()
        per_pair = losses.flex_dpo_loss(
            pairs.chosen_logps, pairs.rejected_logps, ref_chosen, ref_rejected, beta_chosen, beta_rejected
        )
        return ObjectiveOutput(per_pair, *_logratio_rewards(pairs, beta_chosen, beta_rejected))


class _LengthNormalised(Objective):
    """Shared by SimPO and α-DPO: ``ln(y) = lp(y)/n(y)`` when ``args.ln`` (each side with its own counts)."""

    def _normalise(self, logps: Tensor, lengths: Tensor | None) -> Tensor:
        if not self.args.ln:
            return logps
        return logps / lengths.clamp(min=1)

    def policy_terms(self, pairs: PairBatch) -> tuple[Tensor, Tensor]:
        return self._normalise(pairs.chosen_logps, pairs.chosen_lengths), self._normalise(
            pairs.rejected_logps, pairs.rejected_lengths
        )


class SimPO(_LengthNormalised):
    name = "simpo"
    needs_reference = False
    supports_label_smoothing = True

    def __call__(self, pairs, ctx):
        chosen, rejected = self.policy_terms(pairs)
        beta = self.args.beta
        per_pair = losses.simpo_loss(chosen, rejected, beta, self.args.gamma_beta_ratio, self.args.label_smoothing)
        return ObjectiveOutput(per_pair, (beta * chosen).detach(), (beta * rejected).detach())


class AlphaDPO(_LengthNormalised):
    name = "alpha_dpo"
    supports_label_smoothing = True

    def __init__(self, args):
        super().__init__(args)
        self.controller = running_moments(RunningMoments, args, self.name, momentum=0.9)

    def __call__(self, pairs, ctx):
        chosen, rejected = self.policy_terms(pairs)
        ref_chosen_logps, ref_rejected_logps = pairs.reference()
        ref_chosen_lengths = pairs.ref_chosen_lengths if pairs.ref_chosen_lengths is not None else pairs.chosen_lengths
        ref_rejected_lengths = (
            pairs.ref_rejected_lengths if pairs.ref_rejected_lengths is not None else pairs.rejected_lengths
        )
        ref_chosen = self._normalise(ref_chosen_logps, ref_chosen_lengths)
        ref_rejected = self._normalise(ref_rejected_logps, ref_rejected_lengths)
        gap = ((chosen - rejected) - (ref_chosen - ref_rejected)).detach()
        if ctx.training:  # statistics first, then z with the updated μ, σ (authors' order)
            self.controller.observe(ctx.gather(gap))
        mu, sigma = self.controller.estimate()
        beta = self.args.beta
        per_pair = losses.alpha_dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta, self.args.gamma_beta_ratio, self.args.alpha, mu,
            sigma, self.args.label_smoothing,
        )
        margin = self.args.gamma_beta_ratio + self.args.alpha * losses.alpha_dpo_z(gap, mu, sigma)
        metrics = {
            "alpha_dpo/margin_mean": float(ctx.gather(margin).mean()), "alpha_dpo/mu": mu, "alpha_dpo/sigma": sigma
        }
        return ObjectiveOutput(per_pair, (beta * chosen).detach(), (beta * rejected).detach(), metrics)


class Probability(Objective):
    name = "probability"
    needs_reference = False

    def __call__(self, pairs, ctx):
        beta = self.args.beta
        per_pair = losses.probability_loss(pairs.chosen_logps, pairs.rejected_logps, beta)
        return ObjectiveOutput(per_pair, (beta * pairs.chosen_logps).detach(), (beta * pairs.rejected_logps).detach())


class EpsilonDPO(Objective):
    """ε-DPO (Lee et al., 2025, "KL Penalty Control via Perturbation for Direct Preference Optimization";
    docs/algorithms.md §1, the authors' released code): per-pair ``β_i = β / (1 + ε·step_i)`` from whether the
    log-ratio ``s`` is monotone between the policies perturbed towards weaker and stronger KL, then
    ``−log σ(β_i·Δ_i)``. The baseline β moves once per optimizer step (:class:`EpsilonBetaController`).

    The trainer fills ``PairBatch.perturbed_logratios`` (``policy``, ``weaker_kl``, ``stronger_kl``) from the
    hidden states of the policy and reference forwards (:mod:`trl_refpo.perturbation`).
    """

    name = "epsilon_dpo"
    needs_perturbation = True

    def __init__(self, args):
        super().__init__(args)
        self.controller = EpsilonBetaController(beta=args.beta, epsilon=args.epsilon)

    def __call__(self, pairs, ctx):
        ratios = pairs.perturbed_logratios
        if not ratios:
            raise RuntimeError("epsilon_dpo needs perturbed log-ratios, but the trainer computed none.")
        steps = losses.epsilon_dpo_steps(ratios["policy"], ratios["weaker_kl"], ratios["stronger_kl"])
        pair_beta = losses.epsilon_dpo_pair_beta(self.controller.beta, self.args.epsilon, steps).to(
            pairs.chosen_logps.dtype
        )
        if ctx.training:
            self.controller.accumulate(steps)
        ref_chosen, ref_rejected = pairs.reference()
        per_pair = losses.sigmoid_dpo_loss(pairs.chosen_logps, pairs.rejected_logps, ref_chosen, ref_rejected, pair_beta)
        all_steps = ctx.gather(steps.float())
        metrics = {
            "epsilon_dpo/beta": self.controller.beta,
            "epsilon_dpo/beta_mean": float(ctx.gather(pair_beta.detach().float()).mean()),
            "epsilon_dpo/p_steps": float((all_steps > 0).float().mean()),
            "epsilon_dpo/n_steps": float((all_steps < 0).float().mean()),
        }
        return ObjectiveOutput(per_pair, *_logratio_rewards(pairs, pair_beta, pair_beta), metrics)


class Likelihood(Objective):
    """Reference Policies paper Eq. 15: sigmoid DPO whose reference is the prior ``p_LM(y)`` (no prompt).

    The prior reference is selected by the config (``ref_prompt='none'``); this objective is DPO.
    """

    name = "likelihood"

    def __call__(self, pairs, ctx):
        beta = self.args.beta
        ref_chosen, ref_rejected = pairs.reference()
        per_pair = losses.sigmoid_dpo_loss(pairs.chosen_logps, pairs.rejected_logps, ref_chosen, ref_rejected, beta)
        return ObjectiveOutput(per_pair, *_logratio_rewards(pairs, beta, beta))


class BetaDPO(Objective):
    """β-DPO (Wu et al., 2024, "β-DPO: Direct Preference Optimization with Dynamic β"; docs/algorithms.md §8), as
    the authors' ``trainers.py`` runs it.

    On the micro-batch gathered from every process: μ, σ of the raw DPO logit Δ move first (training only; once per
    optimizer step instead with ``moments_update="optimizer_step"``), then
    ⌊(1 − ρ)·N⌋ pairs are sampled ∝ ``exp(−½((Δ − μ)/σ)²)``, ``β = max(β₀·[1 + a·(mean Δ_selected − μ)], 1e-3)``
    and each process averages ``−log σ(β·Δ_i)`` over its own selected rows. The sampling generator is seeded with
    ``args.seed`` + the count of training micro-batches: the same selection on every process, and after resume.
    Evaluation moves nothing; it samples the same way to compute β and averages the loss over every pair (the
    authors' logged evaluation loss).
    """

    name = "beta_dpo"

    def __init__(self, args):
        super().__init__(args)
        self.controller = running_moments(BetaDPOController, args, self.name, momentum=args.beta_dpo_momentum)

    def __call__(self, pairs, ctx):
        beta0 = self.args.beta
        ref_chosen, ref_rejected = pairs.reference()
        logits = losses.dpo_logits(pairs.chosen_logps, pairs.rejected_logps, ref_chosen, ref_rejected).detach()
        gathered = ctx.gather(logits)
        if ctx.training:
            self.controller.observe(gathered)
        mu, sigma = self.controller.estimate()
        selected = losses.beta_dpo_selection(
            gathered, mu, sigma, self.args.beta_dpo_filter_ratio, self.controller.sampling_generator(self.args.seed)
        )
        selected_mean = float(gathered[selected].mean())
        beta = float(losses.beta_dpo_batch_beta(selected_mean, beta0, self.args.beta_dpo_alpha, mu))
        per_pair = losses.sigmoid_dpo_loss(pairs.chosen_logps, pairs.rejected_logps, ref_chosen, ref_rejected, beta)
        if ctx.training:
            self.controller.batches += 1
            local_size = logits.numel()
            start = ctx.process_index * local_size
            local = selected[start : start + local_size].to(per_pair.dtype)
            # The pipeline takes mean() over the rows: these weights make it the mean over this process's
            # selected rows (0 when it has none), as the authors' masked_losses.sum() / max(count, 1).
            per_pair = per_pair * local * (local_size / local.sum().clamp(min=1))
        metrics = {
            "beta_dpo/beta": beta,
            "beta_dpo/mu": mu,
            "beta_dpo/sigma": sigma,
            "beta_dpo/selected_logit_mean": selected_mean,
            "beta_dpo/selected_fraction": float(selected.float().mean()),
        }
        return ObjectiveOutput(per_pair, *_logratio_rewards(pairs, beta0, beta0), metrics)


class Typo(Objective):
    """TYPO (docs/algorithms.md §5): ``softplus(lp_θ(y_l) − lp_θ(y_w)) − λ·lp_θ(y_ref)``, ``y_ref`` sampled from
    the reference.

    ``y_ref`` comes from the column ``typo_ref_completion_column`` or is sampled once from the reference
    before training (:class:`~trl_refpo.ref_completions.ReferenceCompletions`). Its tokens are extra rows of
    the same policy forward; no reference log-probs are needed, so no reference model is kept in training.
    """

    name = "typo"
    needs_reference = False

    def __init__(self, args):
        super().__init__(args)
        self.completions = ref_completions.ReferenceCompletions(args)
        self.samples_from_reference = self.completions.generate

    def extra_completion_columns(self):
        return (self.completions.ids_column,)

    def prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self.completions.prepare_dataset(dataset, processing_class, args, dataset_name)

    def prepare_dataset_with_reference(self, dataset, dataset_name, trainer, reference_model):
        return self.completions.prepare_dataset_with_reference(dataset, dataset_name, trainer, reference_model)

    def __call__(self, pairs, ctx):
        ref_sample_logps = pairs.extra_logps[self.completions.ids_column]
        per_pair = losses.typo_loss(pairs.chosen_logps, pairs.rejected_logps, ref_sample_logps, self.args.typo_lambda)
        metrics = {"typo/ref_completion_logps": float(ctx.gather(ref_sample_logps.detach()).mean())}
        # The supervised term is Bradley–Terry on lp_θ itself: the policy log-probs are TYPO's implicit rewards.
        return ObjectiveOutput(per_pair, pairs.chosen_logps.detach(), pairs.rejected_logps.detach(), metrics)


def running_moments(cls: type[RunningMoments], args, loss_name: str, momentum: float) -> RunningMoments:
    """The μ/σ controller of α-DPO / β-DPO as configured; warns when no update can see two pairs (σ stays 0)."""
    pairs_per_update = args.per_device_train_batch_size * args.world_size
    if args.moments_update == "optimizer_step":
        pairs_per_update *= args.gradient_accumulation_steps
    if pairs_per_update < 2:
        consequence = {
            "alpha_dpo": "z is 0 and α-DPO trains as SimPO",
            "beta_dpo": "the data filter weighs every pair alike",
        }[loss_name]
        logger.warning(
            f"{loss_name}: each update of its running σ sees {pairs_per_update} pair (moments_update="
            f"{args.moments_update!r}, per_device_train_batch_size={args.per_device_train_batch_size}, "
            f"{args.world_size} process(es)), so σ stays 0 and {consequence}. Use a larger "
            "per_device_train_batch_size, or moments_update='optimizer_step' with gradient_accumulation_steps >= 2."
        )
    return cls(momentum=momentum, update_every=args.moments_update, bias_correction=args.moments_bias_correction)


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (EpsilonDPO, FlexDPO, AlphaDPO, SimPO, Probability, Likelihood, BetaDPO, Typo)
}
"""trl-refpo's own loss types. Other modules register theirs with :func:`register_objective`."""


def register_objective(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    return cls


def build_objectives(args) -> list[Objective]:
    built = []
    for name in args.loss_type:
        built.append(OBJECTIVES[name](args) if name in OBJECTIVES else TRLBuiltin(args, name))
    return built
