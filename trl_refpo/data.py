"""Batch collation for the trl-refpo pipeline.

The policy batch keeps TRL's layout — ``2B`` rows ``[chosen; rejected]``, right padding,
``completion_mask`` — and appends one ``B``-row group per extra completion column (e.g. TYPO's sample
from the reference), so every completion goes through ONE policy forward. A reference that tokenises
differently (another tokenizer, or the prompt removed) gets its own ``ref_input_ids`` /
``ref_attention_mask`` / ``ref_completion_mask`` with ``2B`` rows built from ``ref_prompt_ids``,
``ref_chosen_ids`` and ``ref_rejected_ids``. Reference log-prob columns stay float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad


FLOAT_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_lengths", "ref_rejected_lengths")
REF_ID_COLUMNS = (
    "ref_prompt_ids",
    "ref_chosen_ids",
    "ref_rejected_ids",
    "ref_chosen_prompt_start",
    "ref_rejected_prompt_start",
)


@dataclass
class RefPODataCollator(DataCollatorForPreference):
    """``DataCollatorForPreference`` plus extra completion row groups and a reference-side tokenisation.

    Args (in addition to TRL's):
        extra_completion_keys: token-id columns (e.g. ``"ref_completion_ids"``) appended, in order, as
            extra ``B``-row groups after ``[chosen; rejected]``, each after the example's ``prompt_ids``.
        ref_pad_token_id: pad id of the reference tokenizer; set when the dataset has ``ref_*_ids`` columns.
    """

    extra_completion_keys: tuple[str, ...] = ()
    ref_pad_token_id: int | None = None

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = self._sequences(
            [ex["prompt_ids"] for ex in examples],
            [[ex[key] for ex in examples] for key in ("chosen_ids", "rejected_ids", *self.extra_completion_keys)],
            self.pad_token_id,
        )
        if self.ref_pad_token_id is not None:
            # Reference rows arrive already cut to the text the policy keeps (trl_refpo.reference.text): a
            # reference token count is no measure of that text, so max_length does not apply to them here.
            ref_rows = [
                (ex["ref_prompt_ids"][ex.get(f"ref_{side}_prompt_start", 0) :], ex[f"ref_{side}_ids"])
                for side in ("chosen", "rejected")
                for ex in examples
            ]
            ref = self._padded_rows(ref_rows, self.ref_pad_token_id, truncate=False)
            output.update({f"ref_{name}": tensor for name, tensor in ref.items()})
        for column in FLOAT_COLUMNS:
            if column in examples[0]:
                output[column] = torch.tensor([ex[column] for ex in examples], dtype=torch.float32)
        return output

    def _sequences(self, prompts: list[list[int]], completion_groups: list[list[list[int]]], pad_token_id: int):
        rows = [
            (prompt, completion)
            for completions in completion_groups
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        return self._padded_rows(rows, pad_token_id)

    def _padded_rows(self, rows: list[tuple[list[int], list[int]]], pad_token_id: int, truncate: bool = True):
        input_ids = [prompt + completion for prompt, completion in rows]
        completion_mask = [[0] * len(prompt) + [1] * len(completion) for prompt, completion in rows]
        if truncate and self.max_length is not None:
            if self.truncation_mode == "keep_start":
                window = slice(None, self.max_length)
            elif self.truncation_mode == "keep_end":
                window = slice(-self.max_length, None)
            else:
                raise ValueError(
                    f"Unsupported truncation_mode {self.truncation_mode!r}: use 'keep_start' or 'keep_end'."
                )
            input_ids = [ids[window] for ids in input_ids]
            completion_mask = [mask[window] for mask in completion_mask]

        def padded(rows, value, dtype):
            tensors = [torch.tensor(row, dtype=dtype) for row in rows]
            return pad(tensors, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)

        return {
            "input_ids": padded(input_ids, pad_token_id, torch.long),
            "attention_mask": padded([[1] * len(ids) for ids in input_ids], 0, torch.long),
            "completion_mask": padded(completion_mask, 0, torch.long),
        }


def require_rows(dataset, name: str) -> None:
    """An empty dataset is an error naming it (TRL would stop with a bare StopIteration)."""
    if isinstance(dataset, Dataset):
        empty = len(dataset) == 0
    else:  # an IterableDataset: its first example (TRL reads it too)
        empty = isinstance(dataset, IterableDataset) and next(iter(dataset), None) is None
    if empty:
        raise ValueError(f"The {name} dataset is empty: it has no preference pairs. Pass a dataset with rows.")


def report_dropped_rows(dataset, rows_before: int | None, args, name: str) -> None:
    """Say how many rows TRL's preparation dropped for ``max_length`` (prompts that leave no completion token)."""
    if rows_before is None or not isinstance(dataset, Dataset) or len(dataset) == rows_before:
        return
    why = (
        f"their prompt alone has max_length={args.max_length} tokens or more, so truncation_mode="
        f"'{args.truncation_mode}' would keep no completion token"
    )
    if len(dataset) == 0:
        raise ValueError(
            f"All {rows_before} rows of the {name} dataset were dropped: {why}. Raise max_length (or set it to None)."
        )
    warnings.warn(
        f"Dropped {rows_before - len(dataset)} of {rows_before} rows of the {name} dataset: {why}. Raise max_length "
        "to keep them.",
        stacklevel=3,
    )
