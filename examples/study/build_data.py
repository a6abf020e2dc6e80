"""Write the study's training pairs (deterministic; the file is committed).

    python examples/study/build_data.py

``data/train.jsonl``: the package's IFEval-verified on-policy train pairs (``load_ifeval_split("train")``, built
by :mod:`trl_refpo.research.ifeval_data`; card in ``trl_refpo/research/data/ifeval_card.md``) in the conversational
form ``trl-refpo dpo`` trains on: one user message, no system prompt, as the IFEval evaluation renders its prompts.
The held-out prompts and held-out pairs the study evaluates on are the package's own splits (``heldout``,
``heldout_pairs``), named in ``seeds.yaml``; their base tasks are disjoint from the train pairs'.
"""

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from trl_refpo.research.ifeval_data import preference_dataset  # noqa: E402
from trl_refpo.research.ifeval_eval import load_ifeval_split  # noqa: E402


def main() -> None:
    folder = Path(__file__).parent / "data"
    folder.mkdir(exist_ok=True)
    pairs = preference_dataset(list(load_ifeval_split("train")))
    with open(folder / "train.jsonl", "w") as handle:
        for row in pairs.select_columns(["prompt", "chosen", "rejected"]):
            handle.write(json.dumps(row) + "\n")
    for stale in ("heldout_pairs.jsonl",):
        (folder / stale).unlink(missing_ok=True)
    print(f"wrote {len(pairs)} train pairs to {folder / 'train.jsonl'}")


if __name__ == "__main__":
    main()
