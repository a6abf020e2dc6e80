"""``precompute_ref_log_probs`` for every reference source, with an on-disk cache.

The trainer's reference source scores the prepared dataset once; the values land, as in TRL, in the
``ref_chosen_logps`` / ``ref_rejected_logps`` columns (float32, summed over the reference's completion
tokens), with the reference's completion token counts in ``ref_chosen_lengths`` / ``ref_rejected_lengths``.

With ``ref_logps_cache_dir`` the values are stored in ``<dir>/ref_logps-<key>.safetensors``; the key hashes
the scored token columns (policy ids and the reference's own ids, so the data, the prompt mode and the
truncation as applied), the reference weights, the reference tokenizer, the prompt mode, the truncation
settings and the precision. A run with the same key loads the file and runs no reference forward at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pyarrow as pa
import torch
from accelerate.utils import broadcast_object_list, tqdm
from datasets import Dataset, Features, IterableDataset, Value, concatenate_datasets
from datasets.fingerprint import Hasher
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from trl.models import prepare_deepspeed

from .data import FLOAT_COLUMNS, REF_ID_COLUMNS, RefPODataCollator
from .reference import ColumnReference, NoReference, ReferenceLogps
from .text_reference import TextReference

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
SCORED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", *REF_ID_COLUMNS)


def precompute_reference_logps(trainer, dataset, name: str, batch_size: int):
    """Add the reference log-prob columns to ``dataset`` (scored, or loaded from the cache)."""
    source = trainer.ref_scoring_source
    if isinstance(source, NoReference):
        return dataset
    present = [column for column in ("ref_chosen_logps", "ref_rejected_logps") if column in dataset.column_names]
    if isinstance(source, ColumnReference):  # supplied by the user: used as-is
        if len(present) < 2:
            raise ValueError(
                f"The {name} dataset lacks the reference log-prob columns ref_chosen_logps / ref_rejected_logps that "
                "the train dataset supplies, and no reference model is loaded to score it. Add the columns."
            )
        return dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "precompute_ref_log_probs=True needs a map-style Dataset, got an IterableDataset. Use a Dataset or set "
            "precompute_ref_log_probs=False."
        )
    if present:
        raise ValueError(
            f"The {name} dataset already has {present}, but the reference is a model that would score it. Drop the "
            "columns to score them, or supply them in the train dataset too to use them as-is."
        )

    args = trainer.args
    cache_file = None
    if args.ref_logps_cache_dir is not None:
        key_parts = cache_key_parts(trainer, source, dataset)
        key = [Hasher.hash(key_parts)]
        broadcast_object_list(key, from_process=0)  # rank-dependent inputs (sharded weights) → one shared file
        cache_file = os.path.join(args.ref_logps_cache_dir, f"ref_logps-{key[0]}.safetensors")
        if os.path.exists(cache_file):
            logger.info(
                "Loaded the reference log-probs of the %s dataset from the cache %s: no reference forward.", name, cache_file
            )
            return _with_columns(dataset, load_file(cache_file))

    values = _score(trainer, source, dataset, name, batch_size)
    if cache_file is not None:
        if trainer.accelerator.is_main_process:
            os.makedirs(args.ref_logps_cache_dir, exist_ok=True)
            partial = cache_file + f".{os.getpid()}.tmp"
            save_file(values, partial, metadata={"key": json.dumps(key_parts, default=str)})
            os.replace(partial, cache_file)
            logger.info("Cached the reference log-probs of the %s dataset in %s.", name, cache_file)
        trainer.accelerator.wait_for_everyone()
    return _with_columns(dataset, values)


def cache_key_parts(trainer, source, dataset) -> dict:
    args = trainer.args
    tokenizer = source.tokenizer if isinstance(source, TextReference) else trainer._tokenizer
    return {
        "format": CACHE_FORMAT,
        "dataset": dataset_fingerprint(dataset, [c for c in SCORED_COLUMNS if c in dataset.column_names]),
        "reference_weights": trainer._precompute_model_hash,
        "reference_tokenizer": tokenizer_fingerprint(tokenizer),
        "prompt_mode": getattr(source, "prompt_mode", "full"),
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        # TRL's own scoring (TRL loss types) weighs the tail of the longer completion by ld_alpha.
        "scoring": "refpo" if trainer.uses_pipeline else f"trl(ld_alpha={args.ld_alpha})",
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }


def dataset_fingerprint(dataset: Dataset, columns: list[str]) -> str:
    """SHA-256 of the given columns' contents (row order included), independent of how the dataset was made."""
    digest = hashlib.sha256()
    digest.update(json.dumps(columns).encode())
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=10_000):
        # Canonical bytes: no schema metadata (it holds the `datasets` fingerprint, which need not be stable), one chunk.
        table = table.replace_schema_metadata(None).combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": [str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")],
        "chat_template": tokenizer.chat_template,
    }
    return Hasher.hash(parts)


def _with_columns(dataset: Dataset, values: dict[str, torch.Tensor]) -> Dataset:
    if len(values["ref_chosen_logps"]) != len(dataset):
        raise ValueError(
            f"The cached reference log-probs have {len(values['ref_chosen_logps'])} rows but the dataset has "
            f"{len(dataset)}. Delete the stale cache file."
        )
    columns = Dataset.from_dict(
        {name: values[name].float().numpy() for name in FLOAT_COLUMNS},
        features=Features({name: Value("float32") for name in FLOAT_COLUMNS}),
    )
    return concatenate_datasets([dataset, columns], axis=1)


def _reference_model(trainer, source):
    """The model that scores and the context to score in (PEFT: adapter disabled), picked as TRL's precompute does."""
    model, adapter_context = source.reference_context(trainer)
    if trainer.ref_model is None:  # the policy before training is the reference
        model = trainer.model
        if trainer.is_deepspeed_enabled:  # ZeRO parameters are not placed/gathered before `train`
            if trainer._precompute_engine is None:
                trainer._precompute_engine = prepare_deepspeed(trainer.model, trainer.accelerator)
            model = trainer._precompute_engine
    return model, adapter_context


def _score(trainer, source, dataset, name: str, batch_size: int) -> dict[str, torch.Tensor]:
    args = trainer.args
    collator = RefPODataCollator(
        pad_token_id=trainer._tokenizer.pad_token_id,
        max_length=args.max_length,
        truncation_mode=args.truncation_mode,
        pad_to_multiple_of=args.pad_to_multiple_of,
        ref_pad_token_id=source.ref_pad_token_id,
    )
    dataloader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        shuffle=False,
    )
    dataloader = trainer.accelerator.prepare(dataloader)
    model, adapter_context = _reference_model(trainer, source)
    gathered = {name: [] for name in FLOAT_COLUMNS}
    for batch in tqdm(
        iterable=dataloader,
        desc=f"Computing reference log probs for {name} dataset",
        disable=bool(os.environ.get("TQDM_DISABLE", "")),
    ):
        num_pairs = batch["input_ids"].size(0) // 2
        with trainer.accelerator.autocast():
            if trainer.uses_pipeline:
                scored = source.score(trainer, model, adapter_context, batch, num_pairs)
            else:  # TRL's loss code reads these: score exactly as TRL does (ld_alpha included)
                chosen, rejected = trainer.compute_ref_log_probs(model, batch)
                lengths = batch["completion_mask"][:, 1:].sum(dim=1).float().chunk(2)
                scored = ReferenceLogps(chosen.float(), rejected.float(), *lengths)
        row_values = (scored.chosen, scored.rejected, scored.chosen_lengths, scored.rejected_lengths)
        row_values = trainer.accelerator.gather_for_metrics(tuple(value.float() for value in row_values))
        for column, value in zip(FLOAT_COLUMNS, row_values, strict=True):
            gathered[column].append(value.cpu())
    return {column: torch.cat(values).float().contiguous() for column, values in gathered.items()}
