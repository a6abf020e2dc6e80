"""Keys TRL 1.16 / transformers 5 no longer know but recipes still carry, honoured with their old meaning."""

from __future__ import annotations

from enum import Enum
from typing import Any

from trl import ModelConfig

from ..config import RefPOConfig
from ..objectives.registry import reference_free_equivalent, reference_free_types
from .errors import RecipeError


LEGACY_KEYS = (
    "torch_dtype",
    "max_prompt_length",
    "max_completion_length",
    "rpo_alpha",
    "sft_weight",
    "reference_free",
    "warmup_ratio",
    "evaluation_strategy",
    "hub_model_revision",
    "preprocessing_num_workers",
    "use_flash_attention_2",
    "truncation_side",
    "overwrite_output_dir",
    "dataset_mixer",
    "dataset_splits",
    "dataset_configs",
)


def translate_legacy(legacy: dict, training_args: RefPOConfig, model_args: ModelConfig, explicit: set[str]):
    """Old-meaning translation of :data:`LEGACY_KEYS`. Returns (dataclass overrides, printed notes, length limits)."""
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    limits: dict[str, int] = {}

    def rename(old: str, new: str, value):
        now = getattr(model_args, new) if hasattr(model_args, new) else getattr(training_args, new)
        if new in explicit and _differs(now, value):
            raise RecipeError(
                f"`{old}: {value}` and `{new}` are both set and disagree; `{old}` is the old name of "
                f"`{new}`: keep only `{new}`."
            )
        overrides[new] = value
        notes.append(f"{old}: {value} → {new}: {value}")

    for key in ("dataset_mixer", "dataset_splits", "dataset_configs"):
        if key in legacy:
            raise RecipeError(_dataset_mixer_message(legacy))
    if "torch_dtype" in legacy and legacy["torch_dtype"] is not None:
        rename("torch_dtype", "dtype", legacy["torch_dtype"])
    elif "torch_dtype" in legacy:
        notes.append(f"torch_dtype: null → dtype keeps its default ({model_args.dtype})")
    if "warmup_ratio" in legacy:
        ratio = float(legacy["warmup_ratio"])
        if not 0 <= ratio < 1:
            raise RecipeError(f"warmup_ratio must be in [0, 1), got {ratio}.")
        rename("warmup_ratio", "warmup_steps", ratio)
    if "evaluation_strategy" in legacy:
        rename("evaluation_strategy", "eval_strategy", legacy["evaluation_strategy"])
    if "hub_model_revision" in legacy:
        rename("hub_model_revision", "hub_revision", legacy["hub_model_revision"])
    if "preprocessing_num_workers" in legacy and legacy["preprocessing_num_workers"] is not None:
        rename("preprocessing_num_workers", "dataset_num_proc", int(legacy["preprocessing_num_workers"]))
    if legacy.get("use_flash_attention_2"):
        rename("use_flash_attention_2", "attn_implementation", "flash_attention_2")
    elif "use_flash_attention_2" in legacy:
        notes.append("use_flash_attention_2: false → no change (attn_implementation keeps its value)")
    if "truncation_side" in legacy:
        side = legacy["truncation_side"]
        if side not in ("left", "right"):
            raise RecipeError(f"truncation_side must be 'left' or 'right', got {side!r}.")
        rename("truncation_side", "truncation_mode", "keep_end" if side == "left" else "keep_start")
    if "overwrite_output_dir" in legacy:
        notes.append(
            f"overwrite_output_dir: {legacy['overwrite_output_dir']} → accepted; trl-refpo writes output_dir and never "
            "resumes implicitly (set resume_from_checkpoint to resume)"
        )

    loss_type = list(training_args.loss_type)
    loss_weights = list(training_args.loss_weights) if training_args.loss_weights is not None else None
    if legacy.get("reference_free"):
        loss_type = _reference_free(loss_type)
        overrides["loss_type"] = loss_type
        notes.append(f"reference_free: true → loss_type: {loss_type}")
    elif "reference_free" in legacy:
        notes.append("reference_free: false → no change")
    for key in ("rpo_alpha", "sft_weight"):
        if key not in legacy:
            continue
        weight = legacy[key]
        if weight is None or float(weight) == 0.0:
            notes.append(f"{key}: {weight} → no SFT term (its old default)")
            continue
        if float(weight) < 0:
            raise RecipeError(f"{key} must be >= 0, got {weight}.")
        if "sft" in loss_type:
            raise RecipeError(
                f"{key} adds an 'sft' loss term but loss_type already contains 'sft': remove {key} "
                "and set its weight in loss_weights."
            )
        loss_weights = (loss_weights or [1.0] * len(loss_type)) + [float(weight)]
        loss_type = loss_type + ["sft"]
        overrides["loss_type"], overrides["loss_weights"] = loss_type, loss_weights
        notes.append(f"{key}: {weight} → loss_type: {loss_type}, loss_weights: {loss_weights}")

    for key in ("max_prompt_length", "max_completion_length"):
        if legacy.get(key) is not None:
            value = int(legacy[key])
            if value <= 0:
                raise RecipeError(f"{key} must be > 0, got {value}.")
            limits[key] = value
            notes.append(
                f"{key}: {value} → {'prompts keep their last' if 'prompt' in key else 'completions keep their first'} "
                f"{value} tokens"
            )
    if len(limits) == 2 and "max_length" not in explicit:
        overrides["max_length"] = limits["max_prompt_length"] + limits["max_completion_length"]
        notes.append(f"max_length: {overrides['max_length']} (= max_prompt_length + max_completion_length)")
    return overrides, notes, limits


def _differs(a, b) -> bool:
    plain = lambda value: value.value if isinstance(value, Enum) else value  # noqa: E731
    return str(plain(a)) != str(plain(b))


def _reference_free(loss_type: list[str]) -> list[str]:
    mapped = []
    for name in loss_type:
        equivalent = reference_free_equivalent(name)
        if equivalent is None:
            raise RecipeError(
                f"reference_free: true has no trl-refpo equivalent for loss_type {name!r}. Remove reference_free and "
                f"choose a reference-free loss_type: {reference_free_types()} ('probability' is reference-free sigmoid "
                "DPO)."
            )
        mapped.append(equivalent)
    return mapped


def _dataset_mixer_message(legacy: dict) -> str:
    mixer = legacy.get("dataset_mixer") or {}
    splits = legacy.get("dataset_splits") or ["train", "test"]
    configs = legacy.get("dataset_configs") or [None] * len(mixer)
    entries = []
    for (dataset_id, weight), config in zip(mixer.items(), configs):
        for split in splits:
            entry = f"{{id: {dataset_id}, split: {split}, columns: [chosen, rejected]"
            entry += f", config: {config}" if config else ""
            entry += f", weight: {weight}}}" if "train" in split else "}"
            entries.append(entry)
    suggestion = f"dataset_mixture: {{datasets: [{', '.join(entries)}], seed: 0, test_split_size: <n>}}"
    return (
        "dataset_mixer / dataset_splits / dataset_configs are the handbook's pre-2025 dataset keys, which mixed train and "
        f"test splits differently. Replace them with a dataset_mixture, e.g.: {suggestion}"
    )
