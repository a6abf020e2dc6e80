"""Which reference source a trainer uses, decided once at construction (docs/algorithms.md §7).

=========================================  ===============================================================
what the user gives                        source
=========================================  ===============================================================
reference-free loss_type                   :class:`NoReference`
``ref_chosen_logps`` / ``ref_rejected_``   :class:`ColumnReference` (used as-is; no reference model loaded)
``logps`` dataset columns
nothing (or a same-tokenizer ``ref_model``  :class:`ModelReference` on the policy's token ids: the initial
/ ``ref_model_name_or_path``)              policy (PEFT: adapter disabled) or the swapped checkpoint
a ``ref_tokenizer`` /                      :class:`TextReference`: the reference re-scores the original text
``ref_tokenizer_name_or_path`` that        with its own tokenizer and chat template
differs from the policy's
``ref_prompt="none"`` (``likelihood``)     :class:`TextReference` without the prompt (the prior), with
                                           whichever tokenizer the reference has
=========================================  ===============================================================

With ``precompute_ref_log_probs`` the chosen source scores the dataset once (see
:mod:`trl_refpo.reference.precompute`) and training reads the columns. What the loss types need of the reference
(reference samples, the full distribution) comes from the caller, which reads the objectives' declarations.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import AutoProcessor, AutoTokenizer
from trl.data_utils import _tokenize, is_conversational
from trl.trainer.utils import create_model_from_path, get_config_model_id

from ..data import FLOAT_COLUMNS
from ..weights import is_partitioned
from .rules import refuse_partial_reference, refuse_sync_with_other_tokenizer, refuse_unresolved_model_name
from .sources import ColumnReference, ModelReference, NoReference, ReferenceSource
from .text import TextReference


logger = logging.getLogger(__name__)

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
CROSS_TOKENIZER_HINT = (
    "To use a reference with a different tokenizer, pass its tokenizer as `ref_tokenizer=` to the trainer (or set "
    "`ref_tokenizer_name_or_path`): the reference then re-scores the original text with it."
)


@dataclass
class ReferenceSetup:
    source: ReferenceSource
    ref_model: object | None  # handed to TRL's DPOTrainer, which prepares it (dropout, fused head, DeepSpeed/FSDP)
    processing_class: object | None
    owns_ref_model: bool = False  # loaded here from ref_model_name_or_path


def setup_reference(
    model,
    ref_model,
    ref_tokenizer,
    processing_class,
    args,
    train_dataset,
    eval_dataset,
    peft_config,
    *,
    samples_from_reference: bool = False,
    full_distribution_for: list[str] | None = None,
) -> ReferenceSetup:
    """The reference source and the reference model TRL's constructor gets.

    ``samples_from_reference``: a loss type samples from ``ref_model`` before training even without reference
    log-probs (TYPO's generation). ``full_distribution_for``: the loss types that need the reference's full
    next-token distribution over the policy's token ids (ε-DPO).
    """
    source_setup = _choose_source(
        model,
        ref_model,
        ref_tokenizer,
        processing_class,
        args,
        train_dataset,
        eval_dataset,
        peft_config,
        samples_from_reference,
    )
    source = source_setup.source
    refuse_partial_reference(
        full_distribution_for or [],
        supplied_columns=isinstance(source, ColumnReference),
        no_model=isinstance(source, NoReference),
        prior=isinstance(source, TextReference) and source.prompt_mode == "none",
        other_tokenizer=isinstance(source, TextReference),
    )
    return source_setup


def _choose_source(
    model,
    ref_model,
    ref_tokenizer,
    processing_class,
    args,
    train_dataset,
    eval_dataset,
    peft_config,
    samples_from_reference,
) -> ReferenceSetup:
    if not args.needs_reference:
        _refuse_reference_instances(args, ref_model, ref_tokenizer, samples_from_reference)
        return ReferenceSetup(NoReference(), None, processing_class)
    if _supplied_columns_in_use(train_dataset, eval_dataset, args, ref_model, ref_tokenizer):
        return ReferenceSetup(ColumnReference(), None, processing_class)

    owns_ref_model = args.ref_model_name_or_path is not None
    ref_model, ref_tokenizer = _reference_model_and_tokenizer(model, ref_model, ref_tokenizer, args)
    if processing_class is None and (ref_model is not None or args.ref_prompt == "none"):
        processing_class = _policy_processor(model, args)  # the reference's tokenisation is compared with it
    policy_tokenizer = getattr(processing_class, "tokenizer", processing_class)
    first_example = _first_example(train_dataset)
    if ref_tokenizer is not None and tokenizers_agree(policy_tokenizer, ref_tokenizer, first_example):
        logger.info("The reference tokenizer agrees with the policy's: the reference scores the policy's token ids.")
        ref_tokenizer = None
    elif ref_tokenizer is None and ref_model is not None:
        _check_same_tokenizer(ref_model, policy_tokenizer, first_example, _num_embeddings(model))

    source = _model_source(ref_tokenizer, policy_tokenizer, args, first_example)
    if ref_model is None and _policy_copy_needed(model, peft_config, args):
        # TRL reloads the initial policy from `config._name_or_path`; an in-memory policy (built from a config, or
        # edited after loading) has no such path, so its initial weights are copied instead. With precompute TRL
        # scores with the policy itself before training, so no copy is kept.
        ref_model = initial_policy_copy(model)
    return ReferenceSetup(source, ref_model, processing_class, owns_ref_model)


def initial_policy_copy(model):
    """A copy of the in-memory policy's current weights, to serve as the reference.

    Under ZeRO-3 the policy loaded with ``from_pretrained`` is already partitioned by ``zero.Init`` (each process
    holds a shard, the parameters are empty placeholders), and a deep copy would copy placeholders whose DeepSpeed
    bookkeeping belongs to the policy. The copy is then built from the config under ``zero.Init`` (partitioned the
    same way) and filled one gathered parameter at a time: every process runs this, in the same order.
    """
    if not is_partitioned(model):
        return copy.deepcopy(model)
    import deepspeed

    reference = type(model)._from_config(copy.deepcopy(model.config), dtype=model.dtype)
    policy_parameters = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        source = policy_parameters[name]
        with deepspeed.zero.GatheredParameters([source, parameter], modifier_rank=0):
            with torch.no_grad():
                parameter.data.copy_(source.data)
    policy_buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            buffer.copy_(policy_buffers[name])
    if getattr(model, "generation_config", None) is not None:
        reference.generation_config = copy.deepcopy(model.generation_config)
    reference.train(model.training)
    return reference


def _refuse_reference_instances(args, ref_model, ref_tokenizer, samples_from_reference: bool) -> None:
    """One rule for every reference option of a reference-free run (the config checks its fields): name it."""
    for name, value in (("ref_model", ref_model), ("ref_tokenizer", ref_tokenizer)):
        if value is not None and not (name == "ref_model" and samples_from_reference):
            raise ValueError(
                f"The trainer was given {name}=, but loss_type {args.loss_type} uses no reference. Do not pass it."
            )


def _supplied_columns_in_use(train_dataset, eval_dataset, args, ref_model, ref_tokenizer) -> bool:
    if _has_supplied_columns(train_dataset, "train"):
        if is_vision_example(_first_example(train_dataset)):
            raise ValueError(
                f"Supplied reference log-prob columns {list(REFERENCE_COLUMNS)} are not supported with vision datasets "
                "(TRL's vision collator does not carry them). Drop the columns: the reference model scores the images."
            )
        _check_supplied_columns(eval_dataset, args, ref_model, ref_tokenizer)
        for name, dataset in [("train", train_dataset), *_named(eval_dataset)]:
            check_supplied_values(dataset, name)
        return True
    for name, dataset in _named(eval_dataset):
        if _has_supplied_columns(dataset, name):
            raise ValueError(
                f"The {name} dataset has reference log-prob columns {list(REFERENCE_COLUMNS)} but the train dataset "
                "does not: one reference must serve both. Add the columns to the train dataset, or drop them."
            )
    return False


def _reference_model_and_tokenizer(model, ref_model, ref_tokenizer, args):
    """The given ``ref_model`` / ``ref_tokenizer``, or those the config names (loaded here)."""
    if ref_model is not None and args.ref_model_name_or_path is not None:
        raise ValueError(
            "Both a `ref_model` instance and `ref_model_name_or_path` were given; pass only one reference model."
        )
    if ref_tokenizer is not None and args.ref_tokenizer_name_or_path is not None:
        raise ValueError("Both a `ref_tokenizer` instance and `ref_tokenizer_name_or_path` were given; pass only one.")
    refuse_unresolved_model_name("ref_model_name_or_path", args.ref_model_name_or_path)
    refuse_unresolved_model_name("ref_tokenizer_name_or_path", args.ref_tokenizer_name_or_path)
    if args.ref_model_name_or_path is not None:
        ref_model = _load_reference_model(args, model)
    if args.ref_tokenizer_name_or_path is not None:
        ref_tokenizer = AutoTokenizer.from_pretrained(
            args.ref_tokenizer_name_or_path, trust_remote_code=args.trust_remote_code
        )
    if ref_tokenizer is not None and ref_model is None:
        raise ValueError(
            "A reference tokenizer was given (`ref_tokenizer` / `ref_tokenizer_name_or_path`) but no reference model "
            "to go with it: pass `ref_model=` or set `ref_model_name_or_path`."
        )
    return ref_model, ref_tokenizer


def _policy_processor(model, args):
    model_id = model if isinstance(model, str) else get_config_model_id(model.config)
    return AutoProcessor.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)


def _model_source(ref_tokenizer, policy_tokenizer, args, first_example) -> ReferenceSource:
    """A reference with its own tokenizer, or the prior, re-scores the text; else the policy's token ids."""
    if ref_tokenizer is not None:
        refuse_sync_with_other_tokenizer(args.sync_ref_model, other_tokenizer=True)
        source = TextReference(ref_tokenizer, args.ref_prompt)
    elif args.ref_prompt == "none":
        source = TextReference(policy_tokenizer, "none")
    else:
        return ModelReference()
    if first_example is not None and is_vision_example(first_example):
        raise ValueError(
            "A reference that re-tokenises the text (ref_tokenizer / ref_prompt='none') does not support vision "
            "datasets."
        )
    if first_example is not None and not all(
        isinstance(first_example.get(column), (str, list)) for column in ("chosen", "rejected")
    ):
        raise ValueError(
            "A reference that re-tokenises the text (ref_tokenizer / ref_prompt='none') needs the train dataset's "
            f"text columns 'chosen' and 'rejected' (and 'prompt'); it has {sorted(first_example)}. Pass the "
            "dataset with its text, not pre-tokenised ids."
        )
    return source


def _policy_copy_needed(model, peft_config, args) -> bool:
    return (
        not isinstance(model, str)
        and peft_config is None
        and not is_peft_model(model)
        and (not args.precompute_ref_log_probs or args.fsdp)
    )


# ---------------------------------------------------------------------------------------------- columns
def _named(dataset):
    if dataset is None:
        return []
    if isinstance(dataset, dict):
        return list(dataset.items())
    return [("eval", dataset)]


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:
        names = list(_first_example(dataset) or {})
    return list(names)


def is_vision_example(example) -> bool:
    """TRL's test for a vision dataset: an ``image`` or ``images`` column."""
    return example is not None and ("image" in example or "images" in example)


def _first_example(dataset):
    if dataset is None:
        return None
    return next(iter(dataset), None)


def _has_supplied_columns(dataset, name: str) -> bool:
    present = [column for column in REFERENCE_COLUMNS if column in _column_names(dataset)]
    if len(present) == 1:
        missing = [column for column in REFERENCE_COLUMNS if column not in present]
        raise ValueError(
            f"The {name} dataset has the column {present[0]!r} but not {missing[0]!r}: supplied reference log-probs "
            "need both."
        )
    return bool(present)


def _check_supplied_columns(eval_dataset, args, ref_model, ref_tokenizer) -> None:
    given = {
        "ref_model": ref_model,
        "ref_tokenizer": ref_tokenizer,
        "ref_model_name_or_path": args.ref_model_name_or_path,
        "ref_tokenizer_name_or_path": args.ref_tokenizer_name_or_path,
    }
    conflicting = [name for name, value in given.items() if value is not None]
    if conflicting:
        raise ValueError(
            f"The train dataset supplies reference log-probs ({list(REFERENCE_COLUMNS)}), which are used as-is, but "
            f"{conflicting} also name a reference model. Drop the columns to score with that model, or drop "
            f"{conflicting}."
        )
    if args.sync_ref_model:
        raise ValueError(
            "sync_ref_model=True needs a reference model, but the dataset supplies the reference log-probs."
        )
    for name, dataset in _named(eval_dataset):
        if not _has_supplied_columns(dataset, name):
            raise ValueError(
                f"The train dataset supplies reference log-probs ({list(REFERENCE_COLUMNS)}) but the {name} dataset "
                "does not, and no reference model is loaded to score it. Add the columns to it."
            )
    if args.ref_prompt == "none":
        logger.info("Supplied reference log-prob columns are used as-is; ref_prompt='none' does not re-score them.")


def check_supplied_values(dataset, name: str) -> None:
    """Supplied reference columns hold finite numbers, and log-probs in [LOWEST_LOGP, LOGP_ROUNDING_TOLERANCE];
    else one line naming the column and the first bad row.

    Map-style datasets are checked whole; an ``IterableDataset`` (not readable before training) is not.
    """
    if not isinstance(dataset, Dataset):
        return
    columns = [column for column in FLOAT_COLUMNS if column in dataset.column_names]
    table = dataset.select_columns(columns).with_format("arrow")[:]
    for column in columns:
        values = table.column(column)
        if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
            numbers = values.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN
            bad = np.flatnonzero(~np.isfinite(numbers))
            if not len(bad):
                if column in REFERENCE_COLUMNS:
                    _check_logp_range(column, name, numbers)
                continue
            row = int(bad[0])
        else:
            row = 0
        raise ValueError(
            f"Column {column!r} of the {name} dataset must hold finite numbers (reference log-probs), but row {row} "
            f"has {values[row].as_py()!r} ({values.type}). Fix or drop that row."
        )


# A completion's log-probability is <= 0; float32 sums of per-token log-probs that are ~0 may round a little above.
LOGP_ROUNDING_TOLERANCE = 1e-3
# Far below any real completion (hundreds of nats per token × thousands of tokens), and far above the values whose
# square or exponential overflows float32 in TRL's losses (ipo, discopop, sppo_hard: an infinite grad norm).
LOWEST_LOGP = -1e6


def _check_logp_range(column: str, name: str, numbers) -> None:
    above = np.flatnonzero(numbers > LOGP_ROUNDING_TOLERANCE)
    if len(above):
        row = int(above[0])
        raise ValueError(
            f"Column {column!r} of the {name} dataset holds reference log-probs, which are <= 0, but row {row} has "
            f"{float(numbers[row])!r} (above the rounding tolerance {LOGP_ROUNDING_TOLERANCE}): check the sign and the "
            "completion mask where it was computed."
        )
    below = np.flatnonzero(numbers < LOWEST_LOGP)
    if len(below):
        row = int(below[0])
        raise ValueError(
            f"Column {column!r} of the {name} dataset must hold reference log-probs >= {LOWEST_LOGP:g}, but row {row} "
            f"has {float(numbers[row])!r} (a masking fill value, not a log-prob?): recompute that row, or drop it."
        )


# ---------------------------------------------------------------------------------------------- models / tokenizers
def _load_reference_model(args, model):
    kwargs = dict(args.ref_model_init_kwargs or {})
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if not isinstance(model, str):
        kwargs.setdefault("dtype", model.dtype)
    elif args.model_init_kwargs and "dtype" in args.model_init_kwargs:
        kwargs.setdefault("dtype", args.model_init_kwargs["dtype"])
    return create_model_from_path(args.ref_model_name_or_path, **kwargs)


def _known_tokenizer(ref_model):
    """The tokenizer saved with the reference checkpoint, where one is on disk (never downloaded)."""
    path = getattr(ref_model.config, "_name_or_path", None)
    if not path:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 — no tokenizer saved there: nothing to verify against
        return None


def _num_embeddings(model) -> int | None:
    if isinstance(model, str) or not hasattr(model, "get_input_embeddings"):
        return None
    return getattr(model.get_input_embeddings(), "num_embeddings", None)


def _check_same_tokenizer(ref_model, policy_tokenizer, example, policy_num_embeddings: int | None = None) -> None:
    known = _known_tokenizer(ref_model)
    if known is not None and not tokenizers_agree(policy_tokenizer, known, example):
        raise ValueError(
            f"The reference model's tokenizer ({known.name_or_path}) differs from the policy's (vocabulary, special "
            f"tokens or how they tokenise the data), so the reference cannot score the policy's token ids. "
            f"{CROSS_TOKENIZER_HINT}"
        )
    num_embeddings = _num_embeddings(ref_model)
    if num_embeddings is not None and num_embeddings < len(policy_tokenizer):
        raise ValueError(
            f"The reference model has {num_embeddings} token embeddings but the policy's tokenizer has "
            f"{len(policy_tokenizer)} tokens: they do not share a tokenizer. {CROSS_TOKENIZER_HINT}"
        )
    policy_count = policy_num_embeddings or len(policy_tokenizer)
    if known is None and num_embeddings is not None and num_embeddings != policy_count:
        warnings.warn(
            f"The reference model has {num_embeddings} token embeddings and the policy {policy_count}, and no "
            "tokenizer is saved with the reference: it is assumed to share the policy's tokenizer (padded "
            f"embeddings). If it tokenises differently, its log-probs are wrong. {CROSS_TOKENIZER_HINT}",
            stacklevel=4,
        )
    elif known is None:
        logger.info(
            "No tokenizer is saved with the reference model; assuming it shares the policy's tokenizer. "
            + CROSS_TOKENIZER_HINT
        )


PROBE_TEXTS = ("Hello world! The answer is: 42.\n", " a b c", "<|im_start|>user\nHi<|im_end|>")


def tokenizers_agree(policy_tokenizer, reference_tokenizer, example=None) -> bool:
    """Same vocabulary, same BOS/EOS/UNK, and the same ids for probe texts and the first example."""
    if policy_tokenizer is reference_tokenizer:
        return True
    if policy_tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        return False
    for attribute in ("bos_token", "eos_token", "unk_token"):
        if getattr(policy_tokenizer, attribute) != getattr(reference_tokenizer, attribute):
            return False
    texts = list(PROBE_TEXTS)
    if example is not None and not is_conversational(example):
        texts += [example[key] for key in ("prompt", "chosen", "rejected") if isinstance(example.get(key), str)]
    for text in texts:
        if _tokenize(policy_tokenizer, text)["input_ids"] != _tokenize(reference_tokenizer, text)["input_ids"]:
            return False
    if example is not None and is_conversational(example) and "prompt" in example and "chosen" in example:
        if policy_tokenizer.chat_template != reference_tokenizer.chat_template:
            return False
    return True
