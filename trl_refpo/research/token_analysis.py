"""Token-level log-probability analysis (Liu et al., "Understanding Reference Policies in DPO", §4.3, Fig. 1–3):
per vocabulary token, the mean of ``log π_θ − log π_ref`` over its occurrences in completions, the most
down-weighted tokens, and the EOS token's statistics — :func:`token_level_analysis`, and
:class:`TokenLevelAnalysisCallback` to run it at every evaluation. Needs the ``research`` extra (pandas, matplotlib).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import pandas
import torch
from torch import Tensor
from transformers import TrainerCallback

from ..data import RefPODataCollator


@dataclass
class TokenAnalysis:
    """Result of :func:`token_level_analysis`."""

    table: pandas.DataFrame  # one row per vocabulary token occurring in the completions, most down-weighted first
    top_downweighted: pandas.DataFrame  # the ``top_k`` most down-weighted tokens with count ≥ ``min_count``
    eos: dict[str, float]  # EOS statistics (Reference Policies Fig. 3)
    figure_path: str | None = None
    num_examples: int = 0
    extra: dict = field(default_factory=dict)


def token_logps(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``log π(x_{t+1} | x_{≤t})`` for every position, ``(B, T−1)``, from the model's logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return (logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(dim=-1)).detach()


def tokenize_preference_dataset(dataset, processing_class):
    """Tokenise a ``prompt``/``chosen``/``rejected`` dataset exactly as TRL's ``DPOTrainer`` does."""
    from trl import DPOTrainer

    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    shim = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(shim, dataset, processing_class, args, "analysis")


@torch.no_grad()
def token_level_analysis(
    model,
    ref_model,
    dataset,
    processing_class=None,
    *,
    min_count: int = 100,
    top_k: int = 10,
    batch_size: int = 4,
    max_examples: int | None = None,
    max_length: int | None = None,
    eos_token_id: int | None = None,
    figure_path: str | None = None,
    title: str | None = None,
) -> TokenAnalysis:
    """Per-token ``log π_θ − log π_ref`` over the chosen and rejected completions of ``dataset``.

    Args:
        model: the trained policy. ``ref_model``: the reference; ``None`` with a PEFT policy uses the policy
            with its adapter disabled.
        dataset: TRL-tokenised (``prompt_ids``/``chosen_ids``/``rejected_ids``) or raw
            (``prompt``/``chosen``/``rejected``, then ``processing_class`` is required).
        min_count: occurrences a token needs to enter ``top_downweighted`` (the paper uses 100).
        max_examples: analyse only the first examples (keeps an evaluation callback fast).
        figure_path: where to save a PNG with the histogram of per-token means and the top-token bar chart.

    The EOS statistics are those of Reference Policies Fig. 3: the policy's mean log-prob of the EOS token
    where it occurs in completions, and its chosen-minus-rejected difference (and the same for the reference).
    """
    if {"image", "images"} & set(dataset.column_names):
        raise ValueError(
            "token_level_analysis scores text only: it does not support vision datasets (image / images)."
        )
    if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
        if processing_class is None:
            raise ValueError(
                "The dataset is not tokenised (no prompt_ids/chosen_ids/rejected_ids): pass processing_class."
            )
        dataset = tokenize_preference_dataset(dataset, processing_class)
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
    pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    vocab_size = model.config.get_text_config().vocab_size
    collator = RefPODataCollator(pad_token_id=pad_token_id, max_length=max_length)
    device = next(model.parameters()).device

    totals = torch.zeros(4, vocab_size, dtype=torch.float64)  # count, Σ diff, Σ policy, Σ ref
    eos_sums = torch.zeros(2, 3, dtype=torch.float64)  # [chosen, rejected] × [count, Σ policy, Σ ref]
    was_training = model.training
    model.eval()
    try:
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = collator([{key: example[key] for key in columns} for example in rows])
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            policy = token_logps(model, input_ids, attention_mask)
            reference = _reference_logps(model, ref_model, input_ids, attention_mask)
            mask = batch["completion_mask"][:, 1:].bool().to(device)
            tokens = input_ids[:, 1:][mask].cpu()
            policy_sel, reference_sel = policy[mask].double().cpu(), reference[mask].double().cpu()
            for row, values in enumerate(
                (torch.ones_like(policy_sel), policy_sel - reference_sel, policy_sel, reference_sel)
            ):
                totals[row] += torch.bincount(tokens, weights=values, minlength=vocab_size)[:vocab_size]
            num_pairs = len(rows)
            is_chosen = torch.zeros_like(mask)
            is_chosen[:num_pairs] = True
            is_chosen = is_chosen[mask].cpu()
            is_eos = tokens == eos_token_id
            for side, side_mask in enumerate((is_eos & is_chosen, is_eos & ~is_chosen)):
                eos_sums[side] += torch.stack(
                    [side_mask.sum().double(), policy_sel[side_mask].sum(), reference_sel[side_mask].sum()]
                )
    finally:
        model.train(was_training)

    occurring = totals[0] > 0
    ids = occurring.nonzero().flatten()
    counts = totals[0, ids]
    table = (
        pandas.DataFrame(
            {
                "token_id": ids.numpy(),
                "token": _token_strings(tokenizer, ids.tolist()),
                "count": counts.long().numpy(),
                "mean_logp_diff": (totals[1, ids] / counts).numpy(),
                "mean_policy_logp": (totals[2, ids] / counts).numpy(),
                "mean_ref_logp": (totals[3, ids] / counts).numpy(),
            }
        )
        .sort_values("mean_logp_diff", kind="stable")
        .reset_index(drop=True)
    )
    top = table[table["count"] >= min_count].head(top_k).reset_index(drop=True)
    eos = _eos_statistics(eos_sums, eos_token_id, tokenizer)
    result = TokenAnalysis(table, top, eos, num_examples=len(dataset))
    if figure_path is not None:
        result.figure_path = save_token_analysis_figure(result, figure_path, min_count=min_count, title=title)
    return result


def _reference_logps(model, ref_model, input_ids, attention_mask) -> Tensor:
    if ref_model is not None:
        return token_logps(ref_model, input_ids, attention_mask)
    if hasattr(model, "disable_adapter"):  # PEFT: the reference is the base model
        with model.disable_adapter():
            return token_logps(model, input_ids, attention_mask)
    raise ValueError(
        "ref_model is required (it may be None only for a PEFT policy, whose base model is the reference)."
    )


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(token) for token in tokenizer.convert_ids_to_tokens(ids)]


def _eos_statistics(eos_sums: Tensor, eos_token_id, tokenizer) -> dict[str, float]:
    def mean(total, count):
        return float(total / count) if count > 0 else math.nan

    (chosen_n, chosen_policy, chosen_ref), (rejected_n, rejected_policy, rejected_ref) = eos_sums.tolist()
    count = chosen_n + rejected_n
    stats = {
        "eos_token_id": eos_token_id,
        "eos_token": tokenizer.convert_ids_to_tokens(eos_token_id) if tokenizer is not None else str(eos_token_id),
        "count_chosen": int(chosen_n),
        "count_rejected": int(rejected_n),
        "policy_mean_logp": mean(chosen_policy + rejected_policy, count),
        "policy_chosen_mean_logp": mean(chosen_policy, chosen_n),
        "policy_rejected_mean_logp": mean(rejected_policy, rejected_n),
        "ref_mean_logp": mean(chosen_ref + rejected_ref, count),
        "ref_chosen_mean_logp": mean(chosen_ref, chosen_n),
        "ref_rejected_mean_logp": mean(rejected_ref, rejected_n),
    }
    stats["policy_chosen_minus_rejected"] = stats["policy_chosen_mean_logp"] - stats["policy_rejected_mean_logp"]
    stats["ref_chosen_minus_rejected"] = stats["ref_chosen_mean_logp"] - stats["ref_rejected_mean_logp"]
    stats["mean_logp_diff"] = stats["policy_mean_logp"] - stats["ref_mean_logp"]
    return stats


def save_token_analysis_figure(
    result: TokenAnalysis, path: str, min_count: int = 100, title: str | None = None
) -> str:
    """Histogram of the per-token mean log-prob differences and a bar chart of the most down-weighted tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    histogram, bars = figure.subplots(1, 2)
    histogram.hist(result.table["mean_logp_diff"], bins=40, color="tab:blue")
    histogram.set_xlabel("mean log π_θ − log π_ref per token")
    histogram.set_ylabel("vocabulary tokens")
    histogram.set_yscale("log")
    histogram.set_title("Token log-prob difference")
    top = result.top_downweighted
    bars.barh([repr(token) for token in top["token"]][::-1], top["mean_logp_diff"].tolist()[::-1], color="tab:red")
    bars.set_xlabel("mean log π_θ − log π_ref")
    bars.set_title(f"Most down-weighted tokens (≥ {min_count} occurrences)")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def frozen_copy(model):
    """A frozen deep copy that computes with its own weights.

    TRL's fused LM head replaces ``model.forward`` by a closure over the ORIGINAL model's forward, which a
    deepcopy keeps: the copy would silently run the original's (training) weights. Instance-level
    ``forward`` overrides are dropped, so the copy runs its class's forward on its own parameters.
    """
    snapshot = copy.deepcopy(model)
    for module in snapshot.modules():
        module.__dict__.pop("forward", None)
    return snapshot.eval().requires_grad_(False)


class TokenLevelAnalysisCallback(TrainerCallback):
    """Runs :func:`token_level_analysis` at every evaluation.

    Args:
        ref_model: the reference. ``None``: a frozen copy of the policy taken when training begins (the
            initial policy; costs one model's memory), or the adapter-disabled model for PEFT policies.
        dataset: the examples to analyse; default the evaluation dataset.
        max_examples: analyse only this many examples per evaluation.

    Writes ``<output_dir>/token_analysis/step-<N>.png`` and ``.csv`` (on the main process), adds
    ``<prefix>_token/…`` entries (EOS statistics, most down-weighted token) to the evaluation metrics, and
    keeps every :class:`TokenAnalysis` in ``self.results`` as ``(global_step, result)``.
    """

    def __init__(
        self,
        ref_model=None,
        dataset=None,
        processing_class=None,
        *,
        min_count: int = 100,
        top_k: int = 10,
        max_examples: int | None = 256,
        batch_size: int = 4,
        output_subdir: str = "token_analysis",
    ):
        self.ref_model = ref_model
        self.dataset = dataset
        self.processing_class = processing_class
        self.min_count = min_count
        self.top_k = top_k
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.output_subdir = output_subdir
        self.results: list[tuple[int, TokenAnalysis]] = []

    def _snapshot_initial_policy(self, model) -> None:
        if self.ref_model is None and not hasattr(model, "disable_adapter"):
            self.ref_model = frozen_copy(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step == 0:
            self._snapshot_initial_policy(model)

    def on_evaluate(
        self, args, state, control, model=None, processing_class=None, eval_dataloader=None, metrics=None, **kwargs
    ):
        if self.ref_model is None and not hasattr(model, "disable_adapter"):
            if state.global_step > 0:
                raise ValueError(
                    "TokenLevelAnalysisCallback has no reference: pass ref_model=..., or add the callback before "
                    "training starts so it can copy the initial policy."
                )
            self._snapshot_initial_policy(model)  # evaluation before any training: the policy is the initial one
        dataset = self.dataset if self.dataset is not None else getattr(eval_dataloader, "dataset", None)
        if dataset is None:
            raise ValueError("TokenLevelAnalysisCallback needs a dataset (none given and no evaluation dataset).")
        folder = os.path.join(args.output_dir, self.output_subdir)
        is_main = state.is_world_process_zero
        result = token_level_analysis(
            model,
            self.ref_model,
            dataset,
            self.processing_class or processing_class,
            min_count=self.min_count,
            top_k=self.top_k,
            batch_size=self.batch_size,
            max_examples=self.max_examples,
            max_length=getattr(args, "max_length", None),
            figure_path=os.path.join(folder, f"step-{state.global_step}.png") if is_main else None,
            title=f"step {state.global_step}",
        )
        if is_main:
            result.table.to_csv(os.path.join(folder, f"step-{state.global_step}.csv"), index=False)
        self.results.append((state.global_step, result))
        if metrics is not None:
            prefix = next((key.split("_", 1)[0] for key in metrics if key.endswith("_loss")), "eval")
            eos = result.eos
            metrics[f"{prefix}_token/eos_policy_logp"] = eos["policy_mean_logp"]
            metrics[f"{prefix}_token/eos_chosen_minus_rejected"] = eos["policy_chosen_minus_rejected"]
            metrics[f"{prefix}_token/eos_logp_diff"] = eos["mean_logp_diff"]
            if len(result.top_downweighted):
                metrics[f"{prefix}_token/min_mean_logp_diff"] = float(
                    result.top_downweighted["mean_logp_diff"].iloc[0]
                )
        return control
