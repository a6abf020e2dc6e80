"""ZeRO-3 with ``zero.Init`` (policy and references loaded by ``from_pretrained``, so partitioned on arrival) as
exact as one process (issue 18, items 1–2), on 2 CPU processes: one launch runs every case of
tests/zero3_exactness_worker.py.

* an in-memory policy and no ``ref_model`` trains (the reference copy is gathered, not deep-copied placeholders),
  with the losses and reference log-probs of one process;
* the reference log-prob cache is keyed on the real weights: a second reference with other weights is rescored,
  and the key's ``reference_weights`` is TRL's ``hash_module`` of the full model, as with one process;
* TYPO samples its reference completions under ZeRO-3 (item 3: each process gathers the weights and samples its
  share), the tokens one process samples, then trains as one process;
* ``sync_ref_model`` (TRL's callback, which gathers under ZeRO-3) trains as one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deepspeed_launcher import DEEPSPEED_MISSING, deepspeed_available, launch_deepspeed
from transformers import AutoModelForCausalLM
from trl.trainer.utils import hash_module
from zero3_exactness_worker import IN_MEMORY_LOSS_TYPES, run_all

from trl_refpo.testing import save_tiny_llama, tiny_tokenizer


TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not deepspeed_available(), reason=DEEPSPEED_MISSING)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The policy and two references: same architecture and tokenizer, different weights."""
    tokenizer = tiny_tokenizer()
    return [
        str(save_tiny_llama(tmp_path_factory.mktemp(name), tokenizer, seed=seed))
        for name, seed in (("policy", 0), ("ref_a", 1), ("ref_b", 2))
    ]


@pytest.fixture(scope="module")
def single_process(checkpoints, tmp_path_factory):
    return run_all(str(tmp_path_factory.mktemp("single")), *checkpoints, per_device_batch_size=4, use_cpu=True)


@pytest.fixture(scope="module")
def zero3(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    launch_deepspeed(TESTS / "zero3_exactness_worker.py", out, *checkpoints, zero_stage=3)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("loss_type", IN_MEMORY_LOSS_TYPES)
def test_in_memory_policy_without_ref_model_trains_as_one_process(loss_type, zero3, single_process):
    rank0, rank1 = (rank[f"in_memory/{loss_type}"] for rank in zero3)
    expected = single_process[f"in_memory/{loss_type}"]
    assert zero3[0]["world_size"] == 2
    assert rank0["ref_model"] == "DeepSpeedEngine"  # the copy is sharded like the policy
    assert rank0["losses"] == rank1["losses"] and rank0["controller_state"] == rank1["controller_state"]
    assert len(rank0["losses"]) == len(expected["losses"]) == 2
    assert rank0["losses"] == pytest.approx(expected["losses"], rel=1e-4, abs=1e-6)
    if None not in expected["ref_chosen"]:  # TRL's own loss code (sigmoid) does not log them
        assert rank0["ref_chosen"] == pytest.approx(expected["ref_chosen"], rel=1e-4, abs=1e-5)
    for key, state in expected["controller_state"].items():
        assert rank0["controller_state"][key] == pytest.approx(state, rel=1e-4, abs=1e-7)


def test_cache_is_keyed_on_the_gathered_reference_weights(zero3, single_process, checkpoints):
    rank0, rank1 = zero3
    for name, path in (("a", checkpoints[1]), ("b", checkpoints[2])):
        full_hash = hash_module(AutoModelForCausalLM.from_pretrained(path))
        assert rank0[f"cache/{name}"]["reference_weights"] == [full_hash]  # not the placeholders' hash
        assert rank1[f"cache/{name}"]["reference_weights"] == [full_hash]
        assert single_process[f"cache/{name}"]["reference_weights"] == [full_hash]
        # Each reference's own log-probs (B rescored, not A's loaded), as one process scores them.
        assert rank0[f"cache/{name}"]["ref_chosen"] == pytest.approx(
            single_process[f"cache/{name}"]["ref_chosen"], rel=1e-5, abs=1e-5
        )
    assert rank0["cache/a"]["ref_chosen"] != pytest.approx(rank0["cache/b"]["ref_chosen"], rel=1e-3)


def test_typo_samples_its_reference_completions_as_one_process(zero3, single_process):
    rank0, rank1 = zero3[0]["typo_sampled"], zero3[1]["typo_sampled"]
    expected = single_process["typo_sampled"]
    assert len(expected["ref_completion_ids"]) == 8 and all(expected["ref_completion_ids"])
    assert rank0["ref_completion_ids"] == rank1["ref_completion_ids"] == expected["ref_completion_ids"]
    assert rank0["losses"] == rank1["losses"]
    assert rank0["losses"] == pytest.approx(expected["losses"], rel=1e-4, abs=1e-6)


def test_sync_ref_model_trains_as_one_process(zero3, single_process):
    rank0, rank1 = zero3[0]["sync"], zero3[1]["sync"]
    expected = single_process["sync"]
    assert rank0["losses"] == rank1["losses"]
    assert rank0["losses"] == pytest.approx(expected["losses"], rel=1e-4, abs=1e-6)
    # The sync after step 1 changed the reference that step 2 scores with (same first step as without it).
    without = single_process["in_memory/sigmoid"]["losses"]
    assert expected["losses"][0] == pytest.approx(without[0], rel=1e-6)
    assert expected["losses"][1] != pytest.approx(without[1], rel=1e-4)
