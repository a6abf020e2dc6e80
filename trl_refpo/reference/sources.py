"""Where the reference log-probs of a micro-batch come from.

A reference source turns a collated batch into per-pair reference log-probs (and, where the
reference tokenises differently, its own completion token counts). The trainer asks the one source
chosen at construction; objectives never know which it was. A source scores through a :class:`ScoringHandle`
(the model, the adapter switch, the accelerator, the tokenizer), never through the trainer: the handle is built
from TRL's trainer in one place, :func:`trl_refpo.reference.handle.scoring_handle`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from trl.models.utils import disable_gradient_checkpointing

from ..heads.completion import completion_logps, model_inputs


@dataclass
class ReferenceLogps:
    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor | None = None  # the reference's own completion token counts, where they differ
    rejected_lengths: Tensor | None = None


@dataclass
class ScoringHandle:
    """What a reference source needs to score a batch.

    ``model`` is the reference model, or for a PEFT policy without one the policy itself, scored inside
    ``adapter_context()`` (the adapter switched off). ``policy``'s gradient checkpointing is switched off for the
    forward. ``weights_fingerprint`` names the reference weights for the precompute cache's key.
    """

    model: torch.nn.Module
    accelerator: Any
    tokenizer: Any  # the policy's tokenizer
    policy: torch.nn.Module | None = None
    adapter_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    gradient_checkpointing_kwargs: dict | None = None
    weights_fingerprint: Callable[[], str | None] = field(default=lambda: None)


class ReferenceSource:
    """Base class. ``needs_model`` says whether the trainer must keep a reference model in memory;
    ``trl_compatible`` whether TRL's own loss code can use it unchanged (it scores the policy's token ids);
    ``ref_pad_token_id`` is set where the batch needs ``ref_input_ids`` (the collator builds them)."""

    needs_model = False
    trl_compatible = True
    scores_policy_token_ids = False  # a model forward over the policy's own batch (ε-DPO can capture it)
    ref_pad_token_id: int | None = None

    def prepare_dataset(self, dataset, processing_class, args, dataset_name: str):
        """Add the columns this source needs to TRL's tokenised dataset (default: none)."""
        return dataset

    def __call__(self, handle: ScoringHandle | None, inputs: dict, num_pairs: int) -> ReferenceLogps | None:
        raise NotImplementedError


class NoReference(ReferenceSource):
    """Reference-free loss types (SimPO, probability, TYPO's supervised term)."""

    def __call__(self, handle, inputs, num_pairs):
        return None


class ColumnReference(ReferenceSource):
    """``ref_chosen_logps`` / ``ref_rejected_logps`` from the batch: precomputed or supplied by the user."""

    def __call__(self, handle, inputs, num_pairs):
        lengths = (inputs.get("ref_chosen_lengths"), inputs.get("ref_rejected_lengths"))
        return ReferenceLogps(
            inputs["ref_chosen_logps"].float(),
            inputs["ref_rejected_logps"].float(),
            *(None if value is None else value.float() for value in lengths),
        )


class ModelReference(ReferenceSource):
    """Score the policy's own token ids with the reference model.

    The handle's model is the reference model (the initial policy or a swapped same-tokenizer checkpoint) or,
    with PEFT and no ``ref_model``, the policy with its adapter disabled (TRL's convention).
    """

    needs_model = True
    scores_policy_token_ids = True
    input_keys = ("input_ids", "attention_mask", "completion_mask")  # the batch rows this source scores

    def __call__(self, handle: ScoringHandle, inputs, num_pairs) -> ReferenceLogps:
        """Reference log-probs and completion token counts of the first ``2 * num_pairs`` rows of ``input_keys``.

        The batch's other model inputs (images) go along unsliced: a vision batch has no extra rows (the trainer
        refuses extra completion rows on vision data).
        """
        rows = slice(0, 2 * num_pairs)  # chosen and rejected rows; extra rows (TYPO) need no reference
        input_ids, attention_mask, completion_mask = (inputs[key][rows] for key in self.input_keys)
        checkpointing_off = (
            disable_gradient_checkpointing(handle.policy, handle.gradient_checkpointing_kwargs)
            if handle.policy is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), checkpointing_off, handle.adapter_context():
            row_logps, _, _ = completion_logps(
                handle.model, input_ids, attention_mask, completion_mask, **model_inputs(inputs)
            )
        chosen, rejected = row_logps.float().chunk(2)
        chosen_lengths, rejected_lengths = completion_mask[:, 1:].sum(dim=1).float().chunk(2)
        return ReferenceLogps(chosen, rejected, chosen_lengths, rejected_lengths)
