"""Small helpers shared by the notebooks in this folder (kept here so every notebook cell stays short).

* :func:`load_model` — ``"offline:<name>"`` (the real small models of :mod:`trl_refpo.research.offline_models`), a
  local model folder, or for the tests ``"tiny"`` (a random Llama and a WordLevel tokenizer built in code:
  offline, seconds) and ``"tiny-bpe"`` (the same with a different, BPE tokenizer). A model that cannot be found
  raises :class:`NotebookSetupError`, which Jupyter shows as ONE line (no traceback).
* :func:`constraint_data` — the main job's rule-checked constraint tasks (``trl_refpo.research.constraint_tasks``) as
  train / held-out preference datasets; :func:`constraint_satisfaction` scores greedy replies by the rules.
* :func:`train_copy` — a ``DPOTrainer`` on a copy of the policy with :func:`cpu_config`'s fields (CPU, no
  checkpoints, logging every step), trained; :func:`logged` reads a metric's values per step.
* :func:`save_figure` — a PNG under ``OUTPUT_DIR``; with ``TRL_REFPO_NOTEBOOK_EXPORT=1`` (``execute.py --export``)
  also the README's copy under ``docs/images/``.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import warnings
from pathlib import Path


warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto in a kernel without ipywidgets
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames, raised inside TRL
os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: no progress bars in the stored outputs

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback  # noqa: E402

from trl_refpo import DPOConfig, DPOTrainer  # noqa: E402
from trl_refpo.cli import RecipeError, check_model_path  # noqa: E402
from trl_refpo.objectives.typo_completions import eos_token_ids  # noqa: E402
from trl_refpo.research.constraint_tasks import check, constraint_splits, preference_dataset  # noqa: E402
from trl_refpo.research.offline_models import OFFLINE_MODELS, OFFLINE_PREFIX, OfflineModelUnavailable  # noqa: E402
from trl_refpo.testing import tiny_bpe_tokenizer, tiny_llama, tiny_tokenizer  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[2]
README_IMAGES = REPO_ROOT / "docs" / "images"
EXPORT_DPI = 90  # the README's PNGs stay well under 150 KB
SMALL_TEST_RUN = bool(os.environ.get("TRL_REFPO_NOTEBOOK_SMALL"))  # the tests' settings: tiny models, a few steps
TINY, TINY_BPE = "tiny", "tiny-bpe"
KNOWN = [TINY, TINY_BPE] + [OFFLINE_PREFIX + name for name in OFFLINE_MODELS]

sys.path.insert(0, str(REPO_ROOT / "examples"))


def _show_figures_inline() -> None:
    """Figures show in the notebook (and are stored in the .ipynb) even where MPLBACKEND names a file backend."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
        shell.run_line_magic("matplotlib", "inline")
        import matplotlib

        matplotlib.rcParams["figure.dpi"] = 80  # the figures stored in the .ipynb stay small


_show_figures_inline()


class NotebookSetupError(ValueError):
    """A notebook parameter names a model that cannot be loaded.

    IPython renders an exception through its ``_render_traceback_`` when it has one: this error shows as a
    single line in the notebook instead of a wall of library frames.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


def resolve_model(name_or_path: str, parameter: str = "MODEL") -> str:
    """The local folder of ``name_or_path`` (``offline:<name>`` converted on first use); ``NotebookSetupError``
    naming the notebook ``parameter`` if there is no such model."""
    try:
        return check_model_path(name_or_path)  # the trl-refpo CLI's check: offline names, folders, config.json
    except (RecipeError, OfflineModelUnavailable, ValueError) as error:
        message = str(error).replace(f"model_name_or_path {name_or_path!r} ", "", 1)
        raise NotebookSetupError(
            f"{parameter} = {name_or_path!r}: {message} Set {parameter} to one of {KNOWN} or to a local model folder."
        ) from None


def load_model(name_or_path: str, seed: int = 0, parameter: str = "MODEL"):
    """``(model, tokenizer)`` for a notebook parameter (see the module docstring), in fp32."""
    if name_or_path in (TINY, TINY_BPE):
        tokenizer = tiny_tokenizer() if name_or_path == TINY else tiny_bpe_tokenizer()
        return tiny_llama(tokenizer, hidden_size=64, num_layers=2, seed=seed), tokenizer
    path = resolve_model(name_or_path, parameter)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def constraint_data(num_train: int, num_eval: int, seed: int = 0):
    """``(train_tasks, eval_tasks, train_dataset, eval_dataset)``: the main job's constraint tasks, held-out
    prompts disjoint from the training ones, kinds balanced."""
    train_tasks, eval_tasks = constraint_splits(num_train, num_eval, seed)
    return train_tasks, eval_tasks, preference_dataset(train_tasks), preference_dataset(eval_tasks)


def constraint_satisfaction(model, tokenizer, tasks, max_new_tokens: int) -> tuple[dict[str, float], list[str]]:
    """``(rates, replies)``: the greedy replies to ``tasks`` and the share that satisfies its constraint, per kind
    and overall (``"all"``)."""
    replies = greedy_responses(model, tokenizer, tasks, max_new_tokens, desc="Generating")
    return constraint_rates(tasks, replies), replies


def cpu_config(output_dir: str, max_steps: int, learning_rate: float, batch_size: int = 4, **overrides) -> dict:
    """The ``DPOConfig`` fields the notebooks share: short CPU runs, a metric entry per step, no checkpoints."""
    fields = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=8,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max_steps // 8,
        max_length=128,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        report_to=[],
        disable_tqdm=True,  # no HTML progress table per run in the notebook (and no log printer: train_copy)
        seed=0,
    )
    fields.update(overrides)
    return fields


def train_copy(
    model,
    tokenizer,
    output_dir,
    train_dataset,
    eval_dataset=None,
    *,
    max_steps,
    learning_rate,
    batch_size,
    train=True,
    callbacks=None,
    ref_model=None,
    ref_tokenizer=None,
    **fields,
):
    """A ``DPOTrainer`` on a copy of ``model`` (the initial policy stays untouched), trained unless ``train=False``.

    ``fields``: ``DPOConfig`` fields (``loss_type``, ``beta``, ...), on top of :func:`cpu_config`'s.
    """
    args = DPOConfig(**cpu_config(output_dir, max_steps, learning_rate, batch_size, **fields))
    gc.collect()  # the previous run's optimizer state goes before this one allocates its own
    trainer = DPOTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        ref_model=ref_model,
        ref_tokenizer=ref_tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # the notebook plots the logs instead of printing every step
    if train:
        trainer.train()
    return trainer


def logged(history, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of a training metric from a trainer or its ``state.log_history``."""
    entries = [entry for entry in getattr(getattr(history, "state", None), "log_history", history) if key in entry]
    return [entry["step"] for entry in entries], [entry[key] for entry in entries]


def output_dir(name: str) -> str:
    """``outputs/<name>`` (git-ignored), under ``$TRL_REFPO_NOTEBOOK_OUTPUT_DIR`` when set (the tests' own folder)."""
    return os.path.join(os.environ.get("TRL_REFPO_NOTEBOOK_OUTPUT_DIR", ""), "outputs", name)


def output_path(output_dir: str, *parts: str) -> str:
    """A path under ``output_dir``, its folder created."""
    path = os.path.join(output_dir, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def save_figure(figure, output_dir: str, name: str) -> str:
    """Save ``figure`` as ``<output_dir>/<name>``; with ``TRL_REFPO_NOTEBOOK_EXPORT=1`` also as the README's
    ``docs/images/<name>`` (small: ``EXPORT_DPI``)."""
    path = output_path(output_dir, name)
    figure.savefig(path)
    if os.environ.get("TRL_REFPO_NOTEBOOK_EXPORT") == "1":
        README_IMAGES.mkdir(parents=True, exist_ok=True)
        figure.savefig(README_IMAGES / name, dpi=EXPORT_DPI)
        print(f"exported {README_IMAGES.relative_to(REPO_ROOT) / name}")
    return path


def greedy_responses(model, tokenizer, tasks, max_new_tokens: int, batch_size: int = 16, desc="Generating"):
    """Greedy replies to each constraint task's chat prompt (left-padded batches), decoded without special tokens."""
    from tqdm.auto import tqdm

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
                **batch.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].size(1) :]
            responses += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
    return responses


def constraint_rates(tasks, responses) -> dict[str, float]:
    """Share of responses that satisfy their task's constraint, per kind and overall ("all")."""
    hits = {}
    for task, response in zip(tasks, responses, strict=True):
        for key in (task.kind, "all"):
            hits.setdefault(key, []).append(check(task, response))
    return {kind: sum(values) / len(values) for kind, values in hits.items()}
