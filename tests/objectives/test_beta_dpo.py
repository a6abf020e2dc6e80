"""β-DPO against a transcription of its authors' arithmetic (junkangwu/beta-DPO, ``trainers.py``), and the running
moments α-DPO shares with it: update per micro-batch or per optimizer step, bias correction, warnings."""

import logging
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_args

from trl_refpo import RefPOTrainer, losses
from trl_refpo.objectives.base import PairBatch, StepContext
from trl_refpo.objectives.controllers import BetaDPOController
from trl_refpo.objectives.loss_types import BetaDPO
from trl_refpo.objectives.registry import build_objectives
from trl_refpo.testing import tiny_llama


SEED, BETA, A, RHO = 3, 0.1, 0.6, 0.2


class AuthorsBetaDPO:
    """``update_and_sync_tensor_mean`` + ``preference_loss`` (mode beta_DPO) + the masked loss of
    ``get_batch_metrics``, for every rank of one micro-batch; float32 tensors as in their code. Their
    ``torch.multinomial`` draws from the global generator: here from the generator our trainer seeds."""

    def __init__(self):
        self.gap_mean = torch.zeros(1)
        self.gap_std = torch.zeros(1)

    def step(self, rank_logits: list[torch.Tensor], generator, train=True):
        gap = torch.cat([logits.detach() for logits in rank_logits])  # all_gather_if_needed
        if train:
            self.gap_mean.mul_(0.9).add_(gap.mean(), alpha=0.1)
            self.gap_std.mul_(0.9).add_(gap.std(), alpha=0.1)
        weight_sample = torch.exp(-0.5 * ((gap - self.gap_mean) / self.gap_std).pow(2))
        sample_num = int(weight_sample.numel() * (1 - RHO))
        sample_index = torch.multinomial(weight_sample, sample_num, replacement=False, generator=generator)
        global_mask = torch.zeros_like(weight_sample)
        global_mask[sample_index] = 1
        beta_used = (BETA * (1 + A * (torch.mean(gap[sample_index]) - self.gap_mean))).clamp(min=1e-3)
        rank_losses = []
        for rank, logits in enumerate(rank_logits):
            per_pair = -F.logsigmoid(beta_used.detach() * logits)
            size = logits.numel()
            local_mask = global_mask[rank * size : (rank + 1) * size]
            count = local_mask.sum()
            rank_losses.append((per_pair * local_mask).sum() / (count if count > 0 else 1))
        return global_mask.bool(), float(beta_used), rank_losses


def random_pairs(generator, size, scale=1.0):
    """PairBatch with trainable policy log-probs (reference 0, so Δ = chosen − rejected)."""
    chosen = (torch.randn(size, generator=generator) * scale).requires_grad_()
    rejected = (torch.randn(size, generator=generator) * scale).requires_grad_()
    zeros = torch.zeros(size)
    pairs = PairBatch(chosen, rejected, zeros + 5, zeros + 5, zeros[:, None], zeros[:, None], zeros, zeros)
    return pairs


def two_process_contexts(rank_pairs, training=True):
    """One StepContext per simulated process; ``gather`` concatenates both processes' DPO logits in rank order."""
    logits = [losses.dpo_logits(p.chosen_logps, p.rejected_logps, *p.reference()).detach() for p in rank_pairs]
    return [
        StepContext(
            training=training,
            gather=lambda t, r=rank: torch.cat([t if i == r else logits[i] for i in range(len(logits))]),
            process_index=rank,
        )
        for rank in range(len(rank_pairs))
    ]


def beta_dpo_args(tmp_path, **overrides):
    config = dict(
        loss_type="beta_dpo",
        beta=BETA,
        beta_dpo_alpha=A,
        beta_dpo_filter_ratio=RHO,
        seed=SEED,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    config.update(overrides)
    return tiny_args(tmp_path, **config)


def test_matches_authors_over_steps_with_two_processes_and_accumulation(tmp_path):
    args = beta_dpo_args(tmp_path)
    ranks = [BetaDPO(args), BetaDPO(args)]  # each process holds its own controller
    authors = AuthorsBetaDPO()
    data = torch.Generator().manual_seed(0)
    micro_batches = 0
    for _ in range(4):  # optimizer steps
        for _ in range(args.gradient_accumulation_steps):
            rank_pairs = [random_pairs(data, 4), random_pairs(data, 4)]
            outputs = [
                objective(pairs, ctx)
                for objective, pairs, ctx in zip(ranks, rank_pairs, two_process_contexts(rank_pairs))
            ]
            their_logits = [(p.chosen_logps - p.rejected_logps) for p in rank_pairs]
            their_mask, their_beta, their_losses = authors.step(
                their_logits, torch.Generator().manual_seed(SEED + micro_batches)
            )
            micro_batches += 1
            for rank, (output, pairs) in enumerate(zip(outputs, rank_pairs)):
                assert output.metrics["beta_dpo/beta"] == pytest.approx(their_beta, rel=1e-5)
                assert output.metrics["beta_dpo/mu"] == pytest.approx(float(authors.gap_mean), rel=1e-5, abs=1e-7)
                assert output.metrics["beta_dpo/sigma"] == pytest.approx(float(authors.gap_std), rel=1e-5)
                assert output.metrics["beta_dpo/selected_fraction"] == pytest.approx(float(their_mask.float().mean()))
                ours = output.losses.mean()
                torch.testing.assert_close(ours, their_losses[rank], rtol=1e-5, atol=1e-7)
                # Same gradient as theirs: zero on the unselected rows of this process.
                ours_grad = torch.autograd.grad(ours, pairs.chosen_logps, retain_graph=True)[0]
                their_grad = torch.autograd.grad(their_losses[rank], pairs.chosen_logps, retain_graph=True)[0]
                torch.testing.assert_close(ours_grad, their_grad, rtol=1e-5, atol=1e-7)
                assert torch.equal(ours_grad != 0, their_mask[rank * 4 : (rank + 1) * 4])
            assert not their_mask.all()  # ρ = 0.2: 6 of the 8 gathered pairs
    assert [r.controller.state_dict() for r in ranks][0] == ranks[1].controller.state_dict()
    assert ranks[0].controller.batches == micro_batches == 8


def test_state_dict_resumes_the_same_trajectory(tmp_path):
    args = beta_dpo_args(tmp_path)
    data = torch.Generator().manual_seed(1)
    batches = [random_pairs(data, 6) for _ in range(5)]
    straight, first = BetaDPO(args), BetaDPO(args)
    straight_betas = [straight(p, StepContext(True, lambda t: t)).metrics["beta_dpo/beta"] for p in batches]
    for pairs in batches[:2]:
        first(pairs, StepContext(True, lambda t: t))
    resumed = BetaDPO(args)
    resumed.controller.load_state_dict(first.controller.state_dict())
    resumed_betas = [resumed(p, StepContext(True, lambda t: t)).metrics["beta_dpo/beta"] for p in batches[2:]]
    assert resumed_betas == straight_betas[2:]
    assert len(set(straight_betas)) == 5


def test_evaluation_moves_nothing_and_averages_over_every_pair(tmp_path):
    args = beta_dpo_args(tmp_path)
    objective = BetaDPO(args)
    data = torch.Generator().manual_seed(2)
    objective(random_pairs(data, 8), StepContext(True, lambda t: t))
    state = dict(objective.controller.state_dict())
    pairs = random_pairs(data, 8)
    output = objective(pairs, StepContext(False, lambda t: t))
    assert objective.controller.state_dict() == state
    beta = output.metrics["beta_dpo/beta"]
    assert output.metrics["beta_dpo/selected_fraction"] == pytest.approx(6 / 8)  # β from 6 sampled pairs
    expected = -F.logsigmoid(beta * (pairs.chosen_logps - pairs.rejected_logps))  # loss over all 8 pairs
    torch.testing.assert_close(output.losses, expected)
    # Deterministic: the same evaluation batch gives the same β again.
    assert objective(pairs, StepContext(False, lambda t: t)).metrics["beta_dpo/beta"] == beta


def test_guards_where_the_authors_code_fails():
    generator = torch.Generator().manual_seed(0)
    # One pair: their ⌊0.8·1⌋ = 0 samples, a NaN β. Ours keeps the pair.
    assert losses.beta_dpo_selection(torch.tensor([0.3]), 0.0, 0.0, 0.2, generator).tolist() == [True]
    # Δ ≡ 0 with σ = 0 (policy = reference at the first step): their weights are 0/0 = NaN. Ours are uniform.
    selected = losses.beta_dpo_selection(torch.zeros(10), 0.0, 0.0, 0.2, generator)
    assert selected.sum() == 8
    # Weights that underflow to 0 (far outliers) are drawn last: first all the others.
    logits = torch.tensor([0.0, 0.1, -0.1, 50.0, -50.0])
    selected = losses.beta_dpo_selection(logits, 0.0, 0.1, 0.2, generator)  # keeps 4: 3 near + 1 outlier
    assert selected[:3].all() and selected[3:].sum() == 1
    assert losses.beta_dpo_batch_beta(torch.tensor(-100.0), BETA, A, 0.0).item() == pytest.approx(1e-3)  # absolute
    assert losses.beta_dpo_selection(torch.randn(7), 0.0, 1.0, 0.0, generator).all()  # ρ = 0 keeps every pair


def test_zero_delta_first_step_is_finite(tmp_path):
    objective = BetaDPO(beta_dpo_args(tmp_path))
    zeros = torch.zeros(4, requires_grad=True)
    pairs = random_pairs(torch.Generator().manual_seed(0), 4)
    pairs.chosen_logps, pairs.rejected_logps = zeros, zeros.detach()
    output = objective(pairs, StepContext(True, lambda t: t))
    assert output.metrics["beta_dpo/beta"] == pytest.approx(BETA)
    assert output.losses.mean().item() == pytest.approx(math.log(2))  # mean over the 3 selected pairs


# ---------------------------------------------------------------- running moments (α-DPO and β-DPO)
@pytest.mark.parametrize("loss_type", ["alpha_dpo", "beta_dpo"])
def test_warns_when_sigma_cannot_be_estimated(loss_type, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_refpo.objectives.loss_types"):
        build_objectives(tiny_args(tmp_path, loss_type=loss_type, per_device_train_batch_size=1))
    assert f"{loss_type}: each update of its running σ sees 1 pair" in caplog.text
    assert "moments_update='optimizer_step' with gradient_accumulation_steps >= 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_refpo.objectives.loss_types"):
        build_objectives(
            tiny_args(
                tmp_path,
                loss_type=loss_type,
                per_device_train_batch_size=1,
                gradient_accumulation_steps=2,
                moments_update="optimizer_step",
            )
        )
    assert "running σ" not in caplog.text


def train_alpha_dpo(tmp_path, tokenizer, dataset, batch_size, accumulation, moments_update):
    args = tiny_args(
        tmp_path,
        loss_type="alpha_dpo",
        beta=2.5,
        max_steps=3,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        moments_update=moments_update,
    )
    trainer = RefPOTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer.objectives[0].controller


def test_optimizer_step_moments_do_not_depend_on_accumulation(tokenizer, dataset, tmp_path):
    whole = train_alpha_dpo(tmp_path / "a", tokenizer, dataset, 4, 1, "optimizer_step")
    split = train_alpha_dpo(tmp_path / "b", tokenizer, dataset, 2, 2, "optimizer_step")
    assert whole.mu_updates == split.mu_updates == 3 and whole.sigma != 0
    assert split.mu == pytest.approx(whole.mu, rel=1e-4) and split.sigma == pytest.approx(whole.sigma, rel=1e-4)
    per_micro_batch = train_alpha_dpo(tmp_path / "c", tokenizer, dataset, 2, 2, "micro_batch")
    assert per_micro_batch.mu_updates == 6 and per_micro_batch.sigma != pytest.approx(whole.sigma, rel=1e-2)


def test_trainer_seeds_the_filter_per_micro_batch_and_checkpoints_it(tokenizer, dataset, tmp_path):
    args = beta_dpo_args(tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = RefPOTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    (state,) = trainer.controller_state().values()
    assert state["batches"] == 4 and state["sigma"] > 0
    logged = [entry for entry in trainer.state.log_history if "beta_dpo/beta" in entry]
    assert logged and all(entry["beta_dpo/selected_fraction"] == pytest.approx(0.75) for entry in logged)
    assert isinstance(trainer.objectives[0].controller, BetaDPOController)


def test_resume_draws_the_same_selections(tokenizer, dataset, tmp_path):
    def run(folder, save_steps, resume=False):
        args = beta_dpo_args(
            folder,
            max_steps=4,
            save_strategy="steps",
            save_steps=save_steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
        )
        trainer = RefPOTrainer(
            model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train(resume_from_checkpoint=resume or None)
        return trainer

    straight = run(tmp_path / "straight", save_steps=4)
    run(tmp_path / "resumed", save_steps=2)
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-4")
    resumed = run(tmp_path / "resumed", save_steps=2, resume=True)
    ours, theirs = resumed.controller_state(), straight.controller_state()
    assert ours["0:beta_dpo"]["batches"] == theirs["0:beta_dpo"]["batches"] == 4
    for key in ("mu", "sigma"):
        assert ours["0:beta_dpo"][key] == pytest.approx(theirs["0:beta_dpo"][key], rel=1e-5)
    betas = [
        [entry["beta_dpo/beta"] for entry in t.state.log_history if "beta_dpo/beta" in entry][-2:]
        for t in (straight, resumed)
    ]
    assert betas[0] == pytest.approx(betas[1], rel=1e-5)
