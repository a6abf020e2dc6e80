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

import contextlib
import glob
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable

import pyarrow as pa
import torch
from accelerate.utils import broadcast_object_list, tqdm
from datasets import Dataset, Features, IterableDataset, Value, concatenate_datasets
from datasets.fingerprint import Hasher
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader

from ..data import FLOAT_COLUMNS, REF_ID_COLUMNS, RefPODataCollator
from .fingerprints import tokenizer_fingerprint
from .sources import ColumnReference, NoReference, ReferenceLogps, ScoringHandle
from .text import TextReference


logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the file stores its key and a checksum
SCORED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", *REF_ID_COLUMNS)


def precompute_reference_logps(
    source, dataset, name: str, batch_size: int, args, handle: Callable[[], ScoringHandle], trl_scoring=None
):
    """Add the reference log-prob columns to ``dataset`` (scored by ``source``, or loaded from the cache).

    ``handle`` builds the scoring handle (only called when something is scored); ``trl_scoring(model, batch)``,
    where TRL's own loss code reads the values, is TRL's ``compute_ref_log_probs`` (its ``ld_alpha`` weighting).
    """
    if isinstance(source, NoReference):
        return dataset
    if isinstance(source, ColumnReference):  # supplied by the user: used as-is
        if not all(column in _column_names(dataset) for column in ("ref_chosen_logps", "ref_rejected_logps")):
            raise ValueError(
                f"The {name} dataset lacks the reference log-prob columns ref_chosen_logps / ref_rejected_logps that "
                "the train dataset supplies, and no reference model is loaded to score it. Add the columns."
            )
        return dataset
    if isinstance(dataset, IterableDataset):  # TRL's wording (its tests check it)
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
            "Dataset or set `precompute_ref_log_probs=False`."
        )
    present = [column for column in ("ref_chosen_logps", "ref_rejected_logps") if column in dataset.column_names]
    if present:
        raise ValueError(
            f"The {name} dataset already has {present}, but the reference is a model that would score it. Drop the "
            "columns to score them, or supply them in the train dataset too to use them as-is."
        )

    handle = handle()
    cache = None
    if args.ref_logps_cache_dir is not None:
        key_parts = cache_key_parts(source, dataset, args, handle, trl_scoring is not None)
        key = [Hasher.hash(key_parts)]
        broadcast_object_list(key, from_process=0)  # rank-dependent inputs (sharded weights) → one shared file
        cache = RefLogpsCache(args.ref_logps_cache_dir, key[0], json.dumps(key_parts, default=str))
        values = cache.load(len(dataset), handle.accelerator)
        if values is not None:
            logger.info(
                "Loaded the reference log-probs of the %s dataset from the cache %s: no reference forward.",
                name,
                cache.file,
            )
            return _with_columns(dataset, values)
        cache.check_writable()  # before scoring, so that a bad folder costs nothing

    values = _score(source, dataset, name, batch_size, args, handle, trl_scoring)
    if cache is not None:
        if handle.accelerator.is_main_process:
            cache.save(values, name)
        handle.accelerator.wait_for_everyone()
    return _with_columns(dataset, values)


def _column_names(dataset) -> list[str]:
    names = dataset.column_names
    return list(names) if names is not None else list(next(iter(dataset)))


class RefLogpsCache:
    """One cache file ``<folder>/ref_logps-<key>.safetensors``, holding the stored key and a checksum of its values.

    A file that cannot be read, whose key or checksum does not match, or whose values are not finite or not one per
    row is reported (a warning naming it), rescored and replaced. Writes go to a temporary file, fsynced, then renamed
    over the cache file; temporary files left by a killed writer are removed.
    """

    def __init__(self, folder: str, key: str, key_text: str):
        self.folder, self.key, self.key_text = folder, key, key_text
        self.file = os.path.join(folder, f"ref_logps-{key}.safetensors")
        self._remove_stale_temporary_files()

    def load(self, num_rows: int, accelerator) -> dict[str, torch.Tensor] | None:
        values, problem = self._read(num_rows) if os.path.exists(self.file) else (None, None)
        main_verdict = [values is not None]
        broadcast_object_list(main_verdict, from_process=0)  # every process scores, or none does
        if problem is not None and accelerator.is_main_process:
            warnings.warn(
                f"The reference log-prob cache file {self.file} is unusable ({problem}): the reference log-probs are "
                "rescored and the file replaced.",
                stacklevel=4,
            )
        if main_verdict[0] and values is None:
            raise RuntimeError(f"The cache file {self.file} reads on the main process but not here ({problem}).")
        return values if main_verdict[0] else None

    def _read(self, num_rows: int) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        try:
            with safe_open(self.file, framework="pt") as handle:
                metadata = handle.metadata() or {}
                values = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # noqa: BLE001 — truncated, empty or garbage: any failure to parse
            return None, f"unreadable: {type(error).__name__}: {error}"
        if metadata.get("key") != self.key_text:
            return None, "its stored key differs from this run's"
        if sorted(values) != sorted(FLOAT_COLUMNS) or any(v.shape != (num_rows,) for v in values.values()):
            shapes = {name: tuple(value.shape) for name, value in values.items()}
            return None, f"expected columns {list(FLOAT_COLUMNS)} with {num_rows} rows each, found {shapes}"
        if metadata.get("sha256") != values_checksum(values):
            return None, "checksum mismatch"
        non_finite = [name for name, value in values.items() if not torch.isfinite(value).all()]
        if non_finite:
            return None, f"non-finite values in {non_finite}"
        return values, None

    def check_writable(self) -> None:
        try:
            os.makedirs(self.folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".write-check-"):
                pass
        except OSError as error:
            raise ValueError(
                f"ref_logps_cache_dir={self.folder!r} is not a writable folder ({error}). Choose another folder or "
                "unset ref_logps_cache_dir."
            ) from error

    def save(self, values: dict[str, torch.Tensor], name: str) -> None:
        metadata = {"key": self.key_text, "sha256": values_checksum(values)}
        partial = f"{self.file}.{socket.gethostname()}.{os.getpid()}.tmp"
        try:
            payload = safetensors_bytes(values, metadata=metadata)
            with open(partial, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, self.file)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.remove(partial)
            warnings.warn(
                f"Could not write the reference log-prob cache file {self.file} ({error}). The {name} dataset's "
                "reference log-probs are kept in memory for this run; the next run scores them again.",
                stacklevel=3,
            )
            return
        logger.info("Cached the reference log-probs of the %s dataset in %s.", name, self.file)

    def _remove_stale_temporary_files(self) -> None:
        """Remove ``*.tmp`` files of writers that died: same host and no such process, or a day old."""
        host = socket.gethostname()
        for path in glob.glob(os.path.join(glob.escape(self.folder), "ref_logps-*.tmp")):
            writer_host, _, pid = path[: -len(".tmp")].partition(".safetensors.")[2].rpartition(".")
            with contextlib.suppress(OSError):
                stale = time.time() - os.path.getmtime(path) > 24 * 3600
                if writer_host == host and pid.isdigit() and not _process_alive(int(pid)):
                    stale = True
                if stale:
                    os.remove(path)
                    logger.info("Removed the stale temporary cache file %s.", path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def values_checksum(values: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(values):
        digest.update(name.encode())
        digest.update(values[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key_parts(source, dataset, args, handle: ScoringHandle, trl_scored: bool) -> dict:
    tokenizer = source.tokenizer if isinstance(source, TextReference) else handle.tokenizer
    return {
        "format": CACHE_FORMAT,
        "dataset": dataset_fingerprint(dataset, [c for c in SCORED_COLUMNS if c in dataset.column_names]),
        "reference_weights": handle.weights_fingerprint(),
        "reference_tokenizer": tokenizer_fingerprint(tokenizer),
        "prompt_mode": getattr(source, "prompt_mode", "full"),
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        # TRL's own scoring (TRL loss types) weighs the tail of the longer completion by ld_alpha.
        "scoring": f"trl(ld_alpha={args.ld_alpha})" if trl_scored else "refpo",
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


def _with_columns(dataset: Dataset, values: dict[str, torch.Tensor]) -> Dataset:
    if len(values["ref_chosen_logps"]) != len(dataset):
        raise ValueError(
            f"The reference log-probs have {len(values['ref_chosen_logps'])} rows but the dataset has {len(dataset)}."
        )
    columns = Dataset.from_dict(
        {name: values[name].float().numpy() for name in FLOAT_COLUMNS},
        features=Features({name: Value("float32") for name in FLOAT_COLUMNS}),
    )
    return concatenate_datasets([dataset, columns], axis=1)


def _score(source, dataset, name: str, batch_size: int, args, handle, trl_scoring) -> dict[str, torch.Tensor]:
    collator = RefPODataCollator(
        pad_token_id=handle.tokenizer.pad_token_id,
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
    accelerator = handle.accelerator
    dataloader = accelerator.prepare(dataloader)
    gathered = {name: [] for name in FLOAT_COLUMNS}
    for batch in tqdm(
        iterable=dataloader,
        desc=f"Computing reference log probs for {name} dataset",
        disable=bool(os.environ.get("TQDM_DISABLE", "")),
    ):
        num_pairs = batch["input_ids"].size(0) // 2
        with accelerator.autocast():
            if trl_scoring is None:
                scored = source(handle, batch, num_pairs)
            else:  # TRL's loss code reads these: score exactly as TRL does (ld_alpha included)
                chosen, rejected = trl_scoring(handle.model, batch)
                lengths = batch["completion_mask"][:, 1:].sum(dim=1).float().chunk(2)
                scored = ReferenceLogps(chosen.float(), rejected.float(), *lengths)
        row_values = (scored.chosen, scored.rejected, scored.chosen_lengths, scored.rejected_lengths)
        row_values = accelerator.gather_for_metrics(tuple(value.float() for value in row_values))
        for column, value in zip(FLOAT_COLUMNS, row_values, strict=True):
            gathered[column].append(value.cpu())
    return {column: torch.cat(values).float().contiguous() for column, values in gathered.items()}
