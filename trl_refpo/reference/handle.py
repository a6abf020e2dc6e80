"""The one adapter between TRL's ``DPOTrainer`` and the reference sources.

Every attribute of the trainer that ``reference/`` needs — TRL's private ones included (``_tokenizer``,
``_precompute_engine``, ``_precompute_model_hash``) — is read here and nowhere else, into a
:class:`~trl_refpo.reference.sources.ScoringHandle`. When TRL renames one of them, this is the file to change.
"""

from __future__ import annotations

import contextlib

from accelerate.utils import is_peft_model
from trl.models import prepare_deepspeed
from trl.trainer.utils import use_adapter

from .sources import ScoringHandle


def scoring_handle(trainer, *, before_training: bool = False) -> ScoringHandle:
    """The handle that scores with ``trainer``'s reference.

    The reference is ``trainer.ref_model``; with none and a PEFT policy, the policy with its adapter disabled (TRL's
    "ref" adapter where one is loaded). ``before_training`` (precompute): with no ``ref_model`` the untrained policy
    itself is the reference; under DeepSpeed it is scored through TRL's one inference engine, since ZeRO places
    and gathers parameters only inside an engine.
    """
    model, adapter_context = trainer.ref_model, contextlib.nullcontext
    if trainer.ref_model is None and is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        adapter_name = "ref" if "ref" in unwrapped.peft_config else None
        model, adapter_context = trainer.model, lambda: use_adapter(unwrapped, adapter_name=adapter_name)
    if before_training and trainer.ref_model is None:
        model = trainer.model
        if trainer.is_deepspeed_enabled:
            if trainer._precompute_engine is None:
                trainer._precompute_engine = prepare_deepspeed(trainer.model, trainer.accelerator)
            model = trainer._precompute_engine
    return ScoringHandle(
        model=model,
        accelerator=trainer.accelerator,
        tokenizer=trainer._tokenizer,
        policy=trainer.model,
        adapter_context=adapter_context,
        gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        weights_fingerprint=lambda: trainer._precompute_model_hash,
    )


def is_zero3(trainer) -> bool:
    return bool(trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)
