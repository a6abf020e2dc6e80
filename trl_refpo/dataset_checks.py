"""A preference dataset checked before any tokenisation: one line naming the dataset, the column, the first bad row
and what was expected (TRL would fail later with ``KeyError: 'rejected'`` or ``'int' object has no attribute
'endswith'``).

``chosen`` and ``rejected`` (and ``prompt`` where present) hold text, or chat messages: lists of dicts with a
string ``role``. A map-style ``Dataset`` is checked whole from its Arrow columns (no Python loop over rows); an
``IterableDataset`` on its first example, the one TRL reads to decide how to tokenise.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset


REQUIRED_COLUMNS = ("chosen", "rejected")
TEXT_COLUMNS = ("prompt", *REQUIRED_COLUMNS)
EXPECTED = "text (a string) or chat messages (a list of dicts with 'role' and 'content')"


def check_preference_datasets(train_dataset, eval_dataset) -> None:
    """The train dataset and the eval dataset (or each of a dict of them), as TRL names them."""
    datasets = [("train", train_dataset)]
    if isinstance(eval_dataset, dict):
        datasets += [(f"eval {name!r}", dataset) for name, dataset in eval_dataset.items()]
    elif eval_dataset is not None:
        datasets.append(("eval", eval_dataset))
    for name, dataset in datasets:
        if dataset is not None:
            check_preference_dataset(dataset, name)


def check_preference_dataset(dataset, name: str) -> None:
    column_names = _column_names(dataset)
    if column_names is None:
        return  # no rows to read; the empty-dataset check names it
    missing = [column for column in REQUIRED_COLUMNS if column not in column_names]
    if missing:
        raise ValueError(
            f"The {name} dataset has no column {missing[0]!r} (it has {sorted(column_names)}): a preference dataset "
            f"needs 'chosen' and 'rejected' (and optionally 'prompt'), each holding {EXPECTED}. Rename or add it."
        )
    for column in TEXT_COLUMNS:
        if column not in column_names:
            continue
        bad = (
            _first_bad_arrow_row(dataset, column)
            if isinstance(dataset, Dataset)
            else _first_bad_example(dataset, column)
        )
        if bad is not None:
            row, value, why = bad
            raise ValueError(
                f"Column {column!r} of the {name} dataset must hold {EXPECTED}, but row {row} has {_short(value)}"
                f"{why}. Fix or drop that row."
            )


def _column_names(dataset):
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    first = next(iter(dataset), None)
    return None if first is None else list(first)


def _first_bad_example(dataset, column: str):
    value = next(iter(dataset))[column]
    why = _why_bad(value)
    return None if why is None else (0, value, why)


def _why_bad(value) -> str | None:
    """Why one value is neither text nor chat messages; None when it is one of them."""
    if isinstance(value, str):
        return None
    if isinstance(value, list) and value and all(isinstance(message, dict) for message in value):
        for index, message in enumerate(value):
            if not isinstance(message.get("role"), str):
                return f" (message {index} has no 'role')"
        return None
    return f" ({type(value).__name__})"


def _first_bad_arrow_row(dataset: Dataset, column: str):
    values = dataset.select_columns([column]).with_format("arrow")[:].column(column).combine_chunks()
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        bad_rows = pc.is_null(values)
    elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type):
        if kind.value_type.get_field_index("role") == -1:
            return 0, values[0].as_py(), " (its messages have no 'role')"
        messages = pc.list_flatten(values)
        bad_messages = pc.is_null(pc.struct_field(messages, "role"))
        bad_rows = pc.or_(pc.is_null(values), pc.equal(pc.list_value_length(values), 0))
        if pc.any(bad_messages).as_py():
            parents = pc.list_parent_indices(values).to_numpy()
            first_message = int(pc.index(bad_messages, True).as_py())
            row = int(parents[first_message])
            first_empty = _first_true(bad_rows)
            if first_empty is None or row < first_empty:
                return row, values[row].as_py(), " (a message with no 'role')"
    else:
        first = next((row for row in range(len(values)) if values[row].is_valid), 0)
        return first, values[first].as_py(), f" ({kind})"
    row = _first_true(bad_rows)
    return None if row is None else (row, values[row].as_py(), "")


def _first_true(mask) -> int | None:
    mask = pc.fill_null(mask, True)
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
