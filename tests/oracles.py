"""Reference implementations that the tests and benchmarks hold the package against (not part of the package)."""

from __future__ import annotations

import torch


def naive_epsilon_dpo(policy, reference, batch: dict, beta: float, epsilon: float):
    """ε-DPO (docs/algorithms.md §1) written the way the authors' code does it: full ``(2B, T, V)`` logits of policy,
    reference and both perturbed policies. The yardstick for :mod:`trl_refpo.heads.perturbation` in tests and benchmarks.

    ``batch`` is a collated RefPO batch (``input_ids``, ``attention_mask``, ``completion_mask``; chosen rows first;
    a vision batch's images too).
    Returns ``(steps, pair_beta, per_pair_loss)``; the loss has the policy's gradient.
    """

    def sequence_logps(logits):
        token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (token_logps * batch["completion_mask"][:, 1:]).sum(1)

    images = {key: value for key, value in batch.items() if key in ("pixel_values", "image_sizes", "image_grid_thw")}

    def logits_of(model):
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **images
        ).logits.float()

    def chosen_minus_rejected(logps):
        chosen, rejected = logps.chunk(2)
        return chosen - rejected

    policy_logits = logits_of(policy)
    with torch.no_grad():
        reference_logits = logits_of(reference)
        frozen = policy_logits.detach()
        s = chosen_minus_rejected(sequence_logps(frozen))
        s_weaker = chosen_minus_rejected(sequence_logps((1 + epsilon) * frozen - epsilon * reference_logits))
        s_stronger = chosen_minus_rejected(sequence_logps((1 - epsilon) * frozen + epsilon * reference_logits))
        steps = ((s_weaker > s) & (s > s_stronger)).long() - ((s_stronger > s) & (s > s_weaker)).long()
        pair_beta = beta / (1 + epsilon * steps.float())
        ref_chosen, ref_rejected = sequence_logps(reference_logits).chunk(2)
    chosen, rejected = sequence_logps(policy_logits).chunk(2)
    loss = -torch.nn.functional.logsigmoid(pair_beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    return steps, pair_beta, loss
