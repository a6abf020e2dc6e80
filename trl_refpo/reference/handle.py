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

from ..weights import full_weights_hash
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
        weights_fingerprint=lambda: _reference_weights_hash(trainer),
    )


def _reference_weights_hash(trainer) -> str | None:
    """TRL's hash of the reference weights (``hash_module``), taken on the full weights under every engine.

    TRL hashes in its constructor; under ZeRO-3 with ``zero.Init`` the parameters are already partitioned there
    (empty placeholders), so every reference of one architecture hashes alike. Under ZeRO-3 the hash is therefore
    taken here, gathering one parameter at a time (collective: every process calls it, in the same order).
    """
    if not is_zero3(trainer):
        return trainer._precompute_model_hash
    return full_weights_hash(trainer.ref_model if trainer.ref_model is not None else trainer.model)


def is_zero3(trainer) -> bool:
    return bool(trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)
