"""RefPOTrainer end to end on a tiny Llama: TRL parity, every loss type trains, state survives resume."""

import copy
import math

import pytest
import torch
from conftest import tiny_args
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer as TRLDPOTrainer

from trl_refpo import RefPOTrainer
from trl_refpo.objectives.trl_losses import TRL_PAIR_LOSSES
from trl_refpo.testing import tiny_llama, toy_preference_dataset


TRAINER_KWARGS = dict(max_steps=1)


def first_batch_loss(trainer):
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss, metrics


def trl_trainer(model, tokenizer, dataset, tmp_path, **config):
    args = TRLDPOConfig(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        report_to=[],
        seed=0,
        **config,
    )
    return TRLDPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def refpo_trainer(model, tokenizer, dataset, tmp_path, **config):
    return RefPOTrainer(
        model=copy.deepcopy(model),
        args=tiny_args(tmp_path / "refpo", **config),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def train_model_once(model, tokenizer, dataset):
    """Move the policy away from its reference so that log-ratios are non-zero."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = tokenizer(
        [row["prompt"] + row["chosen"] for row in dataset.select(range(4))], return_tensors="pt", padding=True
    )
    model(**ids, labels=ids["input_ids"]).loss.backward()
    optimizer.step()
    return model


@pytest.fixture
def moved_policy_and_ref(model, tokenizer, dataset):
    ref = copy.deepcopy(model)
    return train_model_once(model, tokenizer, dataset), ref


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["sigmoid", "sft"], ["ipo"]])
def test_trl_loss_types_are_trls_own(loss_type, moved_policy_and_ref, tokenizer, dataset, tmp_path):
    policy, ref = moved_policy_and_ref
    weights = [1.0, 0.3][: len(loss_type)]
    trl = TRLDPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=TRLDPOConfig(
            output_dir=str(tmp_path / "t"),
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            per_device_train_batch_size=4,
            report_to=[],
            seed=0,
            loss_type=loss_type,
            loss_weights=weights,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    ours = RefPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=tiny_args(tmp_path / "r", loss_type=loss_type, loss_weights=weights),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trl_loss, trl_metrics = first_batch_loss(trl)
    our_loss, our_metrics = first_batch_loss(ours)
    assert abs(trl_loss.item()) > 1e-3
    torch.testing.assert_close(our_loss, trl_loss)
    for key, value in trl_metrics.items():
        assert our_metrics[key] == pytest.approx(value, abs=1e-6), key
    assert 0.0 <= our_metrics["logps/accuracies"] <= 1.0


@pytest.mark.parametrize("trl_type", sorted(TRL_PAIR_LOSSES))
def test_trl_formulas_in_mixed_lists_match_trl(trl_type, moved_policy_and_ref, tokenizer, dataset, tmp_path):
    """A TRL type inside a list with a trl-refpo type is computed by trl_losses; it must equal TRL's value."""
    policy, ref = moved_policy_and_ref
    extra = {"label_smoothing": 0.1} if trl_type in {"exo_pair", "robust", "aot", "aot_unpaired"} else {}
    trl = TRLDPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=TRLDPOConfig(
            output_dir=str(tmp_path / "t"),
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            per_device_train_batch_size=4,
            report_to=[],
            seed=0,
            loss_type=[trl_type],
            **extra,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    ours = RefPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        # label_smoothing is rejected with a trl-refpo type that does not define it: pair with one that does.
        args=tiny_args(
            tmp_path / "r", loss_type=[trl_type, "simpo" if extra else "flex_dpo"], loss_weights=[1.0, 0.0], **extra
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert ours.uses_pipeline
    trl_loss, _ = first_batch_loss(trl)
    our_loss, _ = first_batch_loss(ours)
    torch.testing.assert_close(our_loss, trl_loss, atol=1e-6, rtol=1e-5)


def test_flex_dpo_with_equal_betas_equals_trl_sigmoid(moved_policy_and_ref, tokenizer, dataset, tmp_path):
    policy, ref = moved_policy_and_ref
    trl = trl_trainer(policy, tokenizer, dataset, tmp_path, loss_type=["sigmoid"], beta=0.2)
    ours = RefPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=tiny_args(tmp_path / "r", loss_type="flex_dpo", beta=0.2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trl.ref_model.load_state_dict(ref.state_dict())
    trl_loss, trl_metrics = first_batch_loss(trl)
    our_loss, our_metrics = first_batch_loss(ours)
    torch.testing.assert_close(our_loss, trl_loss, atol=1e-6, rtol=1e-6)
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]:
        assert our_metrics[key] == pytest.approx(trl_metrics[key], abs=1e-5), key


ALL_PLUGIN_CONFIGS = {
    "flex_dpo": dict(loss_type="flex_dpo", beta=0.5, beta_chosen=0.5, beta_rejected=0.2),
    "alpha_dpo": dict(loss_type="alpha_dpo", beta=2.5, alpha=0.2, gamma_beta_ratio=0.3),
    "simpo": dict(loss_type="simpo", beta=2.5, gamma_beta_ratio=0.3),
    "probability": dict(loss_type="probability", beta=0.5),
    "beta_dpo": dict(loss_type="beta_dpo", beta=0.5),
    "epsilon_dpo": dict(loss_type="epsilon_dpo", beta=0.5, epsilon=0.05),
    "alpha_dpo+sft": dict(loss_type=["alpha_dpo", "sft"], loss_weights=[1.0, 0.2], beta=2.5),
    "sigmoid": dict(loss_type="sigmoid", beta=0.5),
}


@pytest.mark.parametrize("name", sorted(ALL_PLUGIN_CONFIGS))
def test_every_loss_type_trains(name, model, tokenizer, dataset, tmp_path):
    config = ALL_PLUGIN_CONFIGS[name]
    trainer = RefPOTrainer(
        model=model,
        args=tiny_args(tmp_path, max_steps=16, learning_rate=3e-3, **config),
        train_dataset=dataset.select(range(4)),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 16 and all(math.isfinite(value) for value in logged)
    assert sum(logged[-3:]) / 3 < sum(logged[:3]) / 3 - 0.02, logged
    accuracies = [entry["logps/accuracies"] for entry in trainer.state.log_history if "logps/accuracies" in entry]
    assert accuracies[-1] >= accuracies[0]


@pytest.mark.parametrize("loss_type", ["simpo", "probability"])
def test_reference_free_types_load_no_reference(loss_type, model, tokenizer, dataset, tmp_path):
    trainer = RefPOTrainer(
        model=model, args=tiny_args(tmp_path, loss_type=loss_type), train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer.ref_model is None
    assert trainer.args.precompute_ref_log_probs is False and trainer.precompute_ref_logps is False
    with pytest.raises(ValueError, match=rf"given ref_model=, but loss_type \['{loss_type}'\] uses no reference"):
        RefPOTrainer(
            model=tiny_llama(tokenizer),
            ref_model=tiny_llama(tokenizer, seed=1),
            args=tiny_args(tmp_path, loss_type=loss_type),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_typo_takes_a_ref_model_only_to_sample_from_it(tokenizer, dataset, tmp_path):
    with pytest.raises(ValueError, match=r"given ref_model=, but loss_type \['typo'\] uses no reference"):
        RefPOTrainer(
            model=tiny_llama(tokenizer),
            ref_model=tiny_llama(tokenizer, seed=1),
            args=tiny_args(tmp_path, loss_type="typo"),
            processing_class=tokenizer,
            train_dataset=dataset.add_column("ref_completion", [" a"] * len(dataset)),
        )


@pytest.mark.parametrize(
    "field, value", [("precompute_ref_log_probs", True), ("precompute_ref_batch_size", 8), ("sync_ref_model", True)]
)
def test_reference_options_with_a_reference_free_type_are_errors(field, value, tmp_path):
    """One rule for every reference option: set with a type that uses no reference, it is an error naming it."""
    message = rf"\['{field}'\] configure a reference, but loss_type \['simpo'\] uses none"
    with pytest.raises(ValueError, match=message):
        tiny_args(tmp_path, loss_type="simpo", **{field: value})


def test_a_policy_given_as_a_path_is_loaded_and_no_reference_is(model, tokenizer, dataset, tmp_path):
    """The seam that skips TRL's reference load lets the policy load from a path, and leaves the config alone."""
    model.save_pretrained(tmp_path / "policy")
    args = tiny_args(tmp_path / "out", loss_type="simpo")
    trainer = RefPOTrainer(
        model=str(tmp_path / "policy"), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer.ref_model is None and args.precompute_ref_log_probs is False
    for ours, theirs in zip(trainer.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_reference_types_copy_in_memory_policy(model, tokenizer, dataset, tmp_path):
    trainer = RefPOTrainer(
        model=model, args=tiny_args(tmp_path, loss_type="alpha_dpo"), train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    for p, q in zip(trainer.model.parameters(), trainer.ref_model.parameters()):
        assert torch.equal(p, q)


def run_alpha_dpo(tmp_path, tokenizer, dataset, max_steps, resume=False, save_steps=None):
    args = tiny_args(
        tmp_path,
        loss_type="alpha_dpo",
        beta=2.5,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps or max_steps,
        per_device_train_batch_size=2,
    )
    trainer = RefPOTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer


def test_alpha_dpo_moments_survive_resume(tokenizer, dataset, tmp_path):
    straight = run_alpha_dpo(tmp_path / "straight", tokenizer, dataset, max_steps=6)
    run_alpha_dpo(tmp_path / "resumed", tokenizer, dataset, max_steps=6, save_steps=3)
    # Throw away the final state, then resume from the step-3 checkpoint with a fresh trainer.
    import shutil

    shutil.rmtree(tmp_path / "resumed" / "checkpoint-6")
    resumed = run_alpha_dpo(tmp_path / "resumed", tokenizer, dataset, max_steps=6, resume=True)
    ours, theirs = resumed.objectives[0].controller, straight.objectives[0].controller
    assert ours.mu != 0.0 and ours.sigma != 0.0
    assert ours.mu == pytest.approx(theirs.mu, rel=1e-5)
    assert ours.sigma == pytest.approx(theirs.sigma, rel=1e-5)


def test_alpha_dpo_single_pair_batches_are_finite(model, tokenizer, dataset, tmp_path):
    trainer = RefPOTrainer(
        model=model,
        args=tiny_args(tmp_path, loss_type="alpha_dpo", per_device_train_batch_size=1, max_steps=3),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(value) for value in losses)
    assert trainer.objectives[0].controller.sigma == 0.0  # std of one value is undefined: σ never updated


def test_evaluation_does_not_move_controllers(model, tokenizer, dataset, tmp_path):
    trainer = RefPOTrainer(
        model=model,
        args=tiny_args(tmp_path, loss_type=["alpha_dpo", "beta_dpo", "epsilon_dpo"], loss_weights=[1.0, 1.0, 1.0]),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    before = copy.deepcopy(trainer.controller_state())
    metrics = trainer.evaluate()
    assert trainer.controller_state() == before
    assert "eval_logps/accuracies" in metrics and "eval_alpha_dpo/margin_mean" in metrics


class RecordPredictions:
    def __init__(self):
        self.predictions = None

    def __call__(self, prediction):
        self.predictions = prediction
        return {"first_logit": float(prediction.predictions.reshape(-1)[0])}


EVAL_CONFIGS = {
    **ALL_PLUGIN_CONFIGS,
    "likelihood": dict(loss_type="likelihood", beta=0.5),
    "typo": dict(loss_type="typo"),
}


@pytest.mark.parametrize("name", sorted(EVAL_CONFIGS))
def test_compute_metrics_gets_trls_predictions(name, model, tokenizer, dataset, tmp_path):
    """compute_metrics sees what TRL's DPOTrainer gives it: the full logits of every row and the input ids; and the
    eval forms of TRL's logit / accuracy metrics are logged."""
    eval_dataset = dataset.select(range(4))
    if name == "typo":
        eval_dataset = eval_dataset.add_column("ref_completion", [" a b"] * 4)
    trl_record, our_record = RecordPredictions(), RecordPredictions()
    trl = TRLDPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=TRLDPOConfig(
            output_dir=str(tmp_path / "t"), bf16=False, use_cpu=True, report_to=[], per_device_eval_batch_size=4
        ),
        train_dataset=eval_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=trl_record,
    )
    ours = RefPOTrainer(
        model=copy.deepcopy(model),
        args=tiny_args(tmp_path / "r", **EVAL_CONFIGS[name]),
        train_dataset=eval_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=our_record,
    )
    trl_metrics = trl.evaluate()
    with pytest.warns(FutureWarning, match="return_outputs=True"):
        metrics = ours.evaluate()
    expected, got = trl_record.predictions, our_record.predictions
    rows, length = expected.label_ids.shape  # typo scores one extra row group (its reference completion)
    assert got.label_ids.shape[0] == rows * (3 if name == "typo" else 2) // 2
    assert (got.label_ids[:rows, :length] == expected.label_ids).all()
    torch.testing.assert_close(torch.as_tensor(got.predictions[:rows, :length]), torch.as_tensor(expected.predictions))
    assert metrics["eval_first_logit"] == pytest.approx(trl_metrics["eval_first_logit"])
    for key in ("eval_logits/chosen", "eval_logits/rejected", "eval_mean_token_accuracy", "eval_logps/chosen"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-5), key


def test_evaluating_a_new_dataset_after_training(model, tokenizer, dataset, tmp_path):
    """Without TRL's precompute flag borrowed at construction, a new dataset is evaluated after training: with a
    reference-free type, and with supplied reference columns (the new dataset brings its own)."""
    simpo = RefPOTrainer(
        model=copy.deepcopy(model),
        args=tiny_args(tmp_path / "s", loss_type="simpo", max_steps=1),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    simpo.train()
    assert math.isfinite(simpo.evaluate(toy_preference_dataset(4, seed=5))["eval_loss"])

    def with_columns(data):
        data = data.add_column("ref_chosen_logps", [-5.0] * len(data))
        return data.add_column("ref_rejected_logps", [-6.0] * len(data))

    supplied = RefPOTrainer(
        model=copy.deepcopy(model),
        args=tiny_args(tmp_path / "c", max_steps=1),
        train_dataset=with_columns(dataset),
        processing_class=tokenizer,
    )
    supplied.train()
    metrics = supplied.evaluate({"held_out": with_columns(toy_preference_dataset(4, seed=5))})
    assert math.isfinite(metrics["eval_held_out_loss"])
    rewards, logps = metrics["eval_rewards/chosen"], metrics["eval_logps/chosen"]  # TRL logs them as eval_*
    assert rewards == pytest.approx(supplied.args.beta * (logps + 5.0), rel=1e-5)  # the supplied -5.0 was read
    with pytest.raises(ValueError, match="lacks the reference log-prob columns"):
        supplied.evaluate(toy_preference_dataset(4, seed=5))
