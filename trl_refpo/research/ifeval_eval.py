"""The main job's evaluation on the IFEval-verified held-out prompts (reused by the study).

:func:`evaluate_policy` generates one greedy reply per held-out prompt (batched, left-padded, KV cache on) and
reports, each with a 95 % percentile-bootstrap interval over prompts (:func:`bootstrap_interval`, seeded):

* ``prompt_strict`` / ``prompt_loose``: share of prompts whose reply follows *every* instruction (IFEval's
  prompt-level accuracy; strict / loose as in :mod:`.ifeval_judge`);
* ``instruction_strict`` / ``instruction_loose``: followed instructions / all instructions, pooled over prompts
  (IFEval's instruction-level accuracy). Its interval resamples *prompts* (cluster bootstrap: a prompt's one or two
  instructions stay together) and recomputes the pooled ratio;
* ``pair_accuracy`` (when ``pairs`` are given): share of pairs where the policy gives ``chosen`` the larger summed
  log-probability of its reply tokens — TRL's ``logps/accuracies``; ties count as wrong; the interval resamples
  pairs. A pair whose ``key`` equals a prompt's key also sets that prompt's ``pair_correct``;
* ``drift`` (when ``ref_model`` is given): per prompt, the mean over the policy's own greedy reply tokens (the
  generated ids before EOS) of
  ``log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)`` (a per-token Monte-Carlo estimate of KL(π_θ‖π_ref)
  along the policy's greedy path); the metric is the mean over prompts with a non-empty reply;
* ``reply_tokens``: generated tokens before EOS, mean over prompts (length exploitation shows here).

The model is put in a fast generation state for the call (:func:`generation_state`: eval mode, ``use_cache=True``,
gradient checkpointing off) and restored afterwards, so evaluating after training runs at the speed of evaluating
before it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .ifeval_data import DATA_DIR, chat_messages, generate_replies
from .ifeval_judge import judge, validate_rows


METRICS = (
    "prompt_strict",
    "prompt_loose",
    "instruction_strict",
    "instruction_loose",
    "pair_accuracy",
    "drift",
    "reply_tokens",
)
SPLIT_FILES = {
    "train": "ifeval_train.jsonl",
    "heldout": "ifeval_heldout.jsonl",
    "heldout_pairs": "ifeval_heldout_pairs.jsonl",
}


@dataclass
class IFEvalReport:
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    per_instruction: dict[str, float]
    per_prompt: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["intervals"] = {key: list(value) for key, value in self.intervals.items()}
        return json.loads(json.dumps(data))

    def table(self) -> str:
        lines = [f"{'metric':<22}{'value':>9}   95 % interval"]
        for key in METRICS:
            if key in self.metrics:
                low, high = self.intervals[key]
                lines.append(f"  {key:<20}{self.metrics[key]:>9.3f}   [{low:.3f}, {high:.3f}]")
        lines.append(f"{'instruction (strict)':<22}")
        lines += [f"  {key:<46}{value:>6.3f}" for key, value in sorted(self.per_instruction.items())]
        return "\n".join(lines)


def load_ifeval_split(split: str):
    """A shipped split as a ``datasets.Dataset``: "train" (pairs), "heldout" (prompts), "heldout_pairs"."""
    from datasets import Dataset

    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}.")
    path = DATA_DIR / SPLIT_FILES[split]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # Arrow gives every kwargs dict every key seen in the file, None where unused: IFEval's own layout; the judge
    # drops the None values
    return Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------ intervals
def _statistic(values):
    """Mean of per-prompt numbers, or — for per-prompt sequences of booleans — the pooled ratio sum/count."""
    if len(values) and isinstance(values[0], (list, tuple, np.ndarray)):
        return lambda index: sum(sum(values[i]) for i in index) / max(1, sum(len(values[i]) for i in index))
    array = np.asarray(values, dtype=float)
    return lambda index: float(array[index].mean())


def bootstrap_resamples(values, seed: int = 0, num_resamples: int = 1000) -> np.ndarray:
    """The statistic of each resample: indices ``numpy.random.default_rng(seed).integers(0, n, (num_resamples, n))``."""
    statistic = _statistic(values)
    indices = np.random.default_rng(seed).integers(0, len(values), size=(num_resamples, len(values)))
    return np.array([statistic(row) for row in indices])


def bootstrap_interval(values, seed=0, num_resamples=1000, confidence=0.95) -> tuple[float, float]:
    """Percentile bootstrap interval over prompts: the ``(1 ± confidence)/2`` quantiles (numpy's linear
    interpolation) of :func:`bootstrap_resamples`. ``values``: per-prompt numbers (interval of their mean), or
    per-prompt sequences of booleans (cluster bootstrap of the pooled ratio: instruction-level accuracy)."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    resamples = bootstrap_resamples(values, seed, num_resamples)
    tail = (1 - confidence) / 2
    low, high = np.quantile(resamples, [tail, 1 - tail])
    return (float(low), float(high))


# ------------------------------------------------------------------------------------------------ model state
@contextlib.contextmanager
def generation_state(model):
    """Eval mode, KV cache on, gradient checkpointing off, for the block; the model's previous state afterwards.

    Training leaves ``config.use_cache=False`` (gradient checkpointing sets it, and with checkpointing on in train
    mode transformers turns the cache off), which makes every generated token re-run the whole prefix."""
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    generation_use_cache = getattr(getattr(model, "generation_config", None), "use_cache", None)
    checkpointing = bool(model.is_activation_checkpointing)
    checkpoint_funcs = {
        name: module._gradient_checkpointing_func
        for name, module in model.named_modules()
        if getattr(module, "gradient_checkpointing", False)
    }
    model.eval()
    model.config.use_cache = True
    if generation_use_cache is not None:
        model.generation_config.use_cache = True
    if checkpointing:
        model.activation_checkpointing_disable()
    try:
        yield model
    finally:
        if checkpointing:
            modules = dict(model.named_modules())
            for name, func in checkpoint_funcs.items():
                modules[name].gradient_checkpointing = True
                modules[name]._gradient_checkpointing_func = func
        model.config.use_cache = use_cache
        if generation_use_cache is not None:
            model.generation_config.use_cache = generation_use_cache
        model.train(was_training)


# ------------------------------------------------------------------------------------------------ log-probs
def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template(chat_messages(prompt), tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.no_grad()
def token_logps(model, tokenizer, prompts: list[str], reply_ids: list[list[int]], batch_size: int = 16):
    """Per-token log-probs ``log π(y_t | x, y_<t)`` of each reply's token ids after its chat-rendered prompt
    (right-padded batches): a list of 1-D CPU tensors, one value per reply token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(prompts), batch_size):
        prompt_ids = [_prompt_ids(tokenizer, prompt) for prompt in prompts[start : start + batch_size]]
        sequences = [p + list(r) for p, r in zip(prompt_ids, reply_ids[start : start + batch_size], strict=True)]
        width = max(map(len, sequences))
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=model.device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device)
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        for row, (sequence, prompt) in enumerate(zip(sequences, prompt_ids)):
            out.append(logps[row, len(prompt) - 1 : len(sequence) - 1].cpu())
    return out


def completion_ids(tokenizer, reply: str) -> list[int]:
    """A reply as the trainer scores it: its tokens, then EOS."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return tokenizer(reply, add_special_tokens=False)["input_ids"] + eos


# ------------------------------------------------------------------------------------------------ evaluation
def _rows(prompts) -> list[dict]:
    rows = [dict(row) for row in prompts]
    for index, row in enumerate(rows):
        row.setdefault("key", index)
        missing = [name for name in ("prompt", "instruction_id_list", "kwargs") if name not in row]
        if missing:
            raise ValueError(
                f"row {row['key']!r}: missing column(s) {missing}; IFEval rows need prompt, "
                f"instruction_id_list and kwargs."
            )
    return rows


def evaluate_policy(
    model,
    tokenizer,
    prompts,
    *,
    ref_model=None,
    pairs=None,
    batch_size=16,
    max_new_tokens=48,
    seed=0,
    num_resamples=1000,
    progress=True,
) -> IFEvalReport:
    """IFEval numbers of ``model``'s greedy replies to ``prompts`` (IFEval rows: a Dataset or dicts); see the module
    docstring for every metric and interval."""
    rows = _rows(prompts)
    validate_rows(rows)  # a bad row stops here, before any generation
    pair_rows = None if pairs is None else [dict(pair) for pair in pairs]
    with generation_state(model):
        generated = [
            samples[0]
            for samples in generate_replies(
                model,
                tokenizer,
                [row["prompt"] for row in rows],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
                desc="Generating (greedy)",
            )
        ]
        drifts = [None] * len(rows)
        if ref_model is not None:
            texts, ids = [r["prompt"] for r in rows], [reply.token_ids for reply in generated]
            policy_logps = token_logps(model, tokenizer, texts, ids, batch_size)
            with generation_state(ref_model):
                ref_logps = token_logps(ref_model, tokenizer, texts, ids, batch_size)
            drifts = [float((p - r).mean()) if len(p) else None for p, r in zip(policy_logps, ref_logps, strict=True)]
        pair_correct = None
        if pair_rows:
            prompts_ = [pair["prompt"] for pair in pair_rows]
            chosen = token_logps(
                model, tokenizer, prompts_, [completion_ids(tokenizer, p["chosen"]) for p in pair_rows], batch_size
            )
            rejected = token_logps(
                model, tokenizer, prompts_, [completion_ids(tokenizer, p["rejected"]) for p in pair_rows], batch_size
            )
            pair_correct = [bool(c.sum() > r.sum()) for c, r in zip(chosen, rejected, strict=True)]
    correct_by_key = {} if not pair_rows else {p.get("key"): ok for p, ok in zip(pair_rows, pair_correct)}

    per_prompt, strict_lists, loose_lists = [], [], []
    per_instruction_hits: dict[str, list[bool]] = {}
    for row, (text, num_tokens, _), drift in zip(rows, generated, drifts, strict=True):
        strict, loose = judge(text, row["instruction_id_list"], row["kwargs"], row["prompt"], row["key"])
        strict_lists.append(strict)
        loose_lists.append(loose)
        for instruction_id, ok in zip(row["instruction_id_list"], strict):
            per_instruction_hits.setdefault(instruction_id, []).append(ok)
        per_prompt.append(
            {
                "key": row["key"],
                "instruction_id_list": list(row["instruction_id_list"]),
                "strict": strict,
                "loose": loose,
                "reply_tokens": num_tokens,
                "drift": drift,
                "pair_correct": correct_by_key.get(row["key"]),
                "reply": text,
            }
        )

    values = {
        "prompt_strict": [float(all(s)) for s in strict_lists],
        "prompt_loose": [float(all(s)) for s in loose_lists],
        "instruction_strict": strict_lists,
        "instruction_loose": loose_lists,
        "reply_tokens": [float(reply.num_tokens) for reply in generated],
    }
    if pair_correct is not None:
        values["pair_accuracy"] = [float(ok) for ok in pair_correct]
    if ref_model is not None:
        values["drift"] = [d for d in drifts if d is not None]
    metrics, intervals = {}, {}
    for key, per_item in values.items():
        metrics[key] = float(_statistic(per_item)(np.arange(len(per_item)))) if per_item else float("nan")
        intervals[key] = bootstrap_interval(per_item, seed=seed, num_resamples=num_resamples)
    per_instruction = {key: sum(hits) / len(hits) for key, hits in sorted(per_instruction_hits.items())}
    return IFEvalReport(metrics, intervals, per_instruction, per_prompt)


def save_report(report: IFEvalReport, path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
