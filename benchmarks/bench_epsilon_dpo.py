"""ε-DPO's cost: our ``sigmoid`` vs our ``epsilon_dpo`` vs the naive full-logits method (issue #3).

    python benchmarks/bench_epsilon_dpo.py            # SmolLM2-135M's architecture (random weights), 256-token completions
    python benchmarks/bench_epsilon_dpo.py --size long  # 4 pairs × 512-token completions, 4 layers: logits dominate memory
    python benchmarks/bench_epsilon_dpo.py --quick    # smoke run

The three methods run the same batches round-robin in one process (median step time); peak memory is measured
per method in a fresh subprocess (see ``common.py``). The naive method is
``naive_epsilon_dpo`` of ``tests/oracles.py``: the policy, reference and both perturbed policies as full
``(2B, T, V)`` logits, as in the authors' code.

Targets: epsilon_dpo ≤ 1.15× the time and ≤ 1.10× the peak memory of sigmoid, and ≤ 0.5× the naive method's
peak memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile


os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))  # the oracle the tests use

import torch  # noqa: E402
from common import (  # noqa: E402
    add_precision_argument,
    enable_activation_checkpointing,
    long_preference_dataset,
    precision_config,
    precision_flags,
    prepared_batches,
    print_comparisons,
    step_memory,
    time_then_measure_memory,
)
from oracles import naive_epsilon_dpo  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from trl_refpo import RefPOConfig, RefPOTrainer  # noqa: E402
from trl_refpo.testing import tiny_tokenizer  # noqa: E402


METHODS = ("sigmoid", "epsilon_dpo", "naive")
# "full" is SmolLM2-135M's architecture: 30 layers, hidden 576, vocabulary 49152, tied embeddings.
SIZES = {
    "full": dict(
        hidden=576,
        intermediate=1536,
        layers=30,
        heads=9,
        kv_heads=3,
        vocab=49152,
        prompt=32,
        completion=256,
        pairs=2,
        rounds=3,
    ),
    # Where the logits dominate memory: 4 pairs of 512-token completions through a 4-layer model of the same width.
    "long": dict(
        hidden=576,
        intermediate=1536,
        layers=4,
        heads=9,
        kv_heads=3,
        vocab=49152,
        prompt=32,
        completion=512,
        pairs=4,
        rounds=3,
    ),
    "quick": dict(
        hidden=64,
        intermediate=128,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab=32000,
        prompt=16,
        completion=64,
        pairs=1,
        rounds=2,
    ),
}
BETA, EPSILON = 0.1, 0.01


class NaiveEpsilonDPOTrainer(RefPOTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        _, _, losses = naive_epsilon_dpo(model, self.ref_model, inputs, self.args.beta, self.args.epsilon)
        return losses.mean()


def build_model(size):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer, LlamaForCausalLM(config)


def build(method, model, tokenizer, dataset, output_dir, gradient_checkpointing, precision):
    config = RefPOConfig(
        output_dir=output_dir,
        **precision,
        gradient_checkpointing=gradient_checkpointing,
        report_to=[],
        seed=0,
        per_device_train_batch_size=len(dataset),
        beta=BETA,
        epsilon=EPSILON,
        loss_type="sigmoid" if method == "sigmoid" else "epsilon_dpo",
    )
    trainer_class = NaiveEpsilonDPOTrainer if method == "naive" else RefPOTrainer
    trainer = trainer_class(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    enable_activation_checkpointing(trainer)
    return trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smoke run (same as --size quick)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--memory-of")
    parser.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="keep every activation (TRL's default is gradient checkpointing on)",
    )
    add_precision_argument(parser)
    cli = parser.parse_args()
    precision = precision_config(cli)
    size_name = "quick" if cli.quick else cli.size
    size = SIZES[size_name]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer, model = build_model(size)
    dataset = long_preference_dataset(4 * size["pairs"], size["prompt"], size["completion"])
    tmp = tempfile.mkdtemp()

    if cli.memory_of:
        trainer = build(cli.memory_of, model, tokenizer, dataset, tmp, cli.gradient_checkpointing, precision)
        print(json.dumps(step_memory(lambda: trainer, prepared_batches(trainer, size["pairs"]), steps=2)))
        return

    trainers = {
        name: build(name, model, tokenizer, dataset, tmp, cli.gradient_checkpointing, precision) for name in METHODS
    }
    batches = prepared_batches(trainers["sigmoid"], size["pairs"])
    batch_shape = tuple(batches[0]["input_ids"].shape)
    extra = ["--size", size_name] + ([] if cli.gradient_checkpointing else ["--no-gradient-checkpointing"])
    extra += precision_flags(cli)
    times, memory = time_then_measure_memory(__file__, trainers, batches, size["rounds"], extra)
    print(
        f"model: hidden={size['hidden']} layers={size['layers']} vocab={size['vocab']}; batch {batch_shape} "
        f"({size['pairs']} pair(s), {size['completion']}-token completions); {size['rounds']} rounds; "
        f"{torch.get_num_threads()} threads; {'CUDA bf16' if cli.cuda_bf16 else 'CPU fp32'}; gradient checkpointing {'on' if cli.gradient_checkpointing else 'off'}"
    )
    print_comparisons(
        times, memory, [("epsilon_dpo", "sigmoid", "≤1.15 time, ≤1.10 mem"), ("epsilon_dpo", "naive", "≤0.5 mem")]
    )


if __name__ == "__main__":
    main()
