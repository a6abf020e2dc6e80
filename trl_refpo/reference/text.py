"""A reference that re-scores the original TEXT: with its own tokenizer (cross-tokenizer), without the prompt
(the prior ``p(y)``), or both (docs/algorithms.md §6–7).

``TextReference.prepare_dataset`` adds, next to TRL's ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, the
reference's own tokenisation of the same example:

- ``ref_prompt_ids``: the prompt as the reference tokenizer tokenises it by default (its own BOS, its own chat
  template), or with ``prompt_mode="none"`` the empty prompt (BOS only for plain text; an empty user turn for
  conversational data);
- ``ref_chosen_ids`` / ``ref_rejected_ids``: the completion tokens, found as TRL finds the policy's (where the
  tokenised prompt and prompt+completion diverge). A plain-text completion, to which TRL appended the policy's
  EOS, ends with the REFERENCE's EOS instead;
- ``ref_chosen_prompt_start`` / ``ref_rejected_prompt_start``: reference prompt tokens dropped at the front.

Truncation: where the policy's sequence is cut — by the collator (``max_length``), or before it by token limits on
the prompt (its last ``max_prompt_length`` tokens) and the completion (its first ``max_completion_length`` tokens),
as TRL ≤ 0.19 did — the reference sequence is cut here to the same TEXT: the policy keeps one contiguous span of
characters, and the reference keeps the tokens lying wholly inside that span (mapped through the message contents,
which both renderings share). Nothing is cut on the reference side where the policy keeps everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from datasets import Dataset
from datasets.fingerprint import Hasher
from trl.data_utils import _tokenize, common_prefix_length, is_conversational

from ..data import REF_ID_COLUMNS
from .fingerprints import tokenizer_fingerprint
from .sources import ModelReference


# The re-tokenisation's own code is part of its map fingerprint: an edited version never reads an old cache.
_CODE_FINGERPRINT = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

logger = logging.getLogger(__name__)

PROMPT_MODES = ("full", "none")
EMPTY_USER_TURN = [{"role": "user", "content": ""}]
SIDES = ("chosen", "rejected")
NO_TRUNCATION = "set max_length=None (and remove a recipe's max_prompt_length / max_completion_length)"


class TextReference(ModelReference):
    """Score ``ref_input_ids`` (built from the text by :meth:`prepare_dataset`) with the reference model.

    Args:
        tokenizer: the reference's tokenizer (the policy's own for a same-tokenizer prior).
        prompt_mode: ``"full"`` scores ``p_ref(y | x)``, ``"none"`` the prior ``p_ref(y)``.
        max_prompt_length / max_completion_length: token limits the POLICY's prompt ids (last tokens kept) and
            completion ids (first tokens kept) are cut to after tokenisation; the reference keeps the same text.
    """

    trl_compatible = False
    scores_policy_token_ids = False  # it scores its own re-tokenisation of the text
    input_keys = ("ref_input_ids", "ref_attention_mask", "ref_completion_mask")

    def __init__(
        self,
        tokenizer,
        prompt_mode: str = "full",
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
    ):
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"ref_prompt must be one of {PROMPT_MODES}, got {prompt_mode!r}.")
        self.tokenizer = tokenizer
        self.prompt_mode = prompt_mode
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length

    @property
    def ref_pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
            if token_id is not None:
                return token_id

    def prepare_dataset(self, dataset, processing_class, args, dataset_name: str):
        first = next(iter(dataset))
        missing = [column for column in ("prompt", "chosen", "rejected") if column not in first]
        if missing:
            raise ValueError(
                f"The {dataset_name} dataset has no {missing} text column(s): a reference with its own tokenizer or "
                "without the prompt (ref_tokenizer / ref_prompt='none') re-tokenises the original text. Pass the "
                "dataset with its text (prompt/chosen/rejected), not pre-tokenised ids."
            )
        if is_conversational(first) and self.tokenizer.chat_template is None:
            raise ValueError(
                f"The {dataset_name} dataset is conversational but the reference tokenizer "
                f"({getattr(self.tokenizer, 'name_or_path', '') or type(self.tokenizer).__name__}) has no chat "
                "template. Set `ref_tokenizer.chat_template` (the template the reference model was trained with) "
                "before building the trainer."
            )
        policy_tokenizer = getattr(processing_class, "tokenizer", processing_class)
        fn_kwargs = {
            "tokenizer": self.tokenizer,
            "policy_tokenizer": policy_tokenizer,
            "prompt_mode": self.prompt_mode,
            "max_length": args.max_length,
            "truncation_mode": args.truncation_mode,
            "max_prompt_length": self.max_prompt_length,
            "max_completion_length": self.max_completion_length,
        }
        map_kwargs = {}
        if isinstance(dataset, Dataset):  # IterableDataset.map has no num_proc / desc
            map_kwargs = {
                "num_proc": args.dataset_num_proc,
                "desc": f"Tokenizing {dataset_name} dataset for the reference",
            }
            # Fingerprinting the map's arguments would dill-pickle both tokenizers (seconds for a 262k vocabulary).
            map_kwargs["new_fingerprint"] = Hasher.hash(
                [
                    dataset._fingerprint,
                    _CODE_FINGERPRINT,
                    tokenizer_fingerprint(self.tokenizer),
                    tokenizer_fingerprint(policy_tokenizer),
                    {name: value for name, value in fn_kwargs.items() if not name.endswith("tokenizer")},
                ]
            )
        return dataset.map(reference_columns, batched=True, fn_kwargs=fn_kwargs, **map_kwargs)


# ---------------------------------------------------------------------------------------------- tokenisation
def _chat_kwargs(example) -> dict:
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(example.get("chat_template_kwargs") or {})}


def _fallback_context_id(tokenizer) -> int:
    """The one token a no-prompt plain-text sequence starts with when the tokenizer adds no BOS of its own.

    The first completion token needs a preceding position to be scored at all; BOS (or, failing that, the EOS
    that separates documents in GPT-style pre-training) is the least informative context the model knows.
    """
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError(
        "ref_prompt='none' on plain text needs a BOS or EOS token to start the completion from, but the reference "
        "tokenizer has neither (and adds nothing to an empty text)."
    )


def _strip_suffix(text: str, suffix: str | None) -> str:
    return text[: -len(suffix)] if suffix and text.endswith(suffix) else text


def reference_columns(
    batch,
    tokenizer,
    policy_tokenizer,
    prompt_mode,
    max_length,
    truncation_mode,
    max_prompt_length=None,
    max_completion_length=None,
) -> dict:
    """The ``ref_*`` columns of a batch of examples (see the module docstring)."""
    examples = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    output = {column: [] for column in REF_ID_COLUMNS}
    for example, sequences in zip(examples, _reference_sequences(examples, tokenizer, policy_tokenizer, prompt_mode)):
        prompt_ids = sequences["prompt_ids"]
        prompt_len = min(common_prefix_length(prompt_ids, sequences[side]["ids"]) for side in SIDES)
        output["ref_prompt_ids"].append(prompt_ids[:prompt_len])
        for side in SIDES:
            ids = sequences[side]["ids"]
            policy_window = _policy_window(
                len(example["prompt_ids"]),
                len(example[f"{side}_ids"]),
                max_length,
                truncation_mode,
                max_prompt_length,
                max_completion_length,
            )
            start, end = 0, len(ids)
            if policy_window != (0, len(example["prompt_ids"]) + len(example[f"{side}_ids"])):
                start, end = _aligned_window(example, side, sequences, tokenizer, policy_tokenizer, policy_window)
                end = max(end, prompt_len)  # the reference prompt is never cut at its end (TRL keeps the policy's)
            output[f"ref_{side}_prompt_start"].append(min(start, prompt_len))
            output[f"ref_{side}_ids"].append(ids[max(start, prompt_len) : end])
    return output


def _reference_sequences(examples, tokenizer, policy_tokenizer, prompt_mode) -> list[dict]:
    """Per example: the reference's tokenised prompt and, per side, its full text and ids (prompt + completion)."""
    if is_conversational(examples[0]):
        return [_chat_sequences(example, tokenizer, prompt_mode) for example in examples]
    # Plain text: one batched call per column (the tokenizer's per-call overhead dominates short texts).
    prompts = [example["prompt"] if prompt_mode == "full" else "" for example in examples]
    texts = {
        side: [
            prompt + _strip_suffix(example[side], policy_tokenizer.eos_token) + (tokenizer.eos_token or "")
            for prompt, example in zip(prompts, examples, strict=True)
        ]
        for side in SIDES
    }
    prompt_ids = (
        tokenizer(prompts)["input_ids"] if prompt_mode == "full" else [tokenizer("")["input_ids"]] * len(examples)
    )
    full_ids = {side: tokenizer(texts[side])["input_ids"] for side in SIDES}
    output = []
    for index in range(len(examples)):
        prefix_ids = []
        if not prompt_ids[index]:  # only for an empty prompt: a non-empty one always has tokens
            prefix_ids = [_fallback_context_id(tokenizer)]
        sequences = {"prompt_mode": prompt_mode, "prompt_ids": list(prefix_ids or prompt_ids[index])}
        for side in SIDES:
            sequences[side] = {
                "text": texts[side][index],
                "ids": prefix_ids + list(full_ids[side][index]),
                "add_special_tokens": True,
                "prefix_ids": prefix_ids,
            }
        output.append(sequences)
    return output


def _chat_sequences(example, tokenizer, prompt_mode) -> dict:
    kwargs = _chat_kwargs(example)
    prompt = example["prompt"] if prompt_mode == "full" else EMPTY_USER_TURN
    sequences = {
        "prompt_mode": prompt_mode,
        "prompt_ids": _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"],
    }
    for side in SIDES:
        text = tokenizer.apply_chat_template(prompt + example[side], tokenize=False, **kwargs)
        ids = _tokenize(tokenizer, prompt + example[side], **kwargs)["input_ids"]
        sequences[side] = {"text": text, "ids": ids, "add_special_tokens": False, "prefix_ids": []}
    return sequences


# ---------------------------------------------------------------------------------------------- truncation
def _policy_window(
    prompt_len, completion_len, max_length, truncation_mode, max_prompt_length, max_completion_length
) -> tuple[int, int]:
    """Token window ``[start, end)`` of the policy's full prompt + completion ids that the policy trains on: the
    prompt's last ``max_prompt_length`` and the completion's first ``max_completion_length`` tokens, then the
    collator's ``max_length`` cut of their concatenation."""
    start = prompt_len - min(prompt_len, max_prompt_length) if max_prompt_length is not None else 0
    if max_completion_length is not None:
        completion_len = min(completion_len, max_completion_length)
    end = prompt_len + completion_len
    if max_length is not None and end - start > max_length:
        if truncation_mode == "keep_start":
            end = start + max_length
        elif truncation_mode == "keep_end":
            start = end - max_length
        else:
            raise ValueError(f"Unsupported truncation_mode {truncation_mode!r}: use 'keep_start' or 'keep_end'.")
    return start, end


def _offsets(
    tokenizer, text: str, add_special_tokens: bool, expected_ids: list[int], who: str
) -> list[tuple[int, int]]:
    """Character spans of ``text``'s tokens; zero-width special tokens sit where the previous token ended."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"Truncating a reference that re-scores text (max_length) needs a fast {who} tokenizer (character "
            f"offsets); got a slow one. Use a fast tokenizer, or {NO_TRUNCATION}."
        )
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    if list(encoding["input_ids"]) != list(expected_ids):
        raise ValueError(
            f"Cannot align truncation: re-tokenising the {who} text does not reproduce its token ids: "
            f"{NO_TRUNCATION}, or limits no example exceeds."
        )
    spans, previous_end = [], 0
    for start, end in encoding["offset_mapping"]:
        if start == end:
            start = end = previous_end
        spans.append((start, end))
        previous_end = end
    return spans


def _locate(text: str, pieces: list[str], cursor: int, who: str) -> list[tuple[int, int]]:
    spans = []
    for piece in pieces:
        position = text.find(piece, cursor)
        if position < 0 and piece.strip() != piece:
            piece = piece.strip()
            position = text.find(piece, cursor)
        if position < 0:
            raise ValueError(
                f"Cannot align truncation: the {who} rendering does not contain the message text {piece[:40]!r} "
                f"verbatim (its chat template rewrites it): {NO_TRUNCATION}, or limits no example exceeds."
            )
        spans.append((position, position + len(piece)))
        cursor = position + len(piece)
    return spans


def _aligned_window(example, side, sequences, tokenizer, policy_tokenizer, policy_window):
    """Token window ``[start, end)`` of the reference sequence covering the text of the policy's token window."""
    policy_ids = example["prompt_ids"] + example[f"{side}_ids"]
    reference = sequences[side]
    conversational = is_conversational(example)
    if conversational:
        kwargs = _chat_kwargs(example)
        policy_text = policy_tokenizer.apply_chat_template(example["prompt"] + example[side], tokenize=False, **kwargs)
        policy_spans = _offsets(policy_tokenizer, policy_text, False, policy_ids, "policy")
    else:
        policy_text = example["prompt"] + example[side]
        policy_spans = _offsets(policy_tokenizer, policy_text, True, policy_ids, "policy")
    prefix = reference["prefix_ids"]
    reference_spans = [(0, 0)] * len(prefix) + _offsets(
        tokenizer, reference["text"], reference["add_special_tokens"], reference["ids"][len(prefix) :], "reference"
    )

    # Text both renderings share, in order: message contents (chat) or the raw prompt/completion text.
    prompt_mode_full = sequences["prompt_mode"] == "full"
    completion_cursor = (
        policy_spans[len(example["prompt_ids"])][0] if len(policy_ids) > len(example["prompt_ids"]) else 0
    )
    if conversational:
        messages = (example["prompt"] if prompt_mode_full else []) + example[side]
        pieces = [message["content"] for message in messages]
        if not all(isinstance(piece, str) for piece in pieces):
            raise ValueError(f"Cannot align truncation for multimodal message contents: {NO_TRUNCATION}.")
        policy_cursor = 0 if prompt_mode_full else completion_cursor
    else:
        completion = _strip_suffix(example[side], policy_tokenizer.eos_token)
        pieces = [example["prompt"] + completion] if prompt_mode_full else [completion]
        policy_cursor = 0 if prompt_mode_full else len(example["prompt"])
    policy_pieces = _locate(policy_text, pieces, policy_cursor, "policy")
    reference_pieces = _locate(reference["text"], pieces, 0, "reference")

    token_start, token_end = policy_window
    if token_end <= token_start:
        return len(reference_spans), len(reference_spans)
    char_start, char_end = 0, float("inf")
    if token_start > 0:
        char_start = _map_start(policy_spans[token_start][0], policy_pieces, reference_pieces)
    if token_end < len(policy_ids):
        char_end = _map_end(policy_spans[token_end - 1][1], policy_pieces, reference_pieces)
    kept = [index for index, (start, end) in enumerate(reference_spans) if start >= char_start and end <= char_end]
    if not kept:
        return len(reference_spans), len(reference_spans)
    return kept[0], kept[-1] + 1


def _map_end(position: int, policy_pieces, reference_pieces) -> int:
    """Policy character position → reference position, for the END of the kept text (exclusive).

    Inside a shared piece the texts are identical; in template text between pieces the reference keeps
    through the end of the previous piece (not scoring template tokens the policy only partly keeps).
    """
    mapped = 0
    for (policy_start, policy_end), (reference_start, reference_end) in zip(policy_pieces, reference_pieces):
        if position < policy_start:
            break
        if position <= policy_end:
            return reference_start + (position - policy_start)
        mapped = reference_end
    return mapped


def _map_start(position: int, policy_pieces, reference_pieces) -> int:
    """Policy character position → reference position, for the START of the kept text.

    Where the policy keeps part of the template text before a piece, the reference keeps its own template text
    introducing that piece; where the policy starts exactly at the piece, so does the reference.
    """
    mapped = 0
    for (policy_start, policy_end), (reference_start, reference_end) in zip(policy_pieces, reference_pieces):
        if position == policy_start:
            return reference_start
        if position < policy_start:
            return mapped
        if position < policy_end:
            return reference_start + (position - policy_start)
        mapped = reference_end
    return mapped
