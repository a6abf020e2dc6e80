"""The training cases of tests/test_deepspeed.py, and the worker that runs them under ``accelerate launch``.

``python deepspeed_worker.py OUT REF_PATH CASE [CASE ...]`` (one launch per ZeRO stage, every case in it, so process
start-up and DeepSpeed initialisation are paid once) writes ``OUT/rank<r>.json``: per case, the logged losses,
``trainer.controller_state()`` after training, the world size and the engine types. The test runs the same
:func:`run_case` in a single process without DeepSpeed, with the global batch on one device, to compare.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


STEPS = 3
NUM_EXAMPLES = 12  # STEPS × global batch: every example seen once, in dataset order

# name -> (RefPOConfig overrides, whether the reference is the cross-tokenizer model at REF_PATH)
CASES: dict[str, tuple[dict, bool]] = {
    "sigmoid": ({"loss_type": ["sigmoid"]}, False),
    "alpha_dpo": ({"loss_type": ["alpha_dpo"], "alpha": 0.5}, False),
    "epsilon_dpo": ({"loss_type": ["epsilon_dpo"], "epsilon": 0.5}, False),  # a large ε so that β moves in 3 steps
    "cross_tokenizer": ({"loss_type": ["alpha_dpo"], "alpha": 0.5}, True),
}


def run_case(name: str, out: str, ref_path: str, per_device_batch_size: int, use_cpu: bool) -> dict:
    """Train ``STEPS`` steps of case ``name`` from the same tiny Llama on the same examples, in dataset order.

    Under ``accelerate launch`` with N processes, accelerate gives rank r the batches r, r+N, … of the sequential
    sampler, so one optimizer step sees examples ``[step·N·b, (step+1)·N·b)``: the same as one process with
    batch ``N·b``. Losses are logged every step (the Trainer averages them over processes).
    """
    from trl_refpo import RefPOConfig, RefPOTrainer
    from trl_refpo.testing import tiny_llama, tiny_tokenizer, toy_preference_dataset

    overrides, cross_tokenizer = CASES[name]
    tokenizer = tiny_tokenizer()
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
        **overrides,
    )
    if use_cpu:
        config["use_cpu"] = True
    if cross_tokenizer:
        config.update(ref_model_name_or_path=ref_path, ref_tokenizer_name_or_path=ref_path)
    model = tiny_llama(tokenizer, seed=0)
    trainer = RefPOTrainer(
        model=model,
        args=RefPOConfig(**config),
        train_dataset=toy_preference_dataset(NUM_EXAMPLES, seed=3),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    plugin = trainer.accelerator.state.deepspeed_plugin
    return {
        "losses": [entry["loss"] for entry in logged],
        "ref_chosen": [entry.get("logps/ref_chosen") for entry in logged],
        "controller_state": trainer.controller_state(),
        "world_size": trainer.accelerator.num_processes,
        "process_index": trainer.accelerator.process_index,
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "engine": type(trainer.model_wrapped).__name__,
        "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
    }


def main(out: str, ref_path: str, *cases: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deepspeed_launcher import patch_accelerate_for_cpu_deepspeed, skip_shm_comm_build

    os.environ.setdefault("TQDM_DISABLE", "1")
    patch_accelerate_for_cpu_deepspeed()
    skip_shm_comm_build()
    import torch

    torch.set_num_threads(1)
    results = {name: run_case(name, out, ref_path, per_device_batch_size=2, use_cpu=False) for name in cases}
    rank = next(iter(results.values()))["process_index"]
    Path(out, f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
    from deepspeed_launcher import end_worker

    end_worker()
