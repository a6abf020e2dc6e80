"""LoRA training through the trainer's ``peft_config`` for one loss type of each family.

With a ``peft_config`` no reference model is built: the reference is the base model with the adapter
disabled (TRL's convention), for TRL's own losses, trl-refpo's pipeline, the prior reference
(``likelihood``), ε-DPO's perturbation and TYPO's reference samples. The adapter is initialised non-zero
(``init_lora_weights=False``) so that the policy differs from that reference from the first step on: a
reference that is silently the adapted policy fails these tests.
"""

import copy

import pytest
import torch
from conftest import tiny_args
from peft import LoraConfig

from trl_refpo import RefPOTrainer, available_loss_types
from trl_refpo.testing import tiny_llama, tiny_tokenizer, toy_preference_dataset


NUM_PAIRS = 8  # one batch holds the whole dataset, so every logged step averages the same pairs
TYPO_GENERATION = dict(
    typo_generate_ref_completions=True,
    typo_generation_max_new_tokens=5,
    typo_generation_top_k=1,
    typo_generation_batch_size=1,
    typo_generation_repetition_penalty=1.0,  # greedy, unpadded: as `greedy_completions`
)
LOSS_CONFIGS = {
    "sigmoid": dict(beta=0.5),  # TRL's own loss code
    "flex_dpo": dict(beta=0.5, beta_chosen=0.5, beta_rejected=0.2),
    "alpha_dpo": dict(beta=2.5, alpha=0.2, gamma_beta_ratio=0.3),
    "simpo": dict(beta=2.5, gamma_beta_ratio=0.3),  # reference-free
    "beta_dpo": dict(beta=0.5),
    "likelihood": dict(beta=0.5),  # the prior p_ref(y): the completion scored without its prompt
    "typo": dict(typo_lambda=0.5, **TYPO_GENERATION),  # reference samples
    "epsilon_dpo": dict(beta=0.5, epsilon=0.5),  # β steps decided with the reference's logits (large ε: clear steps)
}
REFERENCE_FREE = {"simpo", "typo"}


def lora_config():
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)


@torch.no_grad()
def sequence_logps(model, prompt_ids, completion_ids) -> float:
    """log p(completion | prompt) with a plain forward and log-softmax: nothing of the trainer's code."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    token_logps = logprobs.gather(-1, targets[:, None])[:, 0]
    return token_logps[len(prompt_ids) - 1 :].sum().item()


@torch.no_grad()
def epsilon_step_fractions(policy, base, dataset, epsilon) -> tuple[float, float]:
    """ε-DPO's step fractions (β lowered, β raised) from full logits: s, s⁻, s⁺ with the mixtures
    ``h_θ ± ε (h_θ − h_ref)`` of the policy's and the base's logits (docs/algorithms.md §1), computed naively."""
    steps = []
    for row in dataset:
        ratios = torch.zeros(3)
        for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
            ids = torch.tensor([list(row["prompt_ids"]) + list(row[f"{side}_ids"])])
            h_policy, h_base = policy(input_ids=ids).logits[0, :-1].float(), base(input_ids=ids).logits[0, :-1].float()
            mixtures = [h_policy, h_policy + epsilon * (h_policy - h_base), h_policy - epsilon * (h_policy - h_base)]
            targets = ids[0, 1:, None]
            start = len(row["prompt_ids"]) - 1
            for index, logits in enumerate(mixtures):
                ratios[index] += sign * logits.log_softmax(-1).gather(-1, targets)[start:].sum()
        s, weaker, stronger = ratios.tolist()
        steps.append(1 if weaker > s > stronger else -1 if stronger > s > weaker else 0)
    return sum(step > 0 for step in steps) / len(steps), sum(step < 0 for step in steps) / len(steps)


def base_reference_logps(base, dataset, prior: bool) -> tuple[float, float]:
    """Mean chosen / rejected log-probs of the base model on the trainer's tokenised rows."""
    prefix = "ref_" if prior else ""  # the prior scores the reference-side rows: BOS, then the completion
    means = []
    for side in ("chosen", "rejected"):
        values = [sequence_logps(base, row[f"{prefix}prompt_ids"], row[f"{prefix}{side}_ids"]) for row in dataset]
        means.append(sum(values) / len(values))
    return tuple(means)


@torch.no_grad()
def greedy_completions(model, prompts, max_new_tokens, eos_token_id) -> list[list[int]]:
    completions = []
    for prompt in prompts:
        output = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=eos_token_id,
            eos_token_id=eos_token_id,
        )[0, len(prompt) :].tolist()
        if eos_token_id in output:
            output = output[: output.index(eos_token_id) + 1]
        completions.append(output)
    return completions


@pytest.mark.parametrize("loss_type", list(LOSS_CONFIGS))
def test_lora_trains_against_the_adapter_disabled_base(loss_type, tmp_path):
    if loss_type not in available_loss_types():
        pytest.skip(f"loss_type {loss_type!r} is not available in this version of trl_refpo")
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    base = copy.deepcopy(model).eval()  # get_peft_model injects the adapter into `model` in place
    config = dict(LOSS_CONFIGS[loss_type])
    if loss_type == "typo":
        config["typo_generation_cache_dir"] = str(tmp_path / "completions")
    args = tiny_args(
        tmp_path / "run",
        loss_type=loss_type,
        per_device_train_batch_size=NUM_PAIRS,
        max_steps=5,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        **config,
    )
    trainer = RefPOTrainer(
        model=model,
        args=args,
        train_dataset=toy_preference_dataset(NUM_PAIRS),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert trainer.ref_model is None
    policy = trainer.model
    assert sum(name.count("lora_") > 0 for name, _ in policy.named_parameters()) > 0

    if loss_type == "typo":  # sampled (greedily) from the base, not from the initial adapted policy
        dataset = trainer.train_dataset
        prompts = dataset["prompt_ids"]
        eos = tokenizer.eos_token_id
        from_base = greedy_completions(base, prompts, 5, eos)
        assert [list(ids) for ids in dataset["ref_completion_ids"]] == from_base
        with torch.no_grad():
            assert greedy_completions(policy, prompts, 5, eos) != from_base  # the test can tell them apart

    if loss_type == "epsilon_dpo":  # the perturbation mixes the policy's logits with the base's, at the first step
        expected_steps = epsilon_step_fractions(policy, base, trainer.train_dataset, args.epsilon)
        assert sum(expected_steps) > 0  # with the adapted policy as its own reference no pair would step

    before = {name: parameter.detach().clone() for name, parameter in policy.named_parameters()}
    trainer.train()
    for name, parameter in policy.named_parameters():
        if "lora_" in name:
            assert not torch.equal(parameter, before[name]), f"LoRA parameter {name} did not change"
        else:
            assert torch.equal(parameter, before[name]), f"base parameter {name} changed"

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in logs]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]

    if loss_type in REFERENCE_FREE:
        assert not any(key.startswith("logps/ref_") for entry in logs for key in entry)
        return
    ref_chosen, ref_rejected = base_reference_logps(base, trainer.train_dataset, prior=loss_type == "likelihood")
    for step, entry in enumerate(logs, start=1):
        if loss_type == "sigmoid":  # TRL logs rewards = β (policy - reference) instead of the reference itself
            logged_chosen = entry["logps/chosen"] - entry["rewards/chosen"] / args.beta
            logged_rejected = entry["logps/rejected"] - entry["rewards/rejected"] / args.beta
            tolerance = 1e-3
        else:
            logged_chosen, logged_rejected = entry["logps/ref_chosen"], entry["logps/ref_rejected"]
            tolerance = 1e-4
        assert logged_chosen == pytest.approx(ref_chosen, abs=tolerance), f"step {step}"
        assert logged_rejected == pytest.approx(ref_rejected, abs=tolerance), f"step {step}"
    if loss_type == "epsilon_dpo":
        assert (logs[0]["epsilon_dpo/p_steps"], logs[0]["epsilon_dpo/n_steps"]) == pytest.approx(expected_steps)
    # The reference is not the (adapted, trained) policy.
    assert abs(logs[0]["logps/chosen"] - ref_chosen) > 10 * tolerance
    assert abs(logs[-1]["logps/chosen"] - logs[0]["logps/chosen"]) > 10 * tolerance
