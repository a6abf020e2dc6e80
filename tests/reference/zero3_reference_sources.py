"""Run by tests/test_reference_sources.py under ``accelerate launch`` (DeepSpeed ZeRO-3, 2 CPU processes).

Each rank trains two steps per reference source and writes ``OUT/rank<r>.json``: the logged losses and mean
reference log-probs, and what reached ``compute_loss`` (dtype and values of supplied reference columns).
"""

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deepspeed_launcher import patch_accelerate_for_cpu_deepspeed, skip_shm_comm_build  # noqa: E402


os.environ.setdefault("TQDM_DISABLE", "1")
patch_accelerate_for_cpu_deepspeed()
skip_shm_comm_build()

from trl_refpo import RefPOConfig, RefPOTrainer  # noqa: E402
from trl_refpo.testing import tiny_llama, tiny_tokenizer, toy_preference_dataset  # noqa: E402


SUPPLIED = [-1.23456789 - index for index in range(16)]


def main(out: str, ref_path: str) -> None:
    tokenizer = tiny_tokenizer()
    results = {}
    for case in ("cross_online", "cross_precomputed", "supplied"):
        dataset = toy_preference_dataset(16, seed=2)
        config = dict(
            output_dir=f"{out}/{case}",
            bf16=False,
            gradient_checkpointing=False,
            report_to=[],
            disable_tqdm=True,
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
            save_strategy="no",
            learning_rate=1e-3,
            loss_type=["flex_dpo"],
            train_sampling_strategy="sequential",
            seed=0,
        )
        if case.startswith("cross"):
            config.update(ref_model_name_or_path=ref_path, ref_tokenizer_name_or_path=ref_path)
            config["precompute_ref_log_probs"] = case == "cross_precomputed"
        else:
            dataset = dataset.add_column("ref_chosen_logps", SUPPLIED).add_column(
                "ref_rejected_logps", [value - 0.5 for value in SUPPLIED]
            )
        trainer = RefPOTrainer(
            model=tiny_llama(tokenizer), args=RefPOConfig(**config), train_dataset=dataset, processing_class=tokenizer
        )
        seen = []
        compute_loss = trainer.compute_loss

        def spy(model, inputs, *args, compute_loss=compute_loss, seen=seen, **kwargs):
            column = inputs.get("ref_chosen_logps")
            seen.append(None if column is None else [str(column.dtype), column.tolist()])
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = spy
        trainer.train()
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        results[case] = {
            "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
            "losses": [entry["loss"] for entry in logged],
            "ref_chosen": [entry["logps/ref_chosen"] for entry in logged],
            "seen": seen,
            "world_size": trainer.accelerator.num_processes,
        }
    Path(out, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
    from deepspeed_launcher import end_worker

    end_worker()
