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

With ``precompute_ref_log_probs`` the chosen source scores the dataset once (see :mod:`trl_refpo.ref_cache`)
and training reads the columns.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import AutoProcessor, AutoTokenizer
from trl.data_utils import _tokenize, is_conversational
from trl.trainer.utils import create_model_from_path, get_config_model_id

from .data import FLOAT_COLUMNS
from .objectives import build_objectives
from .research.offline_models import resolve_model_path
from .reference import ColumnReference, ModelReference, NoReference, ReferenceSource
from .text_reference import TextReference

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
    model, ref_model, ref_tokenizer, processing_class, args, train_dataset, eval_dataset, peft_config
) -> ReferenceSetup:
    if not args.needs_reference:
        samples_from_reference = any(objective.samples_from_reference for objective in build_objectives(args))
        # One rule for every reference option (the config's fields are checked in RefPOConfig): an error naming it.
        for name, value in (("ref_model", ref_model), ("ref_tokenizer", ref_tokenizer)):
            if value is not None and not (name == "ref_model" and samples_from_reference):
                raise ValueError(
                    f"The trainer was given {name}=, but loss_type {args.loss_type} uses no reference. Do not pass it."
                )
        return ReferenceSetup(NoReference(), None, processing_class)

    if _has_supplied_columns(train_dataset, "train"):
        if is_vision_example(_first_example(train_dataset)):
            raise ValueError(
                f"Supplied reference log-prob columns {list(REFERENCE_COLUMNS)} are not supported with vision datasets "
                "(TRL's vision collator does not carry them). Drop the columns: the reference model scores the images."
            )
        _check_supplied_columns(eval_dataset, args, ref_model, ref_tokenizer)
        for name, dataset in [("train", train_dataset), *_named(eval_dataset)]:
            check_supplied_values(dataset, name)
        return ReferenceSetup(ColumnReference(), None, processing_class)
    for name, dataset in _named(eval_dataset):
        if _has_supplied_columns(dataset, name):
            raise ValueError(
                f"The {name} dataset has reference log-prob columns {list(REFERENCE_COLUMNS)} but the train dataset "
                "does not: one reference must serve both. Add the columns to the train dataset, or drop them."
            )

    if ref_model is not None and args.ref_model_name_or_path is not None:
        raise ValueError(
            "Both a `ref_model` instance and `ref_model_name_or_path` were given; pass only one reference model."
        )
    owns_ref_model = args.ref_model_name_or_path is not None
    if owns_ref_model:
        ref_model = _load_reference_model(args, model)
    if ref_tokenizer is not None and args.ref_tokenizer_name_or_path is not None:
        raise ValueError("Both a `ref_tokenizer` instance and `ref_tokenizer_name_or_path` were given; pass only one.")
    if args.ref_tokenizer_name_or_path is not None:
        ref_tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_path(args.ref_tokenizer_name_or_path), trust_remote_code=args.trust_remote_code
        )
    if ref_tokenizer is not None and ref_model is None:
        raise ValueError(
            "A reference tokenizer was given (`ref_tokenizer` / `ref_tokenizer_name_or_path`) but no reference model "
            "to go with it: pass `ref_model=` or set `ref_model_name_or_path`."
        )

    needs_policy_tokenizer = ref_model is not None or args.ref_prompt == "none"
    if needs_policy_tokenizer and processing_class is None:
        model_id = model if isinstance(model, str) else get_config_model_id(model.config)
        processing_class = AutoProcessor.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
    policy_tokenizer = getattr(processing_class, "tokenizer", processing_class)
    first_example = _first_example(train_dataset)

    if ref_tokenizer is not None and tokenizers_agree(policy_tokenizer, ref_tokenizer, first_example):
        logger.info("The reference tokenizer agrees with the policy's: the reference scores the policy's token ids.")
        ref_tokenizer = None
    elif ref_tokenizer is None and ref_model is not None:
        _check_same_tokenizer(ref_model, policy_tokenizer, first_example, _num_embeddings(model))

    if ref_tokenizer is not None:
        if args.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True copies the policy's weights into the reference, which a reference with a different "
                "tokenizer cannot take. Set sync_ref_model=False."
            )
        source = TextReference(ref_tokenizer, args.ref_prompt)
    elif args.ref_prompt == "none":
        source = TextReference(policy_tokenizer, "none")
    else:
        source = ModelReference()
    if isinstance(source, TextReference) and first_example is not None:
        if is_vision_example(first_example):
            raise ValueError(
                "A reference that re-tokenises the text (ref_tokenizer / ref_prompt='none') does not support vision "
                "datasets."
            )
        if not all(isinstance(first_example.get(column), (str, list)) for column in ("chosen", "rejected")):
            raise ValueError(
                "A reference that re-tokenises the text (ref_tokenizer / ref_prompt='none') needs the train dataset's "
                f"text columns 'chosen' and 'rejected' (and 'prompt'); it has {sorted(first_example)}. Pass the "
                "dataset with its text, not pre-tokenised ids."
            )

    # TRL reloads the initial policy from `config._name_or_path`; an in-memory policy (built from a config, or edited
    # after loading) has no such path, so its initial weights are copied instead. With precompute TRL scores with the
    # policy itself before training, so no copy is kept.
    if (
        ref_model is None
        and not isinstance(model, str)
        and peft_config is None
        and not is_peft_model(model)
        and (not args.precompute_ref_log_probs or args.fsdp)
    ):
        ref_model = copy.deepcopy(model)
    return ReferenceSetup(source, ref_model, processing_class, owns_ref_model)


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
        raise ValueError("sync_ref_model=True needs a reference model, but the dataset supplies the reference log-probs.")
    for name, dataset in _named(eval_dataset):
        if not _has_supplied_columns(dataset, name):
            raise ValueError(
                f"The train dataset supplies reference log-probs ({list(REFERENCE_COLUMNS)}) but the {name} dataset "
                "does not, and no reference model is loaded to score it. Add the columns to it."
            )
    if args.ref_prompt == "none":
        logger.info("Supplied reference log-prob columns are used as-is; ref_prompt='none' does not re-score them.")


def check_supplied_values(dataset, name: str) -> None:
    """Supplied reference columns hold finite numbers; else one line naming the column and the first bad row.

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
                continue
            row = int(bad[0])
        else:
            row = 0
        raise ValueError(
            f"Column {column!r} of the {name} dataset must hold finite numbers (reference log-probs), but row {row} "
            f"has {values[row].as_py()!r} ({values.type}). Fix or drop that row."
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
    return create_model_from_path(resolve_model_path(args.ref_model_name_or_path), **kwargs)


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
