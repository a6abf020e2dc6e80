"""Reference sources (docs/algorithms.md §6–7): swapped, cross-tokenizer, prior, supplied columns, precompute + cache.

Two in-code tokenizers: ``tiny_tokenizer`` (WordLevel, whitespace, no BOS) for the policy and ``tiny_bpe_tokenizer``
(character BPE whose merges cross spaces, adds ``<s>``, ends with ``</s>``, another chat template) for the reference.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import ForwardCounter
from datasets import Dataset
from transformers import Trainer
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer as TRLDPOTrainer
from trl.data_utils import common_prefix_length

from trl_refpo import RefPOConfig, RefPOTrainer
from trl_refpo.reference.handle import scoring_handle
from trl_refpo.reference.sources import ColumnReference, ModelReference, ScoringHandle
from trl_refpo.reference.text import TextReference
from trl_refpo.testing import tiny_bpe_tokenizer, tiny_llama, tiny_tokenizer, toy_preference_dataset


os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="module")
def policy_tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ref_tokenizer():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def policy(policy_tokenizer):
    return tiny_llama(policy_tokenizer, seed=0)


@pytest.fixture(scope="module")
def ref_model(ref_tokenizer):
    return tiny_llama(ref_tokenizer, seed=1)


def make_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-3,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    defaults.update(overrides)
    return RefPOConfig(**defaults)


def make_trainer(tmp_path, policy, policy_tokenizer, dataset, **kwargs):
    args = kwargs.pop("args", None) or make_args(tmp_path, **kwargs.pop("config", {}))
    return RefPOTrainer(
        model=copy.deepcopy(policy), args=args, train_dataset=dataset, processing_class=policy_tokenizer, **kwargs
    )


def first_batch(trainer, num_examples=4):
    dataset = trainer.train_dataset.select(range(num_examples))
    return trainer.data_collator([dataset[i] for i in range(num_examples)])


# ---------------------------------------------------------------------------------------------- direct scoring
def direct_logps(model, prompt_ids: list[int], full_ids: list[int], prompt_len: int) -> tuple[float, int]:
    """Sum of log p(token) over full_ids[prompt_len:], from the full logits of one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0].float()
    log_probs = logits.log_softmax(-1)
    total = sum(log_probs[position - 1, full_ids[position]].item() for position in range(prompt_len, len(full_ids)))
    return total, len(full_ids) - prompt_len


def reference_text_sequences(example, tokenizer, prompt_mode):
    """The reference's own tokenisation of one ORIGINAL example, built independently of the library."""
    if isinstance(example["prompt"], list):
        prompt = example["prompt"] if prompt_mode == "full" else [{"role": "user", "content": ""}]
        prompt_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        full = {
            side: tokenizer.apply_chat_template(prompt + example[side], tokenize=True, return_dict=True)["input_ids"]
            for side in ("chosen", "rejected")
        }
    else:
        prompt = example["prompt"] if prompt_mode == "full" else ""
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = {
            side: tokenizer(prompt + example[side] + tokenizer.eos_token)["input_ids"]
            for side in ("chosen", "rejected")
        }
        if not prompt_ids:  # no BOS of its own: the no-prompt sequence starts at BOS
            prompt_ids = [tokenizer.bos_token_id]
            full = {side: [tokenizer.bos_token_id] + ids for side, ids in full.items()}
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
    return prompt_ids, full, prompt_len


# ---------------------------------------------------------------------------------------------- cross-tokenizer
@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("prompt_mode", ["full", "none"])
def test_cross_tokenizer_reference_equals_direct_scoring(
    tmp_path, policy, policy_tokenizer, ref_model, ref_tokenizer, conversational, prompt_mode
):
    raw = toy_preference_dataset(6, seed=3, conversational=conversational)
    trainer = make_trainer(
        tmp_path,
        policy,
        policy_tokenizer,
        raw,
        ref_model=copy.deepcopy(ref_model),
        ref_tokenizer=ref_tokenizer,
        config={"ref_prompt": prompt_mode},
    )
    assert isinstance(trainer.reference_source, TextReference) and trainer.uses_pipeline
    batch = first_batch(trainer, 6)
    reference = trainer.reference_source(scoring_handle(trainer), batch, num_pairs=6)

    boundary_differs = False
    for index, example in enumerate(raw):
        prompt_ids, full, prompt_len = reference_text_sequences(example, ref_tokenizer, prompt_mode)
        boundary_differs |= prompt_len < len(prompt_ids)
        for side, got, got_len in (
            ("chosen", reference.chosen, reference.chosen_lengths),
            ("rejected", reference.rejected, reference.rejected_lengths),
        ):
            expected, expected_len = direct_logps(ref_model, prompt_ids, full[side], prompt_len)
            assert got[index].item() == pytest.approx(expected, abs=1e-4)
            assert got_len[index].item() == expected_len
        # the reference's completion ends with the REFERENCE's EOS, never the policy's
        assert full["chosen"][-1] == ref_tokenizer.eos_token_id
    if prompt_mode == "full" and not conversational:
        assert boundary_differs, "the data must include prompts whose token boundary differs between tokenizers"
    # the policy side is untouched: it scores the policy's own ids with the policy's counts
    assert not torch.equal(batch["completion_mask"].sum(1), batch["ref_completion_mask"].sum(1))


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "chat"])
def test_cross_tokenizer_reference_equals_trl_scoring_with_reference_tokenizer(
    tmp_path, policy, policy_tokenizer, ref_model, ref_tokenizer, conversational
):
    """What stock TRL computes when the reference model is trained with its own tokenizer on the same text."""
    raw = toy_preference_dataset(8, seed=5, conversational=conversational)
    trl_args = TRLDPOConfig(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        use_cpu=True,
        report_to=[],
        precompute_ref_log_probs=True,
        per_device_train_batch_size=4,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trl_trainer = TRLDPOTrainer(
        model=copy.deepcopy(ref_model), args=trl_args, train_dataset=raw, processing_class=ref_tokenizer
    )
    trainer = make_trainer(
        tmp_path,
        policy,
        policy_tokenizer,
        raw,
        ref_model=copy.deepcopy(ref_model),
        ref_tokenizer=ref_tokenizer,
        config={"precompute_ref_log_probs": True},
    )
    ours = torch.tensor(
        list(trainer.train_dataset["ref_chosen_logps"]) + list(trainer.train_dataset["ref_rejected_logps"])
    )
    theirs = torch.tensor(
        list(trl_trainer.train_dataset["ref_chosen_logps"]) + list(trl_trainer.train_dataset["ref_rejected_logps"])
    )
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_cross_tokenizer_truncation_keeps_the_policys_text(
    tmp_path, policy, policy_tokenizer, ref_model, ref_tokenizer
):
    raw = Dataset.from_list(
        [{"prompt": "sort : h a g :", "chosen": " a g h b c d e f", "rejected": " h g a b c d e f"}]
    )
    # The policy keeps 5 prompt + 3 completion tokens: " a g h" / " h g a" (keep_start).
    trainer = make_trainer(
        tmp_path,
        policy,
        policy_tokenizer,
        raw,
        ref_model=copy.deepcopy(ref_model),
        ref_tokenizer=ref_tokenizer,
        config={"max_length": 8},
    )
    example = trainer.train_dataset[0]
    for side, kept_text in (("chosen", " a g h"), ("rejected", " h g a")):
        full = ref_tokenizer(raw[0]["prompt"] + raw[0][side] + "</s>")["input_ids"]
        # every reference token kept lies inside the policy's kept text; the next one does not
        text = raw[0]["prompt"] + kept_text
        encoding = ref_tokenizer(raw[0]["prompt"] + raw[0][side] + "</s>", return_offsets_mapping=True)
        kept_count = len(example["ref_prompt_ids"]) + len(example[f"ref_{side}_ids"])
        assert encoding["offset_mapping"][kept_count - 1][1] <= len(text) < encoding["offset_mapping"][kept_count][1]
        assert len(example[f"ref_{side}_ids"]) < len(full) - len(example["ref_prompt_ids"])
    # keep_end: the policy drops the start of the prompt; the reference drops the same text, keeps the completion
    long_prompt = Dataset.from_list([{"prompt": "copy : a b c d e f g h :", "chosen": " a b", "rejected": " b a"}])
    trainer = make_trainer(
        tmp_path,
        policy,
        policy_tokenizer,
        long_prompt,
        ref_model=copy.deepcopy(ref_model),
        ref_tokenizer=ref_tokenizer,
        config={"max_length": 6, "truncation_mode": "keep_end"},
    )
    example = trainer.train_dataset[0]
    batch = first_batch(trainer, 1)
    policy_text = policy_tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert policy_text.startswith("g h :")
    start = example["ref_chosen_prompt_start"]
    kept = ref_tokenizer.decode(example["ref_prompt_ids"][start:] + example["ref_chosen_ids"])
    assert start > 0 and "f" not in kept and kept.endswith(" a b</s>")
    assert " g h : a b</s>".endswith(kept)
    # chat: the policy keeps the assistant message and its EOS (keep_end); so does the reference, in its template
    chat = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "sort : h a g"}],
                "chosen": [{"role": "assistant", "content": "a g h b c d e f"}],
                "rejected": [{"role": "assistant", "content": "h g a b c d e f"}],
            }
        ]
    )
    for truncation_mode, max_length, policy_kept, reference_kept in (
        ("keep_end", 9, "a g h b c d e f <eos>", "a g h b c d e f</s>"),
        (
            "keep_end",
            10,
            "<assistant> a g h b c d e f <eos>",
            "</s><|assistant|>a g h b c d e f</s>",
        ),  # its whole turn header
        ("keep_start", 9, "<user> sort : h a g <eos> <assistant> a", "<s><|user|>sort : h a g</s><|assistant|>a"),
    ):
        trainer = make_trainer(
            tmp_path,
            policy,
            policy_tokenizer,
            chat,
            ref_model=copy.deepcopy(ref_model),
            ref_tokenizer=ref_tokenizer,
            config={"max_length": max_length, "truncation_mode": truncation_mode},
        )
        batch = first_batch(trainer, 1)
        assert policy_tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]) == policy_kept
        assert ref_tokenizer.decode(batch["ref_input_ids"][0][batch["ref_attention_mask"][0].bool()]) == reference_kept
    # A policy sequence that fits is not cut on the reference side, whatever the reference's token count.
    trainer = make_trainer(
        tmp_path,
        policy,
        policy_tokenizer,
        raw,
        ref_model=copy.deepcopy(ref_model),
        ref_tokenizer=ref_tokenizer,
        config={"max_length": 64},
    )
    example = trainer.train_dataset[0]
    assert example["ref_chosen_ids"][-1] == ref_tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- prior
@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "chat"])
def test_prior_reference_equals_hand_built_no_prompt_sequence(tmp_path, policy, policy_tokenizer, conversational):
    raw = Dataset.from_list(
        [
            {"prompt": "sort : c a b :", "chosen": " a b c", "rejected": " c b a"}
            if not conversational
            else {
                "prompt": [{"role": "user", "content": "sort : c a b"}],
                "chosen": [{"role": "assistant", "content": "a b c"}],
                "rejected": [{"role": "assistant", "content": "c b a"}],
            }
        ]
    )
    trainer = make_trainer(tmp_path, policy, policy_tokenizer, raw, config={"loss_type": ["likelihood"]})
    assert trainer.args.ref_prompt == "none" and isinstance(trainer.reference_source, TextReference)
    ids = policy_tokenizer.convert_tokens_to_ids
    if conversational:  # the chat template with an empty user turn: "<user>  <eos> <assistant> a b c <eos> "
        prompt = ids(["<user>", "<eos>", "<assistant>"])
        chosen, rejected = ids(["a", "b", "c", "<eos>"]), ids(["c", "b", "a", "<eos>"])
    else:  # WordLevel adds no BOS: the completion starts from <bos>
        prompt = ids(["<bos>"])
        chosen, rejected = ids(["a", "b", "c", "<eos>"]), ids(["c", "b", "a", "<eos>"])
    example = trainer.train_dataset[0]
    assert (example["ref_prompt_ids"], example["ref_chosen_ids"], example["ref_rejected_ids"]) == (
        prompt,
        chosen,
        rejected,
    )
    reference = trainer.reference_source(scoring_handle(trainer), first_batch(trainer, 1), num_pairs=1)
    for got, completion in ((reference.chosen, chosen), (reference.rejected, rejected)):
        expected, _ = direct_logps(policy, prompt, prompt + completion, len(prompt))
        assert got.item() == pytest.approx(expected, abs=1e-4)
    # and it is not the conditional log-prob
    conditional = ModelReference()(
        ScoringHandle(trainer.ref_model, trainer.accelerator, policy_tokenizer), first_batch(trainer, 1), 1
    )
    assert abs(conditional.chosen.item() - reference.chosen.item()) > 1e-3


# ---------------------------------------------------------------------------------------------- swapped, same tokenizer
def test_swapped_same_tokenizer_reference_by_instance_and_by_path(tmp_path, policy, policy_tokenizer, monkeypatch):
    swapped = tiny_llama(policy_tokenizer, seed=7)
    raw = toy_preference_dataset(4, seed=1)
    trainer = make_trainer(
        tmp_path, policy, policy_tokenizer, raw, ref_model=swapped, config={"loss_type": ["flex_dpo"]}
    )
    assert type(trainer.reference_source) is ModelReference
    batch = first_batch(trainer)
    reference = trainer.reference_source(scoring_handle(trainer), batch, num_pairs=4)
    for index in range(4):
        row = batch["input_ids"][index][batch["attention_mask"][index].bool()].tolist()
        prompt_len = int((batch["completion_mask"][index] == 0).sum()) - int(
            (batch["attention_mask"][index] == 0).sum()
        )
        expected, _ = direct_logps(swapped, row[:prompt_len], row, prompt_len)
        assert reference.chosen[index].item() == pytest.approx(expected, abs=1e-4)

    path = tmp_path / "swapped"
    swapped.save_pretrained(path)
    policy_tokenizer.save_pretrained(path)
    dropout_disabled = []
    import trl.trainer.dpo_trainer as trl_dpo

    original_disable = trl_dpo.disable_dropout_in_model
    monkeypatch.setattr(
        trl_dpo, "disable_dropout_in_model", lambda m: (dropout_disabled.append(m), original_disable(m))
    )
    trainer = make_trainer(
        tmp_path,
        policy,
        policy_tokenizer,
        raw,
        config={
            "loss_type": ["sigmoid"],
            "ref_model_name_or_path": str(path),
            "ref_model_init_kwargs": {"dtype": "float32"},
        },
    )
    # loaded and prepared by TRL like its own reference: dropout off, eval mode, fused LM head
    assert trainer.ref_model is not None and not trainer.ref_model.training
    assert any(model is trainer.ref_model for model in dropout_disabled)
    out = trainer.ref_model(
        input_ids=batch["input_ids"][:2], labels=batch["input_ids"][:2], fused_lm_head=True, use_cache=False
    )
    assert out.log_probs is not None
    torch.testing.assert_close(
        trainer.reference_source(scoring_handle(trainer), batch, num_pairs=4).chosen,
        reference.chosen,
        atol=1e-5,
        rtol=0,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = sorted(os.listdir(tmp_path / "saved"))
    weights = [name for name in saved if name.endswith(".safetensors")]
    assert weights == ["model.safetensors"]
    from safetensors.torch import load_file

    saved_weights = load_file(str(tmp_path / "saved" / "model.safetensors"))
    policy_weights = trainer.model.state_dict()
    assert saved_weights.keys() == policy_weights.keys()
    torch.testing.assert_close(saved_weights["model.embed_tokens.weight"], policy_weights["model.embed_tokens.weight"])
    assert not torch.equal(saved_weights["model.embed_tokens.weight"], swapped.model.embed_tokens.weight)


def test_swapped_reference_with_another_tokenizer_points_to_cross_tokenizer_mode(
    tmp_path, policy, policy_tokenizer, ref_model, ref_tokenizer
):
    path = tmp_path / "other"
    ref_model.save_pretrained(path)
    ref_tokenizer.save_pretrained(path)
    raw = toy_preference_dataset(4)
    with pytest.raises(ValueError, match="ref_tokenizer"):
        make_trainer(tmp_path, policy, policy_tokenizer, raw, config={"ref_model_name_or_path": str(path)})
    # naming the tokenizer selects cross-tokenizer mode
    trainer = make_trainer(
        tmp_path,
        policy,
        policy_tokenizer,
        raw,
        config={"ref_model_name_or_path": str(path), "ref_tokenizer_name_or_path": str(path)},
    )
    assert isinstance(trainer.reference_source, TextReference)
    # an explicit ref_tokenizer equal to the policy's means the same tokenizer: policy ids are scored
    trainer = make_trainer(
        tmp_path,
        policy,
        policy_tokenizer,
        raw,
        ref_model=tiny_llama(policy_tokenizer, seed=3),
        ref_tokenizer=tiny_tokenizer(),
    )
    assert type(trainer.reference_source) is ModelReference and not trainer.uses_pipeline


# ---------------------------------------------------------------------------------------------- supplied columns
def test_supplied_columns_pass_through_unchanged_in_float32(tmp_path, policy, policy_tokenizer, monkeypatch):
    raw = toy_preference_dataset(4, seed=2)
    values = {
        "ref_chosen_logps": [-1.23456789, -2.5, -3.14159265, -40.0],
        "ref_rejected_logps": [-5.5, -6.25, -7.0, -8.125],
    }
    supplied = raw.add_column("ref_chosen_logps", values["ref_chosen_logps"]).add_column(
        "ref_rejected_logps", values["ref_rejected_logps"]
    )
    for loss_type in ("sigmoid", "flex_dpo"):
        trainer = make_trainer(tmp_path, policy, policy_tokenizer, supplied, config={"loss_type": [loss_type]})
        assert trainer.ref_model is None and isinstance(trainer.reference_source, ColumnReference)
        batch = first_batch(trainer)
        # DeepSpeed: the HF Trainer casts float batch tensors to the engine dtype — simulate it
        original = Trainer._prepare_input

        def cast_floats(self, data, original=original):
            data = original(self, data)
            return data.to(torch.bfloat16) if isinstance(data, torch.Tensor) and data.is_floating_point() else data

        monkeypatch.setattr(Trainer, "_prepare_input", cast_floats)
        prepared = trainer._prepare_inputs(dict(batch))
        monkeypatch.undo()
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            assert prepared[column].dtype == torch.float32
            torch.testing.assert_close(
                prepared[column], torch.tensor(values[column], dtype=torch.float32), atol=0, rtol=0
            )
        seen = []
        compute_loss = trainer.compute_loss
        trainer.compute_loss = lambda model, inputs, *a, **k: (
            seen.append(dict(inputs)),
            compute_loss(model, inputs, *a, **k),
        )[1]
        trainer.train()
        assert math.isfinite(trainer.state.log_history[0]["loss"])
        for column in ("ref_chosen_logps", "ref_rejected_logps"):  # what reached the loss: the values, float32
            assert seen[0][column].dtype == torch.float32
            assert sorted(seen[0][column].tolist()) == sorted(torch.tensor(values[column]).tolist())
        if trainer.uses_pipeline:
            expected = sum(values["ref_chosen_logps"]) / 4
            assert trainer.state.log_history[0]["logps/ref_chosen"] == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------- precompute + cache
def cached_trainer(tmp_path, policy, policy_tokenizer, raw, ref, ref_tokenizer=None, **config):
    counter = ForwardCounter(ref)
    trainer = make_trainer(
        tmp_path,
        policy,
        policy_tokenizer,
        raw,
        ref_model=ref,
        ref_tokenizer=ref_tokenizer,
        config={"precompute_ref_log_probs": True, "ref_logps_cache_dir": str(tmp_path / "cache"), **config},
    )
    return trainer, counter.calls


def test_precompute_cache_hit_runs_no_reference_forward_and_any_key_change_rescores(
    tmp_path, policy, policy_tokenizer, ref_model, ref_tokenizer, caplog
):
    raw = toy_preference_dataset(8, seed=4)
    caplog.set_level(logging.INFO, logger="trl_refpo")
    first, calls = cached_trainer(tmp_path, policy, policy_tokenizer, raw, copy.deepcopy(ref_model), ref_tokenizer)
    assert calls > 0 and len(os.listdir(tmp_path / "cache")) == 1
    assert isinstance(first.reference_source, ColumnReference) and first.ref_scoring_source.needs_model
    columns = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_lengths", "ref_rejected_lengths")
    assert all(first.train_dataset.features[column].dtype == "float32" for column in columns)
    # precomputed values are the online values
    online = make_trainer(
        tmp_path, policy, policy_tokenizer, raw, ref_model=copy.deepcopy(ref_model), ref_tokenizer=ref_tokenizer
    )
    reference = online.reference_source(scoring_handle(online), first_batch(online, 8), num_pairs=8)
    torch.testing.assert_close(
        torch.tensor(list(first.train_dataset["ref_chosen_logps"])), reference.chosen, atol=1e-5, rtol=0
    )
    assert list(first.train_dataset["ref_chosen_lengths"]) == reference.chosen_lengths.tolist()

    caplog.clear()
    second, calls = cached_trainer(tmp_path, policy, policy_tokenizer, raw, copy.deepcopy(ref_model), ref_tokenizer)
    assert calls == 0
    assert "from the cache" in caplog.text
    for column in columns:
        assert second.train_dataset[column] == first.train_dataset[column]
    second.train()

    changes = {
        "max_length": dict(config={"max_length": 9}),
        "prompt mode": dict(config={"ref_prompt": "none"}),
        "weights": dict(ref=tiny_llama(ref_tokenizer, seed=11)),
        "tokenizer": dict(tokenizer=tiny_bpe_tokenizer(vocab_size=80), ref=tiny_llama(ref_tokenizer, seed=1)),
        "data": dict(raw=toy_preference_dataset(8, seed=40)),
    }
    for number, (change, spec) in enumerate(changes.items(), start=2):
        _, calls = cached_trainer(
            tmp_path,
            policy,
            policy_tokenizer,
            spec.get("raw", raw),
            spec.get("ref", copy.deepcopy(ref_model)),
            spec.get("tokenizer", ref_tokenizer),
            **spec.get("config", {}),
        )
        assert calls > 0, change
        assert len(os.listdir(tmp_path / "cache")) == number, change


def test_cache_key_depends_on_the_scored_content_not_on_datasets_fingerprints():
    from trl_refpo.reference.precompute import dataset_fingerprint

    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]}] * 3
    one = Dataset.from_list(rows).map(lambda row: row, new_fingerprint="a" * 16)
    other = Dataset.from_list(rows).map(lambda row: row, new_fingerprint="b" * 16)
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert dataset_fingerprint(one, columns) == dataset_fingerprint(other, columns)
    changed = Dataset.from_list(rows[:2] + [{"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [6]}])
    assert dataset_fingerprint(changed, columns) != dataset_fingerprint(one, columns)
    assert dataset_fingerprint(one.select([2, 1, 0]), columns) == dataset_fingerprint(one, columns)  # same rows
    assert dataset_fingerprint(one.select([0, 1]), columns) != dataset_fingerprint(one, columns)
    mixed = Dataset.from_list(rows[:2] + [{"prompt_ids": [9], "chosen_ids": [8], "rejected_ids": [7, 6, 5]}])
    tail = Dataset.from_list(rows[1:2] + [{"prompt_ids": [9], "chosen_ids": [8], "rejected_ids": [7, 6, 5]}])
    assert dataset_fingerprint(mixed.select([1, 2]), columns) == dataset_fingerprint(tail, columns)  # sliced
    assert dataset_fingerprint(mixed.select([2, 1]), columns) != dataset_fingerprint(tail, columns)  # order counts


def test_precompute_initial_policy_matches_trl(tmp_path, policy, policy_tokenizer):
    raw = toy_preference_dataset(8, seed=6)
    trainer = make_trainer(tmp_path, policy, policy_tokenizer, raw, config={"precompute_ref_log_probs": True})
    trl_trainer = TRLDPOTrainer(
        model=copy.deepcopy(policy),
        args=TRLDPOConfig(
            output_dir=str(tmp_path / "trl"),
            bf16=False,
            use_cpu=True,
            report_to=[],
            precompute_ref_log_probs=True,
            gradient_checkpointing=False,
            disable_tqdm=True,
        ),
        train_dataset=raw,
        processing_class=policy_tokenizer,
    )
    torch.testing.assert_close(
        torch.tensor(list(trainer.train_dataset["ref_chosen_logps"])),
        torch.tensor(list(trl_trainer.train_dataset["ref_chosen_logps"])),
    )


# ---------------------------------------------------------------------------------------------- every loss × source
SOURCES = ["initial", "swapped", "cross", "prior_same", "prior_cross", "supplied", "precomputed_cross"]
LOSS_SOURCES = (
    [
        (loss, source)
        for loss in ("sigmoid", "flex_dpo", "alpha_dpo", "beta_dpo")
        for source in SOURCES
        if not source.startswith("prior")
    ]
    + [("likelihood", source) for source in ("prior_same", "prior_cross", "supplied")]
    + [
        ("sigmoid", "prior_cross"),
        ("alpha_dpo", "prior_same"),
    ]
)


@pytest.mark.parametrize(("loss_type", "source"), LOSS_SOURCES)
def test_each_loss_type_trains_with_each_source(
    tmp_path, policy, policy_tokenizer, ref_model, ref_tokenizer, loss_type, source
):
    raw = toy_preference_dataset(4, seed=8)
    kwargs, config = {}, {"loss_type": [loss_type], "per_device_train_batch_size": 2}
    if source == "swapped":
        kwargs["ref_model"] = tiny_llama(policy_tokenizer, seed=5)
    if source in ("cross", "prior_cross", "precomputed_cross"):
        kwargs.update(ref_model=copy.deepcopy(ref_model), ref_tokenizer=ref_tokenizer)
    if source.startswith("prior"):
        config["ref_prompt"] = "none"
    if source == "precomputed_cross":
        config["precompute_ref_log_probs"] = True
    if source == "supplied":
        raw = raw.add_column("ref_chosen_logps", [-9.0, -8.0, -7.5, -10.0]).add_column(
            "ref_rejected_logps", [-9.5, -7.0, -8.5, -10.5]
        )
    trainer = make_trainer(tmp_path, policy, policy_tokenizer, raw, config=config, **kwargs)
    before = [param.detach().clone() for param in trainer.model.parameters()]
    trainer.train()
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and "rewards/margins" in logged
    assert trainer.uses_pipeline == (loss_type != "sigmoid" or source in ("cross", "prior_cross", "precomputed_cross"))
    assert any(not torch.equal(b, a) for b, a in zip(before, trainer.model.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors(tmp_path, policy, policy_tokenizer, ref_model, ref_tokenizer):
    raw = toy_preference_dataset(4)
    one_column = raw.add_column("ref_chosen_logps", [-1.0] * 4)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        make_trainer(tmp_path, policy, policy_tokenizer, one_column)
    both = one_column.add_column("ref_rejected_logps", [-1.0] * 4)
    with pytest.raises(ValueError, match="used as-is"):
        make_trainer(tmp_path, policy, policy_tokenizer, both, ref_model=tiny_llama(policy_tokenizer))
    with pytest.raises(ValueError, match="eval dataset does not"):
        make_trainer(tmp_path, policy, policy_tokenizer, both, eval_dataset=raw)
    with pytest.raises(ValueError, match="no reference model"):
        make_trainer(tmp_path, policy, policy_tokenizer, raw, ref_tokenizer=ref_tokenizer)
    with pytest.raises(ValueError, match="chat template"):
        make_trainer(
            tmp_path,
            policy,
            policy_tokenizer,
            toy_preference_dataset(4, conversational=True),
            ref_model=copy.deepcopy(ref_model),
            ref_tokenizer=tiny_bpe_tokenizer(with_chat_template=False),
        )
    pretokenized = Dataset.from_list([{"prompt_ids": [7, 8], "chosen_ids": [9, 3], "rejected_ids": [10, 3]}] * 4)
    with pytest.raises(ValueError, match="text"):
        make_trainer(
            tmp_path,
            policy,
            policy_tokenizer,
            pretokenized,
            ref_model=copy.deepcopy(ref_model),
            ref_tokenizer=ref_tokenizer,
        )
    with pytest.raises(ValueError, match="token embeddings"):
        make_trainer(tmp_path, policy, policy_tokenizer, raw, ref_model=tiny_llama(policy_tokenizer, vocab_size=8))
    with pytest.raises(ValueError, match="only one reference model"):
        make_trainer(
            tmp_path,
            policy,
            policy_tokenizer,
            raw,
            ref_model=tiny_llama(policy_tokenizer),
            config={"ref_model_name_or_path": "somewhere"},
        )
    with pytest.raises(ValueError, match="sync_ref_model"):
        make_trainer(
            tmp_path,
            policy,
            policy_tokenizer,
            raw,
            ref_model=copy.deepcopy(ref_model),
            ref_tokenizer=ref_tokenizer,
            config={"sync_ref_model": True},
        )
    config_errors = {
        "ref_prompt='none'": {"loss_type": ["likelihood"], "ref_prompt": "full"},
        "precompute_ref_log_probs=True": {"ref_logps_cache_dir": str(tmp_path)},
        "uses none": {"loss_type": ["simpo"], "ref_model_name_or_path": "x"},
        "ref_model_name_or_path is not": {"ref_model_init_kwargs": {"dtype": "float32"}},
        "'full' or 'none'": {"ref_prompt": "both"},
    }
    for message, overrides in config_errors.items():
        with pytest.raises(ValueError, match=message):
            make_args(tmp_path, **overrides)


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO-3
TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not (TESTS / "deepspeed_launcher.py").exists(),
    reason="needs DeepSpeed (pip install 'trl-refpo[deepspeed]') and tests/deepspeed_launcher.py",
)
def test_reference_sources_under_zero3_two_processes(tmp_path, ref_model, ref_tokenizer):
    """A plugin-owned cross-tokenizer reference is sharded by TRL's prepare_deepspeed; online and precomputed
    agree; supplied columns reach the loss unchanged in float32 with no reference model."""
    ref_model.save_pretrained(tmp_path / "ref")
    ref_tokenizer.save_pretrained(tmp_path / "ref")
    from deepspeed_launcher import launch_deepspeed  # a free port, a timeout, the workers' output on failure

    launch_deepspeed(
        Path(__file__).resolve().parent / "zero3_reference_sources.py", tmp_path, tmp_path / "ref", zero_stage=3
    )
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["cross_online"]["losses"] == ranks[1]["cross_online"]["losses"]
    online, precomputed, supplied = (ranks[0][case] for case in ("cross_online", "cross_precomputed", "supplied"))
    assert online["world_size"] == 2 and online["ref_model"] == "DeepSpeedEngine"
    assert precomputed["ref_chosen"] == pytest.approx(online["ref_chosen"], abs=1e-4)
    assert precomputed["losses"] == pytest.approx(online["losses"], abs=1e-5)
    assert supplied["ref_model"] is None
    supplied_values = torch.tensor([-1.23456789 - index for index in range(16)]).tolist()
    for rank in ranks:
        for dtype, values in rank["supplied"]["seen"]:
            assert dtype == "torch.float32" and set(values) <= set(supplied_values)
