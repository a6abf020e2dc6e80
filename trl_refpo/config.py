"""``RefPOConfig``: TRL's ``DPOConfig`` plus the fields of the trl-refpo loss types and reference sources.

All validation happens here, in ``__post_init__``, so bad input fails at construction, before any
model is loaded or any step is trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig as _TRLDPOConfig

from .objectives import OBJECTIVES
from .trl_losses import TRL_LOSS_TYPES


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
        beta_dpo_alpha (`float`, defaults to 0.5): β-DPO's sensitivity ``a`` of β to the reward gap.
        beta_dpo_momentum (`float`, defaults to 0.9): β-DPO's momentum of the running reward-gap baseline M₀.

    Reference sources (ALGORITHMS.md §7; a ``ref_model`` / ``ref_tokenizer`` instance can also be passed to the trainer):
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
    beta_dpo_alpha: float = field(default=0.5, metadata={"help": "β-DPO: sensitivity of β to the reward gap."})
    beta_dpo_momentum: float = field(default=0.9, metadata={"help": "β-DPO: momentum of the reward-gap baseline."})
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

    # ---- reference sources (trl_refpo.reference_setup) ----
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
        return self.uses_trl_loss_code or any(
            OBJECTIVES[name].needs_reference if name in OBJECTIVES else name != "sft" for name in self.loss_type
        )

    def _validate(self) -> None:
        valid = sorted(TRL_LOSS_TYPES | set(OBJECTIVES))
        unknown = [name for name in self.loss_type if name not in valid]
        if unknown:
            raise ValueError(f"Unknown loss_type {unknown}. Valid loss types: {valid}.")
        if not self.loss_type:
            raise ValueError(f"loss_type is empty. Choose at least one of: {valid}.")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")
        for name in ("beta_chosen", "beta_rejected"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or None to use beta), got {value}.")
        if self.alpha < 0:
            raise ValueError(f"alpha (α-DPO) must be >= 0, got {self.alpha}. alpha=0 is SimPO.")
        if not 0 <= self.beta_dpo_momentum < 1:
            raise ValueError(f"beta_dpo_momentum must be in [0, 1), got {self.beta_dpo_momentum}.")
        if self.loss_weights is not None and any(w < 0 for w in self.loss_weights):
            raise ValueError(f"loss_weights must be >= 0, got {self.loss_weights}.")
        if self.plugin_loss_types:
            # TRL applies these only inside its own loss code; their meaning for trl-refpo types is undefined.
            trl_only = {
                "f_divergence_type": self.f_divergence_type != "reverse_kl",
                "ld_alpha": self.ld_alpha is not None,
                "use_weighting": self.use_weighting,
            }
            bad = [name for name, is_set in trl_only.items() if is_set]
            if bad:
                raise ValueError(
                    f"{bad} apply only to TRL's own loss types, but loss_type contains {self.plugin_loss_types}. "
                    "Unset them, or use TRL's loss types alone."
                )
        if "typo" in self.loss_type:
            self._validate_typo()
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3).")
        self._validate_reference_source()
        if "epsilon_dpo" in self.loss_type:
            self._validate_epsilon_dpo()

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
        if self.sync_ref_model and (self.ref_tokenizer_name_or_path is not None):
            raise ValueError(
                "sync_ref_model=True copies the policy's weights into the reference, which a reference with a "
                "different tokenizer (ref_tokenizer_name_or_path) cannot take. Set sync_ref_model=False."
            )

    def _validate_epsilon_dpo(self) -> None:
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon (ε-DPO) must be in (0, 1), got {self.epsilon}. The paper uses 0.01.")
        why = (
            "epsilon_dpo needs the reference model's full next-token distribution at every completion position "
            "(to score the perturbed policies), not only summed reference log-probs"
        )
        if self.precompute_ref_log_probs:
            raise ValueError(f"{why}, so it cannot use precompute_ref_log_probs=True. Set it to False.")
        if self.ref_prompt == "none":
            raise ValueError(
                f"{why} given the same prompt as the policy, so it cannot use the prior reference (ref_prompt='none')."
            )
        if self.ref_tokenizer_name_or_path is not None:
            raise ValueError(
                f"{why} over the policy's vocabulary, so it cannot use a reference with a different tokenizer "
                "(ref_tokenizer_name_or_path). Use a reference that shares the policy's tokenizer."
            )

    def _validate_typo(self) -> None:
        from .ref_completions import RESERVED_COLUMNS, ids_column

        if self.typo_lambda < 0:
            raise ValueError(f"typo_lambda must be >= 0, got {self.typo_lambda}.")
        column = self.typo_ref_completion_column
        taken = [*RESERVED_COLUMNS, "prompt_ids", "chosen_ids", "rejected_ids"]
        if not column or column in taken or ids_column(column) in taken:
            raise ValueError(
                f"typo_ref_completion_column={column!r} clashes with a column TRL uses ({taken}). Rename the column."
            )
        checks = {
            "typo_generation_temperature": self.typo_generation_temperature > 0,
            "typo_generation_top_k": self.typo_generation_top_k >= 0,
            "typo_generation_top_p": 0 < self.typo_generation_top_p <= 1,
            "typo_generation_max_new_tokens": self.typo_generation_max_new_tokens >= 1,
            "typo_generation_repetition_penalty": self.typo_generation_repetition_penalty > 0,
            "typo_generation_batch_size": self.typo_generation_batch_size is None or self.typo_generation_batch_size >= 1,
        }
        expected = {
            "typo_generation_temperature": "> 0",
            "typo_generation_top_k": ">= 0",
            "typo_generation_top_p": "in (0, 1]",
            "typo_generation_max_new_tokens": ">= 1",
            "typo_generation_repetition_penalty": "> 0",
            "typo_generation_batch_size": ">= 1 (or None)",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {expected[name]}, got {getattr(self, name)}.")
