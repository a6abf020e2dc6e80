"""``RefPOTrainer``: TRL's ``DPOTrainer`` with a short loss pipeline for the trl-refpo loss types.

    policy forward → reference source → objectives (with their β / margin controllers) → loss → metrics

A ``loss_type`` made only of TRL's own types is handed to TRL's ``DPOTrainer`` unchanged (plus the
``logps/accuracies`` metric). See ``docs/design.md`` for why these overrides and no others.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOTrainer as _TRLDPOTrainer
from trl.trainer import dpo_trainer as _trl_dpo_module

from .config import RefPOConfig
from .data import FLOAT_COLUMNS, REF_ID_COLUMNS, RefPODataCollator, report_dropped_rows, require_rows
from .dataset_checks import check_preference_datasets
from .diagnostics import logp_gradient_metrics
from .heads.completion import completion_logps, model_inputs
from .heads.perturbation import PerturbationScorer
from .objectives.base import PairBatch, ReferenceSampler, StepContext
from .objectives.registry import build_objectives
from .reference.handle import scoring_handle
from .reference.precompute import precompute_reference_logps
from .reference.setup import is_vision_example, setup_reference
from .reference.sources import ColumnReference


STATE_FILE = "trl_refpo_state.json"


@contextlib.contextmanager
def _trl_reference_loading_skipped(skip: bool, policy_is_path: bool):
    """Stop TRL's constructor from loading a reference model that the chosen reference source does not use.

    TRL 1.16 loads one with ``create_model_from_path`` whenever ``ref_model`` is None, the policy is not PEFT and
    ``precompute_ref_log_probs`` is False; the only call before it loads the policy, when given as a path. Here the
    reference load returns None (TRL then keeps ``ref_model=None``, as with precompute); the user's config and
    TRL's later checks see the user's settings.
    """
    if not skip:
        yield
        return
    load = _trl_dpo_module.create_model_from_path
    policy_loads = [True] if policy_is_path else []

    def load_policy_only(path, **kwargs):
        return load(path, **kwargs) if policy_loads and policy_loads.pop() else None

    _trl_dpo_module.create_model_from_path = load_policy_only
    try:
        yield
    finally:
        _trl_dpo_module.create_model_from_path = load


def _refuse_extra_rows_on_vision_data(extra_completion_columns, train_dataset) -> None:
    if extra_completion_columns and train_dataset is not None:
        if is_vision_example(next(iter(train_dataset), None)):
            raise ValueError(
                f"The loss types scoring extra completion columns ({list(extra_completion_columns)}) do not "
                "support vision datasets (with an 'image' / 'images' column) yet. Use another loss_type."
            )


class _ControllerCallback(TrainerCallback):
    """Steps the controllers once per optimizer step and saves their state with each checkpoint."""

    def __init__(self, trainer: RefPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        reduce_sum = lambda tensor: self.trainer.accelerator.reduce(  # noqa: E731
            tensor.to(self.trainer.accelerator.device), reduction="sum"
        )
        for objective in self.trainer.objectives:
            if objective.controller is not None:
                objective.controller.on_optimizer_step(reduce_sum)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                with open(os.path.join(folder, STATE_FILE), "w") as f:
                    json.dump(self.trainer.controller_state(), f, indent=2)


class RefPOTrainer(_TRLDPOTrainer):
    """DPO trainer whose ``loss_type`` also selects ε-DPO, Flex-DPO, β-DPO, α-DPO, SimPO, TYPO, the
    probability / likelihood parameterisations, and whose reference log-probs can come from any
    reference source. Same constructor as TRL's ``DPOTrainer``, plus ``ref_tokenizer``: the tokenizer of a
    ``ref_model`` that tokenises differently from the policy (it then re-scores the original text).
    """

    _tag_names = ["trl", "dpo", "trl-refpo"]

    def __init__(
        self,
        model,
        ref_model: PreTrainedModel | None = None,
        args: RefPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        ref_tokenizer=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = RefPOConfig(f"{name.split('/')[-1]}-RefPO")
        if not isinstance(args, RefPOConfig):
            raise TypeError(
                f"args must be a trl_refpo.RefPOConfig (or trl_refpo.DPOConfig), got {type(args).__module__}."
                f"{type(args).__name__}. Replace `from trl import DPOConfig` with `from trl_refpo import DPOConfig`."
            )
        require_rows(train_dataset, "train")
        check_preference_datasets(train_dataset, eval_dataset)
        self.objectives = build_objectives(args)
        given_ref_model = ref_model  # TYPO may sample from it before training even when it is not kept
        needs_perturbation = [
            objective.name for objective in self.objectives if objective.needs_reference_distribution
        ]
        reference = setup_reference(
            model,
            ref_model,
            ref_tokenizer,
            processing_class,
            args,
            train_dataset,
            eval_dataset,
            peft_config,
            samples_from_reference=any(objective.samples_from_reference(args) for objective in self.objectives),
            full_distribution_for=needs_perturbation,
        )
        ref_model, processing_class = reference.ref_model, reference.processing_class
        # The source that scores (online, or once with precompute_ref_log_probs) and the one training reads.
        self.ref_scoring_source = self.reference_source = reference.source
        if args.precompute_ref_log_probs and reference.source.needs_model:
            self.reference_source = ColumnReference()
        # TRL's own loss code is used, unchanged, when every loss type is TRL's and the reference is TRL's.
        self.uses_pipeline = not args.uses_trl_loss_code or not reference.source.trl_compatible
        self.extra_completion_columns = tuple(
            column for objective in self.objectives for column in objective.extra_completion_columns()
        )

        _refuse_extra_rows_on_vision_data(self.extra_completion_columns, train_dataset)

        with _trl_reference_loading_skipped(not self.ref_scoring_source.needs_model, isinstance(model, str)):
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        # TRL's own loss code reads the reference columns from the batch only with this attribute on.
        self.precompute_ref_logps = isinstance(self.reference_source, ColumnReference)
        if data_collator is None and not self._is_vision_dataset and self.uses_pipeline:
            trl_collator = self.data_collator
            self.data_collator = RefPODataCollator(
                pad_token_id=trl_collator.pad_token_id,
                max_length=trl_collator.max_length,
                truncation_mode=trl_collator.truncation_mode,
                pad_to_multiple_of=trl_collator.pad_to_multiple_of,
                extra_completion_keys=self.extra_completion_columns,
                ref_pad_token_id=self.reference_source.ref_pad_token_id,
            )
        if self.uses_pipeline:
            self._prepare_datasets_with_reference(given_ref_model)
        self.add_callback(_ControllerCallback(self))
        self.perturbation = None
        if needs_perturbation:  # with PEFT and no ref_model the reference is the policy, adapter disabled
            self.perturbation = PerturbationScorer(
                self.model, self.ref_model if self.ref_model is not None else self.model
            )
        self._captured_policy_logps = None
        if not self.uses_pipeline:
            self.model.register_forward_hook(self._capture_policy_logps)

    # ------------------------------------------------------------------ construction helpers
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        require_rows(dataset, dataset_name)
        rows_before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        report_dropped_rows(dataset, rows_before, args, dataset_name)
        if self.uses_pipeline:
            for component in (self.ref_scoring_source, *self.objectives):
                dataset = component.prepare_dataset(dataset, processing_class, args, dataset_name)
        return dataset

    def _prepare_datasets_with_reference(self, given_ref_model):
        """Let objectives add what only the initial weights can give (TYPO's reference samples), before training.

        The reference is the given ``ref_model``, else, for a PEFT policy, the base with the adapter disabled (or
        TRL's "ref" adapter), as for reference log-probs; else the untrained policy itself.
        """
        reference_model, context = given_ref_model, contextlib.nullcontext()
        if reference_model is None and is_peft_model(self.model):
            handle = scoring_handle(self)
            reference_model, context = handle.model, handle.adapter_context()
        elif reference_model is None:
            reference_model = self.model  # not trained yet
        sampler = ReferenceSampler(reference_model, self.processing_class, self.accelerator)
        with context:
            self._add_reference_columns(sampler)

    def _add_reference_columns(self, sampler: ReferenceSampler):
        for objective in self.objectives:
            self.train_dataset = objective.prepare_dataset_with_reference(self.train_dataset, "train", sampler)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    name: objective.prepare_dataset_with_reference(dataset, name, sampler)
                    for name, dataset in self.eval_dataset.items()
                }
            elif self.eval_dataset is not None:
                self.eval_dataset = objective.prepare_dataset_with_reference(self.eval_dataset, "eval", sampler)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [*FLOAT_COLUMNS, *REF_ID_COLUMNS, *self.extra_completion_columns]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return precompute_reference_logps(
            self.ref_scoring_source,
            dataset,
            name,
            batch_size,
            self.args,
            handle=lambda: scoring_handle(self, before_training=True),
            trl_scoring=None if self.uses_pipeline else self.compute_ref_log_probs,
        )

    def _prepare_inputs(self, inputs):
        # Under DeepSpeed the HF Trainer casts every float tensor of the batch to the engine's dtype (bf16): reference
        # log-probs and token counts stay float32.
        kept = {column: inputs.pop(column) for column in FLOAT_COLUMNS if column in inputs}
        inputs = super()._prepare_inputs(inputs)
        inputs.update({column: value.to(self.args.device, torch.float32) for column, value in kept.items()})
        return inputs

    # ------------------------------------------------------------------ trainer state
    def controller_state(self) -> dict:
        return {
            f"{index}:{objective.name}": objective.controller.state_dict()
            for index, objective in enumerate(self.objectives)
            if objective.controller is not None
        }

    def load_controller_state(self, state: dict) -> None:
        for index, objective in enumerate(self.objectives):
            key = f"{index}:{objective.name}"
            if objective.controller is not None and key in state:
                objective.controller.load_state_dict(state[key])

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool) and checkpoint:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            path = os.path.join(checkpoint, STATE_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    self.load_controller_state(json.load(f))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        supplied_columns = isinstance(self.ref_scoring_source, ColumnReference)
        if not supplied_columns or eval_dataset is None or isinstance(eval_dataset, str) or self._is_vision_dataset:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        # Reference log-probs supplied as columns: a new dataset must bring its own (checked by _precompute_ref_logps).
        # TRL's evaluate would refuse it after training, taking the reference to be the initial policy.
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        named = eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]
        metrics = {}
        for name, dataset in named:
            dataset = self._prepare_dataset(dataset, self.processing_class, self.args, name or "eval")
            dataset = self._precompute_ref_logps(dataset, name or "eval", batch_size)
            prefix = metric_key_prefix if name is None else f"{metric_key_prefix}_{name}"
            metrics.update(Trainer.evaluate(self, dataset, ignore_keys, metric_key_prefix=prefix))
        return metrics

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.uses_pipeline:
            self._captured_policy_logps = None
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._log_policy_ranking(inputs)
            return result
        try:
            loss = self._pipeline_loss(model, inputs)
        except ValueError as error:  # TRL's message for a vision batch whose max_length cut image tokens
            if "Image features and image tokens do not match" in str(error) and self.args.max_length is not None:
                raise ValueError(
                    f"max_length ({self.args.max_length}) cuts image placeholder tokens out of input_ids while the "
                    "image features remain. Increase max_length, or set it to None."
                ) from error
            raise
        if not return_outputs:
            return loss
        # What TRL's DPOTrainer returns (prediction_step hands `outputs.logits` to compute_metrics): the full logits
        # of every row, from an extra forward without gradients.
        warnings.warn(
            "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated in TRL and will be "
            "removed in v2.0.0. The completion head does not build the logits, so they are recomputed with an extra "
            "forward pass.",
            FutureWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
                **model_inputs(inputs),
            )
        return loss, outputs

    def _pipeline_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        num_pairs = self._num_pairs(inputs)
        policy_kwargs = model_inputs(inputs)
        if self.aux_loss_enabled:  # MoE: the router load-balancing loss, as TRL adds it
            policy_kwargs["output_router_logits"] = True
        with self._captured_hidden_states("policy"):
            row_logps, per_token_logps, outputs = completion_logps(
                model,
                inputs["input_ids"],
                inputs["attention_mask"],
                completion_mask,
                entropy=True,
                metrics=True,
                **policy_kwargs,
            )
        shift_mask = completion_mask[:, 1:]
        lengths = shift_mask.sum(dim=1).float()
        with self._captured_hidden_states("reference"):
            reference = self.reference_source(scoring_handle(self), inputs, num_pairs)
        groups = row_logps.split(num_pairs)  # [chosen, rejected, *extra completion columns]
        pairs = PairBatch(
            chosen_logps=groups[0],
            rejected_logps=groups[1],
            chosen_lengths=lengths[:num_pairs],
            rejected_lengths=lengths[num_pairs : 2 * num_pairs],
            chosen_token_logps=per_token_logps[:num_pairs],
            chosen_token_mask=shift_mask[:num_pairs],
            extra_logps=dict(zip(self.extra_completion_columns, groups[2:], strict=True)),
        )
        if reference is not None:
            pairs.ref_chosen_logps, pairs.ref_rejected_logps = reference.chosen, reference.rejected
            pairs.ref_chosen_lengths, pairs.ref_rejected_lengths = reference.chosen_lengths, reference.rejected_lengths
        if self.perturbation is not None:
            pairs.perturbed_logratios = self.perturbation.logratios(inputs, num_pairs, self.args.epsilon)
        ctx = StepContext(
            training=mode == "train", gather=self.accelerator.gather, process_index=self.accelerator.process_index
        )
        loss_weights = self.args.loss_weights or [1.0] * len(self.objectives)
        loss = 0.0
        results = []
        for objective, weight in zip(self.objectives, loss_weights, strict=True):
            result = objective(pairs, ctx)
            loss = loss + weight * result.losses.mean()
            results.append(result)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_pipeline_metrics(mode, pairs, results, outputs, shift_mask, inputs)
        if ctx.training and torch.is_tensor(loss) and loss.requires_grad:  # 3D-properties, from this forward's graph
            for name, value in logp_gradient_metrics(
                loss, per_token_logps, shift_mask, num_pairs, self.accelerator.gather
            ).items():
                self._metrics[mode][name].append(value)
        return loss

    def _captured_hidden_states(self, role: str):
        return self.perturbation.capture(role) if self.perturbation is not None else contextlib.nullcontext()

    def _num_pairs(self, inputs) -> int:
        return inputs["input_ids"].size(0) // (2 + len(self.extra_completion_columns))

    # ------------------------------------------------------------------ metrics
    def _gathered_mean(self, tensor) -> float:
        return self.accelerator.gather(tensor.detach().float()).mean().item()

    def _gathered_token_mean(self, values, mask) -> float | None:
        """Mean of ``values`` over the tokens of ``mask`` on every process (None without tokens), as TRL weighs it."""
        total = self.accelerator.gather_for_metrics((values.detach().float() * mask).sum()).sum().item()
        count = self.accelerator.gather_for_metrics(mask.sum()).sum().item()
        return total / count if count > 0 else None

    def _log_pipeline_metrics(self, mode, pairs, results, outputs, shift_mask, inputs):
        metrics = self._metrics[mode]
        rewarded = next((result for result in results if result.chosen_rewards is not None), None)
        if rewarded is not None:  # the first loss term that defines an implicit reward
            chosen_rewards, rejected_rewards = rewarded.chosen_rewards, rewarded.rejected_rewards
            metrics["rewards/chosen"].append(self._gathered_mean(chosen_rewards))
            metrics["rewards/rejected"].append(self._gathered_mean(rejected_rewards))
            metrics["rewards/accuracies"].append(self._gathered_mean(chosen_rewards > rejected_rewards))
            metrics["rewards/margins"].append(self._gathered_mean(chosen_rewards - rejected_rewards))
        metrics["logps/chosen"].append(self._gathered_mean(pairs.chosen_logps))
        metrics["logps/rejected"].append(self._gathered_mean(pairs.rejected_logps))
        metrics["logps/accuracies"].append(self._gathered_mean(pairs.chosen_logps > pairs.rejected_logps))
        if pairs.has_reference:
            metrics["logps/ref_chosen"].append(self._gathered_mean(pairs.ref_chosen_logps))
            metrics["logps/ref_rejected"].append(self._gathered_mean(pairs.ref_rejected_logps))
        seq_len = shift_mask.size(1)
        entropy = self._gathered_token_mean(outputs.entropy[:, -seq_len:], shift_mask)
        if entropy is not None:
            metrics["entropy"].append(entropy)
        # TRL's logit and top-1 metrics (per completion token, folded in the completion head's tiles)
        num_pairs = pairs.chosen_logps.size(0)
        chosen, rejected = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
        mean_logits, is_top1 = outputs.mean_logits[:, -seq_len:], outputs.is_top1[:, -seq_len:]
        metrics["logits/chosen"].append(self._gathered_token_mean(mean_logits[chosen], shift_mask[chosen]) or 0.0)
        metrics["logits/rejected"].append(
            self._gathered_token_mean(mean_logits[rejected], shift_mask[rejected]) or 0.0
        )
        metrics["mean_token_accuracy"].append(self._gathered_token_mean(is_top1[chosen], shift_mask[chosen]) or 0.0)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        for result in results:
            for name, value in result.metrics.items():
                metrics[name].append(value)

    def _capture_policy_logps(self, module, args, output):
        # The first fused forward of a TRL compute_loss call is the policy's (with PEFT the reference forward runs
        # through the same module afterwards, adapter disabled).
        if self._captured_policy_logps is None and getattr(output, "log_probs", None) is not None:
            self._captured_policy_logps = output.log_probs.detach()

    def _log_policy_ranking(self, inputs):
        if self._captured_policy_logps is None:
            return
        seq_len = inputs["completion_mask"].size(1) - 1
        chosen, rejected = self._captured_policy_logps[:, -seq_len:].sum(dim=1).chunk(2)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["logps/accuracies"].append(self._gathered_mean(chosen > rejected))
        self._captured_policy_logps = None
