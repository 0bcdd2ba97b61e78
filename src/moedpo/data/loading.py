"""Read preference rows from local JSON/JSONL/CSV/Parquet files or ``datasets`` names, validating every row
before anything is used (a bad row stops the run with file, row and field; nothing is half-written)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from moedpo.data.formats import PreferenceDataError, PreferenceRow, normalise_row

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def _read_records(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise PreferenceDataError(str(path), i, "<row>", f"invalid JSON ({err.msg})") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PreferenceDataError(
                str(path), 0, "<file>", f"invalid JSON at line {err.lineno} ({err.msg})"
            ) from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise PreferenceDataError(str(path), 0, "<file>", "expected a JSON list of rows (or {'data': [...]})")
        return data
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {SUFFIXES}")


def load_preference_rows(source: str, split: str = "train") -> list[PreferenceRow]:
    """Rows from a local file, or from ``datasets.load_dataset(source, split=split)`` for a folder or a hub name."""
    path = Path(source)
    if path.is_file():
        records = _read_records(path)
        name = str(path)
    elif path.suffix.lower() in SUFFIXES:
        raise FileNotFoundError(f"{source}: no such file (expected a local {path.suffix} file)")
    else:
        import datasets

        records = datasets.load_dataset(source, split=split).to_list()
        name = f"{source}[{split}]"
    if not records:
        raise PreferenceDataError(name, 0, "<file>", "no rows")
    return [normalise_row(record, name, i) for i, record in enumerate(records)]
