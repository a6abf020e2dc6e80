"""Small helpers shared by the notebooks in this folder (kept here so every notebook cell stays short).

* :func:`load_model` — ``"tiny"`` (a random Llama and a WordLevel tokenizer built in code: offline, seconds),
  ``"tiny-bpe"`` (the same with a different, BPE tokenizer), ``"offline:<name>"`` (the real small models of
  :mod:`trl_refpo.offline_models`) or a local model folder. A model that cannot be found raises
  :class:`NotebookSetupError`, which Jupyter shows as ONE line (no traceback).
* :func:`cpu_config` — the ``DPOConfig`` fields every notebook shares (CPU, no checkpoints, logging every step).
* :func:`logged` — a metric's values per step, read from ``trainer.state.log_history``.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_refpo.cli import RecipeError, check_model_path
from trl_refpo.offline_models import OFFLINE_MODELS, OFFLINE_PREFIX, OfflineModelUnavailable
from trl_refpo.testing import tiny_bpe_tokenizer, tiny_llama, tiny_tokenizer

TINY, TINY_BPE = "tiny", "tiny-bpe"
KNOWN = [TINY, TINY_BPE] + [OFFLINE_PREFIX + name for name in OFFLINE_MODELS]


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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def cpu_config(output_dir: str, max_steps: int, learning_rate: float, batch_size: int = 16, **overrides) -> dict:
    """The ``DPOConfig`` fields the notebooks share: short CPU runs, a metric entry per step, no checkpoints."""
    fields = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=2 * batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        report_to=[],
        seed=0,
    )
    fields.update(overrides)
    return fields


def logged(trainer, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of a training metric from ``trainer.state.log_history``."""
    entries = [entry for entry in trainer.state.log_history if key in entry]
    return [entry["step"] for entry in entries], [entry[key] for entry in entries]


def output_path(output_dir: str, *parts: str) -> str:
    """A path under ``output_dir``, its folder created."""
    path = os.path.join(output_dir, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
