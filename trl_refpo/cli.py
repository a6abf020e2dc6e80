"""``trl-refpo dpo``: the counterpart of ``trl dpo`` for trl-refpo's loss types and reference sources.

::

    trl-refpo dpo --config recipe.yaml [--key value ...]                      # one process
    trl-refpo dpo --config recipe.yaml --accelerate_config zero2 --num_processes 2
    accelerate launch --config_file zero3.yaml -m trl_refpo.cli dpo --config recipe.yaml

A recipe is an alignment-handbook DPO recipe as written — ``model_name_or_path``, ``torch_dtype``,
``dataset_mixture``, every ``DPOConfig`` / ``TrainingArguments`` field, the LoRA fields of TRL's
``ModelConfig`` — with ``loss_type`` and its hyperparameters (``RefPOConfig`` fields) added. Parsing
reuses TRL's ``TrlParser`` with ``ScriptArguments``, ``RefPOConfig``, ``ModelConfig`` and
``DatasetMixtureConfig``; command-line flags override the recipe.

Keys TRL 1.16 / transformers 5 no longer know but recipes still carry are never dropped silently
(:data:`LEGACY_KEYS`). Each is honoured with its old meaning, and the translation is printed:

====================================  =====================================================================
recipe key                            what trl-refpo does
====================================  =====================================================================
``torch_dtype``                       ``dtype`` (TRL's ``ModelConfig`` renamed it)
``max_prompt_length``                 prompts are cut to their LAST ``max_prompt_length`` tokens after
                                      tokenisation (TRL ≤ 0.19's ``tokenize_row``)
``max_completion_length``             chosen / rejected are cut to their FIRST ``max_completion_length``
                                      tokens; with both keys and no ``max_length``,
                                      ``max_length = max_prompt_length + max_completion_length``
``rpo_alpha`` / ``sft_weight``        ``loss_type += ["sft"]``, ``loss_weights += [value]`` (RPO / SimPO's
                                      SFT term: NLL of the chosen completion); null or 0: off
``reference_free: true``              ``sigmoid`` → ``probability`` (−log σ(β·[log π(y_w) − log π(y_l)]),
                                      the same formula); any other reference-based type is an error that
                                      lists the reference-free types. ``false``: no change
``warmup_ratio``                      ``warmup_steps`` (transformers 5 takes a ratio in [0, 1) there)
``evaluation_strategy``               ``eval_strategy``
``hub_model_revision``                ``hub_revision``
``preprocessing_num_workers``         ``dataset_num_proc``
``use_flash_attention_2: true``       ``attn_implementation: flash_attention_2``
``truncation_side``                   ``left`` → ``truncation_mode: keep_end``, ``right`` → ``keep_start``
``overwrite_output_dir``              accepted: trl-refpo never resumes implicitly (``resume_from_checkpoint``)
``dataset_mixer`` / ``dataset_splits`` rejected, with the equivalent ``dataset_mixture`` block in the message
====================================  =====================================================================

Any other unknown key is an error naming it (with the closest valid names). A translated key that
contradicts a key also present (e.g. ``torch_dtype`` and ``dtype``) is an error.

Errors in the recipe, a model path that does not exist or a ZeRO launch without DeepSpeed installed
print one line (``trl-refpo dpo: error: ...``) and exit with status 2; set ``TRL_REFPO_DEBUG=1`` for
the traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from .config import RefPOConfig
from .objectives import OBJECTIVES
from .offline_models import OfflineModelUnavailable, resolve_model_path
from .trainer import RefPOTrainer


PROG = "trl-refpo dpo"
DEEPSPEED_INSTALL = 'pip install "trl-refpo[deepspeed]"'


class RecipeError(ValueError):
    """A problem with the recipe or the command line, reported as one line without a traceback."""


@dataclass
class RecipeArguments(ScriptArguments):
    """TRL's ``ScriptArguments`` plus the alignment-handbook's own recipe fields."""

    dataset_mixture: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "alignment-handbook dataset mixture: {datasets: [{id, config, split, columns, weight}], seed, "
            "test_split_size}. `weight` keeps that fraction of the dataset (after shuffling with `seed`)."
        },
    )
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template to set on the tokenizer."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to use instead of the one stored with model_name_or_path."}
    )


DATACLASS_TYPES = (RecipeArguments, RefPOConfig, ModelConfig, DatasetMixtureConfig)

LEGACY_KEYS = (
    "torch_dtype",
    "max_prompt_length",
    "max_completion_length",
    "rpo_alpha",
    "sft_weight",
    "reference_free",
    "warmup_ratio",
    "evaluation_strategy",
    "hub_model_revision",
    "preprocessing_num_workers",
    "use_flash_attention_2",
    "truncation_side",
    "overwrite_output_dir",
    "dataset_mixer",
    "dataset_splits",
    "dataset_configs",
)


def build_parser() -> TrlParser:
    return TrlParser(DATACLASS_TYPES, prog=PROG)


def _parser_dests(parser) -> set[str]:
    return {action.dest for action in parser._actions}


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# ---------------------------------------------------------------------------------------------- parsing
@dataclass
class ParsedRecipe:
    script_args: RecipeArguments
    training_args: RefPOConfig
    model_args: ModelConfig
    dataset_args: DatasetMixtureConfig
    launch_args: list[str]  # options for `accelerate launch`; empty: run in this process
    script_argv: list[str]  # the command line without the launch options (what each launched process gets)
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    notes: list[str] = field(default_factory=list)


def _load_recipe(argv: list[str]) -> tuple[dict, str | None, list[str]]:
    argv = list(argv)
    path = None
    for index, token in enumerate(argv):
        if token == "--config":
            if index + 1 >= len(argv):
                raise RecipeError("--config needs a path to a YAML recipe.")
            path = argv[index + 1]
            del argv[index : index + 2]
            break
        if token.startswith("--config="):
            path = token.split("=", 1)[1]
            del argv[index]
            break
    if path is None:
        return {}, None, argv
    if not os.path.isfile(path):
        raise RecipeError(f"Recipe file {path!r} does not exist.")
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise RecipeError(f"Recipe {path} is not valid YAML: {error}") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe {path} must be a YAML mapping of keys to values.")
    env = recipe.pop("env", {}) or {}
    if not isinstance(env, dict):
        raise RecipeError(f"`env` in {path} must be a mapping of environment variables.")
    for key, value in env.items():
        os.environ[key] = str(value)
    return recipe, path, argv


def _split_flag(token: str) -> tuple[str, str | None]:
    name, _, value = token[2:].partition("=")
    return name, (value if "=" in token else None)


def _pop_cli_legacy(argv: list[str]) -> tuple[list[str], dict]:
    """Take legacy ``--key value`` / ``--key=value`` / bare ``--flag`` out of the command line."""
    kept, legacy = [], {}
    index = 0
    while index < len(argv):
        token = argv[index]
        name, inline = _split_flag(token) if token.startswith("--") else (None, None)
        if name in LEGACY_KEYS:
            if inline is not None:
                raw = inline
            elif index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                raw = argv[index + 1]
                index += 1
            else:
                raw = "true"
            legacy[name] = yaml.safe_load(raw)
        else:
            kept.append(token)
        index += 1
    return kept, legacy


def _cli_flag_names(argv: list[str], dests: set[str]) -> set[str]:
    names = set()
    for token in argv:
        if token.startswith("--"):
            name, _ = _split_flag(token)
            if name not in dests and name.startswith("no_") and name[3:] in dests:
                name = name[3:]
            names.add(name)
    return names


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {option for action in launch_command_parser()._actions for option in action.option_strings} | {
        "--accelerate_config"
    }


def _separate_launch_args(remaining: list[str], argv: list[str]) -> tuple[list[str], list[str]]:
    """Split the strings no dataclass consumed into `accelerate launch` options and unknown flags."""
    options = _launch_options()
    launch, unknown = [], []
    current = None
    for token in remaining:
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            current = launch if name in options else unknown
        elif current is None:
            current = unknown
        current.append(token)
    return launch, unknown


def _parse_once(recipe: dict, argv: list[str]):
    parser = build_parser()
    parser.set_defaults_with_config(**recipe)
    try:
        *dataclasses_, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (ValueError, TypeError) as error:
        raise RecipeError(str(error).strip().splitlines()[0] if str(error).strip() else repr(error)) from None
    return dataclasses_, remaining


def parse_recipe(argv: list[str]) -> ParsedRecipe:
    """Parse ``--config recipe.yaml`` and command-line flags; translate legacy keys; validate."""
    recipe, recipe_path, argv = _load_recipe(argv)
    full_argv = list(argv)
    source = f"recipe {recipe_path}" if recipe_path else "command line"
    legacy = {key: recipe.pop(key) for key in list(recipe) if key in LEGACY_KEYS}
    argv, cli_legacy = _pop_cli_legacy(argv)
    legacy.update(cli_legacy)

    dests = _parser_dests(build_parser())
    unknown = [key for key in recipe if key not in dests]
    if unknown:
        hints = "; ".join(f"{key}{_suggest(key, dests | set(LEGACY_KEYS))}" for key in unknown)
        raise RecipeError(f"Unknown key(s) in {source}: {hints}. Remove them or fix their names.")
    if "deepspeed" in recipe or any(t.split("=", 1)[0] == "--deepspeed" for t in argv):
        _require_deepspeed("the recipe sets `deepspeed`")

    cli_flags = _cli_flag_names(argv, dests)
    explicit = set(recipe) | cli_flags
    notes = _choose_dataset_source(recipe, cli_flags)
    (script_args, training_args, model_args, dataset_args), remaining = _parse_once(recipe, argv)
    launch_args, unknown_flags = _separate_launch_args(remaining, argv)
    if unknown_flags:
        names = [t for t in unknown_flags if t.startswith("-")]
        hints = "; ".join(f"{name}{_suggest(name.lstrip('-').split('=')[0], dests | set(LEGACY_KEYS))}" for name in names)
        raise RecipeError(f"Unknown command-line argument(s): {hints or unknown_flags}.")

    overrides, legacy_notes, limits = translate_legacy(legacy, training_args, model_args, explicit)
    notes += legacy_notes
    if overrides:
        (script_args, training_args, model_args, dataset_args), _ = _parse_once(recipe, argv + _as_flags(overrides))
    script_argv = _subtract_subsequence(full_argv, launch_args)
    if recipe_path is not None:
        script_argv = ["--config", recipe_path, *script_argv]
    return ParsedRecipe(
        script_args, training_args, model_args, dataset_args, launch_args, script_argv,
        max_prompt_length=limits.get("max_prompt_length"), max_completion_length=limits.get("max_completion_length"),
        notes=notes,
    )


def _as_flags(overrides: dict) -> list[str]:
    flags = []
    for key, value in overrides.items():
        flags.append(f"--{key}")
        flags.extend(str(v) for v in value) if isinstance(value, list) else flags.append(str(value))
    return flags


DATASET_SOURCES = ("dataset_mixture", "datasets", "dataset_name")


def _choose_dataset_source(recipe: dict, cli_flags: set[str]) -> list[str]:
    """One dataset source: a recipe may set only one; a command-line source replaces the recipe's."""
    in_recipe = [key for key in DATASET_SOURCES if key in recipe]
    on_cli = [key for key in DATASET_SOURCES if key in cli_flags]
    if len(in_recipe) > 1:
        raise RecipeError(f"The recipe sets {in_recipe}: they are alternative dataset sources; keep one.")
    if len(on_cli) > 1:
        raise RecipeError(f"The command line sets {on_cli}: they are alternative dataset sources; keep one.")
    if on_cli and in_recipe and in_recipe != on_cli:
        del recipe[in_recipe[0]]
        return [f"--{on_cli[0]} on the command line replaces the recipe's {in_recipe[0]}"]
    return []


def _subtract_subsequence(tokens: list[str], subsequence: list[str]) -> list[str]:
    remaining = iter(subsequence)
    current = next(remaining, None)
    kept = []
    for token in tokens:
        if current is not None and token == current:
            current = next(remaining, None)
        else:
            kept.append(token)
    return kept


# ---------------------------------------------------------------------------------------------- legacy keys
def translate_legacy(legacy: dict, training_args: RefPOConfig, model_args: ModelConfig, explicit: set[str]):
    """Old-meaning translation of :data:`LEGACY_KEYS`. Returns (dataclass overrides, printed notes, length limits)."""
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    limits: dict[str, int] = {}

    def rename(old: str, new: str, value):
        now = getattr(model_args, new) if hasattr(model_args, new) else getattr(training_args, new)
        if new in explicit and _differs(now, value):
            raise RecipeError(f"`{old}: {value}` and `{new}` are both set and disagree; `{old}` is the old name of "
                              f"`{new}`: keep only `{new}`.")
        overrides[new] = value
        notes.append(f"{old}: {value} → {new}: {value}")

    for key in ("dataset_mixer", "dataset_splits", "dataset_configs"):
        if key in legacy:
            raise RecipeError(_dataset_mixer_message(legacy))
    if "torch_dtype" in legacy and legacy["torch_dtype"] is not None:
        rename("torch_dtype", "dtype", legacy["torch_dtype"])
    elif "torch_dtype" in legacy:
        notes.append(f"torch_dtype: null → dtype keeps its default ({model_args.dtype})")
    if "warmup_ratio" in legacy:
        ratio = float(legacy["warmup_ratio"])
        if not 0 <= ratio < 1:
            raise RecipeError(f"warmup_ratio must be in [0, 1), got {ratio}.")
        rename("warmup_ratio", "warmup_steps", ratio)
    if "evaluation_strategy" in legacy:
        rename("evaluation_strategy", "eval_strategy", legacy["evaluation_strategy"])
    if "hub_model_revision" in legacy:
        rename("hub_model_revision", "hub_revision", legacy["hub_model_revision"])
    if "preprocessing_num_workers" in legacy and legacy["preprocessing_num_workers"] is not None:
        rename("preprocessing_num_workers", "dataset_num_proc", int(legacy["preprocessing_num_workers"]))
    if legacy.get("use_flash_attention_2"):
        rename("use_flash_attention_2", "attn_implementation", "flash_attention_2")
    elif "use_flash_attention_2" in legacy:
        notes.append("use_flash_attention_2: false → no change (attn_implementation keeps its value)")
    if "truncation_side" in legacy:
        side = legacy["truncation_side"]
        if side not in ("left", "right"):
            raise RecipeError(f"truncation_side must be 'left' or 'right', got {side!r}.")
        rename("truncation_side", "truncation_mode", "keep_end" if side == "left" else "keep_start")
    if "overwrite_output_dir" in legacy:
        notes.append(
            f"overwrite_output_dir: {legacy['overwrite_output_dir']} → accepted; trl-refpo writes output_dir and never "
            "resumes implicitly (set resume_from_checkpoint to resume)"
        )

    loss_type = list(training_args.loss_type)
    loss_weights = list(training_args.loss_weights) if training_args.loss_weights is not None else None
    if legacy.get("reference_free"):
        loss_type = _reference_free(loss_type)
        overrides["loss_type"] = loss_type
        notes.append(f"reference_free: true → loss_type: {loss_type}")
    elif "reference_free" in legacy:
        notes.append("reference_free: false → no change")
    for key in ("rpo_alpha", "sft_weight"):
        if key not in legacy:
            continue
        weight = legacy[key]
        if weight is None or float(weight) == 0.0:
            notes.append(f"{key}: {weight} → no SFT term (its old default)")
            continue
        if float(weight) < 0:
            raise RecipeError(f"{key} must be >= 0, got {weight}.")
        if "sft" in loss_type:
            raise RecipeError(f"{key} adds an 'sft' loss term but loss_type already contains 'sft': remove {key} "
                              "and set its weight in loss_weights.")
        loss_weights = (loss_weights or [1.0] * len(loss_type)) + [float(weight)]
        loss_type = loss_type + ["sft"]
        overrides["loss_type"], overrides["loss_weights"] = loss_type, loss_weights
        notes.append(f"{key}: {weight} → loss_type: {loss_type}, loss_weights: {loss_weights}")

    for key in ("max_prompt_length", "max_completion_length"):
        if legacy.get(key) is not None:
            value = int(legacy[key])
            if value <= 0:
                raise RecipeError(f"{key} must be > 0, got {value}.")
            limits[key] = value
            notes.append(f"{key}: {value} → {'prompts keep their last' if 'prompt' in key else 'completions keep their first'} "
                         f"{value} tokens")
    if limits:
        retokenising = {
            "ref_tokenizer_name_or_path": training_args.ref_tokenizer_name_or_path is not None,
            "ref_prompt: none": training_args.ref_prompt == "none",
        }
        conflicts = [name for name, is_set in retokenising.items() if is_set]
        if conflicts:
            raise RecipeError(
                f"{sorted(limits)} cut the policy's token ids, but {conflicts} make the reference re-score the original "
                "text, which those limits cannot reach. Replace them with max_length (the reference then keeps the same "
                "text as the policy)."
            )
    if len(limits) == 2 and "max_length" not in explicit:
        overrides["max_length"] = limits["max_prompt_length"] + limits["max_completion_length"]
        notes.append(f"max_length: {overrides['max_length']} (= max_prompt_length + max_completion_length)")
    return overrides, notes, limits


def _differs(a, b) -> bool:
    plain = lambda value: value.value if isinstance(value, Enum) else value  # noqa: E731
    return str(plain(a)) != str(plain(b))


def _reference_free(loss_type: list[str]) -> list[str]:
    free_types = sorted(name for name, cls in OBJECTIVES.items() if not cls.needs_reference)
    mapped = []
    for name in loss_type:
        if name == "sigmoid":
            mapped.append("probability")
        elif name == "sft" or (name in OBJECTIVES and not OBJECTIVES[name].needs_reference):
            mapped.append(name)
        else:
            raise RecipeError(
                f"reference_free: true has no trl-refpo equivalent for loss_type {name!r}. Remove reference_free and "
                f"choose a reference-free loss_type: {free_types} ('probability' is reference-free sigmoid DPO)."
            )
    return mapped


def _dataset_mixer_message(legacy: dict) -> str:
    mixer = legacy.get("dataset_mixer") or {}
    splits = legacy.get("dataset_splits") or ["train", "test"]
    configs = legacy.get("dataset_configs") or [None] * len(mixer)
    entries = []
    for (dataset_id, weight), config in zip(mixer.items(), configs):
        for split in splits:
            entry = f"{{id: {dataset_id}, split: {split}, columns: [chosen, rejected]"
            entry += f", config: {config}" if config else ""
            entry += f", weight: {weight}}}" if "train" in split else "}"
            entries.append(entry)
    suggestion = f"dataset_mixture: {{datasets: [{', '.join(entries)}], seed: 0, test_split_size: <n>}}"
    return (
        "dataset_mixer / dataset_splits / dataset_configs are the handbook's pre-2025 dataset keys, which mixed train and "
        f"test splits differently. Replace them with a dataset_mixture, e.g.: {suggestion}"
    )


# ---------------------------------------------------------------------------------------------- running
def _require_deepspeed(why: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(f"{why}, but DeepSpeed is not installed. Install it with: {DEEPSPEED_INSTALL}")


def check_model_path(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """Resolve ``offline:<name>`` and make sure the model exists before anything is loaded."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) and not any(
        Path(path).glob("*.gguf")
    ):
        raise RecipeError(f"model_name_or_path {name_or_path!r} is a folder without config.json: not a model.")
    looks_local = path.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.dirname(path) or "\0")
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise RecipeError(f"model_name_or_path {name_or_path!r} does not exist (no such folder).")
    try:
        AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - whatever the cause, one line for the user
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(
            f"model_name_or_path {name_or_path!r} does not exist: no local folder with that path and no loadable "
            f"model of that name ({first_line})"
        ) from None
    return path


def _load_split(dataset_id: str, config: str | None, split: str | None):
    import datasets

    path = Path(dataset_id)
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
    try:
        if path.is_file():
            if path.suffix not in builders:
                raise RecipeError(f"Dataset file {dataset_id!r}: unsupported extension; use one of {sorted(builders)}.")
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
        raise RecipeError(f"Unknown key(s) in dataset_mixture: {sorted(extra)}. Known: datasets, seed, test_split_size.")
    seed = int(mixture.get("seed", 0))
    parts, column_sets = [], []
    for entry in mixture["datasets"]:
        if not isinstance(entry, dict) or "id" not in entry:
            raise RecipeError(f"Each dataset_mixture entry needs an `id`; got {entry!r}.")
        bad = set(entry) - allowed
        if bad:
            raise RecipeError(f"Unknown key(s) {sorted(bad)} in dataset_mixture entry {entry['id']!r}. Known: {sorted(allowed)}.")
        part = _load_split(entry["id"], entry.get("config"), entry.get("split", "train"))
        if entry.get("columns") is not None:
            missing = set(entry["columns"]) - set(part.column_names)
            if missing:
                raise RecipeError(f"Dataset {entry['id']!r} has no column(s) {sorted(missing)}; it has {part.column_names}.")
            part = part.select_columns(entry["columns"])
            column_sets.append(set(entry["columns"]))
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
        path = Path(script_args.dataset_name)
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


class _LegacyLengthTrainer(RefPOTrainer):
    """``RefPOTrainer`` that also applies TRL ≤ 0.19's ``max_prompt_length`` / ``max_completion_length``.

    Prompt token ids keep their last ``max_prompt_length`` tokens and chosen / rejected ids their first
    ``max_completion_length`` tokens, right after TRL tokenises the dataset.
    """

    def __init__(self, *args, max_prompt_length=None, max_completion_length=None, **kwargs):
        self.legacy_max_prompt_length = max_prompt_length
        self.legacy_max_completion_length = max_completion_length
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        prompt_limit, completion_limit = self.legacy_max_prompt_length, self.legacy_max_completion_length

        def truncate(example):
            out = {}
            if prompt_limit is not None:
                out["prompt_ids"] = example["prompt_ids"][-prompt_limit:]
            if completion_limit is not None:
                out["chosen_ids"] = example["chosen_ids"][:completion_limit]
                out["rejected_ids"] = example["rejected_ids"][:completion_limit]
            return out

        import datasets

        kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, datasets.Dataset) else {}
        return dataset.map(truncate, **kwargs)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_dpo(parsed: ParsedRecipe):
    """Load model, tokenizer and dataset as the recipe says; train; save. Returns the trainer."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    script_args, training_args, model_args = parsed.script_args, parsed.training_args, parsed.model_args
    if _is_main_process():
        for note in parsed.notes:
            print(f"[{PROG}] {note}", file=sys.stderr)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _require_deepspeed("accelerate was launched with a DeepSpeed (ZeRO) config")
    if not model_args.model_name_or_path:
        raise RecipeError("model_name_or_path is not set (recipe key or --model_name_or_path).")
    model_path = check_model_path(
        model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code
    )
    dataset = load_recipe_dataset(script_args, parsed.dataset_args)
    if script_args.dataset_train_split not in dataset:
        raise RecipeError(f"Dataset has splits {list(dataset)}; dataset_train_split {script_args.dataset_train_split!r} "
                          "is not one of them.")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise RecipeError(
                f"eval_strategy is {training_args.eval_strategy!s} but the dataset has no split "
                f"{script_args.dataset_test_split!r} (splits: {list(dataset)}). Set dataset_mixture.test_split_size, "
                "dataset_test_split, or eval_strategy: 'no'."
            )
        eval_dataset = dataset[script_args.dataset_test_split]

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(script_args.tokenizer_name_or_path or model_path),
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    if script_args.chat_template is not None:
        tokenizer.chat_template = script_args.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    trainer_kwargs = dict(
        model=model_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if parsed.max_prompt_length is not None or parsed.max_completion_length is not None:
        trainer = _LegacyLengthTrainer(
            max_prompt_length=parsed.max_prompt_length, max_completion_length=parsed.max_completion_length,
            **trainer_kwargs,
        )
    else:
        trainer = RefPOTrainer(**trainer_kwargs)
    if script_args.ignore_bias_buffers:
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"[{PROG}] model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def launch(parsed: ParsedRecipe) -> int:
    """Re-run this command under ``accelerate launch`` with the launch options from the command line."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    try:
        launch_args = resolve_accelerate_config_argument(parsed.launch_args)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    config_file = None
    for index, token in enumerate(launch_args):
        if token in ("--config_file", "--config-file") and index + 1 < len(launch_args):
            config_file = launch_args[index + 1]
    uses_deepspeed = "--use_deepspeed" in launch_args or "--use-deepspeed" in launch_args
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise RecipeError(f"accelerate config {config_file!r} does not exist.")
        with open(config_file) as f:
            uses_deepspeed |= str((yaml.safe_load(f) or {}).get("distributed_type", "")).upper() == "DEEPSPEED"
    if uses_deepspeed:
        _require_deepspeed(f"accelerate config {config_file or '--use_deepspeed'} uses DeepSpeed (ZeRO)")
    args = launch_command_parser().parse_args(launch_args + ["-m", "trl_refpo.cli", "dpo", *parsed.script_argv])
    launch_command(args)
    return 0


USAGE = f"""usage: trl-refpo dpo --config recipe.yaml [--key value ...] [accelerate launch options]

Train with trl-refpo's DPOTrainer from an alignment-handbook DPO recipe (see `{PROG} --help` for every key).
Launch options (e.g. --accelerate_config zero2 --num_processes 2) run it under `accelerate launch`."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "dpo":
        print(f"trl-refpo: error: unknown command {command!r}; the only command is 'dpo'.\n{USAGE}", file=sys.stderr)
        return 2
    try:
        parsed = parse_recipe(rest)
        if parsed.launch_args:
            return launch(parsed)
        run_dpo(parsed)
    except (RecipeError, OfflineModelUnavailable) as error:
        if os.environ.get("TRL_REFPO_DEBUG"):
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
