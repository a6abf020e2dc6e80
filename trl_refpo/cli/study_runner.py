"""The study: every (arm, seed) of a YAML file trained and evaluated on the IFEval held-out prompts, resumable, and a
report with seeded bootstrap intervals and paired differences against a baseline arm.

A study file::

    recipe:            # one shared `trl-refpo dpo` recipe (model, data, steps, batch, lr, max_length, ...)
      model_name_or_path: offline:smollm2-135m-instruct
      dataset_name: ifeval_train.jsonl
      max_steps: 16
    evaluation:        # the IFEval evaluation (issue 19's ``evaluate_policy``)
      prompts: heldout         # a ``load_ifeval_split`` name or a .jsonl of IFEval rows
      pairs: heldout_pairs     # optional: held-out preference pairs (pair accuracy, log-probs of y_w / y_l)
      num_prompts: 64          # optional: a fixed subset, drawn with ``subset_seed`` BEFORE any arm ran
      max_new_tokens: 64
    seeds: [0, 1, 2]
    baseline: dpo_beta_0.1
    arms:
      - {name: dpo_beta_0.1, loss_type: sigmoid, beta: 0.1}
      - {name: flex, loss_type: flex_dpo, beta_chosen: 0.1, beta_rejected: 0.05, seeds: [0, 1]}

An arm is its ``name`` plus recipe keys that override the shared recipe (``loss_type``, its fields, a reference
source such as ``ref_model_name_or_path``); ``seeds`` per arm overrides the study's. Every arm's recipe is parsed
(:func:`trl_refpo.cli.parsing.parse_recipe`) before anything trains, so an unknown loss type or key, a duplicate
name, or a seed the baseline lacks stops the study with one line naming the arm.

Each finished run appends one JSON line to ``DIR/runs.jsonl``: arm, seed, ``config_hash`` (SHA-256 of the arm's
resolved recipe, seed and evaluation, as sorted JSON), package version, device, wall times, every metric, and the
per-prompt verdicts. A rerun skips every (arm, seed) whose hash is already there; a changed arm has a new hash and
reruns (its old lines stay in the file but the report reads only lines whose hash matches the current file).

Report maths (:func:`summarise`). For arm ``a`` with seeds ``S`` (``k`` of them) on the ``n`` evaluation prompts,
``v[s, p]`` is prompt ``p``'s verdict in the run of seed ``s`` (``prompt_strict``: 1 if every instruction was followed
strictly; ``prompt_loose``: loosely; ``pair_accuracy``: 1 if the policy prefers ``chosen``; ``drift``, ``reply_tokens``:
the per-prompt numbers). ``instruction_strict`` / ``instruction_loose`` are pooled: followed instructions / all
instructions over the chosen prompts.

* Estimate: the mean over seeds of the run's metric on all prompts.
* Interval (95 %, seeded): ``rng = numpy.random.default_rng(seed)``; ``B`` resamples, each draws ``k`` seeds with
  replacement (``rng.integers(0, k, (B, k))``, drawn first) and then ``n`` prompts with replacement
  (``rng.integers(0, n, (B, n))``, one draw shared by the drawn seeds); its statistic is the mean over the drawn
  seeds of the metric on the drawn prompts (a prompt drawn twice counts twice). The interval is the 2.5 % and 97.5 %
  quantiles (numpy's linear interpolation) of the ``B`` statistics.
* Paired difference vs the baseline arm ``b``: on the arm's seeds (the baseline ran all of them) and the same
  prompts, the same resampling with statistic ``metric_a − metric_b`` on the same drawn seeds and prompts.
  Verdict: interval above 0 → ``better`` (``higher`` for drift / reply length / log-probs, which have no good
  direction), below 0 → ``worse`` (``lower``), else ``no detectable difference at this size``.
* Metrics without per-prompt values (the held-out pairs' mean log-probs ``logps_chosen`` / ``logps_rejected``, their
  change from the initial policy, the final training logs) resample seeds only.
* Gain over the initial policy: the study also evaluates the policy before training, once (``DIR/initial.json``:
  the baseline arm's trainer, built and not trained). Greedy replies make that evaluation the same for every seed,
  so the gain is the paired difference ``metric_a − metric_initial`` with the initial values repeated for each seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .. import __version__
from ..research.ifeval_data import worker_threads
from ..research.ifeval_eval import METRICS as EVALUATION_METRICS
from ..research.ifeval_eval import evaluate_policy, load_ifeval_split
from ..research.offline_models import resolve_model_path
from .checks import check_model_path, check_tokenizer_path
from .parsing import parse_recipe
from .run import build_trainer


RUNS_FILE = "runs.jsonl"
INITIAL_FILE = "initial.json"
INITIAL_ARM = "initial policy"
SUMMARY_FILE = "summary.md"
STUDY_KEYS = {"recipe", "evaluation", "seeds", "baseline", "arms"}
EVALUATION_KEYS = {
    "prompts",
    "pairs",
    "num_prompts",
    "subset_seed",
    "max_new_tokens",
    "batch_size",
    "num_resamples",
    "drift",
}
# Metrics with one value per evaluation prompt: name -> how to read it from one per_prompt entry. Not
# pair_accuracy: the held-out pairs have prompts of their own, and only the few that are also evaluation prompts would
# appear in the per-prompt rows (7 of 36 in the shipped study), so the report uses each run's pair_accuracy over all
# pairs (resampled over seeds).
PROMPT_METRICS: dict[str, Callable[[dict], object]] = {
    "prompt_strict": lambda row: float(all(row["strict"])),
    "prompt_loose": lambda row: float(all(row["loose"])),
    "instruction_strict": lambda row: list(map(bool, row["strict"])),
    "instruction_loose": lambda row: list(map(bool, row["loose"])),
    "drift": lambda row: None if row.get("drift") is None else float(row["drift"]),
    "reply_tokens": lambda row: float(row["reply_tokens"]),
}
HIGHER_IS_BETTER = {"prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose", "pair_accuracy"}
NO_DIFFERENCE = "no detectable difference at this size"


class StudyError(ValueError):
    """A problem with the study file, reported as one line before anything trains."""


# ------------------------------------------------------------------------------------------------ the study file
@dataclass
class Arm:
    name: str
    overrides: dict
    seeds: list[int]


@dataclass
class Study:
    recipe: dict
    evaluation: dict
    arms: list[Arm]
    baseline: str
    base_dir: Path  # relative paths in the file are relative to it
    raw: dict  # the file as written (copied to DIR/study.yaml, which the report reads)

    def arm(self, name: str) -> Arm:
        return next(arm for arm in self.arms if arm.name == name)

    def run_recipe(self, arm: Arm, seed: int) -> dict:
        return {**self.recipe, **arm.overrides, "seed": seed}

    def config_hash(self, arm: Arm, seed: int) -> str:
        resolved = {"recipe": self.run_recipe(arm, seed), "evaluation": self.evaluation}
        return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_study(path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {str(path)!r} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    return parse_study(data, base_dir=path.parent)


def parse_study(data: dict, base_dir=".") -> Study:
    """Check the study's structure and every arm's recipe; nothing is loaded or trained."""
    if not isinstance(data, dict):
        raise StudyError("the study file must be a mapping with keys recipe, evaluation, seeds, baseline, arms.")
    unknown = sorted(set(data) - STUDY_KEYS)
    if unknown:
        raise StudyError(f"unknown study key(s) {unknown}; the keys are {sorted(STUDY_KEYS)}.")
    recipe = dict(data.get("recipe") or {})
    evaluation = dict(data.get("evaluation") or {})
    bad_eval = sorted(set(evaluation) - EVALUATION_KEYS)
    if bad_eval:
        raise StudyError(f"unknown evaluation key(s) {bad_eval}; the keys are {sorted(EVALUATION_KEYS)}.")
    if "prompts" not in evaluation:
        raise StudyError("evaluation.prompts is not set: a load_ifeval_split name (heldout) or a .jsonl path.")
    default_seeds = data.get("seeds")
    raw_arms = data.get("arms") or []
    if not raw_arms:
        raise StudyError("the study has no arms: add a list `arms:` of {name, loss_type, ...}.")
    arms, names = [], set()
    for index, raw in enumerate(raw_arms):
        if not isinstance(raw, dict) or not raw.get("name"):
            raise StudyError(f"arm #{index + 1} has no name: every arm needs `name:`.")
        raw = dict(raw)
        name = str(raw.pop("name"))
        if name in names:
            raise StudyError(f"arm {name!r}: duplicate arm name; every arm needs its own name.")
        names.add(name)
        seeds = raw.pop("seeds", default_seeds)
        if not seeds or not all(isinstance(seed, int) for seed in seeds):
            raise StudyError(f"arm {name!r}: no seeds (a list of integers, per arm or as the study's `seeds:`).")
        if "seed" in raw or "output_dir" in raw:
            raise StudyError(f"arm {name!r}: `seed` / `output_dir` are set by the study; use `seeds:` instead.")
        arms.append(Arm(name, raw, [int(seed) for seed in dict.fromkeys(seeds)]))
    baseline = data.get("baseline")
    if baseline not in names:
        raise StudyError(f"baseline {baseline!r} is not an arm; set `baseline:` to one of {sorted(names)}.")
    study = Study(recipe, evaluation, arms, baseline, Path(base_dir).resolve(), dict(data))
    baseline_seeds = set(study.arm(baseline).seeds)
    for arm in arms:
        missing = sorted(set(arm.seeds) - baseline_seeds)
        if missing:
            raise StudyError(
                f"arm {arm.name!r}: seeds {missing} are missing for the baseline arm {baseline!r} "
                "(paired differences need the baseline on every seed); add them to the baseline."
            )
        _check_arm_recipe(study, arm)
    return study


def _check_arm_recipe(study: Study, arm: Arm) -> None:
    with tempfile.TemporaryDirectory() as folder:
        try:
            parse_recipe(["--config", _write_recipe(study, arm, arm.seeds[0], Path(folder))])
        except ValueError as error:
            text = " ".join(str(error).split())
            text = text.replace(f"recipe {folder}/recipe.yaml", "its recipe")
            raise StudyError(f"arm {arm.name!r}: {text}") from error


MODEL_KEYS = ("model_name_or_path", "ref_model_name_or_path")
TOKENIZER_KEYS = ("ref_tokenizer_name_or_path", "tokenizer_name_or_path")


def check_sources(study: Study, arms) -> None:
    """Every model, tokenizer and local dataset file the pending arms name exists: one line naming the arm before
    any run trains (a missing reference folder would otherwise fail only when its arm's turn comes)."""
    checked = set()
    for arm in arms:
        recipe = study.run_recipe(arm, arm.seeds[0])
        for key in MODEL_KEYS + TOKENIZER_KEYS + ("dataset_name",):
            value = recipe.get(key)
            if not isinstance(value, str) or (key, value) in checked:
                continue
            resolved = _resolve(study, value)
            try:
                if key == "dataset_name":
                    if Path(value).suffix in (".json", ".jsonl", ".csv", ".parquet") and not Path(resolved).is_file():
                        raise ValueError(f"dataset_name {value!r}: no such file (relative to the study file).")
                elif key in MODEL_KEYS:
                    check_model_path(resolved, key=key)
                else:
                    check_tokenizer_path(resolved, key=key)
            except ValueError as error:
                hint = " (examples/study/build_sft_reference.py builds it)" if "sft_reference" in value else ""
                raise StudyError(f"arm {arm.name!r}: {' '.join(str(error).split())}{hint}") from error
            checked.add((key, value))


def _resolve(study: Study, value: str) -> str:
    """A path relative to the study file, when it exists there; anything else (offline:, hub ids) as written."""
    if value.startswith("offline:") or not (study.base_dir / value).exists():
        return value
    return str((study.base_dir / value).resolve())


def _write_recipe(study: Study, arm: Arm, seed: int, folder: Path) -> str:
    recipe = study.run_recipe(arm, seed)
    recipe["output_dir"] = str(folder / "trainer")
    for key in ("dataset_name", *MODEL_KEYS, *TOKENIZER_KEYS):
        if isinstance(recipe.get(key), str):
            recipe[key] = _resolve(study, recipe[key])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=True))
    return str(path)


# ------------------------------------------------------------------------------------------------ running
def read_runs(output_dir) -> list[dict]:
    path = Path(output_dir) / RUNS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pending_runs(study: Study, output_dir) -> list[tuple[Arm, int]]:
    """The (arm, seed) pairs without a line in ``runs.jsonl`` at their current config hash, seed-major (every arm's
    first seed, then every arm's second, ...), so a study cut short has every arm."""
    done = {(run["arm"], run["seed"], run["config_hash"]) for run in read_runs(output_dir)}
    order = [
        (position, index, arm, seed) for index, arm in enumerate(study.arms) for position, seed in enumerate(arm.seeds)
    ]
    return [
        (arm, seed)
        for _, _, arm, seed in sorted(order, key=lambda item: item[:2])
        if (arm.name, seed, study.config_hash(arm, seed)) not in done
    ]


def _evaluation_rows(study: Study, key: str):
    source = study.evaluation.get(key)
    if source is None:
        return None
    path = study.base_dir / str(source)
    if str(source).endswith(".jsonl"):
        if not path.is_file():
            raise StudyError(f"evaluation.{key}: file {str(path)!r} does not exist.")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = [dict(row) for row in load_ifeval_split(str(source))]
    return rows


def evaluation_prompts(study: Study) -> list[dict]:
    """The evaluation prompts: all of them, or a fixed subset drawn with ``subset_seed`` (sorted by position)."""
    rows = _evaluation_rows(study, "prompts")
    size = study.evaluation.get("num_prompts")
    if size is not None and size < len(rows):
        chosen = np.random.default_rng(study.evaluation.get("subset_seed", 0)).choice(len(rows), size, replace=False)
        rows = [rows[index] for index in sorted(chosen)]
    return rows


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _pairs_logps(trainer, pairs) -> dict[str, float]:
    """Mean summed log-probs of y_w and y_l on the held-out pairs, and TRL's accuracies (``trainer.evaluate``)."""
    from datasets import Dataset

    def message(role, text):
        return [{"role": role, "content": text}]

    # as the evaluation renders them: the prompt as one user message, the reply as the assistant's
    columns = {
        "prompt": [message("user", p["prompt"]) for p in pairs],
        "chosen": [message("assistant", p["chosen"]) for p in pairs],
        "rejected": [message("assistant", p["rejected"]) for p in pairs],
    }
    # A loss type scoring an extra completion beside each pair (TYPO's reference sample) gets the chosen reply in
    # that column: it enters only the eval loss, which is not read here, never the pair log-probs.
    for objective in trainer.objectives:
        for ids_column in objective.extra_completion_columns():
            columns[ids_column.removesuffix("_ids")] = columns["chosen"]
    dataset = trainer._prepare_dataset(Dataset.from_dict(columns), trainer.processing_class, trainer.args, "eval")
    metrics = trainer.evaluate(eval_dataset=dataset)
    wanted = {
        "eval_logps/chosen": "logps_chosen",
        "eval_logps/rejected": "logps_rejected",
        "eval_logps/accuracies": "logps_accuracy",
        "eval_rewards/accuracies": "rewards_accuracy",
    }
    return {name: float(metrics[key]) for key, name in wanted.items() if key in metrics}


def _arm_trainer(study: Study, arm: Arm, seed: int, folder: Path):
    """The (arm, seed) recipe parsed and its trainer built, as ``trl-refpo dpo`` builds it (bf16 on a CUDA GPU unless
    the recipe sets it); checkpoints are not saved."""
    import torch

    parsed = parse_recipe(["--config", _write_recipe(study, arm, seed, folder)])
    if torch.cuda.is_available() and "bf16" not in study.run_recipe(arm, seed):
        parsed.training_args.bf16 = True
    parsed.training_args.save_strategy = "no"
    return parsed, build_trainer(parsed)


def _study_evaluation(study: Study, evaluate, model, tokenizer, prompts, pairs, *, ref_model, seed: int):
    """``evaluate`` (``evaluate_policy`` by default) on the study's prompts and pairs with its settings."""
    return (evaluate or evaluate_policy)(
        model,
        tokenizer,
        prompts,
        ref_model=ref_model,
        pairs=pairs,
        seed=seed,
        batch_size=study.evaluation.get("batch_size", 16),
        max_new_tokens=study.evaluation.get("max_new_tokens", 64),
        num_resamples=study.evaluation.get("num_resamples", 1000),
        progress=True,
    )


def _report_fields(report) -> dict:
    return {
        "metrics": dict(report.metrics),
        "intervals": {key: list(value) for key, value in report.intervals.items()},
        "per_instruction": report.per_instruction,
        "per_prompt": report.per_prompt,
    }


def run_one(study: Study, arm: Arm, seed: int, output_dir, evaluate=None) -> dict:
    """Train one (arm, seed) with ``trl-refpo dpo``'s trainer and evaluate it; the JSON record of the run."""
    run_dir = Path(output_dir) / "runs" / f"{arm.name}-seed{seed}"
    prompts, pairs = evaluation_prompts(study), _evaluation_rows(study, "pairs")
    start = time.perf_counter()
    parsed, trainer = _arm_trainer(study, arm, seed, run_dir)
    initial = _pairs_logps(trainer, pairs) if pairs else {}
    train_start = time.perf_counter()
    train_result = trainer.train()
    train_seconds = time.perf_counter() - train_start
    final_logs = {}
    for entry in trainer.state.log_history:
        final_logs.update(
            {
                key: float(value)
                for key, value in entry.items()
                if isinstance(value, (int, float)) and key not in ("epoch", "step") and not key.startswith("eval_")
            }
        )
    after = _pairs_logps(trainer, pairs) if pairs else {}
    model, tokenizer = trainer.model, trainer.processing_class
    ref_model = None
    if study.evaluation.get("drift", True):
        ref_model = type(model).from_pretrained(_initial_policy_path(parsed), dtype=model.dtype).to(model.device)
    eval_start = time.perf_counter()
    report = _study_evaluation(study, evaluate, model, tokenizer, prompts, pairs, ref_model=ref_model, seed=seed)
    eval_seconds = time.perf_counter() - eval_start
    fields = _report_fields(report)
    metrics = fields["metrics"]
    for name, value in after.items():
        metrics[f"heldout_{name}"] = value
        if name.startswith("logps_"):
            metrics[f"heldout_{name}_change"] = value - initial[name]
    metrics.update({f"train/{key}": value for key, value in final_logs.items()})
    metrics["train/loss_mean"] = float(train_result.training_loss)
    return {
        "arm": arm.name,
        "seed": seed,
        "config_hash": study.config_hash(arm, seed),
        "version": __version__,
        "loss_type": study.run_recipe(arm, seed).get("loss_type", "sigmoid"),
        "device": _device(),
        "host": socket.gethostname(),
        "bf16": bool(parsed.training_args.bf16),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        **fields,
        "config": study.run_recipe(arm, seed),
        "evaluation": study.evaluation,
    }


def initial_hash(study: Study) -> str:
    """What the evaluation of the policy before training depends on: its model, tokenizer and the evaluation."""
    keys = ("model_name_or_path", "tokenizer_name_or_path", "model_revision", "dtype")
    what = {"recipe": {key: study.recipe.get(key) for key in keys}, "evaluation": study.evaluation}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_initial(study: Study, output_dir) -> dict | None:
    """``DIR/initial.json`` when it was made with the study's current model and evaluation, else None."""
    path = Path(output_dir) / INITIAL_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("config_hash") == initial_hash(study) else None


def evaluate_initial_policy(study: Study, output_dir, evaluate=None) -> dict:
    """The policy before training, judged by the study's evaluation, once per study: ``DIR/initial.json``, the
    "before" that each arm's gain is read against. The baseline arm's trainer is built (the model and tokenizer
    every arm starts from, loaded as the arms load them) and not trained; no drift (it is 0 by definition)."""
    record = read_initial(study, output_dir)
    if record is not None:
        return record
    arm = study.arm(study.baseline)
    _, trainer = _arm_trainer(study, arm, arm.seeds[0], Path(output_dir) / "runs" / "initial")
    start = time.perf_counter()
    prompts, pairs = evaluation_prompts(study), _evaluation_rows(study, "pairs")
    report = _study_evaluation(
        study, evaluate, trainer.model, trainer.processing_class, prompts, pairs, ref_model=None, seed=0
    )
    record = {
        "arm": INITIAL_ARM,
        "config_hash": initial_hash(study),
        "version": __version__,
        "device": _device(),
        "eval_seconds": round(time.perf_counter() - start, 2),
        **_report_fields(report),
        "model_name_or_path": study.recipe.get("model_name_or_path"),
        "evaluation": study.evaluation,
    }
    (Path(output_dir) / INITIAL_FILE).write_text(json.dumps(record) + "\n")
    return record


def _initial_policy_path(parsed) -> str:
    return resolve_model_path(parsed.model_args.model_name_or_path)


STUDY_COPY = "study.yaml"


def save_study(study: Study, output_dir) -> None:
    """The study as run, for ``trl-refpo study report DIR`` (relative paths resolved against the original file)."""
    text = yaml.safe_dump({**study.raw, "recipe": study.recipe}, sort_keys=False)
    header = (
        "# The study as `trl-refpo study` ran it, read by `trl-refpo study report`. Its relative paths are "
        "relative to the original file: run the original, not this copy.\n"
    )
    (Path(output_dir) / STUDY_COPY).write_text(header + text)


def _append(output_dir, record: dict) -> None:
    with open(Path(output_dir) / RUNS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def run_concurrently(pool, run: Callable[[str, int], dict], todo: list[tuple[str, int]], finished) -> None:
    """``run(arm_name, seed)`` for every pending pair on ``pool`` (an executor); ``finished(record)`` for each record as
    its run ends. A failed run stops the study as a kill would, except that the runs already under way finish and go
    to ``finished``: the ones not started are cancelled, and the first failure is raised at the end. (A process pool
    may already have queued one run beyond its workers; that one counts as under way: it runs and is kept.)"""
    from concurrent.futures import FIRST_COMPLETED, wait

    pending = {pool.submit(run, arm_name, seed) for arm_name, seed in todo}
    failure = None
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    record = future.result()
                except Exception as error:
                    failure = failure or error
                    continue
                finished(record)
            if failure is not None:
                pending = {future for future in pending if not future.cancel()}  # those under way
    finally:  # also when ``finished`` raises: nothing more starts
        for future in pending:
            future.cancel()
    if failure is not None:
        raise failure


def _run_in_subprocess(study_path: str, arm_name: str, seed: int, output_dir: str, threads: int | None = None) -> dict:
    import torch

    if threads is not None and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    study = load_study(study_path)
    return run_one(study, study.arm(arm_name), seed, output_dir)


def run_study(
    study: Study | str | os.PathLike,
    output_dir,
    *,
    evaluate=None,
    jobs: int = 1,
    after_run: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run every pending (arm, seed); append each finished run to ``runs.jsonl``. Returns the new records.

    ``evaluate`` replaces ``evaluate_policy`` (tests); ``after_run(record)`` is called after each line is written
    (raising there stops the study, as a kill would). ``jobs > 1`` runs that many at once in worker processes (a GPU
    with room for several), which needs ``study`` as a path."""
    from tqdm.auto import tqdm

    study_path = None
    if not isinstance(study, Study):
        study_path, study = str(study), load_study(study)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    save_study(study, output_dir)
    todo = pending_runs(study, output_dir)
    check_sources(study, {arm.name: arm for arm, _ in todo}.values())
    if jobs > 1 and todo and (study_path is None or evaluate is not None):
        raise StudyError("--jobs > 1 needs the study as a file path and the default evaluation.")
    evaluate_initial_policy(study, output_dir, evaluate=evaluate)
    records = []
    bar = tqdm(total=len(todo), desc="study runs", disable=not progress)

    def finished(record):
        _append(output_dir, record)
        records.append(record)
        bar.update()
        if after_run:
            after_run(record)

    if jobs > 1 and todo:
        import functools
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            run = functools.partial(
                _run_in_subprocess, study_path, output_dir=str(output_dir), threads=worker_threads(jobs)
            )
            run_concurrently(pool, run, [(arm.name, seed) for arm, seed in todo], finished)
    else:
        for arm, seed in todo:
            bar.set_postfix_str(f"{arm.name} seed {seed}")
            finished(run_one(study, arm, seed, output_dir, evaluate=evaluate))
    bar.close()
    return records


# ------------------------------------------------------------------------------------------------ report maths
def _per_prompt_values(run: dict, metric: str) -> list | None:
    read = PROMPT_METRICS.get(metric)
    if read is None or not run.get("per_prompt"):
        return None
    values = [read(row) for row in run["per_prompt"]]
    return None if all(value is None for value in values) else values


def _statistic(values: list, index: np.ndarray) -> float:
    """The metric on the prompts ``index``: pooled ratio for lists of booleans, else the mean (None skipped)."""
    chosen = [values[i] for i in index]
    if chosen and isinstance(chosen[0], list):
        return sum(map(sum, chosen)) / max(1, sum(map(len, chosen)))
    numbers = [value for value in chosen if value is not None]
    return float(np.mean(numbers)) if numbers else float("nan")


def bootstrap_over_seeds_and_prompts(
    arm_values: list[list],
    baseline_values: list[list] | None = None,
    *,
    seed: int = 0,
    num_resamples: int = 1000,
    confidence: float = 0.95,
):
    """(estimate, low, high) of the mean over seeds of the metric — or of ``arm − baseline`` (paired, row ``i`` of
    both is the same seed) — with the seed-and-prompt bootstrap of the module docstring."""
    k, n = len(arm_values), len(arm_values[0])

    def statistic(seed_index, prompt_index):
        total = 0.0
        for s in seed_index:
            value = _statistic(arm_values[s], prompt_index)
            if baseline_values is not None:
                value -= _statistic(baseline_values[s], prompt_index)
            total += value
        return total / len(seed_index)

    estimate = statistic(np.arange(k), np.arange(n))
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, k, size=(num_resamples, k))
    prompt_draws = rng.integers(0, n, size=(num_resamples, n))
    stats = np.array([statistic(s, p) for s, p in zip(seed_draws, prompt_draws)])
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(stats, [tail, 1 - tail])
    return float(estimate), float(low), float(high)


def bootstrap_over_seeds(
    arm_values: list[float],
    baseline_values: list[float] | None = None,
    *,
    seed: int = 0,
    num_resamples: int = 1000,
    confidence: float = 0.95,
):
    """As :func:`bootstrap_over_seeds_and_prompts` for one number per run (seeds resampled only)."""
    return bootstrap_over_seeds_and_prompts(
        [[value] for value in arm_values],
        None if baseline_values is None else [[v] for v in baseline_values],
        seed=seed,
        num_resamples=num_resamples,
        confidence=confidence,
    )


def verdict(metric: str, low: float, high: float) -> str:
    if low > 0:
        return "better" if metric in HIGHER_IS_BETTER else "higher"
    if high < 0:
        return "worse" if metric in HIGHER_IS_BETTER else "lower"
    return NO_DIFFERENCE


def current_runs(study: Study, runs: list[dict]) -> dict[str, dict[int, dict]]:
    """arm → seed → run, keeping only runs at the arm's current config hash (the last such line wins)."""
    by_arm: dict[str, dict[int, dict]] = {arm.name: {} for arm in study.arms}
    for run in runs:
        if run["arm"] in by_arm and run["seed"] in study.arm(run["arm"]).seeds:
            if run["config_hash"] == study.config_hash(study.arm(run["arm"]), run["seed"]):
                by_arm[run["arm"]][run["seed"]] = run
    return by_arm


def summarise(
    runs_by_arm: dict[str, dict[int, dict]],
    baseline: str,
    metrics: list[str] | None = None,
    *,
    seed: int = 0,
    num_resamples: int = 1000,
    initial: dict | None = None,
) -> list[dict]:
    """One row per (arm, metric): estimate and interval, the paired difference against ``baseline``, and with
    ``initial`` (the record of the policy before training) the gain over it."""
    rows = []
    base_runs = runs_by_arm.get(baseline, {})
    for arm, by_seed in runs_by_arm.items():
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        names = metrics or sorted(
            {key for run in by_seed.values() for key in run["metrics"]},
            key=lambda key: (key not in PROMPT_METRICS, key),
        )
        for metric in names:
            if not all(metric in by_seed[s]["metrics"] for s in seeds):
                continue
            row = {"arm": arm, "metric": metric, "seeds": seeds}
            values = [_per_prompt_values(by_seed[s], metric) for s in seeds]
            per_prompt = all(v is not None for v in values)
            if per_prompt:
                estimate, low, high = bootstrap_over_seeds_and_prompts(values, seed=seed, num_resamples=num_resamples)
            else:
                estimate, low, high = bootstrap_over_seeds(
                    [by_seed[s]["metrics"][metric] for s in seeds], seed=seed, num_resamples=num_resamples
                )
            row.update(mean=estimate, low=low, high=high)
            paired = [s for s in seeds if s in base_runs and metric in base_runs[s]["metrics"]]
            if arm != baseline and paired == seeds:
                if per_prompt:
                    base_values = [_per_prompt_values(base_runs[s], metric) for s in seeds]
                    keys_match = all(
                        [r["key"] for r in by_seed[s]["per_prompt"]] == [r["key"] for r in base_runs[s]["per_prompt"]]
                        for s in seeds
                    )
                    if not keys_match:
                        raise StudyError(
                            f"arm {arm!r}: its evaluation prompts differ from the baseline's; "
                            "rerun both with the same evaluation."
                        )
                    diff = bootstrap_over_seeds_and_prompts(
                        values, base_values, seed=seed, num_resamples=num_resamples
                    )
                else:
                    diff = bootstrap_over_seeds(
                        [by_seed[s]["metrics"][metric] for s in seeds],
                        [base_runs[s]["metrics"][metric] for s in seeds],
                        seed=seed,
                        num_resamples=num_resamples,
                    )
                row.update(
                    diff=diff[0], diff_low=diff[1], diff_high=diff[2], verdict=verdict(metric, diff[1], diff[2])
                )
            if initial is not None:
                row.update(_gain(arm, metric, [by_seed[s] for s in seeds], initial, seed, num_resamples))
            rows.append(row)
    return rows


def _gain(arm: str, metric: str, runs: list[dict], initial: dict, seed: int, num_resamples: int) -> dict:
    """The paired gain over the policy before training (its greedy evaluation repeated for every seed), if it has
    the metric."""
    initial_values = _per_prompt_values(initial, metric)
    values = [_per_prompt_values(run, metric) for run in runs]
    if initial_values is not None and all(v is not None for v in values):
        if any([r["key"] for r in run["per_prompt"]] != [r["key"] for r in initial["per_prompt"]] for run in runs):
            raise StudyError(
                f"arm {arm!r}: its evaluation prompts differ from the initial policy's ({INITIAL_FILE}); "
                f"delete {INITIAL_FILE} to evaluate the initial policy again."
            )
        gain = bootstrap_over_seeds_and_prompts(
            values, [initial_values] * len(runs), seed=seed, num_resamples=num_resamples
        )
    elif metric in initial["metrics"] and initial_values is None:
        gain = bootstrap_over_seeds(
            [run["metrics"][metric] for run in runs],
            [initial["metrics"][metric]] * len(runs),
            seed=seed,
            num_resamples=num_resamples,
        )
    else:
        return {}
    return {"gain": gain[0], "gain_low": gain[1], "gain_high": gain[2]}


# ------------------------------------------------------------------------------------------------ the report
REPORT_METRICS = [*EVALUATION_METRICS, "heldout_logps_chosen_change", "heldout_logps_rejected_change"]


def _interval(row: dict, name: str) -> str:
    return f"{_fmt(row[name])} [{_fmt(row[name + '_low'])}, {_fmt(row[name + '_high'])}]" if name in row else "-"


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def write_report(study: Study, output_dir, *, seed: int = 0, num_resamples: int = 1000) -> Path:
    """``DIR/summary.md`` and ``DIR/figures/*.png`` from ``runs.jsonl`` (runs at their current config hash)."""
    output_dir = Path(output_dir)
    runs_by_arm = current_runs(study, read_runs(output_dir))
    done = sum(map(len, runs_by_arm.values()))
    planned = sum(len(arm.seeds) for arm in study.arms)
    initial = read_initial(study, output_dir)
    rows = summarise(runs_by_arm, study.baseline, seed=seed, num_resamples=num_resamples, initial=initial)
    if initial is not None:
        initial_rows = summarise({INITIAL_ARM: {0: initial}}, INITIAL_ARM, seed=seed, num_resamples=num_resamples)
        rows = [row for row in initial_rows if row["metric"] in REPORT_METRICS] + rows
    lines = [
        f"# Study summary: {done} of {planned} runs finished",
        "",
        f"Baseline arm: `{study.baseline}`. 95 % intervals: bootstrap over prompts and seeds "
        f"({num_resamples} resamples, seed {seed}); differences are paired (same seeds, same prompts).",
        "",
        f"`{INITIAL_ARM}`: the policy before training, evaluated the same way ({INITIAL_FILE}); an arm's gain is its "
        "paired difference from it."
        if initial is not None
        else f"The policy before training has not been evaluated ({INITIAL_FILE} is missing): no gains.",
        "",
    ]
    lines += ["| arm | seeds done | wall time per run (s) |", "|---|---|---|"]
    for arm in study.arms:
        runs = runs_by_arm[arm.name]
        wall = [run["wall_seconds"] for run in runs.values()]
        cost = f"{np.mean(wall):.0f} (min {min(wall):.0f}, max {max(wall):.0f})" if wall else "-"
        lines.append(f"| {arm.name} | {sorted(runs)} of {arm.seeds} | {cost} |")
    devices = sorted({run["device"] for runs in runs_by_arm.values() for run in runs.values()})
    lines += ["", f"Devices: {', '.join(devices) or '-'}.", ""]
    for metric in [m for m in REPORT_METRICS if any(r["metric"] == m for r in rows)]:
        lines += [
            f"## {metric}",
            "",
            f"| arm | mean [95 % interval] | gain over the {INITIAL_ARM} | paired difference vs {study.baseline} "
            "| verdict |",
            "|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["metric"] == metric):
            lines.append(
                f"| {row['arm']} | {_fmt(row['mean'])} [{_fmt(row['low'])}, {_fmt(row['high'])}] | "
                f"{_interval(row, 'gain')} | {_interval(row, 'diff')} | {row.get('verdict', '-')} |"
            )
        lines.append("")
    other = sorted({r["metric"] for r in rows} - set(REPORT_METRICS))
    if other:
        lines += [
            "## Other metrics (mean over seeds; interval over seeds)",
            "",
            "| arm | metric | mean [95 %] |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['arm']} | {r['metric']} | {_fmt(r['mean'])} [{_fmt(r['low'])}, {_fmt(r['high'])}] |"
            for r in rows
            if r["metric"] in other
        ]
        lines.append("")
    figures = save_figures(rows, output_dir / "figures", study.baseline)
    lines += [f"![{path.stem}](figures/{path.name})" for path in figures]
    summary = output_dir / SUMMARY_FILE
    summary.write_text("\n".join(lines) + "\n")
    (output_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    return summary


def save_figures(rows: list[dict], folder: Path, baseline: str) -> list[Path]:
    """Per headline metric: each arm's mean with its interval, and its paired difference against the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in ("prompt_strict", "instruction_strict", "drift"):
        chosen = [r for r in rows if r["metric"] == metric and r["arm"] != INITIAL_ARM]
        if not chosen:
            continue
        before = next((r["mean"] for r in rows if r["metric"] == metric and r["arm"] == INITIAL_ARM), None)
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(chosen) + 1.8), sharey=True)
        ys = np.arange(len(chosen))
        means = np.array([r["mean"] for r in chosen])
        left.errorbar(
            means,
            ys,
            xerr=[means - [r["low"] for r in chosen], [r["high"] for r in chosen] - means],
            fmt="o",
            capsize=3,
        )
        if before is not None:
            left.axvline(before, color="tab:gray", linestyle="--", linewidth=1, label=f"{INITIAL_ARM}: {before:.3f}")
            left.legend(loc="lower right", fontsize=8)
        left.set_yticks(ys, [r["arm"] for r in chosen])
        left.set_xlabel(f"{metric} (mean over seeds, 95 % interval)")
        for y, r in zip(ys, chosen):
            if "diff" in r:
                right.errorbar(
                    [r["diff"]],
                    [y],
                    xerr=[[r["diff"] - r["diff_low"]], [r["diff_high"] - r["diff"]]],
                    fmt="o",
                    capsize=3,
                    color="tab:red"
                    if r["verdict"] in ("worse", "lower")
                    else "tab:green"
                    if r["verdict"] in ("better", "higher")
                    else "tab:gray",
                )
        right.axvline(0, color="black", linewidth=0.8)
        right.set_xlabel(f"paired difference vs {baseline}")
        left.invert_yaxis()
        figure.tight_layout()
        path = folder / f"{metric}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths
