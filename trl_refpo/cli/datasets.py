"""Datasets as alignment-handbook recipes name them: ``dataset_mixture``, TRL's ``datasets``, ``dataset_name``."""

from __future__ import annotations

from pathlib import Path

from trl import DatasetMixtureConfig

from .errors import RecipeError
from .parsing import RecipeArguments


PREFERENCE_COLUMNS = ("chosen", "rejected")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def check_local_dataset_exists(dataset_id: str, key: str) -> None:
    """A name that looks like a path (``./``, ``../``, ``/``, ``~`` or a data-file extension) and does not exist is
    "no such file" at once: ``datasets`` would take it for a Hub id (an id-format error, or ~30 s of retries)."""
    looks_like_path = dataset_id.startswith(("./", "../", "/", "~")) or Path(dataset_id).suffix in FILE_BUILDERS
    if looks_like_path and not Path(dataset_id).expanduser().exists():
        raise RecipeError(f"{key} {dataset_id!r}: no such file or folder.")


def check_preference_columns(column_names, what: str) -> None:
    """A DPO dataset has ``chosen`` and ``rejected`` (text or messages; ``*_ids`` when pre-tokenised)."""
    missing = [c for c in PREFERENCE_COLUMNS if c not in column_names and f"{c}_ids" not in column_names]
    if missing:
        raise RecipeError(
            f"{what} has no column(s) {missing} (it has {list(column_names)}): a DPO dataset needs `chosen` and "
            "`rejected` (and optionally `prompt`). Rename its columns, or pick another dataset or split."
        )


def _load_split(dataset_id: str, config: str | None, split: str | None):
    import datasets

    check_local_dataset_exists(dataset_id, "dataset_mixture id")
    path = Path(dataset_id).expanduser()
    builders = FILE_BUILDERS
    try:
        if path.is_file():
            if path.suffix not in builders:
                raise RecipeError(
                    f"Dataset file {dataset_id!r}: unsupported extension; use one of {sorted(builders)}."
                )
            if split not in (None, "train"):
                raise RecipeError(f"Dataset file {dataset_id!r} has a single split 'train'; got split {split!r}.")
            return datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise RecipeError(f"Dataset {dataset_id!r} has splits {list(loaded)}, not {split!r}.")
                return loaded[split]
            return loaded
        return datasets.load_dataset(dataset_id, config, split=split)
    except RecipeError:
        raise
    except Exception as error:  # noqa: BLE001
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"Could not load dataset {dataset_id!r} (split {split!r}): {first_line}") from None


def load_handbook_mixture(mixture: dict):
    """The alignment-handbook's ``dataset_mixture`` semantics: each dataset is loaded (and its ``columns``
    selected), ``weight`` keeps that fraction of it after shuffling with ``seed``; the concatenation is
    shuffled with ``seed`` and split by ``test_split_size`` (an int count or a fraction)."""
    import datasets

    if not isinstance(mixture, dict) or not isinstance(mixture.get("datasets"), list) or not mixture["datasets"]:
        raise RecipeError("dataset_mixture must be a mapping with a non-empty `datasets` list.")
    allowed = {"id", "config", "split", "columns", "weight"}
    extra = set(mixture) - {"datasets", "seed", "test_split_size"}
    if extra:
        raise RecipeError(
            f"Unknown key(s) in dataset_mixture: {sorted(extra)}. Known: datasets, seed, test_split_size."
        )
    seed = int(mixture.get("seed", 0))
    parts, column_sets = [], []
    for entry in mixture["datasets"]:
        if not isinstance(entry, dict) or "id" not in entry:
            raise RecipeError(f"Each dataset_mixture entry needs an `id`; got {entry!r}.")
        bad = set(entry) - allowed
        if bad:
            raise RecipeError(
                f"Unknown key(s) {sorted(bad)} in dataset_mixture entry {entry['id']!r}. Known: {sorted(allowed)}."
            )
        part = _load_split(entry["id"], entry.get("config"), entry.get("split", "train"))
        if entry.get("columns") is not None:
            missing = set(entry["columns"]) - set(part.column_names)
            if missing:
                raise RecipeError(
                    f"Dataset {entry['id']!r} has no column(s) {sorted(missing)}; it has {part.column_names}."
                )
            part = part.select_columns(entry["columns"])
            column_sets.append(set(entry["columns"]))
        check_preference_columns(part.column_names, f"Dataset {entry['id']!r} (split {entry.get('split', 'train')!r})")
        weight = entry.get("weight")
        if weight is not None:
            if not 0 < float(weight) <= 1:
                raise RecipeError(f"weight of {entry['id']!r} must be in (0, 1], got {weight}.")
            part = part.shuffle(seed=seed).select(range(int(len(part) * float(weight))))
        parts.append(part)
    if column_sets and any(columns != column_sets[0] for columns in column_sets):
        raise RecipeError(f"dataset_mixture entries select different columns: {[sorted(c) for c in column_sets]}.")
    combined = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    test_size = mixture.get("test_split_size")
    if test_size is not None:
        return combined.train_test_split(test_size=test_size, seed=seed)
    return datasets.DatasetDict({"train": combined})


def load_recipe_dataset(script_args: RecipeArguments, dataset_args: DatasetMixtureConfig):
    import datasets
    from trl import get_dataset

    if script_args.dataset_mixture is not None:
        return load_handbook_mixture(script_args.dataset_mixture)
    if dataset_args.datasets:
        return get_dataset(dataset_args)
    if script_args.dataset_name:
        check_local_dataset_exists(script_args.dataset_name, "dataset_name")
        path = Path(script_args.dataset_name).expanduser()
        if path.is_file() or (path.is_dir() and (path / "state.json").exists()):
            return datasets.DatasetDict({"train": _load_split(script_args.dataset_name, None, "train")})
        if path.is_dir() and (path / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))
        try:
            return datasets.load_dataset(
                script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
            )
        except Exception as error:  # noqa: BLE001
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RecipeError(f"Could not load dataset {script_args.dataset_name!r}: {first_line}") from None
    raise RecipeError("No dataset: set dataset_mixture (alignment-handbook), datasets (TRL) or dataset_name.")
