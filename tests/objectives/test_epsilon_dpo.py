"""ε-DPO (docs/algorithms.md §1) against a deliberately naive full-logits implementation on tiny models."""

import copy
import shutil

import pytest
import torch
from conftest import tiny_args
from model_families import cohere_with_logit_scale, gemma2_with_softcap, moved
from oracles import naive_epsilon_dpo
from transformers import TrainerCallback

from trl_refpo import RefPOConfig, RefPOTrainer, losses
from trl_refpo.heads.completion import completion_logps
from trl_refpo.heads.perturbation import PerturbationScorer
from trl_refpo.reference.handle import scoring_handle
from trl_refpo.testing import tiny_bpe_tokenizer, tiny_llama, toy_preference_dataset


BETA = 0.1


def full_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits.float()


def sequence_logps(logits, batch):
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(1)


# ---------------------------------------------------------------------------------------------- helpers
def first_batch(trainer):
    trainer.model.train()
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def scorer_logratios(trainer, batch, epsilon):
    """Run the two forwards DPO runs, with the trainer's capture hooks, and score the mixtures."""
    num_pairs = batch["input_ids"].size(0) // 2
    scorer = trainer.perturbation
    with torch.no_grad():
        with scorer.capture("policy"):
            completion_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        with scorer.capture("reference"):
            trainer.reference_source(scoring_handle(trainer), batch, num_pairs)
    return scorer.logratios(batch, num_pairs, epsilon)


def epsilon_trainer(tmp_path, policy, reference, tokenizer, dataset, epsilon=0.5, **config):
    args = tiny_args(tmp_path, loss_type="epsilon_dpo", beta=BETA, epsilon=epsilon, **config)
    return RefPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_full_logits_implementation(seed, tokenizer, tmp_path):
    reference = tiny_llama(tokenizer, seed=seed)
    policy = moved(reference, seed)
    dataset = toy_preference_dataset(16, seed=seed)  # completions of different lengths: padded batches
    trainer = epsilon_trainer(
        tmp_path, copy.deepcopy(policy), copy.deepcopy(reference), tokenizer, dataset, per_device_train_batch_size=8
    )
    batch = first_batch(trainer)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"

    expected_steps, expected_beta, expected_loss = naive_epsilon_dpo(policy, reference, batch, BETA, 0.5)
    ratios = scorer_logratios(trainer, batch, 0.5)
    steps = losses.epsilon_dpo_steps(ratios["policy"], ratios["weaker_kl"], ratios["stronger_kl"])
    assert set(expected_steps.tolist()) - {0}, "a test where every step is 0 checks nothing"
    assert torch.equal(steps, expected_steps)
    torch.testing.assert_close(losses.epsilon_dpo_pair_beta(BETA, 0.5, steps), expected_beta, rtol=0, atol=1e-9)

    loss = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, expected_loss.mean(), rtol=0, atol=1e-6)
    expected_loss.mean().backward()  # and the gradient of the policy is the naive one
    naive_grads = [p.grad.clone() for p in policy.parameters()]
    loss.backward()
    for ours, theirs in zip(trainer.model.parameters(), naive_grads, strict=True):
        torch.testing.assert_close(ours.grad, theirs, rtol=1e-4, atol=1e-7)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    assert metrics["epsilon_dpo/beta_mean"] == pytest.approx(expected_beta.mean().item(), rel=1e-6)
    assert metrics["epsilon_dpo/p_steps"] == pytest.approx((expected_steps > 0).float().mean().item())
    assert metrics["epsilon_dpo/n_steps"] == pytest.approx((expected_steps < 0).float().mean().item())


@pytest.mark.parametrize("block_elements", [1, 7 * 40, 1 << 22])
def test_position_chunking_does_not_change_the_result(block_elements, tokenizer, dataset, tmp_path):
    reference = tiny_llama(tokenizer)
    trainer = epsilon_trainer(tmp_path, moved(reference, 0), reference, tokenizer, dataset)
    batch = first_batch(trainer)
    full = scorer_logratios(trainer, batch, 0.5)
    trainer.perturbation = PerturbationScorer(trainer.model, trainer.ref_model, block_elements=block_elements)
    chunked = scorer_logratios(trainer, batch, 0.5)
    for key in full:
        torch.testing.assert_close(chunked[key], full[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("build", [gemma2_with_softcap, cohere_with_logit_scale])
def test_logit_scale_and_softcap_follow_the_lm_head(build, tokenizer, tmp_path):
    """Gemma-2 softcaps its logits, Cohere scales them: the mixtures are formed from the transformed logits, as
    the model's own forward and TRL's fused head form them."""
    torch.manual_seed(0)
    reference = build(tokenizer)
    policy = moved(reference, 3, scale=0.2)
    trainer = epsilon_trainer(
        tmp_path,
        copy.deepcopy(policy),
        copy.deepcopy(reference),
        tokenizer,
        toy_preference_dataset(16),
        per_device_train_batch_size=8,
    )
    batch = first_batch(trainer)
    expected_steps, _, expected_loss = naive_epsilon_dpo(policy, reference, batch, BETA, 0.5)
    ratios = scorer_logratios(trainer, batch, 0.5)
    expected_policy = sequence_logps(full_logits(policy, batch), batch)
    torch.testing.assert_close(ratios["policy"], expected_policy[:8] - expected_policy[8:], rtol=0, atol=1e-4)
    assert torch.equal(
        losses.epsilon_dpo_steps(ratios["policy"], ratios["weaker_kl"], ratios["stronger_kl"]), expected_steps
    )
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected_loss.mean(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- β per optimizer step
class RecordBeta(TrainerCallback):
    def __init__(self, controller):
        self.controller, self.betas = controller, []

    def on_step_end(self, args, state, control, **kwargs):
        self.betas.append(self.controller.beta)


@pytest.mark.parametrize("accumulation", [1, 4])
def test_beta_follows_the_hand_computed_sequence(accumulation, tokenizer, tmp_path):
    reference = tiny_llama(tokenizer)
    trainer = epsilon_trainer(
        tmp_path,
        moved(reference, 0),
        reference,
        tokenizer,
        toy_preference_dataset(32),
        epsilon=0.2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_steps=3,
    )
    controller = trainer.objectives[0].controller
    micro_batch_steps = []
    accumulate = controller.accumulate
    controller.accumulate = lambda steps: (micro_batch_steps.append(steps.clone()), accumulate(steps))
    recorder = RecordBeta(controller)
    trainer.add_callback(recorder)  # after the controller callback: sees β once it has been updated
    trainer.train()

    assert len(micro_batch_steps) == 3 * accumulation
    beta, expected = BETA, []
    for step in range(3):
        decisions = torch.cat(micro_batch_steps[step * accumulation : (step + 1) * accumulation]).double()
        beta = beta / (1 + 0.2 * decisions.mean().item())
        expected.append(beta)
    assert recorder.betas == pytest.approx(expected, rel=1e-12)
    assert expected[-1] != BETA
    assert controller.step_count == 0  # nothing left over from the last optimizer step


def run_epsilon(tmp_path, tokenizer, max_steps, resume=False, save_steps=None):
    reference = tiny_llama(tokenizer)
    trainer = epsilon_trainer(
        tmp_path,
        moved(reference, 0),
        reference,
        tokenizer,
        toy_preference_dataset(32),
        epsilon=0.2,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps or max_steps,
        per_device_train_batch_size=2,
    )
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer


def test_resume_continues_the_same_beta_trajectory(tokenizer, tmp_path):
    straight = run_epsilon(tmp_path / "straight", tokenizer, max_steps=6)
    run_epsilon(tmp_path / "resumed", tokenizer, max_steps=6, save_steps=3)
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-6")
    resumed = run_epsilon(tmp_path / "resumed", tokenizer, max_steps=6, resume=True)

    def trajectory(trainer):
        return {entry["step"]: entry["epsilon_dpo/beta"] for entry in trainer.state.log_history if "loss" in entry}

    ours, theirs = trajectory(resumed), trajectory(straight)
    assert set(ours) == set(theirs) == set(range(1, 7))  # steps 1-3 come from the checkpoint's log history
    assert [ours[step] for step in (4, 5, 6)] == pytest.approx([theirs[step] for step in (4, 5, 6)], rel=1e-6)
    assert len({theirs[step] for step in (4, 5, 6)}) > 1  # β does move over the resumed steps
    assert resumed.objectives[0].controller.beta == pytest.approx(straight.objectives[0].controller.beta, rel=1e-6)
    assert straight.objectives[0].controller.beta != BETA


def test_peft_reference_is_the_adapter_disabled_base(tokenizer, dataset, tmp_path):
    from peft import LoraConfig

    base = tiny_llama(tokenizer)
    args = tiny_args(tmp_path, loss_type="epsilon_dpo", beta=BETA, epsilon=0.5, max_steps=3, learning_rate=5e-2)
    trainer = RefPOTrainer(
        model=copy.deepcopy(base),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
        ),
    )
    assert trainer.ref_model is None
    trainer.train()
    batch = first_batch(trainer)
    ratios = scorer_logratios(trainer, batch, 0.5)
    with torch.no_grad():
        policy_logits = full_logits(trainer.model, batch)
        reference_logits = full_logits(base, batch)  # the untouched base: what the disabled adapter must give
        weaker = sequence_logps(1.5 * policy_logits - 0.5 * reference_logits, batch)
    torch.testing.assert_close(ratios["weaker_kl"], weaker[:4] - weaker[4:], rtol=0, atol=1e-4)
    assert not torch.allclose(ratios["weaker_kl"], ratios["policy"], atol=1e-4)  # the adapter did move the policy


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=1.0), "epsilon"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(precompute_ref_log_probs=True), "precompute_ref_log_probs"),
        (dict(ref_prompt="none"), "ref_prompt"),
        (dict(ref_model_name_or_path="x", ref_tokenizer_name_or_path="y"), "ref_tokenizer_name_or_path"),
    ],
)
def test_config_errors(fields, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        RefPOConfig(output_dir=str(tmp_path), loss_type="epsilon_dpo", bf16=False, **fields)


def test_supplied_reference_columns_are_rejected(model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(8)
    dataset = dataset.add_column("ref_chosen_logps", [-1.0] * 8).add_column("ref_rejected_logps", [-2.0] * 8)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        RefPOTrainer(
            model=model,
            args=tiny_args(tmp_path, loss_type="epsilon_dpo"),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_cross_tokenizer_reference_is_rejected(model, tokenizer, tmp_path):
    ref_tokenizer = tiny_bpe_tokenizer()
    with pytest.raises(ValueError, match="re-tokenises"):
        RefPOTrainer(
            model=model,
            ref_model=tiny_llama(ref_tokenizer),
            ref_tokenizer=ref_tokenizer,
            args=tiny_args(tmp_path, loss_type="epsilon_dpo"),
            train_dataset=toy_preference_dataset(8),
            processing_class=tokenizer,
        )


def test_reference_with_another_vocabulary_size_is_rejected(model, tokenizer, tmp_path):
    bigger = tiny_llama(tokenizer, vocab_size=len(tokenizer) + 64)
    with pytest.raises(ValueError, match="vocabulary"):
        RefPOTrainer(
            model=model,
            ref_model=bigger,
            args=tiny_args(tmp_path, loss_type="epsilon_dpo"),
            train_dataset=toy_preference_dataset(8),
            processing_class=tokenizer,
        )
