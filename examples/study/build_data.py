"""Write the study's training pairs and held-out pairs (deterministic; the files are committed).

    python examples/study/build_data.py

``data/train.jsonl``: 128 conversational preference pairs from the main job's rule-checked instruction tasks
(:mod:`trl_refpo.research.constraint_tasks`, seed 0; one user message, no system prompt, as the IFEval
evaluation renders its prompts). ``data/heldout_pairs.jsonl``: 48 held-out pairs of the same families (prompts
never seen in training), as plain strings, for the held-out log-probabilities of y_w and y_l. The IFEval
held-out prompts themselves come with the package (``load_ifeval_split("heldout")``).
"""

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from trl_refpo.research.constraint_tasks import constraint_splits, preference_dataset  # noqa: E402


NUM_TRAIN, NUM_HELDOUT, SEED = 128, 48, 0


def main() -> None:
    folder = Path(__file__).parent / "data"
    folder.mkdir(exist_ok=True)
    train, heldout = constraint_splits(NUM_TRAIN, NUM_HELDOUT, SEED)
    with open(folder / "train.jsonl", "w") as handle:
        for row in preference_dataset(train, system_prompt=None):
            handle.write(json.dumps(row) + "\n")
    with open(folder / "heldout_pairs.jsonl", "w") as handle:
        for index, task in enumerate(heldout):
            handle.write(
                json.dumps(
                    {
                        "key": f"pair-{index:03d}",
                        "kind": task.kind,
                        "prompt": task.instruction,
                        "chosen": task.chosen,
                        "rejected": task.rejected,
                    }
                )
                + "\n"
            )
    print(f"wrote {len(train)} train pairs and {len(heldout)} held-out pairs to {folder}")


if __name__ == "__main__":
    main()
