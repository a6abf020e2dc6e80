"""Third-party warnings that trl-refpo's own code triggers on every run and that the user cannot act on.

* transformers 5 renamed ``gradient_checkpointing*`` to ``activation_checkpointing*``: TRL's ``DPOConfig`` default,
  TRL's ``disable_gradient_checkpointing`` (used around reference forwards) and alignment-handbook recipes, which the
  CLI accepts as written, all use the old names, so each run printed up to four ``FutureWarning``s. Both names
  still mean the same setting.
* DeepSpeed, imported by accelerate when installed, logs "Setting accelerator to CPU. If you have GPU or other
  accelerator, we were unable to detect it." on any machine without a GPU, although no ZeRO config was asked for
  (a ZeRO launch without CUDA is refused with its own error, see ``launch.py``).

Nothing else is filtered: every other warning still reaches the user.
"""

from __future__ import annotations

import logging
import warnings


GRADIENT_CHECKPOINTING_RENAME = r"`(is_)?gradient_checkpointing(_kwargs|_enable|_disable)?` is deprecated"
DEEPSPEED_CPU_LINE = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."


class _DropDeepSpeedCpuLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != DEEPSPEED_CPU_LINE


def silence_project_triggered_warnings() -> None:
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_RENAME, category=FutureWarning)
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed's LoggerFactory creates and reuses
    if not any(isinstance(existing, _DropDeepSpeedCpuLine) for existing in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropDeepSpeedCpuLine())
