"""trl-refpo's loss types: each binds a pure loss from :mod:`trl_refpo.objectives.losses` to the config fields it
owns (with their ranges), its reference needs and, where the paper needs one, a controller from
:mod:`trl_refpo.objectives.controllers`. :mod:`trl_refpo.objectives.registry` maps ``loss_type`` names to them.
"""

from __future__ import annotations

import logging

from torch import Tensor

from . import losses
from .base import FieldRange, Objective, ObjectiveOutput, PairBatch, StepContext, fraction, non_negative, positive
from .controllers import MOMENTS_UPDATES, BetaDPOController, EpsilonBetaController, RunningMoments
from .trl_losses import TRL_PAIR_LOSSES, trl_type_needs_reference
from .typo_completions import RESERVED_COLUMNS, ReferenceCompletions, ids_column


logger = logging.getLogger(__name__)

LENGTH_NORMALISATION_FIELDS = {
    "gamma_beta_ratio": non_negative(">= 0 (SimPO / α-DPO target margin γ/β)"),
    "ln": None,
}
RUNNING_MOMENTS_FIELDS = {
    "moments_update": FieldRange(lambda value: value in MOMENTS_UPDATES, f"one of {list(MOMENTS_UPDATES)}"),
    "moments_bias_correction": None,
}
TYPO_FIELDS = {
    "typo_lambda": non_negative(),
    "typo_ref_completion_column": None,
    "typo_generate_ref_completions": None,
    "typo_generation_temperature": positive(),
    "typo_generation_top_k": non_negative(),
    "typo_generation_top_p": FieldRange(lambda value: 0 < value <= 1, "in (0, 1]"),
    "typo_generation_max_new_tokens": FieldRange(lambda value: value >= 1, ">= 1"),
    "typo_generation_repetition_penalty": positive(),
    "typo_generation_batch_size": FieldRange(lambda value: value >= 1, ">= 1 (or None)"),
    "typo_generation_cache_dir": None,
}


def _logratio_rewards(pairs: PairBatch, beta_chosen, beta_rejected) -> tuple[Tensor, Tensor]:
    ref_chosen, ref_rejected = pairs.reference()
    return (
        (beta_chosen * (pairs.chosen_logps - ref_chosen)).detach(),
        (beta_rejected * (pairs.rejected_logps - ref_rejected)).detach(),
    )


class TRLBuiltin(Objective):
    """A TRL loss type used inside a list that also holds trl-refpo types (see :mod:`trl_refpo.objectives.trl_losses`)."""

    def __init__(self, args, name: str):
        super().__init__(args)
        self.name = name
        self.needs_reference = trl_type_needs_reference(name)

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
    """Flex-DPO (3D-properties paper, docs/algorithms.md §3): β⁺ on the chosen and β⁻ on the rejected log-ratio."""

    name = "flex_dpo"
    fields = {
        "beta_chosen": positive("> 0 (or None to use beta)"),
        "beta_rejected": positive("> 0 (or None to use beta)"),
    }

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

    fields = LENGTH_NORMALISATION_FIELDS

    def _normalise(self, logps: Tensor, lengths: Tensor | None) -> Tensor:
        if not self.args.ln:
            return logps
        return logps / lengths.clamp(min=1)

    def policy_terms(self, pairs: PairBatch) -> tuple[Tensor, Tensor]:
        return self._normalise(pairs.chosen_logps, pairs.chosen_lengths), self._normalise(
            pairs.rejected_logps, pairs.rejected_lengths
        )


class SimPO(_LengthNormalised):
    """SimPO (Meng et al., 2024): α-DPO with α = 0, no reference (docs/algorithms.md §4)."""

    name = "simpo"
    needs_reference = False
    supports_label_smoothing = True

    def __call__(self, pairs, ctx):
        chosen, rejected = self.policy_terms(pairs)
        beta = self.args.beta
        per_pair = losses.simpo_loss(chosen, rejected, beta, self.args.gamma_beta_ratio, self.args.label_smoothing)
        return ObjectiveOutput(per_pair, (beta * chosen).detach(), (beta * rejected).detach())


class AlphaDPO(_LengthNormalised):
    """α-DPO (Wu et al., 2025, docs/algorithms.md §4): SimPO's margin plus α·z, z the gap u − r normalised by its
    running μ, σ (:class:`~trl_refpo.objectives.controllers.RunningMoments`), as the authors' code computes it."""

    name = "alpha_dpo"
    fields = {
        **LENGTH_NORMALISATION_FIELDS,
        **RUNNING_MOMENTS_FIELDS,
        "alpha": non_negative(">= 0 (α-DPO; alpha=0 is SimPO)"),
    }
    supports_label_smoothing = True

    def __init__(self, args):
        super().__init__(args)
        self.controller = running_moments(
            RunningMoments, args, self.name, momentum=0.9, constant_sigma="z is 0 and α-DPO trains as SimPO"
        )

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
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta,
            self.args.gamma_beta_ratio,
            self.args.alpha,
            mu,
            sigma,
            self.args.label_smoothing,
        )
        margin = self.args.gamma_beta_ratio + self.args.alpha * losses.alpha_dpo_z(gap, mu, sigma)
        metrics = {
            "alpha_dpo/margin_mean": float(ctx.gather(margin).mean()),
            "alpha_dpo/mu": mu,
            "alpha_dpo/sigma": sigma,
        }
        return ObjectiveOutput(per_pair, (beta * chosen).detach(), (beta * rejected).detach(), metrics)


class Probability(Objective):
    """Reference Policies paper Eq. 10: DPO's Bradley–Terry loss on ``β·lp_θ`` itself, without a reference."""

    name = "probability"
    needs_reference = False
    reference_free_variant_of = "sigmoid"

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
    hidden states of the policy and reference forwards (:mod:`trl_refpo.heads.perturbation`).
    """

    name = "epsilon_dpo"
    fields = {"epsilon": FieldRange(lambda value: 0 < value < 1, "in (0, 1) (ε-DPO; the paper uses 0.01)")}
    needs_reference_distribution = True

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
        per_pair = losses.sigmoid_dpo_loss(
            pairs.chosen_logps, pairs.rejected_logps, ref_chosen, ref_rejected, pair_beta
        )
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
    fields = {
        **RUNNING_MOMENTS_FIELDS,
        "beta_dpo_alpha": non_negative(">= 0 (β-DPO's sensitivity of β to the reward gap)"),
        "beta_dpo_momentum": fraction(),
        "beta_dpo_filter_ratio": fraction("in [0, 1) (β-DPO's filtering ratio ρ; 0 keeps every pair)"),
    }

    def __init__(self, args):
        super().__init__(args)
        self.controller = running_moments(
            BetaDPOController,
            args,
            self.name,
            momentum=args.beta_dpo_momentum,
            constant_sigma="the data filter weighs every pair alike",
        )

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
    before training (:class:`~trl_refpo.objectives.typo_completions.ReferenceCompletions`). Its tokens are extra rows of
    the same policy forward; no reference log-probs are needed, so no reference model is kept in training.
    """

    name = "typo"
    fields = TYPO_FIELDS
    needs_reference = False
    uses_beta = False

    def __init__(self, args):
        super().__init__(args)
        self.completions = ReferenceCompletions(args)

    @classmethod
    def samples_from_reference(cls, args) -> bool:
        return bool(args.typo_generate_ref_completions)

    @classmethod
    def validate(cls, args) -> None:
        column = args.typo_ref_completion_column
        taken = [*RESERVED_COLUMNS, "prompt_ids", "chosen_ids", "rejected_ids"]
        if not column or column in taken or ids_column(column) in taken:
            raise ValueError(
                f"typo_ref_completion_column={column!r} clashes with a column TRL uses ({taken}). Rename the column."
            )

    def extra_completion_columns(self):
        return (self.completions.ids_column,)

    def prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self.completions.prepare_dataset(dataset, processing_class, args, dataset_name)

    def prepare_dataset_with_reference(self, dataset, dataset_name, sampler):
        return self.completions.prepare_dataset_with_reference(dataset, dataset_name, sampler)

    def __call__(self, pairs, ctx):
        ref_sample_logps = pairs.extra_logps[self.completions.ids_column]
        per_pair = losses.typo_loss(pairs.chosen_logps, pairs.rejected_logps, ref_sample_logps, self.args.typo_lambda)
        metrics = {"typo/ref_completion_logps": float(ctx.gather(ref_sample_logps.detach()).mean())}
        # The supervised term is Bradley–Terry on lp_θ itself: the policy log-probs are TYPO's implicit rewards.
        return ObjectiveOutput(per_pair, pairs.chosen_logps.detach(), pairs.rejected_logps.detach(), metrics)


def running_moments(
    cls: type[RunningMoments], args, loss_name: str, momentum: float, constant_sigma: str
) -> RunningMoments:
    """The μ/σ controller of α-DPO / β-DPO as configured; warns when no update can see two pairs (σ stays 0)."""
    pairs_per_update = args.per_device_train_batch_size * args.world_size
    if args.moments_update == "optimizer_step":
        pairs_per_update *= args.gradient_accumulation_steps
    if pairs_per_update < 2:
        logger.warning(
            f"{loss_name}: each update of its running σ sees {pairs_per_update} pair (moments_update="
            f"{args.moments_update!r}, per_device_train_batch_size={args.per_device_train_batch_size}, "
            f"{args.world_size} process(es)), so σ stays 0 and {constant_sigma}. Use a larger "
            "per_device_train_batch_size, or moments_update='optimizer_step' with gradient_accumulation_steps >= 2."
        )
    return cls(momentum=momentum, update_every=args.moments_update, bias_correction=args.moments_bias_correction)
