"""``RefPOConfig``: TRL's ``DPOConfig`` plus the fields of the trl-refpo loss types and reference sources.

All validation happens here, in ``__post_init__``, so bad input fails at construction, before any
model is loaded or any step is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig as _TRLDPOConfig

from .objectives import OBJECTIVES
from .trl_losses import TRL_LOSS_TYPES


@dataclass
class RefPOConfig(_TRLDPOConfig):
    r"""Configuration for :class:`~trl_refpo.RefPOTrainer`.

    Everything of TRL's ``DPOConfig`` applies. ``loss_type`` additionally accepts the trl-refpo types
    (see ``trl_refpo.available_loss_types()``), alone or mixed with TRL's in a list with ``loss_weights``.

    Parameters added by trl-refpo:
        beta_chosen / beta_rejected (`float`, *optional*): Flex-DPO's β⁺ and β⁻; default ``beta``.
        alpha (`float`, defaults to 0.2): α-DPO's weight of the z-normalised adaptive margin (0 is SimPO).
        gamma_beta_ratio (`float`, defaults to 0.6): SimPO / α-DPO target margin γ/β.
        ln (`bool`, defaults to True): SimPO / α-DPO length normalisation ``lp(y)/n(y)``.
        beta_dpo_alpha (`float`, defaults to 0.5): β-DPO's sensitivity ``a`` of β to the reward gap.
        beta_dpo_momentum (`float`, defaults to 0.9): β-DPO's momentum of the running reward-gap baseline M₀.
    """

    beta_chosen: float | None = field(default=None, metadata={"help": "Flex-DPO β⁺ (chosen); default: beta."})
    beta_rejected: float | None = field(default=None, metadata={"help": "Flex-DPO β⁻ (rejected); default: beta."})
    alpha: float = field(default=0.2, metadata={"help": "α-DPO adaptive-margin weight α ≥ 0 (0 = SimPO)."})
    gamma_beta_ratio: float = field(default=0.6, metadata={"help": "SimPO/α-DPO target margin γ/β."})
    ln: bool = field(default=True, metadata={"help": "SimPO/α-DPO: length-normalise log-probs."})
    beta_dpo_alpha: float = field(default=0.5, metadata={"help": "β-DPO: sensitivity of β to the reward gap."})
    beta_dpo_momentum: float = field(default=0.9, metadata={"help": "β-DPO: momentum of the reward-gap baseline."})

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
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3).")
        if self.sync_ref_model and not self.needs_reference:
            raise ValueError(
                f"sync_ref_model=True but loss_type {self.loss_type} uses no reference model. Set sync_ref_model=False."
            )
