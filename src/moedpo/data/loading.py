"""Read preference rows (pairs or rankings) from local JSON/JSONL/CSV/Parquet files or ``datasets`` names,
validating every row before anything is used (a bad row stops the run with file, row and field; nothing is
half-written)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from moedpo.data.formats import PreferenceDataError, PreferenceRow
from moedpo.data.ranking_rows import RankingRow, normalise_record

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def _text(path: Path) -> str:
    """The file as UTF-8 text, or a named error with the (0-based) line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n")
        problem = f"not UTF-8 text (byte 0x{data[err.start]:02x}); re-save the file as UTF-8"
        raise PreferenceDataError(str(path), line, "<file>", problem) from None


def _read_records(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        problem = f"unsupported file type {suffix!r}; expected one of {SUFFIXES} or a datasets folder"
        raise PreferenceDataError(str(path), 0, "<file>", problem)
    if suffix == ".jsonl":
        records = []
        for i, line in enumerate(_text(path).splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PreferenceDataError(str(path), i, "<row>", f"invalid JSON ({err.msg})") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(_text(path))
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
        rows = csv.DictReader(io.StringIO(_text(path), newline=""))
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in rows]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def load_preference_rows(source: str, split: str = "train") -> list[PreferenceRow | RankingRow]:
    """Rows from a local file, or from ``datasets.load_dataset(source, split=split)`` for a folder or a hub name:
    pairs, or rankings where the records have ``completions`` (:mod:`moedpo.data.ranking_rows`)."""
    path = Path(source)
    if path.is_file():
        records = _read_records(path)
        name = str(path)
    elif path.suffix:  # a name with a file extension is a file, never a hub dataset
        kind = f"a local {path.suffix} file" if path.suffix.lower() in SUFFIXES else f"a local file, one of {SUFFIXES}"
        raise FileNotFoundError(f"{source}: no such file (expected {kind}; a datasets hub name has no extension)")
    else:
        import datasets

        records = datasets.load_dataset(source, split=split).to_list()
        name = f"{source}[{split}]"
    if not records:
        raise PreferenceDataError(name, 0, "<file>", "no rows")
    return [normalise_record(record, name, i) for i, record in enumerate(records)]
