"""Diagnostics: token-level analysis on a hand-built case, its evaluation callback, 3D-properties gradient metrics,
and the policy ranking accuracy on train and eval."""

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_args
from datasets import Dataset

from trl_refpo import RefPOTrainer, losses
from trl_refpo.diagnostics import completion_logp_gradients, gradient_magnitude_metrics, pair_logp_gradients
from trl_refpo.research.token_analysis import TokenLevelAnalysisCallback, token_level_analysis
from trl_refpo.testing import toy_preference_dataset


PAD, A, B_, EOS, C, D = range(6)
LOG2, LOG6, LOG12 = math.log(2), math.log(6), math.log(12)


class BigramLM(torch.nn.Module):
    """log π(next | current) = table[current] — a model whose every log-prob is known by hand."""

    def __init__(self, log_probs):
        super().__init__()
        self.table = torch.nn.Parameter(log_probs)
        self.config = SimpleNamespace(pad_token_id=PAD, vocab_size=log_probs.size(0))
        self.config.get_text_config = lambda: self.config

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


def uniform_table():
    return torch.full((6, 6), -LOG6)


@pytest.fixture
def bigram_case():
    reference = BigramLM(uniform_table())
    table = uniform_table()
    table[A] = torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 12, 1 / 6, 1 / 4]).log()  # after 'a': EOS halved, 'd' × 1.5
    policy = BigramLM(table)
    dataset = Dataset.from_list(
        [
            {"prompt_ids": [A], "chosen_ids": [B_, EOS], "rejected_ids": [A, EOS]},
            {"prompt_ids": [B_], "chosen_ids": [A, D], "rejected_ids": [C, A, EOS]},
        ]
    )
    return policy, reference, dataset


@pytest.mark.parametrize("batch_size", [1, 2])  # 2: the pairs are padded to different lengths
def test_token_analysis_hand_computed(bigram_case, batch_size, tmp_path):
    policy, reference, dataset = bigram_case
    figure = str(tmp_path / "tokens.png")
    result = token_level_analysis(
        policy, reference, dataset, min_count=2, top_k=5, batch_size=batch_size, eos_token_id=EOS, figure_path=figure
    )
    # Completion tokens (previous token → token): chosen b|a, eos|b, a|b, d|a; rejected a|a, eos|a, c|b, a|c, eos|a.
    rows = {row.token_id: row for row in result.table.itertuples()}
    assert {token: rows[token].count for token in rows} == {A: 3, B_: 1, EOS: 3, C: 1, D: 1}
    assert rows[EOS].mean_logp_diff == pytest.approx(-2 * LOG2 / 3)  # 0, −log 2, −log 2
    assert rows[D].mean_logp_diff == pytest.approx(math.log(1.5))
    for token in (A, B_, C):
        assert rows[token].mean_logp_diff == pytest.approx(0.0, abs=1e-6)
        assert rows[token].mean_ref_logp == pytest.approx(-LOG6)
    order = result.table.token_id.tolist()  # most down-weighted first
    assert order[0] == EOS and order[-1] == D and set(order[1:4]) == {A, B_, C}
    assert result.top_downweighted.token_id.tolist() == [EOS, A]  # count ≥ 2 only
    eos = result.eos
    assert (eos["count_chosen"], eos["count_rejected"]) == (1, 2)
    assert eos["policy_chosen_mean_logp"] == pytest.approx(-LOG6)
    assert eos["policy_rejected_mean_logp"] == pytest.approx(-LOG12)
    assert eos["policy_chosen_minus_rejected"] == pytest.approx(LOG2)
    assert eos["policy_mean_logp"] == pytest.approx((-LOG6 - 2 * LOG12) / 3)
    assert eos["ref_chosen_minus_rejected"] == pytest.approx(0.0)
    assert eos["mean_logp_diff"] == pytest.approx(-2 * LOG2 / 3)
    with open(figure, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_token_analysis_of_identical_models_is_zero_on_raw_text(model, tokenizer):
    dataset = toy_preference_dataset(6)
    result = token_level_analysis(model, copy.deepcopy(model), dataset, tokenizer, min_count=1)
    assert result.table.mean_logp_diff.abs().max() < 1e-5
    eos_row = result.table[result.table.token_id == tokenizer.eos_token_id].iloc[0]
    assert eos_row["count"] == 12 and eos_row["token"] == "<eos>"  # TRL appended EOS to every completion
    expected_tokens = sum(
        len(tokenizer(row["chosen"] + " <eos>")["input_ids"]) + len(tokenizer(row["rejected"] + " <eos>")["input_ids"])
        for row in dataset
    )
    assert result.table["count"].sum() == expected_tokens


def test_callback_runs_at_evaluation_and_writes_files(model, tokenizer, tmp_path):
    callback = TokenLevelAnalysisCallback(min_count=1, max_examples=4)
    trainer = RefPOTrainer(
        model=model,
        args=tiny_args(
            tmp_path, loss_type="sigmoid", max_steps=2, learning_rate=5e-2, eval_strategy="steps", eval_steps=2
        ),
        train_dataset=toy_preference_dataset(8),
        eval_dataset=toy_preference_dataset(4, seed=2),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    before = trainer.evaluate()
    assert before["eval_token/eos_logp_diff"] == pytest.approx(0.0, abs=1e-6)  # policy = its initial copy
    trainer.train()
    step, result = callback.results[-1]
    assert step == 2 and result.num_examples == 4
    assert result.table.mean_logp_diff.abs().max() > 1e-3  # training moved the policy away from the snapshot
    logged = next(entry for entry in trainer.state.log_history if "eval_loss" in entry and entry.get("step") == 2)
    assert logged  # the evaluation at step 2 ran
    for suffix in ("png", "csv"):
        assert os.path.getsize(tmp_path / "token_analysis" / f"step-2.{suffix}") > 0


def test_pair_logp_gradients_dpo_and_flex(tmp_path):
    torch.manual_seed(0)
    pc, pr, rc, rr = [(-10 * torch.rand(5, dtype=torch.float64)).requires_grad_(True) for _ in range(4)]
    loss = losses.sigmoid_dpo_loss(pc, pr, rc, rr, 0.1).mean()
    chosen, rejected = pair_logp_gradients(loss, pc, pr)
    weight = 0.1 * torch.sigmoid(-0.1 * ((pc - rc) - (pr - rr))).detach()
    torch.testing.assert_close(chosen, -weight)
    torch.testing.assert_close(rejected, weight)
    loss = losses.flex_dpo_loss(pc, pr, rc, rr, 0.1, 0.02).mean()
    metrics = gradient_magnitude_metrics(*pair_logp_gradients(loss, pc, pr))
    assert metrics["grad/ratio"] == pytest.approx(0.2)  # β⁻/β⁺ on every pair


def test_completion_logp_gradients_include_the_sft_term():
    torch.manual_seed(0)
    num_pairs, length = 3, 6
    mask = torch.zeros(2 * num_pairs, length)
    for row, n in enumerate([2, 4, 3, 5, 1, 6]):
        mask[row, :n] = 1
    per_token = (-torch.rand(2 * num_pairs, length, dtype=torch.float64) * mask).requires_grad_(True)
    sequence = per_token.sum(1)
    chosen, rejected = sequence[:num_pairs], sequence[num_pairs:]
    zeros = torch.zeros(num_pairs, dtype=torch.float64)
    gamma = 0.5
    loss = losses.sigmoid_dpo_loss(chosen, rejected, zeros, zeros, 0.1).mean() + gamma * losses.sft_loss(
        per_token[:num_pairs], mask[:num_pairs]
    )
    grad_chosen, grad_rejected = completion_logp_gradients(loss, per_token, mask, num_pairs)
    weight = 0.1 * torch.sigmoid(-0.1 * (chosen - rejected)).detach()
    chosen_tokens = mask[:num_pairs].sum()
    torch.testing.assert_close(grad_chosen, -weight - gamma * num_pairs / chosen_tokens)
    torch.testing.assert_close(grad_rejected, weight)


def test_trainer_logs_gradient_magnitudes(model, tokenizer, tmp_path):
    """First batch, policy = reference: every DPO logit is 0, so |∂ℓ/∂lp(y_w)| = β⁺/2 and |∂ℓ/∂lp(y_l)| = β⁻/2;
    the sft term adds γ·B/N_chosen-tokens to the chosen side."""
    trainer = RefPOTrainer(
        model=model,
        args=tiny_args(
            tmp_path, loss_type=["flex_dpo", "sft"], loss_weights=[1.0, 0.3], beta_chosen=0.1, beta_rejected=0.05
        ),
        train_dataset=toy_preference_dataset(8),
        processing_class=tokenizer,
    )
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    chosen_tokens = batch["completion_mask"][:4, 1:].sum().item()
    assert metrics["grad/chosen_abs"] == pytest.approx(0.05 + 0.3 * 4 / chosen_tokens, rel=1e-5)
    assert metrics["grad/rejected_abs"] == pytest.approx(0.025, rel=1e-5)
    assert metrics["grad/ratio"] == pytest.approx(0.025 / (0.05 + 0.3 * 4 / chosen_tokens), rel=1e-5)


def policy_ranking_accuracy(model, dataset, collator):
    batch = collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    tokens = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    chosen, rejected = (tokens * batch["completion_mask"][:, 1:]).sum(1).chunk(2)
    return (chosen > rejected).float().mean().item()


@pytest.mark.parametrize("loss_type", ["simpo", "sigmoid"])  # the pipeline and TRL's own loss code
def test_policy_ranking_accuracy_on_eval(loss_type, model, tokenizer, tmp_path):
    trained = copy.deepcopy(model)
    with torch.no_grad():  # move the policy so that the accuracy is neither 0 nor 1
        for parameter in trained.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    trainer = RefPOTrainer(
        model=trained,
        ref_model=copy.deepcopy(model) if loss_type == "sigmoid" else None,
        args=tiny_args(tmp_path, loss_type=loss_type),
        train_dataset=toy_preference_dataset(8),
        eval_dataset=toy_preference_dataset(16, seed=4),
        processing_class=tokenizer,
    )
    expected = policy_ranking_accuracy(trainer.model, trainer.eval_dataset, trainer.data_collator)
    assert 0 < expected < 1
    assert trainer.evaluate()["eval_logps/accuracies"] == pytest.approx(expected)
