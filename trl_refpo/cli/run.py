"""One training run from a parsed recipe: model, tokenizer and dataset loaded as the recipe says."""

from __future__ import annotations

import os
import sys

from ..offline_models import resolve_model_path
from ..trainer import RefPOTrainer
from .checks import check_model_path, require_deepspeed
from .datasets import load_recipe_dataset
from .errors import PROG, RecipeError
from .parsing import ParsedRecipe


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
        require_deepspeed("accelerate was launched with a DeepSpeed (ZeRO) config")
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
