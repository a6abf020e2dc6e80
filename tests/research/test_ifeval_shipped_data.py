"""The shipped IFEval data: re-judged by the verifier, splits disjoint, held-out balanced, card current."""

import hashlib
from collections import Counter

from trl_refpo.research.ifeval_data import DATA_DIR, INSTRUCTION_IDS, make_prompts
from trl_refpo.research.ifeval_eval import load_ifeval_split
from trl_refpo.research.ifeval_judge import judge


def test_heldout_has_300_balanced_prompts_over_every_instruction_id_and_is_reproducible():
    heldout = list(load_ifeval_split("heldout"))
    assert len(heldout) >= 300
    counts = Counter(i for row in heldout for i in row["instruction_id_list"])
    assert set(counts) == set(INSTRUCTION_IDS) and len(counts) >= 12
    first = Counter(row["instruction_id_list"][0] for row in heldout)
    assert max(first.values()) - min(first.values()) <= 1
    rebuilt = make_prompts("heldout", len(heldout), seed=0)
    assert [row["prompt"] for row in heldout] == [row["prompt"] for row in rebuilt]


def test_every_shipped_pair_is_chosen_passes_rejected_fails_by_the_verifier():
    for split in ("train", "heldout_pairs"):
        rows = list(load_ifeval_split(split))
        assert rows, split
        for row in rows:
            chosen, _ = judge(row["chosen"], row["instruction_id_list"], row["kwargs"], row["prompt"], row["key"])
            rejected, _ = judge(row["rejected"], row["instruction_id_list"], row["kwargs"], row["prompt"], row["key"])
            assert all(chosen) and not all(rejected), row["key"]


def test_train_shares_no_base_task_with_the_heldout_prompts():
    train = {row["base_task"] for row in load_ifeval_split("train")}
    heldout = {row["base_task"] for row in load_ifeval_split("heldout")}
    assert train and not train & heldout


def test_the_card_names_the_shipped_files_fingerprints():
    card = (DATA_DIR / "ifeval_card.md").read_text()
    for name in ("ifeval_train.jsonl", "ifeval_heldout.jsonl", "ifeval_heldout_pairs.jsonl"):
        digest = hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest()[:16]
        assert f"`{name}` {digest}" in card
