"""TRL 1.16's built-in DPO loss types as pure functions of per-pair log-ratios.

These are used only when a TRL loss type is combined with a trl-refpo loss type in one ``loss_type``
list (e.g. ``[alpha_dpo, sft]``). A ``loss_type`` made only of TRL's types is computed by TRL's own
``DPOTrainer`` code, unchanged. The formulas mirror ``trl/trainer/dpo_trainer.py`` (reverse-KL scores)
and are tested against TRL's trainer on the same batch.

Each function takes ``chosen_logratios = lp_θ(y_w) − lp_ref(y_w)``, ``rejected_logratios`` (``(B,)``)
plus the extras it needs, and returns per-pair losses ``(B,)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, **_) -> Tensor:
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def hinge(chosen_logratios, rejected_logratios, beta, **_):
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def ipo(chosen_logratios, rejected_logratios, beta, chosen_lengths, rejected_lengths, **_):
    delta = chosen_logratios / chosen_lengths.clamp(min=1.0) - rejected_logratios / rejected_lengths.clamp(min=1.0)
    return (delta - 1 / (2 * beta)) ** 2


def sigmoid_norm(chosen_logratios, rejected_logratios, beta, chosen_lengths, rejected_lengths, **_):
    delta = chosen_logratios / chosen_lengths.clamp(min=1.0) - rejected_logratios / rejected_lengths.clamp(min=1.0)
    return -F.logsigmoid(beta * delta)


def exo_pair(chosen_logratios, rejected_logratios, beta, label_smoothing, **_):
    logits = beta * (chosen_logratios - rejected_logratios)
    return torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-label_smoothing)) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - math.log(label_smoothing)
    )


def nca_pair(chosen_logratios, rejected_logratios, beta, **_):
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def robust(chosen_logratios, rejected_logratios, beta, label_smoothing, **_):
    logits = beta * (chosen_logratios - rejected_logratios)
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def bco_pair(chosen_logratios, rejected_logratios, beta, **_):
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard(chosen_logratios, rejected_logratios, beta, **_):
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def _sorted_sigmoid(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot(chosen_logratios, rejected_logratios, beta, label_smoothing, policy_logratios, ref_logratios, **_):
    delta = torch.sort(policy_logratios, dim=0).values - torch.sort(ref_logratios, dim=0).values
    return _sorted_sigmoid(delta, beta, label_smoothing)


def aot_unpaired(chosen_logratios, rejected_logratios, beta, label_smoothing, **_):
    delta = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
    return _sorted_sigmoid(delta, beta, label_smoothing)


def apo_zero(chosen_logratios, rejected_logratios, beta, **_):
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down(chosen_logratios, rejected_logratios, beta, **_):
    return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))


def discopop(chosen_logratios, rejected_logratios, beta, discopop_tau, **_):
    logits = beta * (chosen_logratios - rejected_logratios)
    modulation = torch.sigmoid(logits / discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


TRL_PAIR_LOSSES = {
    "sigmoid": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "robust": robust,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sigmoid_norm": sigmoid_norm,
}
"""TRL's pairwise loss types; ``sft`` is :func:`trl_refpo.objectives.losses.sft_loss`."""

TRL_LOSS_TYPES = frozenset(TRL_PAIR_LOSSES) | {"sft"}
TRL_REFERENCE_FREE = frozenset({"sft"})


def trl_type_needs_reference(name: str) -> bool:
    """TRL's rule: every built-in type but ``sft`` reads reference log-probs."""
    return name not in TRL_REFERENCE_FREE


def trl_type_uses_beta(name: str) -> bool:
    """Every built-in type but ``sft`` (a plain NLL) reads ``beta``."""
    return name != "sft"
