"""The ZeRO-3 cases of tests/test_zero3_exactness.py (issue 18), and the worker that runs them under
``accelerate launch`` with ``zero.Init`` on (the policy and references loaded by ``from_pretrained`` arrive partitioned).

``python zero3_exactness_worker.py OUT POLICY REF_A REF_B`` writes ``OUT/rank<r>.json``:

* ``in_memory/<loss>``: ``model = AutoModelForCausalLM.from_pretrained(POLICY)`` after the config, then the trainer
  with no ``ref_model`` (the reference is a copy of that in-memory policy): losses and reference log-probs;
* ``cache/<a|b>``: precomputed reference log-probs of REF_A, then of REF_B (same tokenizer and data, other weights),
  into one ``ref_logps_cache_dir``: the scored values and the key's ``reference_weights``;
* ``typo_sampled``: TYPO with its reference completions sampled before training from that in-memory policy
  (``typo_generation_top_k=1``: the same tokens however the prompts are split over processes and seeded);
* ``sync``: ``sigmoid`` with ``sync_ref_model`` (TRL's callback mixes the policy into the reference after step 1).

The test runs :func:`run_all` in one process without DeepSpeed to compare.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


IN_MEMORY_LOSS_TYPES = ("sigmoid", "alpha_dpo", "epsilon_dpo")
STEPS = 2
NUM_EXAMPLES = 8  # STEPS × global batch 4, in dataset order


def _config(out: str, name: str, per_device_batch_size: int, use_cpu: bool, **overrides):
    """The shared settings, updated by ``overrides``; an override of None removes the setting (TYPO has no β)."""
    from trl_refpo import RefPOConfig

    config = dict(
        output_dir=f"{out}/{name}",
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        disable_tqdm=True,
        per_device_train_batch_size=per_device_batch_size,
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        beta=0.1,
        train_sampling_strategy="sequential",
        seed=0,
        dataloader_num_workers=0,
    )
    config = {key: value for key, value in {**config, **overrides}.items() if value is not None}
    if use_cpu:
        config["use_cpu"] = True
    return RefPOConfig(**config)


def run_in_memory(
    loss_type: str, out: str, policy: str, per_device_batch_size: int, use_cpu: bool, name: str | None = None, **fields
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_refpo import RefPOTrainer
    from trl_refpo.testing import toy_preference_dataset

    extra = {"epsilon": 0.5} if loss_type == "epsilon_dpo" else {}
    name = name or f"in_memory_{loss_type}"
    args = _config(out, name, per_device_batch_size, use_cpu, loss_type=[loss_type], **extra, **fields)
    model = AutoModelForCausalLM.from_pretrained(policy)  # after the config: partitioned by zero.Init under ZeRO-3
    trainer = RefPOTrainer(
        model=model,
        args=args,
        train_dataset=toy_preference_dataset(NUM_EXAMPLES, seed=3),
        processing_class=AutoTokenizer.from_pretrained(policy),
    )
    completions = list(trainer.train_dataset["ref_completion_ids"]) if loss_type == "typo" else None
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "losses": [entry["loss"] for entry in logged],
        "ref_chosen": [entry.get("logps/ref_chosen") for entry in logged],
        "controller_state": trainer.controller_state(),
        "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
        "ref_completion_ids": completions,
    }


def run_cached(reference: str, out: str, policy: str, cache_dir: str, use_cpu: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_refpo import RefPOTrainer
    from trl_refpo.reference import precompute

    args = _config(
        out,
        "cache",
        2,
        use_cpu,
        loss_type=["flex_dpo"],
        precompute_ref_log_probs=True,
        ref_model_name_or_path=reference,
        ref_logps_cache_dir=cache_dir,
    )
    keys = []
    original = precompute.cache_key_parts

    def recording(*call_args, **kwargs):
        parts = original(*call_args, **kwargs)
        keys.append(parts["reference_weights"])
        return parts

    precompute.cache_key_parts = recording
    try:
        from trl_refpo.testing import toy_preference_dataset

        trainer = RefPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(policy),
            args=args,
            train_dataset=toy_preference_dataset(NUM_EXAMPLES, seed=3),
            processing_class=AutoTokenizer.from_pretrained(policy),
        )
        dataset = trainer.train_dataset  # scored (or loaded) in the constructor
    finally:
        precompute.cache_key_parts = original
    return {"ref_chosen": [round(value, 6) for value in dataset["ref_chosen_logps"]], "reference_weights": keys}


def run_all(out: str, policy: str, ref_a: str, ref_b: str, per_device_batch_size: int, use_cpu: bool) -> dict:
    results = {
        f"in_memory/{loss}": run_in_memory(loss, out, policy, per_device_batch_size, use_cpu)
        for loss in IN_MEMORY_LOSS_TYPES
    }
    cache_dir = f"{out}/ref_logps_cache"
    for name, reference in (("a", ref_a), ("b", ref_b)):
        results[f"cache/{name}"] = run_cached(reference, out, policy, cache_dir, use_cpu)
    results["typo_sampled"] = run_in_memory(
        "typo",
        out,
        policy,
        per_device_batch_size,
        use_cpu,
        beta=None,
        typo_generate_ref_completions=True,
        typo_generation_top_k=1,
        typo_generation_max_new_tokens=6,
        typo_generation_cache_dir=f"{out}/typo_cache",
    )
    results["sync"] = run_in_memory(
        "sigmoid",
        out,
        policy,
        per_device_batch_size,
        use_cpu,
        name="sync",
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.5,
    )
    return results


def main(out: str, policy: str, ref_a: str, ref_b: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deepspeed_launcher import patch_accelerate_for_cpu_deepspeed, skip_shm_comm_build

    os.environ.setdefault("TQDM_DISABLE", "1")
    patch_accelerate_for_cpu_deepspeed()
    skip_shm_comm_build()
    import torch
    from accelerate import PartialState

    torch.set_num_threads(1)
    results = run_all(out, policy, ref_a, ref_b, per_device_batch_size=2, use_cpu=False)
    results["world_size"] = PartialState().num_processes
    Path(out, f"rank{PartialState().process_index}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
    from deepspeed_launcher import end_worker

    end_worker()
