"""Quickstart: train a tiny Llama with any loss_type on a small bundled preference task, on CPU.

    python examples/quickstart.py                      # alpha_dpo, under a minute
    python examples/quickstart.py --loss_type simpo --beta 2.5
    python examples/quickstart.py --loss_type sigmoid flex_dpo ...   (any trl-refpo or TRL loss type)

The model and tokenizer are built in code (nothing is downloaded). The task: sort / reverse / copy a few
letters; `chosen` solves it, `rejected` does not. Prints the loss trajectory and the final ranking
accuracies: rewards/accuracies (implicit reward ranks chosen first) and logps/accuracies (the policy
itself ranks chosen first — the Reference Policies paper's Table 2 quantity).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from trl_refpo import RefPOConfig, RefPOTrainer, available_loss_types  # noqa: E402
from trl_refpo.testing import tiny_llama, tiny_tokenizer, toy_preference_dataset  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss_type", nargs="+", default=["alpha_dpo"], choices=available_loss_types())
    parser.add_argument("--loss_weights", nargs="+", type=float)
    parser.add_argument("--beta", type=float, default=None, help="default: 2.5 for simpo/alpha_dpo, else 0.1")
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--output_dir", default="outputs/quickstart")
    cli = parser.parse_args(argv)
    length_normalised = {"simpo", "alpha_dpo"} & set(cli.loss_type)
    beta = cli.beta if cli.beta is not None else (2.5 if length_normalised else 0.1)

    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, hidden_size=64, num_layers=2)
    train, test = toy_preference_dataset(256, seed=0), toy_preference_dataset(64, seed=1)
    args = RefPOConfig(
        output_dir=cli.output_dir,
        loss_type=cli.loss_type,
        loss_weights=cli.loss_weights,
        beta=beta,
        max_steps=cli.max_steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=5,
        eval_strategy="no",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        seed=0,
    )
    trainer = RefPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer)
    before = trainer.evaluate()
    start = time.time()
    trainer.train()
    after = trainer.evaluate()

    print(f"\nloss_type={cli.loss_type} beta={beta}: {cli.max_steps} steps in {time.time() - start:.1f}s")
    print("step  loss")
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"{entry['step']:>4}  {entry['loss']:.4f}")
    print("\nheld-out ranking accuracy   before   after")
    for key in ["eval_rewards/accuracies", "eval_logps/accuracies"]:
        print(f"{key:<27} {before[key]:>6.3f}  {after[key]:>6.3f}")
    return before, after


if __name__ == "__main__":
    main()
