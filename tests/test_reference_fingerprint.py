"""The cross-tokenizer re-tokenisation map is fingerprinted from the tokenizers' fingerprints (issue 18, item 9):
deterministic, different for another reference tokenizer or setting, and no dill pickle of a tokenizer."""

import pytest
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from trl_refpo import RefPOConfig
from trl_refpo.reference.fingerprints import tokenizer_fingerprint
from trl_refpo.reference.text import TextReference
from trl_refpo.testing import tiny_bpe_tokenizer, tiny_tokenizer, toy_preference_dataset


@pytest.fixture(scope="module")
def tokenized():
    policy = tiny_tokenizer()
    dataset = toy_preference_dataset(4).map(
        lambda example: {
            f"{c}_ids": policy(example[c], add_special_tokens=False)["input_ids"]
            for c in ("prompt", "chosen", "rejected")
        }
    )
    return policy, dataset


def retokenised(tokenized, reference_tokenizer, tmp_path, prompt_mode="full", **config):
    policy, dataset = tokenized
    args = RefPOConfig(str(tmp_path), bf16=False, use_cpu=True, report_to=[], **config)
    return TextReference(reference_tokenizer, prompt_mode).prepare_dataset(dataset, policy, args, "train")


def test_fingerprint_follows_tokenizer_and_settings(tokenized, tmp_path, monkeypatch):
    first = retokenised(tokenized, tiny_bpe_tokenizer(), tmp_path)
    again = retokenised(tokenized, tiny_bpe_tokenizer(), tmp_path)
    assert first._fingerprint == again._fingerprint
    assert first["ref_chosen_ids"] == again["ref_chosen_ids"]
    assert retokenised(tokenized, tiny_bpe_tokenizer(vocab_size=80), tmp_path)._fingerprint != first._fingerprint
    assert retokenised(tokenized, tiny_bpe_tokenizer(), tmp_path, "none")._fingerprint != first._fingerprint
    assert retokenised(tokenized, tiny_bpe_tokenizer(), tmp_path, max_length=8)._fingerprint != first._fingerprint
    changed = tiny_bpe_tokenizer()
    changed.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(tiny_bpe_tokenizer())
    assert retokenised(tokenized, changed, tmp_path)._fingerprint != first._fingerprint


def _holds_tokenizer(value) -> bool:
    if isinstance(value, PreTrainedTokenizerBase):
        return True
    if isinstance(value, dict):
        return any(_holds_tokenizer(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tokenizer(item) for item in value)
    return False


def test_no_tokenizer_is_pickled_for_the_fingerprint(tokenized, tmp_path, monkeypatch):
    """``datasets`` hashes each map argument with ``Hasher.hash`` (a dill pickle): never a tokenizer here."""
    hashed = []
    original = Hasher.hash

    def recording(cls, value):
        hashed.append(_holds_tokenizer(value))
        return original(value)

    monkeypatch.setattr(Hasher, "hash", classmethod(recording))
    retokenised(tokenized, tiny_bpe_tokenizer(), tmp_path)
    assert hashed and not any(hashed)
