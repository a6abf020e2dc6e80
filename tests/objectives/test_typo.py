"""TYPO: the loss against its formula, the reference-completion column, generation with its disk cache, training."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args

from trl_refpo import RefPOTrainer, losses
from trl_refpo.objectives.base import PairBatch, StepContext
from trl_refpo.objectives.registry import OBJECTIVES
from trl_refpo.testing import tiny_llama, toy_preference_dataset


B = 7


def test_typo_loss_matches_formula_and_gradients():
    torch.manual_seed(0)
    chosen, rejected, sample = [(-20 * torch.rand(B, dtype=torch.float64)).requires_grad_(True) for _ in range(3)]
    lam = 0.05
    loss = losses.typo_loss(chosen, rejected, sample, lam)
    expected = torch.log(1 + rejected.exp() / chosen.exp()) - lam * sample  # Eq. 16 + λ·Eq. 17
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=0)
    grads = torch.autograd.grad(loss.sum(), (chosen, rejected, sample))
    p_rejected = (rejected.exp() / (chosen.exp() + rejected.exp())).detach()
    torch.testing.assert_close(grads[0], -p_rejected, atol=1e-10, rtol=0)
    torch.testing.assert_close(grads[1], p_rejected, atol=1e-10, rtol=0)
    torch.testing.assert_close(grads[2], torch.full_like(sample, -lam), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda c, r, s: losses.typo_loss(c, r, s, 0.3), (chosen, rejected, sample))


def test_typo_objective_on_a_pair_batch(tmp_path):
    args = tiny_args(tmp_path, loss_type="typo", typo_lambda=0.3)
    objective = OBJECTIVES["typo"](args)
    assert not objective.needs_reference and objective.extra_completion_columns() == ("ref_completion_ids",)
    torch.manual_seed(1)
    chosen, rejected, sample = (-10 * torch.rand(B) for _ in range(3))
    pairs = PairBatch(
        chosen,
        rejected,
        torch.ones(B),
        torch.ones(B),
        torch.zeros(B, 3),
        torch.ones(B, 3),
        extra_logps={"ref_completion_ids": sample},
    )
    out = objective(pairs, StepContext(training=True, gather=lambda t: t))
    torch.testing.assert_close(out.losses, F.softplus(rejected - chosen) - 0.3 * sample)
    torch.testing.assert_close(out.chosen_rewards, chosen)  # BT on the policy log-probs: lp_θ is the reward
    assert out.metrics["typo/ref_completion_logps"] == pytest.approx(sample.mean().item())


def build(model, tokenizer, dataset, tmp_path, eval_dataset=None, ref_model=None, **config):
    config.setdefault("loss_type", "typo")
    return RefPOTrainer(
        model=model,
        ref_model=ref_model,
        args=tiny_args(tmp_path, **config),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def test_plain_column_is_tokenised_like_chosen(model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(8)
    other = " a b c"
    dataset = dataset.add_column("ref_completion", [row["chosen"] for row in dataset][:-1] + [other])
    prepared = build(model, tokenizer, dataset, tmp_path).train_dataset
    for row in prepared.select(range(7)):
        assert row["ref_completion_ids"] == row["chosen_ids"]  # TRL's chosen ids, EOS included
        assert row["ref_completion_ids"][-1] == tokenizer.eos_token_id
    last = prepared[7]
    full = tokenizer(last["prompt"] + other + tokenizer.eos_token)["input_ids"]
    assert last["prompt_ids"] + last["ref_completion_ids"] == full


def test_conversational_column_is_tokenised_like_chosen(model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(6, conversational=True)
    dataset = dataset.add_column("ref_completion", [row["chosen"] for row in dataset])
    prepared = build(model, tokenizer, dataset, tmp_path).train_dataset
    for row in prepared:
        assert row["ref_completion_ids"] == row["chosen_ids"]
        expected = tokenizer.apply_chat_template(
            row["prompt"] + row["ref_completion"], tokenize=True, return_dict=True
        )
        assert row["prompt_ids"] + row["ref_completion_ids"] == list(expected["input_ids"])


def test_custom_column_name(model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(4).add_column("sample", [" a b"] * 4)
    trainer = build(model, tokenizer, dataset, tmp_path, typo_ref_completion_column="sample")
    assert trainer.extra_completion_columns == ("sample_ids",)
    assert all(len(ids) == 3 for ids in trainer.train_dataset["sample_ids"])


def test_missing_column_is_an_error_before_training(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"no column 'ref_completion'.*typo_generate_ref_completions=True"):
        build(model, tokenizer, toy_preference_dataset(4), tmp_path)


def test_column_in_the_wrong_format_is_an_error(model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(4).add_column("ref_completion", [[{"role": "assistant", "content": "a"}]] * 4)
    with pytest.raises(ValueError, match="'ref_completion'.*must be a string"):
        build(model, tokenizer, dataset, tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(typo_lambda=-0.1), "typo_lambda"),
        (dict(typo_ref_completion_column="chosen"), "typo_ref_completion_column"),
        (dict(typo_generation_top_p=0.0), "typo_generation_top_p"),
        (dict(typo_generation_temperature=0.0), "typo_generation_temperature"),
        (dict(typo_generation_max_new_tokens=0), "typo_generation_max_new_tokens"),
        (dict(typo_generation_top_k=-1), "typo_generation_top_k"),
        (dict(typo_generation_batch_size=0), "typo_generation_batch_size"),
    ],
)
def test_bad_typo_config_raises(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        tiny_args(tmp_path, loss_type="typo", **overrides)


def sequence_logps(model, input_ids, attention_mask, completion_mask):
    """Σ completion-token log-probs from plain logits (independent of the fused LM head)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token = logits.log_softmax(-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * completion_mask[:, 1:]).sum(1)


def test_first_batch_loss_is_the_formula_on_one_forward(model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(8)
    dataset = dataset.add_column(
        "ref_completion", [" " + " ".join(reversed(row["chosen"].split())) for row in dataset]
    )
    trainer = build(model, tokenizer, dataset, tmp_path, typo_lambda=0.2)
    assert trainer.ref_model is None  # no reference model is kept
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["input_ids"].size(0) == 3 * 4  # [chosen; rejected; reference completion] rows, one forward
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        lp = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    chosen, rejected, sample = lp.chunk(3)
    expected = (F.softplus(rejected - chosen) - 0.2 * sample).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert trainer._metrics["train"]["typo/ref_completion_logps"][-1] == pytest.approx(sample.mean().item(), abs=1e-4)


def test_training_raises_the_reference_completion_likelihood(model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(8)
    dataset = dataset.add_column("ref_completion", [" a b c d"] * 8)
    trainer = build(model, tokenizer, dataset, tmp_path, typo_lambda=1.0, max_steps=6, learning_rate=1e-2)
    collate = trainer.data_collator

    def mean_sample_logp():
        batch = collate([trainer.train_dataset[i] for i in range(8)])
        with torch.no_grad():
            return (
                sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
                .chunk(3)[2]
                .mean()
                .item()
            )

    before = mean_sample_logp()
    trainer.train()
    assert mean_sample_logp() > before + 1.0
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(key in logged[0] for key in ("typo/ref_completion_logps", "grad/chosen_abs", "logps/accuracies"))


GENERATION = dict(
    typo_generate_ref_completions=True,
    typo_generation_max_new_tokens=5,
    typo_generation_top_k=1,
    typo_generation_batch_size=3,
)


def greedy(model, prompt_ids, tokenizer, max_new_tokens=5, repetition_penalty=1.1):
    out = model.generate(
        input_ids=torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )[0, len(prompt_ids) :].tolist()
    return out[: out.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in out else out


def test_generated_completions_come_from_the_reference_and_are_cached(tokenizer, tmp_path):
    dataset, eval_dataset = toy_preference_dataset(8), toy_preference_dataset(4, seed=5)
    cache = str(tmp_path / "cache")
    first = build(
        tiny_llama(tokenizer, seed=0),
        tokenizer,
        dataset,
        tmp_path / "a",
        eval_dataset=eval_dataset,
        typo_generation_cache_dir=cache,
        **GENERATION,
    )
    assert first.objectives[0].completions.cache_hits == {"train": False, "eval": False}
    reference = tiny_llama(tokenizer, seed=0)
    for row in first.train_dataset:
        # top_k = 1 makes sampling deterministic: each completion is the reference's greedy continuation
        # (left-padded batches of 3 give what one unpadded prompt gives).
        assert row["ref_completion_ids"] == greedy(reference, row["prompt_ids"], tokenizer)
    assert len(first.eval_dataset["ref_completion_ids"]) == 4

    again = tiny_llama(tokenizer, seed=0)
    again.generate = lambda *a, **k: pytest.fail("a cache hit must not generate")
    second = build(again, tokenizer, dataset, tmp_path / "b", typo_generation_cache_dir=cache, **GENERATION)
    assert second.objectives[0].completions.cache_hits == {"train": True}
    assert second.train_dataset["ref_completion_ids"] == first.train_dataset["ref_completion_ids"]
    second.train()
    assert second.state.global_step == 4

    changed = build(
        tiny_llama(tokenizer, seed=0),
        tokenizer,
        dataset,
        tmp_path / "c",
        typo_generation_cache_dir=cache,
        **{**GENERATION, "typo_generation_top_p": 0.5},
    )
    assert changed.objectives[0].completions.cache_hits == {
        "train": False
    }  # the sampling settings are part of the key


def test_generation_samples_from_the_given_ref_model(tokenizer, tmp_path):
    dataset = toy_preference_dataset(6)
    policy, reference = tiny_llama(tokenizer, seed=1), tiny_llama(tokenizer, seed=0)
    trainer = build(
        policy,
        tokenizer,
        dataset,
        tmp_path,
        ref_model=copy.deepcopy(reference),
        typo_generation_cache_dir=str(tmp_path / "cache"),
        **GENERATION,
    )
    assert trainer.ref_model is None  # used once for sampling, not kept
    samples = trainer.train_dataset["ref_completion_ids"]
    prompts = trainer.train_dataset["prompt_ids"]
    assert samples == [greedy(reference, prompt, tokenizer) for prompt in prompts]
    assert samples != [greedy(policy, prompt, tokenizer) for prompt in prompts]


def test_evaluate_on_a_new_dataset_without_the_column_raises(model, tokenizer, tmp_path):
    trainer = build(
        model,
        tokenizer,
        toy_preference_dataset(4),
        tmp_path,
        typo_generation_cache_dir=str(tmp_path / "cache"),
        **GENERATION,
    )
    with pytest.raises(ValueError, match="only be generated while the trainer is built"):
        trainer.evaluate(eval_dataset=toy_preference_dataset(4, seed=9))
    with_column = toy_preference_dataset(4, seed=9).add_column("ref_completion", [" a"] * 4)
    assert "eval_typo/ref_completion_logps" in trainer.evaluate(eval_dataset=with_column)


def test_typo_composes_with_sft(model, tokenizer, tmp_path):
    dataset = toy_preference_dataset(8).add_column("ref_completion", [" a b"] * 8)
    trainer = build(model, tokenizer, dataset, tmp_path, loss_type=["typo", "sft"], loss_weights=[1.0, 0.5])
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        lp = sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    chosen, rejected, sample = lp.chunk(3)
    chosen_tokens = batch["completion_mask"][:4, 1:].sum()
    expected = (F.softplus(rejected - chosen) - 0.05 * sample).mean() + 0.5 * (-chosen.sum() / chosen_tokens)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
