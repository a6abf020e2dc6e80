"""The cross-tokenizer reference's text alignment (trl_refpo/reference/text.py) on non-ASCII text: the reference keeps
exactly the characters the policy keeps when ``max_length`` cuts the policy's sequence."""

import pytest
from conftest import tiny_args
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trl_refpo import RefPOTrainer
from trl_refpo.reference.text import TextReference, reference_columns
from trl_refpo.testing import tiny_llama, tiny_tokenizer


WORDS = ["café", "naïve", "日本語", "über", "🙂", "straße", "ØRE"]
PROMPT = "say : a b"
COMPLETION = " café naïve 日本語 über 🙂 straße"


@pytest.fixture(scope="module")
def policy_tokenizer():
    return tiny_tokenizer(extra_words=WORDS)


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """A byte-level BPE (GPT-2 style): multi-byte characters are split over several tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=266,
        special_tokens=["<|pad|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([PROMPT + COMPLETION, "say : " + " ".join(WORDS)] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|end|>")


def reference_row(policy_tokenizer, byte_level_tokenizer, tmp_path, max_length, truncation_mode="keep_start"):
    dataset = Dataset.from_list([{"prompt": PROMPT, "chosen": COMPLETION, "rejected": " über café"}])
    trainer = RefPOTrainer(
        model=tiny_llama(policy_tokenizer),
        ref_model=tiny_llama(byte_level_tokenizer, seed=1),
        ref_tokenizer=byte_level_tokenizer,
        processing_class=policy_tokenizer,
        train_dataset=dataset,
        args=tiny_args(
            tmp_path,
            loss_type="sigmoid",
            max_length=max_length,
            truncation_mode=truncation_mode,
            per_device_train_batch_size=1,
        ),
    )
    assert isinstance(trainer.reference_source, TextReference)
    return trainer.train_dataset[0]


def kept_text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_unicode_completion_is_kept_whole_without_truncation(policy_tokenizer, byte_level_tokenizer, tmp_path):
    row = reference_row(policy_tokenizer, byte_level_tokenizer, tmp_path, max_length=None)
    assert (
        kept_text(byte_level_tokenizer, row["ref_prompt_ids"] + row["ref_chosen_ids"])
        == PROMPT + COMPLETION + "<|end|>"
    )
    assert any(
        len(byte_level_tokenizer.decode([token])) == 0 or "�" in byte_level_tokenizer.decode([token])
        for token in row["ref_chosen_ids"]
    )  # some token holds part of a character: the case under test


@pytest.mark.parametrize("kept_words", [1, 2, 3, 4, 5])
def test_truncation_keeps_the_policys_characters(kept_words, policy_tokenizer, byte_level_tokenizer, tmp_path):
    prompt_tokens = len(PROMPT.split())
    row = reference_row(policy_tokenizer, byte_level_tokenizer, tmp_path, max_length=prompt_tokens + kept_words)
    expected = PROMPT + "".join(" " + word for word in COMPLETION.split()[:kept_words])
    text = kept_text(byte_level_tokenizer, row["ref_prompt_ids"] + row["ref_chosen_ids"])
    # Byte-level tokens begin with their leading space: the reference keeps the kept words and never a partial
    # character or the next word.
    assert text == expected
    assert "�" not in text


def test_keep_end_drops_the_same_unicode_text_at_the_front(policy_tokenizer, byte_level_tokenizer, tmp_path):
    row = reference_row(policy_tokenizer, byte_level_tokenizer, tmp_path, max_length=5, truncation_mode="keep_end")
    start = row["ref_chosen_prompt_start"]
    text = kept_text(byte_level_tokenizer, row["ref_prompt_ids"][start:] + row["ref_chosen_ids"])
    assert start > 0 and text.endswith("straße<|end|>") and "�" not in text
    assert (PROMPT + COMPLETION + "<|end|>").endswith(text)


def test_reference_columns_is_a_pure_function_of_the_batch(policy_tokenizer, byte_level_tokenizer):
    batch = {
        "prompt": [PROMPT],
        "chosen": [COMPLETION],
        "rejected": [" über"],
        "prompt_ids": [policy_tokenizer(PROMPT)["input_ids"]],
        "chosen_ids": [policy_tokenizer(COMPLETION)["input_ids"] + [policy_tokenizer.eos_token_id]],
        "rejected_ids": [policy_tokenizer(" über")["input_ids"] + [policy_tokenizer.eos_token_id]],
    }
    first = reference_columns(batch, byte_level_tokenizer, policy_tokenizer, "full", None, "keep_start")
    assert first == reference_columns(batch, byte_level_tokenizer, policy_tokenizer, "full", None, "keep_start")
    assert first["ref_chosen_prompt_start"] == [0]
