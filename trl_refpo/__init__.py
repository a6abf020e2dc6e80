"""trl-refpo: reference policies and KL control for TRL's DPO trainer.

``from trl_refpo import DPOConfig, DPOTrainer`` is a drop-in replacement for TRL's classes whose
``loss_type`` also selects the objectives in :mod:`trl_refpo.losses`.
"""

__version__ = "0.2.0"

from .version_guard import check_installed_versions

check_installed_versions(__version__)  # before anything imports TRL's internals: one line instead of a deep error

from . import controllers, losses
from .config import RefPOConfig
from .objectives import OBJECTIVES, Objective, register_objective
from .trainer import RefPOTrainer
from .trl_losses import TRL_LOSS_TYPES

DPOConfig = RefPOConfig
DPOTrainer = RefPOTrainer


def available_loss_types() -> list[str]:
    """Every value ``loss_type`` accepts: TRL's built-in types and trl-refpo's."""
    return sorted(TRL_LOSS_TYPES | set(OBJECTIVES))


__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "Objective",
    "RefPOConfig",
    "RefPOTrainer",
    "available_loss_types",
    "controllers",
    "losses",
    "register_objective",
]
