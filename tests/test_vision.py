"""A tiny Llava (CLIP vision tower, projector, Llama): the images reach every forward of the pipeline."""

import copy
import math

import pytest
import torch
from conftest import tiny_args
from model_families import moved
from oracles import naive_epsilon_dpo

from trl_refpo import RefPOTrainer
from trl_refpo.testing import tiny_llava, toy_vision_preference_dataset


BETA = 0.1


def llava_trainer(tmp_path, policy, processor, ref_model=None, dataset=None, **config):
    return RefPOTrainer(
        model=policy,
        ref_model=ref_model,
        args=tiny_args(tmp_path, **config),
        train_dataset=dataset if dataset is not None else toy_vision_preference_dataset(8),
        processing_class=processor,
    )


def first_batch(trainer):
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def direct_logps(model, batch, with_images=True):
    """Completion log-probs from the model's own full logits."""
    images = {"pixel_values": batch["pixel_values"]} if with_images else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **images).logits[:, :-1]
    token_logps = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(1)


def test_policy_and_reference_log_probs_are_those_of_a_forward_with_the_images(tmp_path):
    reference, processor = tiny_llava()
    policy = moved(reference, 1)
    trainer = llava_trainer(
        tmp_path, copy.deepcopy(policy), processor, ref_model=copy.deepcopy(reference), loss_type="flex_dpo", beta=BETA
    )
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    with torch.no_grad():
        policy_logps, reference_logps = direct_logps(policy, batch), direct_logps(reference, batch)
        text_only = direct_logps(policy, batch, with_images=False)
    assert (policy_logps - text_only).abs().max() > 1e-3, "the images must matter for this test to check anything"
    num_pairs = batch["input_ids"].size(0) // 2
    for key, expected in [
        ("logps/chosen", policy_logps[:num_pairs]),
        ("logps/rejected", policy_logps[num_pairs:]),
        ("logps/ref_chosen", reference_logps[:num_pairs]),
        ("logps/ref_rejected", reference_logps[num_pairs:]),
    ]:
        assert metrics[key] == pytest.approx(expected.mean().item(), abs=1e-5), key


def test_epsilon_dpo_decisions_equal_the_full_logits_computation_with_images(tmp_path):
    reference, processor = tiny_llava()
    policy = moved(reference, 1, scale=0.2)
    trainer = llava_trainer(
        tmp_path,
        copy.deepcopy(policy),
        processor,
        ref_model=copy.deepcopy(reference),
        loss_type="epsilon_dpo",
        beta=BETA,
        epsilon=0.5,
        per_device_train_batch_size=8,
    )
    batch = first_batch(trainer)
    expected_steps, expected_beta, expected_loss = naive_epsilon_dpo(policy, reference, batch, BETA, 0.5)
    assert set(expected_steps.tolist()) - {0}, "a test where every step is 0 checks nothing"
    loss = trainer.compute_loss(trainer.model, batch)  # policy and reference forwards, then the perturbation pass
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    assert metrics["epsilon_dpo/p_steps"] == pytest.approx((expected_steps > 0).float().mean().item())
    assert metrics["epsilon_dpo/n_steps"] == pytest.approx((expected_steps < 0).float().mean().item())
    assert metrics["epsilon_dpo/beta_mean"] == pytest.approx(expected_beta.mean().item(), rel=1e-6)
    torch.testing.assert_close(loss, expected_loss.mean(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["simpo", "probability"])
def test_reference_free_types_train_on_images_and_the_vision_tower_learns(loss_type, tmp_path):
    model, processor = tiny_llava()
    # every vision-tower weight but the post-layernorm (Llava reads the last layer's hidden states before it)
    before = {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if "vision_tower" in name and "post_layernorm" not in name
    }
    dataset = toy_vision_preference_dataset(4)
    trainer = llava_trainer(
        tmp_path,
        model,
        processor,
        dataset=dataset,
        loss_type=loss_type,
        beta=2.5,
        max_steps=12,
        learning_rate=3e-3,
        eval_strategy="no",
    )
    assert trainer.ref_model is None and trainer.args.precompute_ref_log_probs is False
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(value) for value in logged)
    assert sum(logged[-3:]) / 3 < sum(logged[:3]) / 3 - 0.02, logged
    after = dict(trainer.model.named_parameters())
    changed = [name for name in before if not torch.equal(after[name], before[name])]
    assert len(changed) == len(before)
    metrics = trainer.evaluate(toy_vision_preference_dataset(4, seed=3))
    assert math.isfinite(metrics["eval_loss"]) and "eval_logps/accuracies" in metrics


def test_typo_supplied_columns_and_precompute_are_refused_on_vision_data(tmp_path):
    model, processor = tiny_llava()
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True` is not supported for vision datasets"):
        llava_trainer(tmp_path, model, processor, loss_type="flex_dpo", precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="extra completion columns .* do not support vision datasets"):
        llava_trainer(
            tmp_path,
            model,
            processor,
            loss_type="typo",
            dataset=toy_vision_preference_dataset(4).add_column("ref_completion", [" a"] * 4),
        )
    columns = toy_vision_preference_dataset(4)
    columns = columns.add_column("ref_chosen_logps", [-1.0] * 4).add_column("ref_rejected_logps", [-2.0] * 4)
    with pytest.raises(ValueError, match="Supplied reference log-prob columns .* not supported with vision datasets"):
        llava_trainer(tmp_path, model, processor, loss_type="flex_dpo", dataset=columns)


def test_token_level_analysis_refuses_vision_data():
    from trl_refpo.research.token_analysis import token_level_analysis

    model, processor = tiny_llava()
    with pytest.raises(ValueError, match="does not support vision datasets"):
        token_level_analysis(model, model, toy_vision_preference_dataset(4), processor)


def test_a_max_length_that_cuts_image_tokens_names_the_field(tmp_path):
    model, processor = tiny_llava()
    trainer = llava_trainer(tmp_path, model, processor, loss_type="simpo", max_length=8)
    with pytest.raises(ValueError, match=r"max_length \(8\) cuts image placeholder tokens"):
        trainer.compute_loss(trainer.model, first_batch(trainer))
