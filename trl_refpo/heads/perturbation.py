"""ε-DPO's perturbed log-ratios without materialising a ``(2B, T, V)`` tensor (docs/algorithms.md §1).

ε-DPO compares the chosen-minus-rejected log-ratio ``s`` of the policy with the same quantity under two
mixtures of policy and reference logits, ``h⁻ = h_θ + ε·(h_θ − h_ref)`` (weaker KL) and
``h⁺ = h_θ − ε·(h_θ − h_ref)`` (stronger KL). Both need the full next-token distributions of policy and
reference. The LM head DPO's forwards run through (:mod:`trl_refpo.heads.completion`) returns only per-token log-probs,
so :class:`PerturbationScorer` captures the backbones' last hidden states during those forwards (a forward
hook, no extra model forward) and re-projects them through the two LM heads under ``no_grad``, a chunk of
completion positions at a time: the extra memory is O(chunk × V). The head's logit scale and softcap are
applied exactly as TRL's kernel applies them, and under DeepSpeed ZeRO-3 the head weights are gathered for
the projection.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .completion import LogitTransform, causal_lm_of


#: Elements of one ``(positions, V)`` fp32 logit block; three such blocks are alive at a time (48 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 22


@dataclass
class _Head:
    """A causal LM's backbone (whose ``last_hidden_state`` is captured) and its output projection."""

    backbone: torch.nn.Module
    lm_head: torch.nn.Module
    transform: LogitTransform

    @classmethod
    def of(cls, model) -> _Head:
        causal_lm = causal_lm_of(model)
        return cls(
            causal_lm.base_model, causal_lm.get_output_embeddings(), LogitTransform.from_config(causal_lm.config)
        )

    @property
    def vocab_size(self) -> int:
        out_features = getattr(self.lm_head, "out_features", None)
        return int(out_features if out_features is not None else self.lm_head.weight.shape[0])


def vocab_size(model) -> int:
    """Rows of a causal LM's output projection (correct under ZeRO-3, where the weight itself is partitioned)."""
    return _Head.of(model).vocab_size


class PerturbationScorer:
    """Captures policy and reference hidden states during DPO's forwards, then scores ε-DPO's mixtures.

    Usage per micro-batch (see ``RefPOTrainer._pipeline_loss``)::

        with scorer.capture("policy"):
            policy forward
        with scorer.capture("reference"):
            reference forward
        ratios = scorer.logratios(inputs, num_pairs, epsilon)

    ``policy_model`` / ``reference_model`` may be wrapped (DeepSpeed engine, DDP, PEFT); with PEFT and no
    separate reference, both are the same module and the reference forward runs with the adapter disabled.
    """

    def __init__(self, policy_model, reference_model, block_elements: int = DEFAULT_BLOCK_ELEMENTS):
        self.heads = {"policy": _Head.of(policy_model), "reference": _Head.of(reference_model)}
        policy_vocab, reference_vocab = (head.vocab_size for head in self.heads.values())
        if policy_vocab != reference_vocab:
            raise ValueError(
                f"epsilon_dpo mixes policy and reference logits token by token, but the policy's LM head has "
                f"{policy_vocab} outputs and the reference's {reference_vocab}: they do not share a vocabulary. Use a "
                "reference with the policy's tokenizer and vocabulary size."
            )
        self.block_elements = int(block_elements)
        self._hidden: dict[str, Tensor] = {}

    @contextlib.contextmanager
    def capture(self, role: str):
        """Keep the ``last_hidden_state`` of ``role``'s backbone from the forward run inside this block."""
        self._hidden.pop(role, None)

        def keep(module, args, output):
            self._hidden[role] = output.last_hidden_state.detach()

        handle = self.heads[role].backbone.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def logratios(self, inputs: dict, num_pairs: int, epsilon: float) -> dict[str, Tensor]:
        """Per-pair ``s``, ``s⁻`` (``"weaker_kl"``) and ``s⁺`` (``"stronger_kl"``) of the captured micro-batch.

        ``s`` is recomputed in the same pass as ``s⁻``/``s⁺`` so the three are compared with the same numerics.
        """
        missing = [role for role in self.heads if role not in self._hidden]
        if missing:
            raise RuntimeError(f"ε-DPO: no hidden states were captured for {missing} in this micro-batch.")
        rows = 2 * num_pairs
        hidden = {role: self._hidden.pop(role)[:rows, :-1] for role in self.heads}
        labels = inputs["input_ids"][:rows, 1:]
        mask = inputs["completion_mask"][:rows, 1:].bool()
        row_index, position_index = mask.nonzero(as_tuple=True)
        targets = labels[row_index, position_index]
        policy_hidden = hidden["policy"][row_index, position_index]
        reference_hidden = hidden["reference"][row_index, position_index].to(policy_hidden.device)

        token_logps = self._score_mixtures(policy_hidden, reference_hidden, targets, epsilon)
        sums = torch.zeros(3, rows, dtype=torch.float32, device=targets.device)
        sums.index_add_(1, row_index, token_logps)
        chosen, rejected = sums[:, :num_pairs], sums[:, num_pairs:]
        policy, weaker_kl, stronger_kl = chosen - rejected
        return {"policy": policy, "weaker_kl": weaker_kl, "stronger_kl": stronger_kl}

    def _score_mixtures(
        self, policy_hidden: Tensor, reference_hidden: Tensor, targets: Tensor, epsilon: float
    ) -> Tensor:
        """``(3, N)`` log-probs of ``targets`` under ``h_θ``, ``h_θ + ε·(h_θ − h_ref)`` and ``h_θ − ε·(h_θ − h_ref)``."""
        policy_head, reference_head = self.heads["policy"], self.heads["reference"]
        out = torch.empty(3, targets.numel(), dtype=torch.float32, device=targets.device)
        chunk = max(1, self.block_elements // policy_head.vocab_size)
        with maybe_gather_lm_head_ctx(
            policy_head.lm_head.weight,
            policy_head.lm_head.bias,
            reference_head.lm_head.weight,
            reference_head.lm_head.bias,
        ):
            for start in range(0, targets.numel(), chunk):
                end = min(start + chunk, targets.numel())
                index = targets[start:end].unsqueeze(1)
                policy_logits = _project(policy_head, policy_hidden[start:end])
                difference = _project(reference_head, reference_hidden[start:end].to(policy_logits.device))
                torch.sub(policy_logits, difference, out=difference)  # h_θ − h_ref
                mixture = torch.add(policy_logits, difference, alpha=epsilon)  # weaker KL
                out[1, start:end] = _target_logps(mixture, index)
                torch.add(policy_logits, difference, alpha=-epsilon, out=mixture)  # stronger KL
                out[2, start:end] = _target_logps(mixture, index)
                out[0, start:end] = _target_logps(policy_logits, index)
        return out


def _project(head: _Head, hidden: Tensor) -> Tensor:
    weight = head.lm_head.weight
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, head.lm_head.bias)
    return head.transform(logits.float())


def _target_logps(logits: Tensor, index: Tensor) -> Tensor:
    return (logits.gather(1, index) - torch.logsumexp(logits, dim=1, keepdim=True)).squeeze(1)
