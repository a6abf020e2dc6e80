"""Step time and peak memory: RefPOTrainer(sigmoid) vs TRL's DPOTrainer, and each new loss type vs our sigmoid.

    python benchmarks/bench_core.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_core.py --quick    # smoke run
    python benchmarks/bench_core.py --cuda-bf16   # on a CUDA GPU in bf16 (memory: CUDA allocated)

Targets (issue #2): sigmoid ≤ 1.02× TRL's time and ≤ 1.00× its memory; flex_dpo / alpha_dpo / beta_dpo
≤ 1.02× our sigmoid; simpo / probability ≤ 0.75× (no reference forward).

Our ``sigmoid`` runs TRL's own loss code and LM head; the trl-refpo types run the pipeline, whose LM head
projects only completion positions (``trl_refpo/heads/completion.py``). So the reference-free types are also compared
with ``sigmoid_pipeline`` — sigmoid's loss through the pipeline (``flex_dpo`` with β⁺ = β⁻ = β) — where the
only difference left is the reference forward.
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

import torch  # noqa: E402
from common import (  # noqa: E402
    add_precision_argument,
    bench_model,
    long_preference_dataset,
    precision_config,
    precision_flags,
    prepared_batches,
    print_comparisons,
    step_memory,
    time_then_measure_memory,
)
from trl import DPOConfig as TRLDPOConfig  # noqa: E402
from trl import DPOTrainer as TRLDPOTrainer  # noqa: E402

from trl_refpo import RefPOConfig, RefPOTrainer  # noqa: E402


METHODS = {
    "trl_sigmoid": None,
    "sigmoid": dict(loss_type="sigmoid"),
    "sigmoid_pipeline": dict(loss_type="flex_dpo"),
    "flex_dpo": dict(loss_type="flex_dpo", beta_rejected=0.05),
    "alpha_dpo": dict(loss_type="alpha_dpo", beta=2.5),
    "beta_dpo": dict(loss_type="beta_dpo"),
    "simpo": dict(loss_type="simpo", beta=2.5),
    "probability": dict(loss_type="probability"),
}
TARGETS = {"sigmoid": 1.02, "flex_dpo": 1.02, "alpha_dpo": 1.02, "beta_dpo": 1.02, "simpo": 0.75, "probability": 0.75}
SIZES = {
    "full": dict(hidden=256, layers=4, vocab=32000, prompt=48, completion=96, pairs=4, rounds=20),
    "quick": dict(hidden=64, layers=2, vocab=4000, prompt=16, completion=32, pairs=2, rounds=3),
}


def build(method: str, model, tokenizer, dataset, output_dir: str, precision: dict):
    common = dict(
        output_dir=output_dir,
        **precision,
        gradient_checkpointing=False,
        report_to=[],
        per_device_train_batch_size=len(dataset),
        seed=0,
    )
    ref = copy.deepcopy(model)
    if method == "trl_sigmoid":
        return TRLDPOTrainer(
            model=copy.deepcopy(model),
            ref_model=ref,
            args=TRLDPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    config = RefPOConfig(**common, **METHODS[method])
    needs_ref = config.needs_reference
    return RefPOTrainer(
        model=copy.deepcopy(model),
        ref_model=ref if needs_ref else None,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def setup(size):
    tokenizer, model = bench_model(size["hidden"], size["layers"], size["vocab"])
    dataset = long_preference_dataset(size["pairs"] * 4, size["prompt"], size["completion"])
    return tokenizer, model, dataset


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-of")
    add_precision_argument(parser)
    cli = parser.parse_args()
    precision = precision_config(cli)
    size = SIZES["quick" if cli.quick else "full"]
    torch.manual_seed(0)
    tokenizer, model, dataset = setup(size)
    tmp = tempfile.mkdtemp()

    if cli.memory_of:
        trainer = build(cli.memory_of, model, tokenizer, dataset, tmp, precision)
        batches = prepared_batches(trainer, size["pairs"])
        print(json.dumps(step_memory(lambda: trainer, batches, steps=4)))
        return

    trainers = {name: build(name, model, tokenizer, dataset, tmp, precision) for name in METHODS}
    batches = prepared_batches(trainers["sigmoid"], size["pairs"])
    times, memory = time_then_measure_memory(
        __file__, trainers, batches, size["rounds"], (["--quick"] if cli.quick else []) + precision_flags(cli)
    )
    print(
        f"model: hidden={size['hidden']} layers={size['layers']} vocab={size['vocab']}; "
        f"{size['pairs']} pairs/step, ~{size['prompt']}+{size['completion']} tokens; {size['rounds']} rounds; "
        f"{'CUDA bf16' if cli.cuda_bf16 else 'CPU fp32'}"
    )
    print_comparisons(
        times,
        memory,
        [("sigmoid", "trl_sigmoid", "≤1.02 time, ≤1.00 mem")]
        + [
            (name, "sigmoid", f"≤{TARGETS[name]}")
            for name in ["flex_dpo", "alpha_dpo", "beta_dpo", "simpo", "probability"]
        ]
        + [("sigmoid_pipeline", "sigmoid", "(LM heads: pipeline vs TRL's)")]
        + [(name, "sigmoid_pipeline", "(like for like: the reference forward)") for name in ["simpo", "probability"]],
    )


if __name__ == "__main__":
    main()
