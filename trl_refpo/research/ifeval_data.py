"""IFEval-verified prompts and on-policy preference pairs for the main job.

**Prompts** (:func:`make_prompts`). A base task a 135M chat model can answer in a few sentences ("Write a short
description of a lighthouse.") followed by one or two IFEval instructions, each worded by its checker's own
``build_description`` with kwargs chosen for short replies; a second instruction never conflicts with the first
(IFEval's ``INSTRUCTION_CONFLICTS``). Base tasks are a template × a topic; train and held-out use disjoint topic
lists, so they share no base task. The held-out split cycles its first instruction over :data:`INSTRUCTION_IDS`
(balanced), and 30 % of its prompts get a second one. Every row has IFEval's fields: ``key``, ``prompt``,
``instruction_id_list``, ``kwargs`` (one dict per id, all of that checker's kwargs).

**Pairs** (:func:`build_pairs`), as open on-policy instruction-following recipes build them: the policy samples
``num_samples`` replies per train prompt; IFEval's strict verdict (:mod:`.ifeval_judge`) judges each; ``chosen`` is
the first reply that follows every instruction; ``rejected`` is, among the replies that fail at least one, the one
closest to ``chosen`` in token length (ties: the earlier sample), so that length is not what is learned. Prompts
with no passing or no failing sample are dropped and counted in the card.

Left out of :data:`INSTRUCTION_IDS` (see :data:`EXCLUDED`): ids whose checker cannot run offline (NLTK's punkt data
is on no package registry) and ids that need long or multi-part replies.

Rebuild (opt-in; the built files ship in ``research/data/``)::

    python -m trl_refpo.research.ifeval_data --output_dir trl_refpo/research/data --seed 0

(the defaults are the shipped build's settings; 6.5 min on 2 CPU cores with the default ``--workers``, nearly all
of it sampling).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

from ..objectives.typo_completions import eos_token_ids
from ..testing import tiny_llama, tiny_tokenizer
from ..weights import full_weights_hash
from .ifeval_judge import build_checker, conflicts, judge, verifier_version
from .offline_models import OfflineModelUnavailable, resolve_model_path


DATA_DIR = Path(__file__).parent / "data"

# kwargs samplers: short replies (≤ ~60 tokens can pass every one of them)
KEYWORDS = ["simple", "important", "useful", "small", "bright", "quiet", "fresh", "strong", "gentle", "warm"]
FORBIDDEN = ["very", "really", "also", "many", "often", "usually", "great", "good"]
LETTERS = list("aeiost")


def _kwargs_samplers() -> dict:
    return {
        "punctuation:no_comma": lambda rng: {},
        "change_case:english_lowercase": lambda rng: {},
        "change_case:english_capital": lambda rng: {},
        "detectable_format:title": lambda rng: {},
        "detectable_format:json_format": lambda rng: {},
        "startend:quotation": lambda rng: {},
        "detectable_format:number_bullet_lists": lambda rng: {"num_bullets": rng.choice([2, 3])},
        "detectable_format:number_highlighted_sections": lambda rng: {"num_highlights": rng.choice([1, 2])},
        "detectable_format:multiple_sections": lambda rng: {
            "section_spliter": rng.choice(["Section", "SECTION"]),
            "num_sections": 2,
        },
        "detectable_content:postscript": lambda rng: {"postscript_marker": rng.choice(["P.S.", "P.P.S"])},
        "detectable_content:number_placeholders": lambda rng: {"num_placeholders": rng.choice([1, 2])},
        "startend:end_checker": lambda rng: {
            "end_phrase": rng.choice(["Any other questions?", "Is there anything else I can help with?"])
        },
        "keywords:existence": lambda rng: {"keywords": rng.sample(KEYWORDS, 2)},
        "keywords:frequency": lambda rng: {"keyword": rng.choice(KEYWORDS), "frequency": 2, "relation": "at least"},
        "keywords:forbidden_words": lambda rng: {"forbidden_words": rng.sample(FORBIDDEN, 2)},
        "keywords:letter_frequency": lambda rng: {
            "letter": rng.choice(LETTERS),
            "let_frequency": rng.choice([3, 5]),
            "let_relation": "at least",
        },
        "length_constraints:number_words": lambda rng: {"num_words": rng.choice([30, 50]), "relation": "less than"},
        "length_constraints:number_paragraphs": lambda rng: {"num_paragraphs": 2},
    }


KWARGS_SAMPLERS = _kwargs_samplers()
INSTRUCTION_IDS = tuple(KWARGS_SAMPLERS)

EXCLUDED = {
    "length_constraints:number_sentences": "needs NLTK's punkt data, which no package registry ships",
    "change_case:capital_word_frequency": "nltk.word_tokenize needs NLTK's punkt data, which no registry ships",
    "language:response_language": "an English-only 135M model essentially never replies in another language",
    "combination:two_responses": "needs two full replies (long)",
    "combination:repeat_prompt": "the reply repeats the whole prompt first (long)",
    "length_constraints:nth_paragraph_first_word": "needs several paragraphs (long)",
    "detectable_format:constrained_response": "needs yes/no questions and conflicts with every other id",
}

TEMPLATES = [
    "Write a short description of {topic}.",
    "List a few facts about {topic}.",
    "Write a short note to a friend about {topic}.",
    "Suggest a name for a shop that sells {topic}, and say why.",
    "Explain in a few sentences why people like {topic}.",
    "Give two tips for someone who wants to learn about {topic}.",
    "Write a short advertisement for {topic}.",
    "Describe {topic} to a child.",
]
TRAIN_TOPICS = [
    "bread",
    "rivers",
    "bicycles",
    "tea",
    "winter",
    "owls",
    "gardens",
    "trains",
    "candles",
    "maps",
    "honey",
    "forests",
    "kites",
    "lighthouses",
    "soup",
    "rain",
    "violins",
    "bridges",
    "cats",
    "libraries",
    "apples",
    "clocks",
    "islands",
    "shoes",
    "snow",
    "bees",
    "castles",
    "coffee",
    "deserts",
    "pencils",
    "boats",
    "cheese",
    "mountains",
    "umbrellas",
    "frogs",
    "markets",
    "stars",
    "rice",
    "lamps",
    "parks",
]
HELDOUT_TOPICS = [
    "dogs",
    "oceans",
    "guitars",
    "pizza",
    "summer",
    "eagles",
    "museums",
    "buses",
    "mirrors",
    "books",
    "oranges",
    "volcanoes",
    "balloons",
    "windmills",
    "salad",
    "wind",
    "pianos",
    "tunnels",
    "horses",
    "schools",
    "bananas",
    "calendars",
    "beaches",
    "hats",
    "ice",
    "ants",
    "towers",
    "juice",
    "caves",
    "crayons",
    "planes",
    "butter",
    "lakes",
    "scarves",
    "turtles",
    "bakeries",
    "planets",
    "noodles",
    "chairs",
    "zoos",
]

SAMPLER = dict(num_samples=4, temperature=0.9, top_p=0.95, max_new_tokens=48)


def _instructions_text(rng: random.Random, instruction_ids: list[str]) -> tuple[list[dict], str]:
    kwargs_list, descriptions = [], []
    for instruction_id in instruction_ids:
        kwargs = KWARGS_SAMPLERS[instruction_id](rng)
        descriptions.append(build_checker(instruction_id, kwargs).build_description(**kwargs))
        kwargs_list.append(kwargs)
    return kwargs_list, " ".join(descriptions)


def _second_id(rng: random.Random, first: str) -> str | None:
    options = [other for other in INSTRUCTION_IDS if other != first and not conflicts(first, other)]
    return rng.choice(options) if options else None


def make_prompts(split: str, num_prompts: int, seed: int = 0, second_share: float = 0.3) -> list[dict]:
    """IFEval-style rows (no replies) for ``split`` ("train" or "heldout"); distinct base tasks within a split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
    topics = TRAIN_TOPICS if split == "train" else HELDOUT_TOPICS
    rng = random.Random(f"{split}-{seed}")
    base_tasks = [template.format(topic=topic) for topic in topics for template in TEMPLATES]
    if num_prompts > len(base_tasks):
        raise ValueError(f"{split}: at most {len(base_tasks)} prompts (one per base task), asked for {num_prompts}.")
    rng.shuffle(base_tasks)
    order = list(INSTRUCTION_IDS)
    rng.shuffle(order)
    rows = []
    for index, base_task in enumerate(base_tasks[:num_prompts]):
        first = order[index % len(order)]
        ids = [first]
        if rng.random() < second_share and (second := _second_id(rng, first)) is not None:
            ids.append(second)
        kwargs_list, text = _instructions_text(rng, ids)
        rows.append(
            {
                "key": f"{split}-{index:04d}",
                "prompt": f"{base_task} {text}",
                "base_task": base_task,
                "instruction_id_list": ids,
                "kwargs": kwargs_list,
            }
        )
    return rows


def chat_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# ------------------------------------------------------------------------------------------------ generation
class Reply(NamedTuple):
    text: str
    num_tokens: int  # generated tokens before the first EOS
    token_ids: list[int]  # those tokens


def generate_replies(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    desc: str = "Generating",
    pool=None,
):
    """``num_samples`` replies per prompt (left-padded batches of ``batch_size`` prompts): a list of
    :class:`Reply` per prompt. Sampling reseeds torch with ``seed + batch index`` before each batch, so a batch's
    samples do not depend on the batches before it, nor on which process samples it: with ``pool`` (a
    :func:`sampling_pool`) the batches run in its worker processes, with the same replies."""
    from tqdm.auto import tqdm

    texts = [
        tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
        for prompt in prompts
    ]
    batches = [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]
    seeds = [seed + batch_index for batch_index in range(len(batches))]
    settings = dict(num_samples=num_samples, max_new_tokens=max_new_tokens)
    settings.update(dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False))
    if pool is None:
        results = (
            _generate_batch(model, tokenizer, batch, batch_seed, **settings)
            for batch, batch_seed in zip(batches, seeds)
        )
    else:
        results = pool.map(functools.partial(_generate_batch_in_worker, **settings), batches, seeds)
    replies = []
    for batch_replies in tqdm(results, total=len(batches), desc=desc, unit="batch", disable=not progress):
        replies.extend(batch_replies)
    return replies


@torch.no_grad()
def _generate_batch(
    model, tokenizer, texts: list[str], seed: int, *, num_samples: int, max_new_tokens: int, **sampling
):
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = padding_side
    torch.manual_seed(seed)
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
        **sampling,
    )
    new_tokens = output[:, batch["input_ids"].size(1) :].tolist()
    replies = []
    for prompt_index in range(len(texts)):
        samples = []
        for sequence in new_tokens[prompt_index * num_samples : (prompt_index + 1) * num_samples]:
            length = next((i for i, token in enumerate(sequence) if token in eos_ids), len(sequence))
            tokens = sequence[:length]
            samples.append(Reply(tokenizer.decode(tokens, skip_special_tokens=True).strip(), length, tokens))
        replies.append(samples)
    return replies


def worker_threads(workers: int, environ=os.environ) -> int | None:
    """Torch CPU threads for each of ``workers`` worker processes: the cores shared out (at least 1), unless
    ``OMP_NUM_THREADS`` says otherwise (then None: torch reads it). Workers that each spin torch's default
    thread count on the same cores slow each other far more than their number (measured in docs/ifeval.md)."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // workers)


_WORKER_POLICY = None


def _load_worker_policy(model_name: str, threads: int | None, weights_hash: str) -> None:
    global _WORKER_POLICY
    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer = load_policy(model_name)
    other_weights = full_weights_hash(model) != weights_hash
    _WORKER_POLICY = (model.eval(), tokenizer, model_name if other_weights else None)


def _generate_batch_in_worker(texts, seed, **settings):
    model, tokenizer, other_weights_from = _WORKER_POLICY
    if other_weights_from is not None:  # raised here, not in the initializer, so that the caller gets this line
        raise ValueError(
            f"workers: {other_weights_from!r} loads other weights than the model given to sample from; pass that "
            f"model's name or folder as model_name, or use workers=1."
        )
    return _generate_batch(model, tokenizer, texts, seed, **settings)


def sampling_pool(model, model_name: str, workers: int):
    """A pool of ``workers`` CPU processes, each with its own copy of ``model_name`` (:func:`load_policy`) and
    :func:`worker_threads` torch threads. Each worker checks that it loaded ``model``'s weights: a batch asked of a
    worker with other weights is an error."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_load_worker_policy,
        initargs=(model_name, worker_threads(workers), full_weights_hash(model)),
    )


# ------------------------------------------------------------------------------------------------ pairs
def pick_pair(samples: list[Reply], verdicts: list[bool]):
    """``(chosen, rejected)`` indices: the first passing sample, and the failing one closest to it in length."""
    passing = [i for i, ok in enumerate(verdicts) if ok]
    failing = [i for i, ok in enumerate(verdicts) if not ok]
    if not passing or not failing:
        return None
    chosen = passing[0]
    rejected = min(failing, key=lambda i: (abs(samples[i].num_tokens - samples[chosen].num_tokens), i))
    return chosen, rejected


def build_pairs(
    model,
    tokenizer,
    rows: list[dict],
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    pool=None,
):
    """On-policy pairs for ``rows`` (see the module docstring) and the statistics the card reports; ``pool``: see
    :func:`generate_replies`."""
    samples = generate_replies(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        num_samples=num_samples,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        desc="Sampling",
        pool=pool,
    )
    pairs, passed, judged, samples_passing = [], Counter(), Counter(), 0
    dropped = {"no_passing_sample": 0, "no_failing_sample": 0}
    for row, row_samples in zip(rows, samples, strict=True):
        verdicts = []
        for sample in row_samples:
            strict, _ = judge(sample.text, row["instruction_id_list"], row["kwargs"], row["prompt"], row["key"])
            verdicts.append(all(strict))
            samples_passing += all(strict)
            for instruction_id, ok in zip(row["instruction_id_list"], strict):
                judged[instruction_id] += 1
                passed[instruction_id] += ok
        picked = pick_pair(row_samples, verdicts)
        if picked is None:
            dropped["no_passing_sample" if not any(verdicts) else "no_failing_sample"] += 1
            continue
        chosen, rejected = picked
        pairs.append(
            {
                **row,
                "chosen": row_samples[chosen].text,
                "rejected": row_samples[rejected].text,
                "chosen_tokens": row_samples[chosen].num_tokens,
                "rejected_tokens": row_samples[rejected].num_tokens,
                "sample_pass_rate": sum(verdicts) / len(verdicts),
            }
        )
    all_verdicts = sum(judged.values())
    stats = {
        "prompts": len(rows),
        "pairs": len(pairs),
        "dropped": dropped,
        "sample_pass_rate_per_instruction": {k: passed[k] / judged[k] for k in sorted(judged)},
        "sample_instruction_pass_rate": sum(passed.values()) / max(1, all_verdicts),
        "sample_prompt_pass_rate": samples_passing / max(1, len(rows) * num_samples),
    }
    return pairs, stats


def preference_dataset(rows):
    """Conversational ``prompt`` / ``chosen`` / ``rejected`` for the trainer, IFEval's fields kept alongside."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": chat_messages(row["prompt"]),
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
                "key": row["key"],
                "instruction_id_list": row["instruction_id_list"],
                "kwargs_json": json.dumps(row["kwargs"]),
            }
            for row in rows
        ]
    )


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_jsonl(rows, path: Path) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


REBUILD_FLAGS = (
    "seed",
    "num_train_prompts",
    "num_heldout_prompts",
    "num_heldout_pair_prompts",
    "num_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "batch_size",
)


def write_card(path: Path, build_report: dict, heldout: list[dict]) -> None:
    config, train, held_pairs = build_report["config"], build_report["train"], build_report["heldout_pairs"]
    held_counts = Counter(i for row in heldout for i in row["instruction_id_list"])
    lines = [
        "# IFEval-verified preference data (built by trl_refpo.research.ifeval_data)",
        "",
        "Rebuild: `python -m trl_refpo.research.ifeval_data --output_dir <dir> "
        + " ".join(f"--{key} {config[key]}" for key in REBUILD_FLAGS)
        + "`.",
        "",
        f"* policy / sampler: `{config['model']}`, {config['num_samples']} samples per prompt, temperature "
        f"{config['temperature']}, top_p {config['top_p']} (top_k: the model's generation config), at most "
        f"{config['max_new_tokens']} new tokens, seed {config['seed']}, batches of {config['batch_size']} prompts, "
        f"torch {config['torch']}, {config['device']}",
        f"* verifier: `{config['verifier']}` (IFEval's checker registry); strict verdicts pick the pairs",
        f"* `ifeval_heldout.jsonl`: {len(heldout)} held-out prompts (no replies; no base task shared with train)",
    ]
    for name, stats in (("ifeval_train.jsonl", train), ("ifeval_heldout_pairs.jsonl", held_pairs)):
        lines.append(
            f"* `{name}`: {stats['prompts']} prompts → **{stats['pairs']} pairs**; dropped "
            f"{stats['dropped']['no_passing_sample']} (no passing sample) and {stats['dropped']['no_failing_sample']}"
            f" (no failing sample); samples following every instruction: {stats['sample_prompt_pass_rate']:.3f}, "
            f"instructions followed: {stats['sample_instruction_pass_rate']:.3f}; sampling {stats['seconds']:.0f} s"
            f" ({_processes(stats.get('workers', 1))})"
        )
    lines += [
        "* fingerprints (sha256, first 16 hex digits): "
        + ", ".join(f"`{name}` {digest}" for name, digest in build_report["files"].items()),
        "",
        "| instruction id | held-out prompts | train pairs | held-out pairs | sample pass rate (train) |",
        "|---|---|---|---|---|",
    ]
    rates = train["sample_pass_rate_per_instruction"]
    for instruction_id in INSTRUCTION_IDS:
        lines.append(
            f"| `{instruction_id}` | {held_counts[instruction_id]} "
            f"| {train['pairs_per_instruction'].get(instruction_id, 0)}"
            f" | {held_pairs['pairs_per_instruction'].get(instruction_id, 0)} | "
            f"{rates.get(instruction_id, float('nan')):.3f} |"
        )
    lines += ["", "Left out of the instruction ids:", ""] + [f"* `{k}`: {v}" for k, v in EXCLUDED.items()]
    path.write_text("\n".join(lines) + "\n")


def _processes(workers: int) -> str:
    return "one process" if workers == 1 else f"{workers} worker processes"


HELDOUT_PAIR_SEED_OFFSET = 1000


PARTS = ("train", "heldout_pairs")


def build(
    model,
    tokenizer,
    output_dir,
    *,
    model_name: str,
    num_train_prompts: int,
    num_heldout_prompts: int,
    num_heldout_pair_prompts: int,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    parts=PARTS,
    workers: int = 1,
    **sampler,
) -> dict:
    """Write ``ifeval_train.jsonl`` (pairs), ``ifeval_heldout.jsonl`` (prompts), ``ifeval_heldout_pairs.jsonl``
    (pairs sampled on the first ``num_heldout_pair_prompts`` held-out prompts), ``ifeval_build.json`` and
    ``ifeval_card.md``. ``parts`` builds only some of the pair files (e.g. two processes in parallel, one part
    each): their statistics are merged into ``ifeval_build.json`` (the settings must match) and the card is written
    once both parts are there. ``workers`` > 1 samples the batches in that many CPU processes, each loading
    ``model_name`` with :func:`load_policy` (so ``model`` must be what that loads); the files are the same as with
    one process."""
    import contextlib
    import fcntl

    sampler = {**SAMPLER, **sampler}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    heldout = make_prompts("heldout", num_heldout_prompts, seed)
    if num_heldout_pair_prompts > len(heldout):
        raise ValueError(f"num_heldout_pair_prompts ({num_heldout_pair_prompts}) > held-out prompts ({len(heldout)}).")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts: unknown {sorted(unknown)}; choose from {PARTS}.")
    if workers < 1 or (workers > 1 and model.device.type != "cpu"):
        raise ValueError(f"workers: {workers}; use 1, or more than 1 only on the CPU (one model per process).")
    config = {
        "model": model_name,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(model.device),
        "torch": torch.__version__,
        "verifier": verifier_version(),
        "num_train_prompts": num_train_prompts,
        "num_heldout_prompts": num_heldout_prompts,
        "num_heldout_pair_prompts": num_heldout_pair_prompts,
        **sampler,
    }
    part_rows = {
        "train": (make_prompts("train", num_train_prompts, seed), seed),
        "heldout_pairs": (heldout[:num_heldout_pair_prompts], seed + HELDOUT_PAIR_SEED_OFFSET),
    }
    was_training = model.training
    model.eval()
    built = {}
    with sampling_pool(model, model_name, workers) if workers > 1 else contextlib.nullcontext() as pool:
        try:
            for part in parts:
                rows, part_seed = part_rows[part]
                start = time.time()
                pairs, stats = build_pairs(
                    model,
                    tokenizer,
                    rows,
                    batch_size=batch_size,
                    seed=part_seed,
                    progress=progress,
                    pool=pool,
                    **sampler,
                )
                stats["seconds"] = time.time() - start
                stats["workers"] = workers
                stats["pairs_per_instruction"] = dict(Counter(i for row in pairs for i in row["instruction_id_list"]))
                write_jsonl(pairs, output_dir / f"ifeval_{part}.jsonl")
                built[part] = stats
        finally:
            model.train(was_training)
    write_jsonl(heldout, output_dir / "ifeval_heldout.jsonl")
    report_path = output_dir / "ifeval_build.json"
    with open(output_dir / ".ifeval_build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(report_path.read_text()) if report_path.exists() and set(parts) != set(PARTS) else {}
        if report and report["config"] != config:
            raise ValueError(
                f"{report_path} was built with other settings ({report['config']}); build every part "
                f"with the same settings, or remove it."
            )
        report.update(built, config=config)
        if all(part in report for part in PARTS):
            report["files"] = {
                name: fingerprint(output_dir / name)
                for name in ("ifeval_train.jsonl", "ifeval_heldout.jsonl", "ifeval_heldout_pairs.jsonl")
            }
            write_card(output_dir / "ifeval_card.md", report, heldout)
        report_path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    (output_dir / ".ifeval_build.lock").unlink(missing_ok=True)
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Build the IFEval-verified train pairs and held-out prompts.")
    parser.add_argument("--output_dir", default=str(DATA_DIR))
    parser.add_argument("--model", default="offline:smollm2-135m-instruct", help="offline:<name>, a folder or 'tiny'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train_prompts", type=int, default=320)
    parser.add_argument("--num_heldout_prompts", type=int, default=300)
    parser.add_argument("--num_heldout_pair_prompts", type=int, default=96)
    parser.add_argument("--num_samples", type=int, default=SAMPLER["num_samples"])
    parser.add_argument("--temperature", type=float, default=SAMPLER["temperature"])
    parser.add_argument("--top_p", type=float, default=SAMPLER["top_p"])
    parser.add_argument("--max_new_tokens", type=int, default=SAMPLER["max_new_tokens"])
    parser.add_argument("--batch_size", type=int, default=12, help="prompts per generate call (× num_samples rows)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="CPU processes sampling the batches, the cores shared out among them (default: one per core, at most 4;"
        " 1 on a GPU); the data do not depend on it",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads with --workers 1")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        choices=PARTS,
        help="pair files to build (the card is written once both are built; --workers uses several cores)",
    )
    cli = parser.parse_args(argv)
    if cli.workers is not None and (cli.workers < 1 or (cli.workers > 1 and torch.cuda.is_available())):
        parser.error(f"--workers {cli.workers}: use 1, or more than 1 only on the CPU (one model per process).")
    workers = cli.workers or (1 if torch.cuda.is_available() else min(4, os.cpu_count() or 1))
    if cli.threads and workers > 1:
        parser.error(f"--threads applies with --workers 1; {workers} workers share the cores out themselves.")
    if cli.threads:
        torch.set_num_threads(cli.threads)
    model, tokenizer = load_policy(cli.model)
    if torch.cuda.is_available():
        model.to("cuda")
    start = time.time()
    report = build(
        model,
        tokenizer,
        cli.output_dir,
        model_name=cli.model,
        num_train_prompts=cli.num_train_prompts,
        num_heldout_prompts=cli.num_heldout_prompts,
        num_heldout_pair_prompts=cli.num_heldout_pair_prompts,
        seed=cli.seed,
        batch_size=cli.batch_size,
        num_samples=cli.num_samples,
        temperature=cli.temperature,
        top_p=cli.top_p,
        max_new_tokens=cli.max_new_tokens,
        parts=cli.parts,
        workers=workers,
    )
    card = Path(cli.output_dir, "ifeval_card.md")
    print(card.read_text() if all(part in report for part in PARTS) else f"built {cli.parts}; card after all parts")
    print(f"built in {time.time() - start:.0f} s")
    return report


def load_policy(name: str):
    """(model, tokenizer): ``tiny`` (a random tiny Llama built in code), ``offline:<name>`` or a local folder."""
    if name == "tiny":
        tokenizer = tiny_tokenizer()
        return tiny_llama(tokenizer), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = resolve_model_path(name)
    except (ValueError, OfflineModelUnavailable) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    if not os.path.isdir(path):
        print(f"error: --model {name!r} is not a local folder or offline:<name>.", file=sys.stderr)
        sys.exit(2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


if __name__ == "__main__":
    main()
