"""trl-refpo: reference policies and KL control for TRL's DPO trainer.

``from trl_refpo import DPOConfig, DPOTrainer`` is a drop-in replacement for TRL's classes whose
``loss_type`` also selects the objectives in :mod:`trl_refpo.objectives.losses`.
"""

__version__ = "0.2.0"

from .version_guard import check_installed_versions


check_installed_versions(__version__)  # before anything imports TRL's internals: one line instead of a deep error

from .config import RefPOConfig
from .objectives import controllers, losses
from .objectives.base import Objective
from .objectives.registry import OBJECTIVES, available_loss_types, register_objective
from .trainer import RefPOTrainer


DPOConfig = RefPOConfig
DPOTrainer = RefPOTrainer


__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "OBJECTIVES",
    "Objective",
    "RefPOConfig",
    "RefPOTrainer",
    "available_loss_types",
    "controllers",
    "losses",
    "register_objective",
]
