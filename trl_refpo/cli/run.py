"""One training run from a parsed recipe: model, tokenizer and dataset loaded as the recipe says; afterwards the
files the alignment-handbook's ``scripts/dpo.py`` leaves (metrics, trainer state, model card)."""

from __future__ import annotations

import logging
import os
import sys
from enum import Enum
from pathlib import Path

from trl import DPOTrainer as _TRLDPOTrainer

from ..reference.text import TextReference
from ..research.offline_models import resolve_model_path
from ..trainer import RefPOTrainer
from .checks import check_model_path, check_required_packages, check_tokenizer_path
from .datasets import check_preference_columns, load_recipe_dataset
from .errors import PROG, RecipeError
from .launch import check_launched_processes
from .parsing import ParsedRecipe


LIBRARY_LOGGER = "trl_refpo"


class _TokeniseWithoutDropping(_TRLDPOTrainer):
    """TRL's tokenisation without its drop of examples whose prompt alone fills ``max_length``: that drop must see
    the prompt AFTER ``max_prompt_length`` cut it (TRL ≤ 0.19 cut first), so :class:`_LegacyLengthTrainer` makes it.
    Placed after ``RefPOTrainer`` in the MRO, so it runs before the reference columns are added."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        max_length, args.max_length = args.max_length, None  # TRL reads max_length here only for that drop
        try:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        finally:
            args.max_length = max_length


class _LegacyLengthTrainer(RefPOTrainer, _TokeniseWithoutDropping):
    """``RefPOTrainer`` that also applies TRL ≤ 0.19's ``max_prompt_length`` / ``max_completion_length``.

    Prompt token ids keep their last ``max_prompt_length`` tokens and chosen / rejected ids their first
    ``max_completion_length`` tokens, right after TRL tokenises the dataset; then, as TRL does with ``keep_start``,
    examples whose (cut) prompt alone fills ``max_length`` are dropped. A reference that re-scores the text (its
    own tokenizer, or no prompt) keeps the same text: it is told the limits before it tokenises.
    """

    def __init__(self, *args, max_prompt_length=None, max_completion_length=None, **kwargs):
        self.legacy_max_prompt_length = max_prompt_length
        self.legacy_max_completion_length = max_completion_length
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        prompt_limit, completion_limit = self.legacy_max_prompt_length, self.legacy_max_completion_length
        if isinstance(self.ref_scoring_source, TextReference):
            self.ref_scoring_source.max_prompt_length = prompt_limit
            self.ref_scoring_source.max_completion_length = completion_limit
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)

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
        dataset = dataset.map(truncate, **kwargs)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length, **kwargs)
        return dataset


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _plain(value):
    return value.value if isinstance(value, Enum) else value


def configure_library_logging(training_args) -> None:
    """Give trl-refpo's own loggers the recipe's ``log_level`` (as the trainer does for transformers')."""
    level = training_args.get_process_log_level()
    library_logger = logging.getLogger(LIBRARY_LOGGER)
    library_logger.setLevel(level)
    if not logging.getLogger().handlers and not library_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        library_logger.addHandler(handler)


def build_trainer(parsed: ParsedRecipe) -> RefPOTrainer:
    """Everything before training: checks, model, tokenizer, dataset, trainer. Errors here are the user's setup."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    script_args, training_args, model_args = parsed.script_args, parsed.training_args, parsed.model_args
    if _is_main_process():
        for note in parsed.notes:
            print(f"[{PROG}] {note}", file=sys.stderr)
    check_launched_processes(training_args)
    check_required_packages(training_args, model_args)
    configure_library_logging(training_args)
    if not model_args.model_name_or_path:
        raise RecipeError("model_name_or_path is not set (recipe key or --model_name_or_path).")
    trust_remote_code = training_args.trust_remote_code
    model_path = check_model_path(model_args.model_name_or_path, model_args.model_revision, trust_remote_code)
    # offline:<name> resolves to its folder here: the trainer and the reference setup take folders and hub ids only.
    if training_args.ref_model_name_or_path is not None:
        training_args.ref_model_name_or_path = check_model_path(
            training_args.ref_model_name_or_path, None, trust_remote_code, key="ref_model_name_or_path"
        )
    if training_args.ref_tokenizer_name_or_path is not None:
        training_args.ref_tokenizer_name_or_path = check_tokenizer_path(
            training_args.ref_tokenizer_name_or_path, trust_remote_code, "ref_tokenizer_name_or_path"
        )
    if script_args.tokenizer_name_or_path is not None:
        check_tokenizer_path(script_args.tokenizer_name_or_path, trust_remote_code)
    dataset = load_recipe_dataset(script_args, parsed.dataset_args)
    if script_args.dataset_train_split not in dataset:
        raise RecipeError(
            f"Dataset has splits {list(dataset)}; dataset_train_split {script_args.dataset_train_split!r} "
            "is not one of them."
        )
    train_dataset = dataset[script_args.dataset_train_split]
    check_preference_columns(train_dataset.column_names, f"The train split {script_args.dataset_train_split!r}")
    eval_dataset = None
    if _plain(training_args.eval_strategy) != "no":
        if script_args.dataset_test_split not in dataset:
            raise RecipeError(
                f"eval_strategy is {_plain(training_args.eval_strategy)!r} but the dataset has no split "
                f"{script_args.dataset_test_split!r} (splits: {list(dataset)}). Set dataset_mixture.test_split_size, "
                "dataset_test_split, or eval_strategy: 'no'."
            )
        eval_dataset = dataset[script_args.dataset_test_split]
    elif training_args.do_eval and script_args.dataset_test_split in dataset:
        eval_dataset = dataset[script_args.dataset_test_split]  # for the final evaluation only
    if eval_dataset is not None:
        check_preference_columns(eval_dataset.column_names, f"The test split {script_args.dataset_test_split!r}")

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(script_args.tokenizer_name_or_path or model_path),
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
    )
    if script_args.chat_template is not None:
        tokenizer.chat_template = script_args.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    trainer_kwargs = dict(
        model=model_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if parsed.max_prompt_length is not None or parsed.max_completion_length is not None:
        trainer = _LegacyLengthTrainer(
            max_prompt_length=parsed.max_prompt_length,
            max_completion_length=parsed.max_completion_length,
            **trainer_kwargs,
        )
    else:
        trainer = RefPOTrainer(**trainer_kwargs)
    if script_args.ignore_bias_buffers:
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    return trainer


def train_and_save(trainer: RefPOTrainer, parsed: ParsedRecipe) -> RefPOTrainer:
    """Train, then save what the alignment-handbook's ``scripts/dpo.py`` saves: ``train_results.json``,
    ``trainer_state.json``, the model and its card; with an eval split a final ``evaluate()`` into
    ``eval_results.json``; ``all_results.json`` holds both."""
    script_args, training_args = parsed.script_args, parsed.training_args
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    if hasattr(trainer.train_dataset, "__len__"):
        metrics["train_samples"] = len(trainer.train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        mixture = (script_args.dataset_mixture or {}).get("datasets") or []
        names = [script_args.dataset_name, *(entry["id"] for entry in mixture)]
        hub_ids = [name for name in names if name and not os.path.exists(name)]
        trainer.create_model_card(
            model_name=Path(training_args.output_dir).name,
            dataset_name=", ".join(hub_ids) or None,  # the card links it on the Hub: local files are not named
            tags=list(dict.fromkeys(training_args.loss_type)),
        )
        describe_local_models_in_card(
            Path(training_args.output_dir) / "README.md",
            parsed.model_args.model_name_or_path,
            training_args.output_dir,
        )
    trainer.accelerator.print(f"[{PROG}] model saved to {training_args.output_dir}")
    if trainer.eval_dataset is not None:
        metrics = final_eval_metrics(trainer)
        if hasattr(trainer.eval_dataset, "__len__"):
            metrics["eval_samples"] = len(trainer.eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # The main process writes the card and results alone: a process that destroys the group (``end``) and exits
    # while the other still runs can abort ("terminate called without an active exception") and fail the launch.
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()
    return trainer


def final_eval_metrics(trainer: RefPOTrainer) -> dict:
    """The evaluation at the last step if training just made one (``eval_strategy`` landed on it), else a new one:
    the same model evaluated twice gives the same numbers twice."""
    evaluations = [entry for entry in trainer.state.log_history if any(key.startswith("eval_") for key in entry)]
    if evaluations and evaluations[-1].get("step") == trainer.state.global_step:
        return {key: value for key, value in evaluations[-1].items() if key != "step"}
    return trainer.evaluate()


def describe_local_models_in_card(card_path: Path, model_name_or_path: str, output_dir: str) -> None:
    """TRL's card template links the base model and names the snippet's model on the Hub; for a local (or
    ``offline:``) model and a model not pushed it would read ``[None](https://huggingface.co/None)`` and
    ``model="None"``. Name the local model as the recipe wrote it, and the saved folder in the snippet."""
    if not card_path.is_file():
        return
    text = card_path.read_text()
    text = text.replace("[None](https://huggingface.co/None)", f"the local model `{model_name_or_path}`")
    text = text.replace('model="None"', f'model="{output_dir}"')
    card_path.write_text(text)


def run_dpo(parsed: ParsedRecipe) -> RefPOTrainer:
    """Load model, tokenizer and dataset as the recipe says; train; save. Returns the trainer."""
    return train_and_save(build_trainer(parsed), parsed)
