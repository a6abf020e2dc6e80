import os

import pytest
import torch


os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

import trl_refpo  # noqa: E402
from trl_refpo import RefPOConfig  # noqa: E402
from trl_refpo.testing import tiny_llama, tiny_tokenizer, toy_preference_dataset  # noqa: E402


# The wheel check runs this suite against the installed wheel: never against the checkout by accident.
if os.environ.get("TRL_REFPO_TEST_INSTALLED") == "1" and "site-packages" not in trl_refpo.__file__:
    raise RuntimeError(f"TRL_REFPO_TEST_INSTALLED=1 but trl_refpo was imported from {trl_refpo.__file__}")


def tiny_args(output_dir, **overrides) -> RefPOConfig:
    """A RefPOConfig for seconds-long CPU runs."""
    defaults = dict(
        output_dir=str(output_dir),
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return RefPOConfig(**defaults)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture
def dataset():
    return toy_preference_dataset(16)


class ForwardCounter:
    """Counts the forwards of a module (e.g. a reference model: 0 means nothing was scored)."""

    def __init__(self, module):
        self.calls = 0
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
