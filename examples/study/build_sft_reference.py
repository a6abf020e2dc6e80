"""Build the study's stronger, compatible reference: the initial policy fine-tuned on the CHOSEN replies.

    python examples/study/build_sft_reference.py          # -> examples/study/sft_reference/ (not committed)

TRL's ``SFTTrainer`` trains SmolLM2-135M-Instruct (``offline:smollm2-135m-instruct``) for 16 steps of 4
prompt–chosen pairs of ``data/train.jsonl`` (loss on the reply only, lr 1e-5, seed 0, CPU) and saves the model
and tokenizer. The study's ``sft_reference`` arm names the folder as ``ref_model_name_or_path``; it shares the
policy's tokenizer, so it scores the policy's own token ids.
"""

import os
import sys
from pathlib import Path


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

HERE = Path(__file__).parent
MODEL = "offline:smollm2-135m-instruct"


def main() -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trl_refpo.cli.run import resolve_model_path

    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    pairs = load_dataset("json", data_files=str(HERE / "data" / "train.jsonl"), split="train")
    dataset = pairs.map(
        lambda row: {"prompt": row["prompt"], "completion": row["chosen"]}, remove_columns=pairs.column_names
    )
    output_dir = HERE / "sft_reference"
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=16,
        per_device_train_batch_size=4,
        learning_rate=1e-5,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=3,
        logging_steps=4,
        seed=0,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        max_length=256,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    print(f"SFT reference saved to {output_dir}")


if __name__ == "__main__":
    main()
