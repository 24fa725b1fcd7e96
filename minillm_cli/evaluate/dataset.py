"""The evaluation set of `minillm eval`: rows read and checked for the columns the asked metrics
need, and the label column of a classification file (calibration)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from minillm_cli.data import encoding as data_mod
from minillm_cli.data import rows as rows_mod
from minillm_cli.errors import UserError

# Reference column(s) of the row formats whose prompt column is the key.
_REFERENCE_COLUMNS = {"instruction": ("output", "response"), "prompt": ("response", "completion")}


def _fill_reference(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of a row without a reference column given an empty one (metrics that need none)."""
    for prompt_col, ref_cols in _REFERENCE_COLUMNS.items():
        if prompt_col in row and not any(row.get(c) is not None for c in ref_cols):
            return {**row, ref_cols[0]: ""}
    return row


def read_eval_data(source: str, need_references: list[str]) -> tuple[list[data_mod.Example], list[dict[str, Any]]]:
    """Read the evaluation set (split "test" for hub ids) as Examples plus the raw rows.

    Args:
        source: A jsonl/json/csv/parquet file or a hub dataset id.
        need_references: The asked metrics that compare against references; when empty, rows
            without a reference column are accepted (e.g. a classification file for calibration).

    Raises:
        UserError: Empty file, unknown format, or a row without its reference column (naming the
            file:line, the column and the metrics that need it).
    """
    rows = rows_mod.read_rows(source, "test")
    checked: list[tuple[str, dict[str, Any]]] = []
    for where, row in rows:
        if need_references:
            for prompt_col, ref_cols in _REFERENCE_COLUMNS.items():
                if prompt_col in row and "messages" not in row:
                    if not any(row.get(c) is not None for c in ref_cols):
                        raise UserError(
                            f"{where}: missing reference column '{ref_cols[0]}' (or '{ref_cols[1]}'); "
                            f"metric(s) {', '.join(need_references)} compare against it"
                        )
                    break
            checked.append((where, row))
        else:
            checked.append((where, _fill_reference(row)))
    first_where, first = checked[0]
    fmt = rows_mod.detect_format(first, first_where)
    examples = [rows_mod.row_to_example(row, fmt, where) for where, row in checked]
    return examples, [row for _, row in rows]


def read_labels(rows: Sequence[dict[str, Any]], examples: Sequence[data_mod.Example], words: list[str]) -> list[str]:
    """The `label` of every row, checked against the label words.

    Raises:
        UserError: A row without a label, or with a label that is not a label word.
    """
    labels = []
    for row, ex in zip(rows, examples):
        if row.get("label") is None:
            raise UserError(f"{ex.where}: missing column 'label' (calibration needs a labelled classification file)")
        label = str(row["label"]).strip()
        if label not in words:
            raise UserError(f"{ex.where}: label {label!r} is not one of --label-words {','.join(words)}")
        labels.append(label)
    return labels
