"""The loss pipeline is as wide as TRL: on every architecture family, ``flex_dpo`` with β⁺ = β⁻ = β is TRL's
``sigmoid`` — same loss, same parameter gradients (router and vision tower included), same metrics (``aux_loss``,
``logits/*``, ``mean_token_accuracy``)."""

import copy

import pytest
import torch
from conftest import tiny_args
from peft import LoraConfig
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer as TRLDPOTrainer

from trl_refpo import RefPOTrainer
from trl_refpo.testing import (
    tiny_causal_lm,
    tiny_llava,
    tiny_tokenizer,
    toy_preference_dataset,
    toy_vision_preference_dataset,
)


BETA = 0.2
MOE = ("qwen3_moe", "gpt_oss")
ARCHITECTURES = ["llama", "qwen2", "gemma2", "cohere", "lfm2", "nemotron_h", *MOE, "llava"]
SHARED_METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "num_tokens",
]


def fitted(model, processing_class, dataset, steps=40):
    """A copy of ``model`` fitted a little to the chosen texts: a policy that has left its reference and predicts
    some completion tokens (so that ``mean_token_accuracy`` is neither 0 nor 1)."""
    policy = copy.deepcopy(model)
    rows = dataset.select(range(4))
    texts = [row["prompt"] + row["chosen"] for row in rows]
    if "images" in dataset.column_names:
        images = [row["images"] for row in rows]
        encoded = processing_class(text=texts, images=images, padding=True, return_tensors="pt")
    else:
        encoded = processing_class(texts, padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        policy(**encoded, labels=labels).loss.backward()
        optimizer.step()
    policy.zero_grad(set_to_none=True)
    return policy


def build(architecture):
    """(reference model, processing class, dataset) of one architecture family."""
    if architecture == "llava":
        model, processor = tiny_llava()
        return model, processor, toy_vision_preference_dataset(8)
    tokenizer = tiny_tokenizer()
    return tiny_causal_lm(architecture, tokenizer), tokenizer, toy_preference_dataset(8)


def trainer_pair(architecture, tmp_path, peft_config=None):
    """TRL's sigmoid trainer and ours with flex_dpo (β⁺ = β⁻ = β), on the same policy and reference."""
    reference, processing_class, dataset = build(architecture)
    policy = fitted(reference, processing_class, dataset)
    reference_kwargs = {} if peft_config is not None else {"ref_model": copy.deepcopy(reference)}
    if peft_config is not None:
        policy = reference  # the adapter-disabled base is the reference
    trl = TRLDPOTrainer(
        model=copy.deepcopy(policy),
        **copy.deepcopy(reference_kwargs),
        args=TRLDPOConfig(
            output_dir=str(tmp_path / "trl"),
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            per_device_train_batch_size=4,
            report_to=[],
            seed=0,
            loss_type=["sigmoid"],
            beta=BETA,
        ),
        train_dataset=dataset,
        processing_class=processing_class,
        peft_config=copy.deepcopy(peft_config),
    )
    ours = RefPOTrainer(
        model=copy.deepcopy(policy),
        **copy.deepcopy(reference_kwargs),
        args=tiny_args(tmp_path / "ours", loss_type="flex_dpo", beta=BETA, beta_chosen=BETA, beta_rejected=BETA),
        train_dataset=dataset,
        processing_class=processing_class,
        peft_config=copy.deepcopy(peft_config),
    )
    if peft_config is not None:  # the same adapter weights in both
        ours.model.load_state_dict(trl.model.state_dict())
    return trl, ours


def loss_gradients_metrics(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def assert_same_as_trl(trl, ours):
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    trl_loss, trl_grads, trl_metrics = loss_gradients_metrics(trl, batch)
    our_loss, our_grads, our_metrics = loss_gradients_metrics(ours, batch)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == trl_grads.keys() and trl_grads
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for key in SHARED_METRICS + (["aux_loss"] if "aux_loss" in trl_metrics else []):
        assert our_metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
    return batch, trl_metrics, our_grads


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_flex_dpo_with_equal_betas_is_trl_sigmoid(architecture, tmp_path):
    trl, ours = trainer_pair(architecture, tmp_path)
    batch, trl_metrics, grads = assert_same_as_trl(trl, ours)
    assert trl_metrics["rewards/margins"] != 0.0 and 0 < trl_metrics["mean_token_accuracy"] < 1
    if architecture in MOE:  # the router loss is in the loss (router gradients) and in the logs
        assert trl_metrics["aux_loss"] > 0 and ours.aux_loss_enabled and ours.router_aux_loss_coef == 0.01
        routers = [name for name in grads if ".gate.weight" in name or ".router.weight" in name]
        assert routers and all(grads[name].abs().sum() > 0 for name in routers)
    if architecture == "llava":  # the images reach the model: the vision tower and projector get gradients
        assert "pixel_values" in batch
        for part in ("vision_tower", "multi_modal_projector"):
            assert any(part in name and grad.abs().sum() > 0 for name, grad in grads.items()), part


@pytest.mark.parametrize("architecture", MOE)
def test_moe_with_lora_on_the_experts_keeps_the_router_loss(architecture, tmp_path):
    lora = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.down_proj"],
        init_lora_weights=False,
    )
    trl, ours = trainer_pair(architecture, tmp_path, peft_config=lora)
    _, trl_metrics, grads = assert_same_as_trl(trl, ours)
    assert trl_metrics["aux_loss"] > 0
    assert any("experts" in name and "lora" in name for name in grads)
