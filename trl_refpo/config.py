"""``RefPOConfig``: TRL's ``DPOConfig`` plus the fields of the trl-refpo loss types and reference sources.

All validation happens here, in ``__post_init__``, so bad input fails at construction, before any
model is loaded or any step is trained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from trl import DPOConfig as _TRLDPOConfig

from .objectives.base import FieldRange, fraction, non_negative, positive
from .objectives.registry import (
    OBJECTIVES,
    available_loss_types,
    field_owners,
    field_ranges,
    label_smoothing_types,
    needs_reference,
    uses_beta,
)
from .objectives.trl_losses import TRL_LOSS_TYPES
from .reference.rules import refuse_partial_reference, refuse_sync_with_other_tokenizer


# The ranges of TRL's own numeric fields (those of the trl-refpo loss types are declared by their Objective classes).
TRL_FIELD_RANGES = {
    "beta": positive(),
    "loss_weights": non_negative(">= 0 (one per loss_type)"),
    "label_smoothing": fraction(),
    "ld_alpha": FieldRange(lambda value: 0 <= value <= 1, "in [0, 1] (or None)"),
    "discopop_tau": positive(),
    "ref_model_mixup_alpha": FieldRange(lambda value: 0 <= value <= 1, "in [0, 1]"),
}


@dataclass
class RefPOConfig(_TRLDPOConfig):
    r"""Configuration for :class:`~trl_refpo.RefPOTrainer`.

    Everything of TRL's ``DPOConfig`` applies. ``loss_type`` additionally accepts the trl-refpo types
    (see ``trl_refpo.available_loss_types()``), alone or mixed with TRL's in a list with ``loss_weights``.

    Parameters added by trl-refpo:
        epsilon (`float`, defaults to 0.01): ε-DPO's perturbation size ε ∈ (0, 1) (per-pair β_i = β / (1 + ε·step_i)).
        beta_chosen / beta_rejected (`float`, *optional*): Flex-DPO's β⁺ and β⁻; default ``beta``.
        alpha (`float`, defaults to 0.2): α-DPO's weight of the z-normalised adaptive margin (0 is SimPO).
        gamma_beta_ratio (`float`, defaults to 0.6): SimPO / α-DPO target margin γ/β.
        ln (`bool`, defaults to True): SimPO / α-DPO length normalisation ``lp(y)/n(y)``.
        beta_dpo_alpha (`float`, defaults to 0.6): β-DPO's sensitivity ``a`` of β to the DPO logit Δ (raw, not ×β).
        beta_dpo_filter_ratio (`float`, defaults to 0.2): β-DPO's filtering ratio ρ ∈ [0, 1): ⌊(1 − ρ)·N⌋ pairs of
            each gathered batch are sampled for the loss (0 keeps every pair).
        beta_dpo_momentum (`float`, defaults to 0.9): β-DPO's momentum of the running mean μ and std σ of Δ.
        moments_update (`str`, defaults to ``"micro_batch"``): when α-DPO's and β-DPO's running μ, σ move:
            ``"micro_batch"`` on every training micro-batch (the authors' codes), ``"optimizer_step"`` once per
            optimizer step from every pair of that step on every process (gradient accumulation then does not
            change the trajectory).
        moments_bias_correction (`bool`, defaults to False): use μ/(1 − m^t), σ/(1 − m^t) (as Adam corrects its
            moments; t = number of updates) instead of the raw running moments, which start at 0.

    TRL's ``label_smoothing`` applies the authors' conservative smoothing to ``alpha_dpo`` and ``simpo`` and is
    rejected for the other trl-refpo types; every TRL field either applies or is rejected (``docs/trl_fields.md``).

    Reference sources (docs/algorithms.md §7; a ``ref_model`` / ``ref_tokenizer`` instance can also be passed to the
    trainer):
        ref_model_name_or_path (`str`, *optional*): reference checkpoint to load instead of the initial policy.
        ref_model_init_kwargs (`dict`, *optional*): ``from_pretrained`` kwargs for ``ref_model_name_or_path``.
        ref_tokenizer_name_or_path (`str`, *optional*): the reference's own tokenizer, when it differs from the
            policy's: the reference then re-scores the original text with it (cross-tokenizer reference).
        ref_prompt (`str`, *optional*): ``"full"`` scores ``p_ref(y|x)``; ``"none"`` the prior ``p_ref(y)`` with the
            prompt removed. Default ``"none"`` for ``loss_type="likelihood"``, else ``"full"``.
        ref_logps_cache_dir (`str`, *optional*): with ``precompute_ref_log_probs``, a folder where precomputed
            reference log-probs are stored and reloaded, keyed by data, reference weights and tokenizer, prompt
            mode and truncation.
        typo_lambda (`float`, defaults to 0.05): TYPO's weight λ of the NLL of the reference completion.
        typo_ref_completion_column (`str`, defaults to ``"ref_completion"``): TYPO's column of completions sampled
            from the reference policy (plain text or a list of messages, like ``chosen``).
        typo_generate_ref_completions (`bool`, defaults to False): if that column is missing, sample one completion
            per prompt from the reference model before training (cached on disk) instead of raising.
        typo_generation_temperature / _top_k / _top_p / _max_new_tokens / _repetition_penalty: the sampling
            settings (TYPO paper: 1.0, 60, 0.8, 256, 1.1).
        typo_generation_batch_size (`int`, *optional*): prompts per ``generate`` call; default
            ``per_device_eval_batch_size``.
        typo_generation_cache_dir (`str`, *optional*): where generated completions are cached; default
            ``<HF datasets cache>/trl_refpo/reference_completions``.
    """

    _VALID_DICT_FIELDS = _TRLDPOConfig._VALID_DICT_FIELDS + ["ref_model_init_kwargs"]

    epsilon: float = field(default=0.01, metadata={"help": "ε-DPO perturbation size ε in (0, 1)."})
    beta_chosen: float | None = field(default=None, metadata={"help": "Flex-DPO β⁺ (chosen); default: beta."})
    beta_rejected: float | None = field(default=None, metadata={"help": "Flex-DPO β⁻ (rejected); default: beta."})
    alpha: float = field(default=0.2, metadata={"help": "α-DPO adaptive-margin weight α ≥ 0 (0 = SimPO)."})
    gamma_beta_ratio: float = field(default=0.6, metadata={"help": "SimPO/α-DPO target margin γ/β."})
    ln: bool = field(default=True, metadata={"help": "SimPO/α-DPO: length-normalise log-probs."})
    beta_dpo_alpha: float = field(default=0.6, metadata={"help": "β-DPO: sensitivity a of β to the DPO logit."})
    beta_dpo_filter_ratio: float = field(
        default=0.2, metadata={"help": "β-DPO: fraction ρ of each batch's pairs filtered out (0 keeps all)."}
    )
    beta_dpo_momentum: float = field(default=0.9, metadata={"help": "β-DPO: momentum of the running μ, σ of Δ."})
    moments_update: str = field(
        default="micro_batch",
        metadata={
            "help": "When α-DPO / β-DPO running moments move: every training micro-batch (authors) or once per "
            "optimizer step from all its pairs.",
            "choices": ["micro_batch", "optimizer_step"],
        },
    )
    moments_bias_correction: bool = field(
        default=False, metadata={"help": "α-DPO / β-DPO: bias-correct the running moments (μ/(1-m^t), as Adam)."}
    )
    typo_lambda: float = field(default=0.05, metadata={"help": "TYPO: weight λ of the reference-completion NLL."})
    typo_ref_completion_column: str = field(
        default="ref_completion", metadata={"help": "TYPO: column of completions sampled from the reference."}
    )
    typo_generate_ref_completions: bool = field(
        default=False, metadata={"help": "TYPO: sample the missing reference completions before training."}
    )
    typo_generation_temperature: float = field(default=1.0, metadata={"help": "TYPO sampling temperature."})
    typo_generation_top_k: int = field(default=60, metadata={"help": "TYPO sampling top-k (0 disables)."})
    typo_generation_top_p: float = field(default=0.8, metadata={"help": "TYPO sampling top-p."})
    typo_generation_max_new_tokens: int = field(default=256, metadata={"help": "TYPO sampling max new tokens."})
    typo_generation_repetition_penalty: float = field(default=1.1, metadata={"help": "TYPO repetition penalty."})
    typo_generation_batch_size: int | None = field(
        default=None, metadata={"help": "TYPO: prompts per generate call (default per_device_eval_batch_size)."}
    )
    typo_generation_cache_dir: str | None = field(
        default=None, metadata={"help": "TYPO: cache directory of generated reference completions."}
    )

    # ---- reference sources (trl_refpo.reference.setup) ----
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference checkpoint to load instead of the initial policy."}
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "from_pretrained kwargs for ref_model_name_or_path."}
    )
    ref_tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The reference's own tokenizer when it differs from the policy's (re-scores the text)."},
    )
    ref_prompt: str | None = field(
        default=None,
        metadata={
            "help": "'full': p_ref(y|x); 'none': the prior p_ref(y), prompt removed. Default 'none' for "
            "loss_type likelihood, else 'full'.",
            "choices": ["full", "none"],
        },
    )
    ref_logps_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder caching precomputed reference log-probs (precompute_ref_log_probs)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.loss_type = [str(name) for name in self.loss_type]
        self._validate()

    @property
    def plugin_loss_types(self) -> list[str]:
        return [name for name in self.loss_type if name in OBJECTIVES]

    @property
    def uses_trl_loss_code(self) -> bool:
        """``loss_type`` holds only TRL's own types: TRL's ``DPOTrainer`` computes the loss, unchanged."""
        return all(name in TRL_LOSS_TYPES for name in self.loss_type)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (TRL's own loss code always does)."""
        return self.uses_trl_loss_code or any(needs_reference(name) for name in self.loss_type)

    def _validate(self) -> None:
        valid = available_loss_types()
        unknown = [name for name in self.loss_type if name not in valid]
        if unknown:
            raise ValueError(f"Unknown loss_type {unknown}. Valid loss types: {valid}.")
        if not self.loss_type:
            raise ValueError(f"loss_type is empty. Choose at least one of: {valid}.")
        self._validate_numbers()
        self._validate_fields_apply()
        if self.plugin_loss_types:
            # TRL applies these only inside its own loss code; their meaning for trl-refpo types is undefined.
            trl_only = {
                "f_divergence_type": self.f_divergence_type != "reverse_kl",
                "f_alpha_divergence_coef": self.f_alpha_divergence_coef != 0.5,
                "ld_alpha": self.ld_alpha is not None,
                "use_weighting": self.use_weighting,
                "label_smoothing_factor": self.label_smoothing_factor != 0.0,
                "discopop_tau": self.discopop_tau != 0.05 and "discopop" not in self.loss_type,
            }
            bad = [name for name, is_set in trl_only.items() if is_set]
            if bad:
                raise ValueError(
                    f"{bad} apply only to TRL's own loss types, but loss_type contains {self.plugin_loss_types}. "
                    "Unset them, or use TRL's loss types alone (see docs/trl_fields.md)."
                )
            no_smoothing = [name for name in self.plugin_loss_types if not OBJECTIVES[name].supports_label_smoothing]
            if self.label_smoothing > 0 and no_smoothing:
                raise ValueError(
                    f"label_smoothing={self.label_smoothing} has no meaning for loss_type {no_smoothing} (their "
                    f"authors define none); it applies to {label_smoothing_types()} (conservative smoothing). Set "
                    "label_smoothing=0."
                )
            if self.label_smoothing >= 0.5:
                raise ValueError(
                    f"label_smoothing must be in [0, 0.5) with trl-refpo loss types (the probability that a preference "
                    f"label is flipped), got {self.label_smoothing}."
                )
        for name in dict.fromkeys(self.plugin_loss_types):
            OBJECTIVES[name].validate(self)
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3).")
        self._validate_reference_source()
        refuse_partial_reference(
            [name for name in self.plugin_loss_types if OBJECTIVES[name].needs_reference_distribution],
            precomputed=self.precompute_ref_log_probs,
            prior=self.ref_prompt == "none",
            other_tokenizer=self.ref_tokenizer_name_or_path is not None,
        )

    def _validate_fields_apply(self) -> None:
        """A field set to a non-default value must be read by some loss type of the run: none is ignored silently."""
        defaults = {item.name: item.default for item in fields(self)}
        for name, owners in field_owners().items():
            if name in defaults and getattr(self, name) != defaults[name] and not set(owners) & set(self.loss_type):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is used only by loss_type {list(owners)}, which loss_type "
                    f"{self.loss_type} does not contain. Unset {name}, or add the loss type."
                )
        if self.beta != defaults["beta"] and not any(uses_beta(name) for name in self.loss_type):
            raise ValueError(f"beta={self.beta} is unused: loss_type {self.loss_type} has no β. Unset beta.")
        if self.plugin_loss_types and not self.sync_ref_model:
            for name in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
                if getattr(self, name) != defaults[name]:
                    raise ValueError(
                        f"{name} applies only with sync_ref_model=True. Set sync_ref_model, or unset {name}."
                    )

    def _validate_numbers(self) -> None:
        """Every float setting is finite (NaN / inf anywhere, lists included, is an error), and in its range."""
        for name, value in vars(self).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(item, float) and not math.isfinite(item) for item in values):
                raise ValueError(f"{name} must be a finite number, got {value}.")
        for name, valid in {**TRL_FIELD_RANGES, **field_ranges()}.items():
            value = getattr(self, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(valid.is_valid(item) for item in values):
                raise ValueError(f"{name} must be {valid.expected}, got {value!r}.")
        if self.loss_weights is not None and not any(weight > 0 for weight in self.loss_weights):
            raise ValueError(
                f"loss_weights={self.loss_weights} are all 0: the loss would be 0 and nothing would be trained. "
                f"Give at least one of loss_type {self.loss_type} a weight > 0."
            )

    def _validate_reference_source(self) -> None:
        if self.ref_prompt is None:
            self.ref_prompt = "none" if "likelihood" in self.loss_type else "full"
        if self.ref_prompt not in ("full", "none"):
            raise ValueError(f"ref_prompt must be 'full' or 'none', got {self.ref_prompt!r}.")
        if "likelihood" in self.loss_type and self.ref_prompt != "none":
            raise ValueError(
                "loss_type 'likelihood' is DPO against the prior p_ref(y) (the completion scored without its prompt), "
                "so it needs ref_prompt='none'; got ref_prompt='full'. Unset ref_prompt, or use loss_type 'sigmoid'."
            )
        reference_fields = {
            "ref_model_name_or_path": self.ref_model_name_or_path,
            "ref_tokenizer_name_or_path": self.ref_tokenizer_name_or_path,
            "ref_logps_cache_dir": self.ref_logps_cache_dir,
        }
        if self.ref_prompt == "none":
            reference_fields["ref_prompt"] = self.ref_prompt
        for name in ("precompute_ref_log_probs", "precompute_ref_batch_size", "sync_ref_model"):  # TRL's
            reference_fields[name] = getattr(self, name) or None
        if not self.needs_reference:
            set_fields = [name for name, value in reference_fields.items() if value is not None]
            if set_fields:
                raise ValueError(
                    f"{set_fields} configure a reference, but loss_type {self.loss_type} uses none. Unset them."
                )
        if isinstance(self.ref_model_init_kwargs, str):
            self.ref_model_init_kwargs = json.loads(self.ref_model_init_kwargs)
        if self.ref_model_init_kwargs is not None and self.ref_model_name_or_path is None:
            raise ValueError(
                "ref_model_init_kwargs is set but ref_model_name_or_path is not: the kwargs load the reference "
                "checkpoint named there. Set ref_model_name_or_path, or unset ref_model_init_kwargs."
            )
        if self.ref_logps_cache_dir is not None and not self.precompute_ref_log_probs:
            raise ValueError(
                "ref_logps_cache_dir caches PRECOMPUTED reference log-probs: set precompute_ref_log_probs=True, or "
                "unset ref_logps_cache_dir."
            )
        refuse_sync_with_other_tokenizer(self.sync_ref_model, self.ref_tokenizer_name_or_path is not None)
