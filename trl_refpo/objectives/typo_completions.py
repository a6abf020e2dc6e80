"""Completions sampled from the reference policy, as token ids after each prompt (TYPO's unsupervised term).

They reach the tokenised dataset as ``<column>_ids`` in one of two ways:

* :func:`tokenize_completion_column` — the dataset has a text column (plain or conversational, like
  ``chosen``/``rejected``): it is tokenised after the prompt exactly as TRL tokenises chosen/rejected
  (chat template on ``prompt + completion`` for conversational data; the EOS token appended to plain text).
* :func:`generate_completions_cached` — the column is missing: one completion per prompt is sampled from
  the reference model before training and cached on disk, keyed by the tokenised prompts, the model
  weights and the sampling settings, so a second run with the same key loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset, IterableDataset
from tqdm.auto import tqdm
from transformers import GenerationConfig
from trl.data_utils import _tokenize, common_prefix_length, is_conversational

from ..weights import full_weights_hash, full_weights_present


logger = logging.getLogger(__name__)

RESERVED_COLUMNS = ("prompt", "chosen", "rejected", "images", "tools", "chat_template_kwargs")


def ids_column(column: str) -> str:
    """Name of the token-id column built from the text column ``column`` (``ref_completion`` → ``ref_completion_ids``)."""
    return f"{column}_ids"


def has_column(dataset, column: str) -> bool:
    names = dataset.column_names
    if names is None:  # an IterableDataset whose features are unknown
        names = list(next(iter(dataset)).keys())
    return column in names


class ReferenceCompletions:
    """The reference-completion column of the ``typo_*`` fields, through the trainer's two dataset hooks.

    ``prepare_dataset`` (inside TRL's dataset preparation): tokenise the text column, or — when it is
    missing and ``typo_generate_ref_completions`` is set — note the dataset for generation (else raise).
    ``prepare_dataset_with_reference`` (end of the trainer's construction, weights still initial): sample
    the noted datasets' completions from the reference, or load them from the cache. A dataset without the
    column that arrives later (``evaluate(eval_dataset=...)``) is an error: the initial weights are gone.
    """

    def __init__(self, args):
        self.args = args
        self.column = args.typo_ref_completion_column
        self.ids_column = ids_column(self.column)
        self.generate = args.typo_generate_ref_completions
        self.cache_hits: dict[str, bool] = {}  # dataset name -> whether its generated completions came from the cache
        self._pending: set[str] = set()
        self._trainer_built = False

    def prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if has_column(dataset, self.ids_column):
            return dataset
        if has_column(dataset, self.column):
            return tokenize_completion_column(
                dataset, processing_class, self.column, dataset_name, num_proc=args.dataset_num_proc
            )
        if not self.generate:
            raise ValueError(
                f"loss_type 'typo' needs a completion sampled from the reference policy for every prompt, but the "
                f"{dataset_name} dataset has no column {self.column!r} (typo_ref_completion_column). Add that column "
                "(plain text or a list of messages, like 'chosen'), or set typo_generate_ref_completions=True to "
                "sample one per prompt from the reference model before training."
            )
        if self._trainer_built:
            raise ValueError(
                f"The {dataset_name} dataset has no column {self.column!r}, and reference completions can only be "
                "generated while the trainer is built, before training changes the weights. Add the column, or pass "
                "this dataset as eval_dataset to the trainer's constructor."
            )
        self._pending.add(dataset_name)
        return dataset

    def prepare_dataset_with_reference(self, dataset, dataset_name, sampler):
        self._trainer_built = True
        if dataset_name not in self._pending:
            return dataset
        args = self.args
        dataset, self.cache_hits[dataset_name] = generate_completions_cached(
            dataset,
            sampler.model,
            sampler.processing_class,
            SamplingSettings.from_args(args),
            self.column,
            args.typo_generation_cache_dir,
            sampler.accelerator,
            dataset_name,
            batch_size=args.typo_generation_batch_size or args.per_device_eval_batch_size,
        )
        return dataset


# --------------------------------------------------------------------------------------------------- tokenisation
def tokenize_completion_column(dataset, processing_class, column: str, dataset_name: str, num_proc: int | None = None):
    """Add ``<column>_ids``: the completion's tokens after the example's ``prompt_ids``.

    Runs on TRL's tokenised dataset (which keeps the text columns). Conversational: the chat template is
    applied to ``prompt + completion`` (with the example's ``tools`` / ``chat_template_kwargs``) and the
    completion is what follows ``prompt_ids``. Plain text: ``prompt + completion``, with the tokenizer's
    EOS appended to the completion if it does not end with it (TRL does the same to chosen/rejected).
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    eos_token = tokenizer.eos_token
    output_column = ids_column(column)
    warned = []

    def tokenize(example, index):
        completion = example[column]
        conversational = is_conversational(example)
        if not isinstance(completion, list if conversational else str):
            kind = "a list of messages" if conversational else "a string"
            raise ValueError(
                f"Column {column!r} of the {dataset_name} dataset must be {kind} like 'chosen' and 'rejected', but row "
                f"{index} has {completion!r} ({type(completion).__name__})."
            )
        if conversational:
            tools = example.get("tools")
            tools = json.loads(tools) if isinstance(tools, str) else tools
            kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
            full_ids = _tokenize(processing_class, example["prompt"] + completion, **kwargs)["input_ids"]
        else:
            if eos_token is not None and not completion.endswith(eos_token):
                completion = completion + eos_token
            full_ids = _tokenize(processing_class, example["prompt"] + completion)["input_ids"]
        prompt_ids = example["prompt_ids"]
        shared = common_prefix_length(prompt_ids, full_ids)
        if shared < len(prompt_ids) and not warned:
            warned.append(True)
            logger.warning(
                "Column %r: the tokenized prompt is not a prefix of the tokenized prompt+completion (example %d); "
                "the completion tokens after the common prefix are scored after the full prompt.",
                column,
                index,
            )
        return {output_column: full_ids[shared:] if shared < len(prompt_ids) else full_ids[len(prompt_ids) :]}

    map_kwargs = {"with_indices": True}
    if isinstance(dataset, Dataset):
        map_kwargs.update(num_proc=num_proc, desc=f"Tokenizing {column!r} of {dataset_name} dataset")
    return dataset.map(tokenize, **map_kwargs)


# ------------------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled from the reference (defaults: TYPO paper, App. A.3)."""

    temperature: float = 1.0
    top_k: int = 60
    top_p: float = 0.8
    max_new_tokens: int = 256
    repetition_penalty: float = 1.1
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> SamplingSettings:
        return cls(
            temperature=args.typo_generation_temperature,
            top_k=args.typo_generation_top_k,
            top_p=args.typo_generation_top_p,
            max_new_tokens=args.typo_generation_max_new_tokens,
            repetition_penalty=args.typo_generation_repetition_penalty,
            seed=args.seed,
        )

    def generation_config(self, pad_token_id: int, eos_token_ids: list[int]) -> GenerationConfig:
        return GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            repetition_penalty=self.repetition_penalty,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_ids,
        )


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config_eos = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    return sorted(set(ids + config_eos))


@torch.no_grad()
def sample_completions(
    model,
    prompts: list[list[int]],
    settings: SamplingSettings,
    pad_token_id: int,
    eos_ids: list[int],
    batch_size: int = 8,
    desc: str = "Sampling reference completions",
    seed_offset: int = 0,
) -> list[list[int]]:
    """One sampled completion per prompt, as token ids ending with the EOS token if the model produced one.

    Prompts are left-padded in batches of similar length; the RNG is forked and seeded with
    ``settings.seed + seed_offset``, so training's random state is untouched.
    """
    device = next(model.parameters()).device
    config = settings.generation_config(pad_token_id, eos_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[list[int] | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed + seed_offset)
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc=desc, disable=bool(os.environ.get("TQDM_DISABLE", ""))):
                batch = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, index in enumerate(batch):
                    ids = prompts[index]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    synced_gpus=False,  # the weights are whole here (gathered under ZeRO-3): no rank waits for another
                )
                for row, index in enumerate(batch):
                    completions[index] = _cut_at_eos(output[row, width:].tolist(), eos_ids)
    finally:
        model.train(was_training)
    return completions


def _cut_at_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[: position + 1]
    return ids  # stopped at max_new_tokens: no EOS, nothing after it is padding


# -------------------------------------------------------------------------------------------------------- caching
def cache_key(prompts: list[list[int]], model_hash: str, settings: SamplingSettings, eos_ids, pad_token_id) -> str:
    """sha256 of the tokenised prompts, the reference weights' hash and everything that shapes the samples."""
    prompt_hash = hashlib.sha256()
    for ids in prompts:
        prompt_hash.update(json.dumps(ids).encode())
        prompt_hash.update(b"\n")
    payload = {
        "prompts": prompt_hash.hexdigest(),
        "model": model_hash,
        "settings": asdict(settings),
        "eos_token_ids": list(eos_ids),
        "pad_token_id": pad_token_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> str:
    from datasets import config

    return os.path.join(str(config.HF_DATASETS_CACHE), "trl_refpo", "reference_completions")


def generate_completions_cached(
    dataset,
    model,
    processing_class,
    settings: SamplingSettings,
    column: str,
    cache_dir: str | None,
    accelerator,
    dataset_name: str,
    batch_size: int = 8,
) -> tuple[Dataset, bool]:
    """Add ``<column>_ids`` sampled from ``model`` (the reference), loading them from the cache when present.

    Returns ``(dataset, cache_hit)``. Prompts are split across processes; the main process writes the
    cache, then every process reads it, so all hold the same completions. Under ZeRO-3 each process gathers the
    reference's full weights for the sampling (as TRL gathers them to generate in its online trainers), so the
    processes sample independently, as under DDP, and the key hashes the gathered weights, as one process does.
    """
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"Column {column!r} is missing from the {dataset_name} dataset, and reference completions cannot be "
            "generated for an IterableDataset. Add the column, or pass a map-style datasets.Dataset."
        )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    model = accelerator.unwrap_model(model)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    prompts = [list(ids) for ids in dataset["prompt_ids"]]
    key = cache_key(prompts, full_weights_hash(model), settings, eos_ids, pad_token_id)
    folder = os.path.join(cache_dir or default_cache_dir(), key[:32])
    output_column = ids_column(column)
    hit = os.path.exists(os.path.join(folder, "settings.json"))
    if not hit:
        # Each process samples its share of the prompts on its own; under ZeRO-3 with the weights gathered first.
        with full_weights_present(model), accelerator.split_between_processes(list(range(len(prompts)))) as indices:
            local = sample_completions(
                model,
                [prompts[i] for i in indices],
                settings,
                pad_token_id,
                eos_ids,
                batch_size,
                desc=f"Sampling reference completions for {dataset_name} dataset",
                seed_offset=accelerator.process_index,
            )
            local = list(zip(indices, local, strict=True))
        gathered = _gather_objects(accelerator, local)
        if accelerator.is_main_process:
            completions = [None] * len(prompts)
            for index, ids in gathered:
                completions[index] = ids
            _write_cache(folder, completions, tokenizer, settings, key, dataset_name)
        accelerator.wait_for_everyone()
    completions = Dataset.load_from_disk(os.path.join(folder, "completions"))["completion_ids"]
    if len(completions) != len(dataset):
        raise RuntimeError(
            f"The reference-completion cache {folder} holds {len(completions)} rows, expected {len(dataset)}."
        )
    if output_column in dataset.column_names:
        dataset = dataset.remove_columns(output_column)
    return dataset.add_column(output_column, completions), hit


def _gather_objects(accelerator, local: list) -> list:
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    return gather_object(local)


def _write_cache(folder, completions, tokenizer, settings, key, dataset_name) -> None:
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        Dataset.from_dict(
            {"completion_ids": completions, "completion_text": tokenizer.batch_decode(completions)}
        ).save_to_disk(os.path.join(staging, "completions"))
        with open(os.path.join(staging, "settings.json"), "w") as f:
            json.dump({"key": key, "dataset": dataset_name, **asdict(settings)}, f, indent=2)
        if os.path.exists(folder):  # written meanwhile by another run with the same key
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
