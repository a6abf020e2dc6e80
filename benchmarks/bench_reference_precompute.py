"""Precompute throughput of reference sources, and the cost of a cached rerun.

1. Cross-tokenizer vs same-tokenizer reference scoring the SAME texts (target: cross ≥ 0.9× same), with
   a reference model of the same size. Two cross-tokenizer references:
   - "cross (permuted ids)": the policy's tokenizer with its ids permuted — the same tokens, so the same
     amount of model work: the ratio isolates the cost of the cross-tokenizer path itself;
   - "cross (BPE)": a BPE tokenizer with other boundaries (its own token count, shown per pair).
   Measured: the precompute stage (``_precompute_ref_logps``: collation + reference forwards) and, separately,
   the reference's re-tokenisation of the text (a ``datasets.map`` in ``_prepare_dataset``, done once).
2. A rerun with the same cache key (target: < 5% of the first run's precompute stage).
3. The re-tokenisation's fixed cost with a large reference vocabulary (``--large-vocab``, 262,144 tokens as
   Gemma-3's): 8 pairs re-tokenised by ``TextReference.prepare_dataset`` — the ``datasets.map`` fingerprint is
   the tokenizers' fingerprint, not a dill pickle of the tokenizers.

Timing is the process's CPU time (one torch thread), not wall time: the machine this runs on is shared and
its load swings tenfold within minutes, which wall-clock ratios cannot survive; the CPU time of a
single-threaded process is what the work costs. Runs alternate A/B/C per repeat; medians are reported. Usage:
    PYTHONPATH=. python benchmarks/bench_reference_precompute.py [--pairs 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import statistics
import tempfile
import time


os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset, disable_caching  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import trl_refpo.reference.text as text_reference  # noqa: E402
from trl_refpo import RefPOConfig, RefPOTrainer  # noqa: E402
from trl_refpo.testing import LETTERS, tiny_bpe_tokenizer, tiny_llama, tiny_tokenizer  # noqa: E402


class TimedTrainer(RefPOTrainer):
    precompute_seconds: float = 0.0  # CPU seconds of the precompute stage

    def _precompute_ref_logps(self, dataset, name, batch_size):
        start = time.process_time()
        dataset = super()._precompute_ref_logps(dataset, name, batch_size)
        type(self).precompute_seconds = time.process_time() - start
        return dataset


def permuted_tokenizer(tokenizer, seed: int = 0) -> PreTrainedTokenizerFast:
    """The same tokens under other ids: a different tokenizer with identical boundaries."""
    vocab = tokenizer.get_vocab()
    ids = list(vocab.values())
    random.Random(seed).shuffle(ids)
    permuted = dict(zip(vocab.keys(), ids, strict=True))
    backend = Tokenizer(models.WordLevel(vocab=permuted, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def large_vocab_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``size`` tokens (the letters, then filler words) and 6,000 added special tokens."""
    words = ["<pad>", "<unk>", "<bos>", "<eos>", *LETTERS, ":", "copy"]
    vocab = {word: index for index, word in enumerate(words)}
    vocab.update({f"w{index}": index for index in range(len(vocab), size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    # Gemma-3's tokenizer carries thousands of added special tokens (``<unused…>``): dill pickles each one.
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<unused{index}>" for index in range(6000)]})
    return tokenizer


def retokenisation_seconds(policy_tokenizer, reference_tokenizer, pairs: int, repeats: int) -> list[float]:
    """CPU seconds of the reference's re-tokenisation of ``pairs`` pairs (TRL's policy tokenisation first, untimed)."""
    args = RefPOConfig(output_dir=tempfile.gettempdir(), bf16=False, use_cpu=True, report_to=[])
    dataset = long_preference_dataset(pairs).map(
        lambda example: {
            f"{column}_ids": policy_tokenizer(example[column], add_special_tokens=False)["input_ids"]
            for column in ("prompt", "chosen", "rejected")
        }
    )
    seconds = []
    for _ in range(repeats):
        source = text_reference.TextReference(reference_tokenizer, "full")
        start = time.process_time()
        source.prepare_dataset(dataset, policy_tokenizer, args, "train")
        seconds.append(time.process_time() - start)
    return seconds


def long_preference_dataset(num_pairs: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_pairs):
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(24, 40))]
        chosen = [rng.choice(LETTERS) for _ in range(rng.randint(24, 40))]
        rejected = [rng.choice(LETTERS) for _ in range(rng.randint(24, 40))]
        rows.append(
            {
                "prompt": "copy : " + " ".join(letters) + " :",
                "chosen": " " + " ".join(chosen),
                "rejected": " " + " ".join(rejected),
            }
        )
    return Dataset.from_list(rows)


def build(
    policy, policy_tokenizer, dataset, reference, reference_tokenizer, output_dir, cache_dir=None, batch_size=16
):
    args = RefPOConfig(
        output_dir=output_dir,
        bf16=False,
        use_cpu=True,
        report_to=[],
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=batch_size,
        ref_logps_cache_dir=cache_dir,
        disable_tqdm=True,
    )
    return TimedTrainer(
        model=policy,
        ref_model=reference,
        ref_tokenizer=reference_tokenizer,
        args=args,
        train_dataset=dataset,
        processing_class=policy_tokenizer,
    )


def timed_map():
    """Wrap the reference re-tokenisation so its time is measured apart from scoring."""
    original = text_reference.TextReference.prepare_dataset
    timings = []

    def prepare_dataset(self, *args, **kwargs):
        start = time.process_time()
        result = original(self, *args, **kwargs)
        timings.append(time.process_time() - start)
        return result

    text_reference.TextReference.prepare_dataset = prepare_dataset
    return timings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--large-vocab", type=int, default=262_144, help="section 3's vocabulary size (0: skip)")
    parser.add_argument("--only-large-vocab", action="store_true", help="run section 3 only")
    options = parser.parse_args()
    disable_caching()  # no datasets map cache: every run re-tokenises, as a fresh process would
    hf_logging.set_verbosity_error()
    logging.getLogger("trl_refpo").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    policy_tokenizer = tiny_tokenizer()
    if options.large_vocab:
        large = large_vocab_tokenizer(options.large_vocab)
        seconds = retokenisation_seconds(policy_tokenizer, large, pairs=8, repeats=options.repeats)
        print(
            f"\nRe-tokenisation of 8 pairs, reference vocabulary {len(large):,}: median {statistics.median(seconds):.3f} "
            f"CPU s (min {min(seconds):.3f}) over {options.repeats} runs"
        )
    if options.only_large_vocab:
        return
    tokenizers = {
        "same tokenizer": None,
        "cross (permuted ids)": permuted_tokenizer(policy_tokenizer),
        "cross (BPE)": tiny_bpe_tokenizer(),
    }
    dataset = long_preference_dataset(options.pairs)
    policy = tiny_llama(policy_tokenizer, hidden_size=options.hidden, num_layers=options.layers, seed=0)
    references = {
        name: tiny_llama(tokenizer or policy_tokenizer, hidden_size=options.hidden, num_layers=options.layers, seed=1)
        for name, tokenizer in tokenizers.items()
    }
    tokenize_timings = timed_map()
    scoring = {name: [] for name in tokenizers}
    retokenise = {name: [] for name in tokenizers}
    tokens_per_pair = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(options.repeats):
            for name, tokenizer in tokenizers.items():
                tokenize_timings.clear()
                trainer = build(policy, policy_tokenizer, dataset, copy.deepcopy(references[name]), tokenizer, tmp)
                scoring[name].append(TimedTrainer.precompute_seconds)
                retokenise[name].append(sum(tokenize_timings))
                key = "ref_chosen_lengths"
                tokens_per_pair[name] = sum(trainer.train_dataset[key]) / len(trainer.train_dataset) + sum(
                    trainer.train_dataset["ref_rejected_lengths"]
                ) / len(trainer.train_dataset)

        print(
            f"\nPrecompute, {options.pairs} pairs, reference Llama {options.hidden}x{options.layers}, CPU fp32, "
            f"1 thread, CPU seconds; median of {options.repeats} alternating runs"
        )
        print(
            f"{'reference':<22}{'scoring s':>10}{'pairs/s':>10}{'ratio':>8}{'+retok s':>10}{'ratio incl.':>13}"
            f"{'tok/pair':>10}"
        )
        base = statistics.median(scoring["same tokenizer"])
        base_total = base + statistics.median(retokenise["same tokenizer"])
        for name in tokenizers:
            seconds = statistics.median(scoring[name])
            total = seconds + statistics.median(retokenise[name])
            print(
                f"{name:<22}{seconds:>10.2f}{options.pairs / seconds:>10.1f}{base / seconds:>8.2f}"
                f"{statistics.median(retokenise[name]):>10.2f}{base_total / total:>13.2f}{tokens_per_pair[name]:>10.1f}"
            )

        # Cached rerun: same key → load; measured against the first (scoring + writing) run.
        cache_dir = os.path.join(tmp, "cache")
        first, cached, first_init, cached_init = [], [], [], []
        for repeat in range(options.repeats):
            repeat_cache = f"{cache_dir}-{repeat}"
            for runs, init_runs in ((first, first_init), (cached, cached_init)):
                start = time.process_time()
                build(
                    policy,
                    policy_tokenizer,
                    dataset,
                    copy.deepcopy(references["cross (BPE)"]),
                    tokenizers["cross (BPE)"],
                    tmp,
                    cache_dir=repeat_cache,
                )
                init_runs.append(time.process_time() - start)
                runs.append(TimedTrainer.precompute_seconds)
        first_s, cached_s = statistics.median(first), statistics.median(cached)
        first_init_s, cached_init_s = statistics.median(first_init), statistics.median(cached_init)
        print("\nCache (cross (BPE) reference)")
        print(
            f"  precompute stage: first {first_s:.2f}s, cached rerun {cached_s:.3f}s = {100 * cached_s / first_s:.1f}% "
            "(target < 5%)"
        )
        print(
            f"  whole trainer construction: first {first_init_s:.2f}s, cached rerun {cached_init_s:.2f}s = "
            f"{100 * cached_init_s / first_init_s:.1f}%"
        )


if __name__ == "__main__":
    main()
