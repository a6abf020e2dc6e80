"""Two bf16 training steps on the CUDA GPU per loss type (TRL's fused LM head and the pipeline's completion head),
printing one markdown row each; exits non-zero on a non-finite loss or a model left off the GPU.

    python benchmarks/gpu/cuda_smoke.py
"""

from __future__ import annotations

import math
import os
import sys
import tempfile


os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from trl_refpo import RefPOConfig, RefPOTrainer  # noqa: E402
from trl_refpo.testing import tiny_llama, tiny_tokenizer, toy_preference_dataset  # noqa: E402


LOSS_TYPES = {
    "sigmoid": {},
    "alpha_dpo": {"alpha": 0.2},
    "beta_dpo": {},
    "epsilon_dpo": {"epsilon": 0.5},
    "simpo": {"beta": 2.5},
}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    tokenizer = tiny_tokenizer()
    failed = False
    print("| loss_type | device | dtype | losses | grad/chosen_abs |")
    print("|---|---|---|---|---|")
    for loss_type, extra in LOSS_TYPES.items():
        args = RefPOConfig(
            output_dir=tempfile.mkdtemp(),
            bf16=True,
            gradient_checkpointing=False,
            report_to=[],
            disable_tqdm=True,
            per_device_train_batch_size=4,
            max_steps=2,
            logging_steps=1,
            save_strategy="no",
            learning_rate=1e-3,
            seed=0,
            loss_type=[loss_type],
            **extra,
        )
        trainer = RefPOTrainer(
            model=tiny_llama(tokenizer), args=args, train_dataset=toy_preference_dataset(8), processing_class=tokenizer
        )
        trainer.train()
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        losses = [entry["loss"] for entry in logged]
        device = next(trainer.model.parameters()).device.type
        bad = device != "cuda" or len(losses) != 2 or not all(math.isfinite(loss) for loss in losses)
        failed |= bad
        grad = logged[-1].get("grad/chosen_abs") if logged else None
        print(
            f"| {loss_type} | {device} | {'bf16' if trainer.args.bf16 else 'fp32'} | "
            f"{', '.join(f'{loss:.4f}' for loss in losses)}{' FAILED' if bad else ''} | {grad} |"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
