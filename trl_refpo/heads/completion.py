"""Completion-token log-probs through the LM head: only completion positions, in bounded tiles.

:func:`completion_logps` is what the policy forward and every model reference call: per-row sums of a batch's
completion-token log-probs (and, on request, the per-token values, entropy and TRL's logit metrics).

TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) never builds the ``(B, T, V)`` logits, but on
devices without Triton (CPU included) it projects EVERY position of the batch — prompt and padding too — in
``4096 × 32768`` tiles, and folds each tile with several tile-sized temporaries (its policy head also computes
``mean_logits`` and ``is_top1`` for TRL's metrics). On CPU that head is the largest single allocation of a DPO
step: more than plain full logits for a few hundred tokens (see ``benchmarks/bench_epsilon_dpo.py``).

The loss pipeline needs only the completion tokens' log-probs (and, for the policy's metrics, their entropy, mean
logit and whether the label is the top-1 token: TRL's ``entropy``, ``logits/*`` and ``mean_token_accuracy``, folded
inside the same tiles). :func:`add_completion_head` gives the model's forward a ``completion_head=…`` mode: the same backbone,
then TRL's own kernel (:class:`trl.kernels.chunked_logprob.ChunkedLogProbFunction`) on the completion
positions only. Without Triton, a tile's vocabulary width is narrowed so that it holds at most
``tile_elements`` logits; with Triton (GPU) TRL's kernel folds each tile in place and TRL's head is already
compact, so TRL's width is kept and both heads do the same work. Like TRL's head, this mode runs inside the
model's forward, so DDP, DeepSpeed (ZeRO-3 gathers the head weight) and PEFT see an ordinary forward call;
without ``completion_head`` the forward is the one it replaced (TRL's head, or generation's). Other model inputs
(a vision batch's ``pixel_values``, ``image_sizes``, …) go to the backbone; with ``output_router_logits=True`` a
mixture-of-experts model also returns its load-balancing ``aux_loss``, computed as TRL's fused head computes it.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers.utils import is_triton_available
from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, ChunkedLogProbFunction
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx


#: Logits in one projection tile where TRL folds tiles in torch (fp32: 16 MiB; a few tile-sized temporaries live).
TILE_ELEMENTS = 1 << 22
#: TRL's own vocabulary width per tile, kept where its Triton kernel folds a tile in place.
TRITON_VOCAB_TILE = 32768
_MARK = "_trl_refpo_completion_head"  # set on the forward function itself: a copy that drops it gets a new one


@dataclass(frozen=True)
class LogitTransform:
    """What TRL's fused LM head does to ``hidden @ W.T + b`` (``trl.trainer.utils.add_fused_lm_head``):
    multiply by the config's logit scale, then softcap ``c·tanh(z/c)``. TRL's DPO head uses temperature 1."""

    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config) -> LogitTransform:
        text_config = config.get_text_config()
        scale = getattr(text_config, "logit_scale", None)
        if scale is None:
            scale = getattr(text_config, "output_multiplier", None)
        if scale is None:
            scale = getattr(text_config, "lm_head_multiplier", None)
        if scale is None and getattr(text_config, "logits_scaling", None) is not None:
            scaling = text_config.logits_scaling
            scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
        return cls(1.0 if scale is None else float(scale), getattr(text_config, "final_logit_softcapping", None))

    def __call__(self, logits: Tensor) -> Tensor:
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def causal_lm_of(model):
    """The ``PreTrainedModel`` with the LM head inside a DDP / DeepSpeed / PEFT wrapper."""
    causal_lm = extract_model_from_parallel(model)
    return causal_lm.get_base_model() if is_peft_model(causal_lm) else causal_lm


def add_completion_head(model, tile_elements: int = TILE_ELEMENTS) -> None:
    """Give ``model``'s forward a ``completion_head`` mode (see the module docstring). Idempotent."""
    causal_lm = causal_lm_of(model)
    if getattr(causal_lm.forward, _MARK, False):
        return
    previous_forward = causal_lm.forward.__func__  # TRL's fused-head forward, or the class's own
    transform = LogitTransform.from_config(causal_lm.config)

    @functools.wraps(previous_forward)
    def forward(self, *args, completion_head: tuple[str, ...] | None = None, labels=None, **kwargs):
        if completion_head is None:
            if labels is not None:
                kwargs["labels"] = labels
            return previous_forward(self, *args, **kwargs)
        kwargs["use_cache"] = False
        backbone_outputs = self.base_model(*args, **kwargs)
        hidden_states = backbone_outputs.last_hidden_state[:, :-1]
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):  # FSDP2 shards the head; the kernel needs the whole matrix
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden_states = hidden_states.to(weight.device)
        targets = labels[:, 1:].to(weight.device)
        mask = targets != -100
        tokens = int(mask.sum())
        if is_triton_available() and weight.device.type in ("cuda", "xpu"):
            vocab_tile = TRITON_VOCAB_TILE
        else:
            vocab_tile = max(1, tile_elements // max(1, min(tokens, TOKEN_CHUNK_SIZE)))
        with maybe_gather_lm_head_ctx(weight, bias):
            per_token = ChunkedLogProbFunction.apply(
                hidden_states[mask],
                weight,
                bias,
                targets[mask],
                1.0,
                vocab_tile,
                transform.softcap,
                transform.logit_scale,
                completion_head,
            )
        # masked_scatter keeps the output connected to the graph even when no position is a completion token
        log_probs, entropy, _, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token
        )
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = router_aux_loss(self.config, backbone_outputs.router_logits, kwargs.get("attention_mask"))
        return FusedCausalLMOutput(
            log_probs=log_probs,
            entropy=entropy,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
            aux_loss=aux_loss,
        )

    setattr(forward, _MARK, True)
    causal_lm.forward = types.MethodType(forward, causal_lm)


def router_aux_loss(config, router_logits, attention_mask: Tensor | None) -> Tensor:
    """The MoE load-balancing loss of one forward, as TRL's fused head computes it (Mixtral's function, which every
    MoE family of transformers shares), unweighted."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = config.get_text_config()
    return load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
    )


def completion_head_outputs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    entropy: bool,
    metrics: bool = False,
    **model_kwargs,
):
    """``model``'s per-token log-probs of the labels that are not -100 via the completion head; with ``entropy``
    their entropy, with ``metrics`` also the mean logit and whether the label is the top-1 token. ``model_kwargs``
    (images, ``output_router_logits``) go to the model's forward."""
    add_completion_head(model)
    outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
    if metrics:
        outputs += ("mean_logits", "is_top1")
    return model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, completion_head=outputs, **model_kwargs
    )


#: Batch keys that are token rows or reference-side columns; every other key is a model input (a vision batch's
#: ``pixel_values``, ``image_sizes``, ``token_type_ids``, …), passed to ``model.forward`` as TRL passes it.
ROW_KEYS = frozenset({"input_ids", "attention_mask", "completion_mask"})


def model_inputs(inputs: dict) -> dict:
    """The batch's model inputs besides ``input_ids`` / ``attention_mask`` (empty for a text batch)."""
    return {key: value for key, value in inputs.items() if key not in ROW_KEYS and not key.startswith("ref_")}


def completion_logps(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    entropy: bool = False,
    metrics: bool = False,
    **model_kwargs,
) -> tuple[Tensor, Tensor, FusedCausalLMOutput]:
    """Per-row sums of completion-token log-probs, the per-token values, and the head's outputs.

    Returns ``(row_logps (R,), per_token_logps (R, T-1), outputs)``; ``per_token_logps`` is 0 outside the
    completion; ``outputs.entropy`` is set when ``entropy`` is true, ``outputs.mean_logits`` / ``is_top1`` when
    ``metrics`` is. Only completion positions are projected through the LM head. ``model_kwargs`` (images,
    ``output_router_logits``) go to the model's forward.
    """
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    outputs = completion_head_outputs(
        model, input_ids, attention_mask, labels, entropy=entropy, metrics=metrics, **model_kwargs
    )
    per_token = outputs.log_probs[:, -(input_ids.size(1) - 1) :]
    return per_token.sum(dim=1), per_token, outputs
