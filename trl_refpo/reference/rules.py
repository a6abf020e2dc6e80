"""Rules on reference settings, each written once. The config applies them to its fields at construction; the
reference setup applies them again to what the trainer was given (a ``ref_tokenizer`` instance, supplied columns),
with the same wording."""

from __future__ import annotations


def refuse_partial_reference(
    loss_types: list[str],
    *,
    precomputed: bool = False,
    supplied_columns: bool = False,
    no_model: bool = False,
    prior: bool = False,
    other_tokenizer: bool = False,
) -> None:
    """Loss types that need the reference's full next-token distribution over the policy's token ids (ε-DPO's
    perturbed policies) cannot use a reference that gives only summed log-probs or scores other tokens."""
    if not loss_types:
        return
    why = (
        f"{' and '.join(loss_types)} needs the reference model's full next-token distribution at every completion "
        "position (to score the perturbed policies)"
    )
    if precomputed:
        raise ValueError(
            f"{why}, not only summed reference log-probs, so it cannot use precompute_ref_log_probs=True. "
            "Set it to False."
        )
    if supplied_columns:
        raise ValueError(
            f"{why}, but the dataset supplies reference log-prob columns (ref_chosen_logps / ref_rejected_logps), "
            "which hold only their sums. Drop those columns so a reference model scores the batch."
        )
    if no_model:
        raise ValueError(f"{why}, but this setup has no reference model.")
    if prior:
        raise ValueError(
            f"{why} given the same prompt as the policy, so it cannot use the prior reference (ref_prompt='none'), "
            "which re-tokenises the text without the prompt. Set ref_prompt='full'."
        )
    if other_tokenizer:
        raise ValueError(
            f"{why} over the policy's vocabulary, so it cannot use a reference that re-tokenises the text with a "
            "different tokenizer (ref_tokenizer / ref_tokenizer_name_or_path). Use a reference that shares the "
            "policy's tokenizer."
        )


def refuse_sync_with_other_tokenizer(sync_ref_model: bool, other_tokenizer: bool) -> None:
    if sync_ref_model and other_tokenizer:
        raise ValueError(
            "sync_ref_model=True copies the policy's weights into the reference, which a reference with a different "
            "tokenizer (ref_tokenizer / ref_tokenizer_name_or_path) cannot take. Set sync_ref_model=False."
        )


def refuse_unresolved_model_name(field: str, name: str | None) -> None:
    """``offline:<name>`` is resolved by the ``trl-refpo`` CLI; the Python API takes a folder or a hub id."""
    if isinstance(name, str) and name.startswith("offline:"):
        raise ValueError(
            f"{field}={name!r} names an offline model, which only the trl-refpo CLI resolves. In Python pass its "
            "folder: trl_refpo.research.offline_models.resolve_model_path(name)."
        )
