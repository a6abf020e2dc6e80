"""Where the reference log-probs of a micro-batch come from.

A reference source turns a collated batch into per-pair reference log-probs (and, where the
reference tokenises differently, its own completion token counts). The trainer asks the one source
chosen at construction; objectives never know which it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from torch import Tensor
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import FusedCausalLMOutput, use_adapter

from .lm_head import completion_head_outputs


@dataclass
class ReferenceLogps:
    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor | None = None  # the reference's own completion token counts, where they differ
    rejected_lengths: Tensor | None = None


#: Batch keys that are token rows or reference-side columns; every other key is a model input (a vision batch's
#: ``pixel_values``, ``image_sizes``, ``token_type_ids``, …), passed to ``model.forward`` as TRL passes it.
ROW_KEYS = frozenset({"input_ids", "attention_mask", "completion_mask"})


def model_inputs(inputs: dict) -> dict:
    """The batch's model inputs besides ``input_ids`` / ``attention_mask`` (empty for a text batch)."""
    return {key: value for key, value in inputs.items() if key not in ROW_KEYS and not key.startswith("ref_")}


def completion_logps(
    model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, entropy: bool = False,
    metrics: bool = False, **model_kwargs,
) -> tuple[Tensor, Tensor, FusedCausalLMOutput]:
    """Per-row sums of completion-token log-probs, the per-token values, and the head's outputs.

    Returns ``(row_logps (R,), per_token_logps (R, T-1), outputs)``; ``per_token_logps`` is 0 outside the
    completion; ``outputs.entropy`` is set when ``entropy`` is true, ``outputs.mean_logits`` / ``is_top1`` when
    ``metrics`` is. Only completion positions are projected through the LM head (:mod:`trl_refpo.lm_head`).
    ``model_kwargs`` (images, ``output_router_logits``) go to the model's forward.
    """
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    outputs = completion_head_outputs(
        model, input_ids, attention_mask, labels, entropy=entropy, metrics=metrics, **model_kwargs
    )
    per_token = outputs.log_probs[:, -(input_ids.size(1) - 1) :]
    return per_token.sum(dim=1), per_token, outputs


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

    def __call__(self, trainer, inputs: dict, num_pairs: int) -> ReferenceLogps | None:
        raise NotImplementedError


class NoReference(ReferenceSource):
    """Reference-free loss types (SimPO, probability, TYPO's supervised term)."""

    def __call__(self, trainer, inputs, num_pairs):
        return None


class ColumnReference(ReferenceSource):
    """``ref_chosen_logps`` / ``ref_rejected_logps`` from the batch: precomputed or supplied by the user."""

    def __call__(self, trainer, inputs, num_pairs):
        lengths = (inputs.get("ref_chosen_lengths"), inputs.get("ref_rejected_lengths"))
        return ReferenceLogps(
            inputs["ref_chosen_logps"].float(), inputs["ref_rejected_logps"].float(),
            *(None if value is None else value.float() for value in lengths),
        )


class ModelReference(ReferenceSource):
    """Score the policy's own token ids with the reference model.

    The reference is ``trainer.ref_model`` (the initial policy or a swapped same-tokenizer checkpoint)
    or, with PEFT and no ``ref_model``, the policy with its adapter disabled (TRL's convention).
    """

    needs_model = True
    scores_policy_token_ids = True
    input_keys = ("input_ids", "attention_mask", "completion_mask")  # the batch rows this source scores

    @staticmethod
    def reference_context(trainer):
        if trainer.ref_model is None and is_peft_model(trainer.model):
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            return trainer.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return trainer.ref_model, contextlib.nullcontext()

    def __call__(self, trainer, inputs, num_pairs):
        model, adapter_context = self.reference_context(trainer)
        return self.score(trainer, model, adapter_context, inputs, num_pairs)

    def score(self, trainer, model, adapter_context, inputs, num_pairs) -> ReferenceLogps:
        """Reference log-probs and completion token counts of the first ``2 * num_pairs`` rows of ``input_keys``.

        The batch's other model inputs (images) go along unsliced: a vision batch has no extra rows (the trainer
        refuses extra completion rows on vision data).
        """
        rows = slice(0, 2 * num_pairs)  # chosen and rejected rows; extra rows (TYPO) need no reference
        input_ids, attention_mask, completion_mask = (inputs[key][rows] for key in self.input_keys)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs),
            adapter_context,
        ):
            row_logps, _, _ = completion_logps(
                model, input_ids, attention_mask, completion_mask, **model_inputs(inputs)
            )
        chosen, rejected = row_logps.float().chunk(2)
        chosen_lengths, rejected_lengths = completion_mask[:, 1:].sum(dim=1).float().chunk(2)
        return ReferenceLogps(chosen, rejected, chosen_lengths, rejected_lengths)
