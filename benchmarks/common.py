"""Shared helpers for the benchmarks: a CPU-sized model, fixed batches, alternating timing, peak memory.

Timing: every method runs the same batches, interleaved round-robin in ONE process (so machine noise
hits all methods alike); we report the median step time and its ratio to the baseline.
Memory: each method runs in a fresh subprocess. The kernel's peak-RSS mark (VmHWM) is reset just before
the first step (``/proc/self/clear_refs``), so "step peak" is the peak RSS during the training steps
minus the RSS before them: what the steps themselves add. "total peak" also counts the weights.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time

import psutil
import torch
from datasets import Dataset


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from trl_refpo.testing import LETTERS, tiny_llama, tiny_tokenizer  # noqa: E402


def long_preference_dataset(num_examples: int, prompt_tokens: int, completion_tokens: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)

    def words(n):
        return " ".join(rng.choice(LETTERS) for _ in range(n))

    return Dataset.from_list(
        [
            {
                "prompt": words(prompt_tokens),
                "chosen": " " + words(completion_tokens),
                "rejected": " " + words(completion_tokens - rng.randint(0, completion_tokens // 4)),
            }
            for _ in range(num_examples)
        ]
    )


def bench_model(hidden_size: int, num_layers: int, vocab_size: int, seed: int = 0):
    tokenizer = tiny_tokenizer()
    return tokenizer, tiny_llama(
        tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed, vocab_size=vocab_size
    )


def prepared_batches(trainer, pairs: int) -> list[dict]:
    """The trainer's own collated, device-placed batches of ``pairs`` preference pairs each."""
    trainer.args.per_device_train_batch_size = pairs
    trainer._train_batch_size = pairs  # what get_train_dataloader reads
    return [trainer._prepare_inputs(batch) for batch in trainer.get_train_dataloader()]


def enable_activation_checkpointing(trainer) -> None:
    """Turn on activation checkpointing as ``Trainer.train`` does before its first step, if the config asks for it.

    The benchmarks call ``compute_loss`` directly, so without this ``gradient_checkpointing=True`` would do nothing.
    """
    args = trainer.args
    if args.activation_checkpointing:
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)


def training_step(trainer, batch, optimizer):
    trainer.model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    optimizer.step()
    return loss.item()


def alternate(methods: dict, batches: list, rounds: int) -> dict[str, float]:
    """Median seconds per training step for each method, measured round-robin on the same batches."""
    optimizers = {name: torch.optim.AdamW(t.model.parameters(), lr=1e-6) for name, t in methods.items()}
    for name, trainer in methods.items():  # warm-up
        training_step(trainer, batches[0], optimizers[name])
    times = {name: [] for name in methods}
    for index in range(rounds):
        batch = batches[index % len(batches)]
        order = list(methods) if index % 2 == 0 else list(reversed(methods))
        for name in order:
            start = time.perf_counter()
            training_step(methods[name], batch, optimizers[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def add_precision_argument(parser) -> None:
    parser.add_argument(
        "--cuda-bf16",
        action="store_true",
        help="train on the CUDA GPU in bf16 (default: CPU fp32); memory is then CUDA memory",
    )


def precision_config(cli) -> dict:
    """The config fields of the chosen mode: CPU fp32, or the CUDA GPU in bf16."""
    if cli.cuda_bf16:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda-bf16 needs a CUDA GPU; none is visible.")
        return dict(bf16=True, use_cpu=False)
    return dict(bf16=False, use_cpu=True)


def precision_flags(cli) -> list[str]:
    return ["--cuda-bf16"] if cli.cuda_bf16 else []


def step_memory(build_trainer, batches: list, steps: int) -> dict[str, float]:
    """Run in a fresh process: peak memory added by `steps` training steps, and the total peak (MiB): RSS on CPU,
    CUDA allocated memory when the trainer is on a GPU."""
    trainer = build_trainer()
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-6)
    training_step(trainer, batches[0], optimizer)  # optimizer state and allocator pools exist in every method
    if trainer.args.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for index in range(steps):
            training_step(trainer, batches[index % len(batches)], optimizer)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"step_peak_mib": (peak - before) / 2**20, "total_peak_mib": peak / 2**20}
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark
    before = psutil.Process().memory_info().rss
    for index in range(steps):
        training_step(trainer, batches[index % len(batches)], optimizer)
    peak = _peak_rss_bytes()
    return {"step_peak_mib": (peak - before) / 2**20, "total_peak_mib": peak / 2**20}


#: A fixed mmap threshold turns off glibc's adaptive one, which otherwise rises to the size of the largest freed
#: block (up to 32 MiB) and keeps later blocks of that size in the heap after they are freed: peak RSS then depends
#: on the allocation history. With it fixed, every block over 128 KiB is returned to the OS when freed, and the
#: peak RSS follows the peak of live memory.
MEMORY_RUN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run_memory_subprocess(script: str, method: str, extra_args: list[str] | None = None) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, script, "--memory-of", method, *(extra_args or [])],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **MEMORY_RUN_ENV},
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def print_table(title: str, rows: list[tuple], headers: tuple):
    print(f"\n{title}")
    print(" | ".join(headers))
    print(" | ".join("---" for _ in headers))
    for row in rows:
        print(" | ".join(f"{value:.3f}" if isinstance(value, float) else str(value) for value in row))


def time_then_measure_memory(script: str, trainers: dict, batches: list, rounds: int, extra_args: list[str]):
    """Median step times (methods alternating in this process), then each method's peak memory in a fresh process.

    The timed trainers are dropped before the memory runs so the subprocesses do not compete with them for RAM.
    """
    times = alternate(trainers, batches, rounds)
    print(
        "median step ms: " + ", ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in times.items()), flush=True
    )
    methods = list(trainers)
    trainers.clear()
    batches.clear()
    gc.collect()
    memory = {name: run_memory_subprocess(script, name, extra_args) for name in methods}
    return times, memory


def print_comparisons(times: dict, memory: dict, comparisons: list[tuple[str, str, str]]):
    """``comparisons``: (method, baseline, target) rows of ratios, then every method's absolute numbers."""
    rows = [
        (
            f"{method} vs {baseline}",
            times[method] / times[baseline],
            memory[method]["step_peak_mib"] / memory[baseline]["step_peak_mib"],
            memory[method]["total_peak_mib"] / memory[baseline]["total_peak_mib"],
            target,
        )
        for method, baseline, target in comparisons
    ]
    print_table(
        "Ratios (median step time; peak RSS added by the steps; total process peak RSS)",
        rows,
        ("comparison", "time ratio", "step-memory ratio", "total-memory ratio", "target"),
    )
    print_table(
        "Absolute",
        [(name, times[name] * 1000, memory[name]["step_peak_mib"], memory[name]["total_peak_mib"]) for name in times],
        ("method", "median step ms", "step peak MiB", "total peak MiB"),
    )
