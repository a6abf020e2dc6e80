"""What every loss type is: an :class:`Objective` that declares its config fields and its reference needs, and
turns one micro-batch's per-pair log-probs (:class:`PairBatch`) into per-pair losses (:class:`ObjectiveOutput`).

The trainer sees only this interface; the config, the CLI and the reference setup read the declarations through
:mod:`trl_refpo.objectives.registry`. How to add a loss type: ``docs/design.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor


@dataclass(frozen=True)
class FieldRange:
    """The valid values of a numeric config field: a predicate and how the error message words it."""

    is_valid: Callable[[Any], bool]
    expected: str


def positive(wording: str = "> 0") -> FieldRange:
    return FieldRange(lambda value: value > 0, wording)


def non_negative(wording: str = ">= 0") -> FieldRange:
    return FieldRange(lambda value: value >= 0, wording)


def fraction(wording: str = "in [0, 1)") -> FieldRange:
    return FieldRange(lambda value: 0 <= value < 1, wording)


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
    """One ``loss_type``. A subclass sets the declarations below and implements :meth:`__call__`.

    Declarations (class attributes, read by the config, the CLI and the reference setup through the registry):

    * ``fields``: the config fields this loss type owns, each with its valid range (``None``: no numeric range).
      A field owned by loss types none of which is in ``loss_type`` must keep its default.
    * ``needs_reference``: reads reference log-probs.
    * ``needs_reference_distribution``: needs the reference model's full next-token distribution over the
      policy's token ids (ε-DPO's perturbed policies): no precomputed / supplied / re-tokenising reference.
    * ``uses_beta``: the loss reads ``beta`` (a run whose loss types all read none must leave it at its default).
    * ``supports_label_smoothing``: the authors' code applies conservative label smoothing.
    * ``reference_free_variant_of``: the TRL type this one replaces under a legacy ``reference_free: true``.
    * :meth:`samples_from_reference`: uses the reference model before training (TYPO's generation).
    * :meth:`validate`: checks of this type's own fields beyond their ranges (one line, naming the field).
    """

    name: ClassVar[str]
    fields: ClassVar[dict[str, FieldRange | None]] = {}
    needs_reference: ClassVar[bool] = True
    needs_reference_distribution: ClassVar[bool] = False
    uses_beta: ClassVar[bool] = True
    supports_label_smoothing: ClassVar[bool] = False
    reference_free_variant_of: ClassVar[str | None] = None
    controller = None  # a trl_refpo.objectives.controllers.Controller where the loss has training-time state

    def __init__(self, args):
        self.args = args

    @classmethod
    def samples_from_reference(cls, args) -> bool:
        return False

    @classmethod
    def validate(cls, args) -> None:
        """Raise ``ValueError`` for settings of this loss type's fields that are invalid together."""

    def extra_completion_columns(self) -> tuple[str, ...]:
        """Token-id columns of extra completions scored in the same policy forward (TYPO).

        Their per-pair log-probs arrive in ``PairBatch.extra_logps[column]``.
        """
        return ()

    def prepare_dataset(self, dataset, processing_class, args, dataset_name: str):
        """Add the columns this objective needs to TRL's tokenised dataset (default: none)."""
        return dataset

    def prepare_dataset_with_reference(self, dataset, dataset_name: str, sampler):
        """Complete a dataset with what only the reference model can give (TYPO: completions sampled from it).

        Called once per dataset at the end of the trainer's construction, before any training step; ``sampler``
        holds the reference model (the ``ref_model`` passed to the trainer, else the still untrained policy), the
        processing class and the accelerator (:class:`ReferenceSampler`).
        """
        return dataset

    def __call__(self, pairs: PairBatch, ctx: StepContext) -> ObjectiveOutput:
        raise NotImplementedError


@dataclass
class ReferenceSampler:
    """What an objective gets to sample from the reference before training: the model and how to run it."""

    model: Any
    processing_class: Any
    accelerator: Any
