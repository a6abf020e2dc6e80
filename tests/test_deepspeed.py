"""DeepSpeed ZeRO-2 and ZeRO-3 with 2 CPU processes (issue 6): every case of tests/deepspeed_worker.py in one
``accelerate launch`` per stage. Both ranks must hold the same controller state (ε-DPO's β, α-DPO's μ/σ), and the
logged losses must match one process without DeepSpeed on the same global batches.

CPU DeepSpeed needs the test-only accelerate patch in tests/deepspeed_launcher.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deepspeed_launcher import DEEPSPEED_MISSING, deepspeed_available, launch_deepspeed
from deepspeed_worker import CASES, run_case

import trl_refpo
from trl_refpo.testing import save_tiny_llama, tiny_bpe_tokenizer


TESTS = Path(__file__).resolve().parent
EPSILON_MISSING = "epsilon_dpo is not a loss type of this trl_refpo (trl_refpo.available_loss_types())"

pytestmark = pytest.mark.skipif(not deepspeed_available(), reason=DEEPSPEED_MISSING)


def available_cases() -> list[str]:
    loss_types = set(trl_refpo.available_loss_types())
    return [name for name, (overrides, _) in CASES.items() if set(overrides["loss_type"]) <= loss_types]


@pytest.fixture(scope="module")
def ref_path(tmp_path_factory):
    """The cross-tokenizer reference: a tiny Llama over ``tiny_bpe_tokenizer``, saved with its tokenizer."""
    return Path(save_tiny_llama(tmp_path_factory.mktemp("ref"), tiny_bpe_tokenizer(), seed=1))


@pytest.fixture(scope="module")
def single_process(ref_path, tmp_path_factory):
    """Each case in this process, no DeepSpeed, one device holding the 2-process global batch."""
    out = tmp_path_factory.mktemp("single")
    return {
        name: run_case(name, str(out), str(ref_path), per_device_batch_size=4, use_cpu=True)
        for name in available_cases()
    }


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request, ref_path, tmp_path_factory):
    """One 2-process launch per ZeRO stage; returns the two ranks' results."""
    out = tmp_path_factory.mktemp(f"zero{request.param}")
    launch_deepspeed(TESTS / "deepspeed_worker.py", out, ref_path, *available_cases(), zero_stage=request.param)
    return request.param, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("case", list(CASES))
def test_zero_two_processes_match_single_process(case, zero_run, single_process):
    if case not in available_cases():
        pytest.skip(EPSILON_MISSING)
    stage, ranks = zero_run
    rank0, rank1 = (rank[case] for rank in ranks)
    expected = single_process[case]

    assert [rank0["world_size"], rank1["world_size"]] == [2, 2]
    assert [rank0["process_index"], rank1["process_index"]] == [0, 1]
    assert rank0["zero_stage"] == stage and rank0["engine"] == "DeepSpeedEngine"
    if rank0["ref_model"] is not None:
        assert rank0["ref_model"] == "DeepSpeedEngine"  # the reference is sharded like the policy

    # Synced state: exactly the same on both ranks (β of ε-DPO, μ/σ of α-DPO are computed from all-reduced values).
    assert rank0["controller_state"] == rank1["controller_state"]
    assert rank0["losses"] == rank1["losses"]
    if case in ("alpha_dpo", "cross_tokenizer"):
        (moments,) = rank0["controller_state"].values()
        assert moments["sigma"] > 0  # it has moved from its initial 0
    if case == "epsilon_dpo":
        (state,) = rank0["controller_state"].values()
        assert state["beta"] != 0.1  # it has moved from β₀ with ε = 0.5

    # Same numbers as one process on the same global batches, up to float rounding: the first step before any
    # optimizer step, later ones after DeepSpeed's ZeRO optimizer wrapping the same torch AdamW (measured: ≤ 3e-6 rel).
    assert len(rank0["losses"]) == len(expected["losses"]) == 3
    assert rank0["losses"] == pytest.approx(expected["losses"], rel=1e-4, abs=1e-6)
    if None in expected["ref_chosen"]:  # TRL's own loss code (sigmoid) does not log the reference log-probs
        assert rank0["ref_chosen"] == expected["ref_chosen"]
    else:
        assert rank0["ref_chosen"] == pytest.approx(expected["ref_chosen"], rel=1e-4, abs=1e-5)
    assert rank0["controller_state"].keys() == expected["controller_state"].keys()
    for key, state in expected["controller_state"].items():
        assert rank0["controller_state"][key] == pytest.approx(state, rel=1e-4, abs=1e-7)
