"""Property: any file with a malformed row fails with a named error: exit code 2, a one-line message naming the
file (and row and field where there is one), no traceback, and no run directory left behind."""

import csv
import io
import json

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from moedpo.cli import main

GOOD = {"prompt": "describe the garden :", "chosen": " sunny day", "rejected": " dark day", "user_id": "a"}
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
junk = st.one_of(
    st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=3)
)
tag = lambda typed, strategy: st.tuples(st.just(typed), strategy)  # noqa: E731  (typed: CSV cannot express it)
BAD_ROWS = st.one_of(
    tag(False, st.fixed_dictionaries({}, optional={"prompt": text, "rejected": text})),  # no chosen
    tag(True, st.builds(lambda v: {**GOOD, "chosen": v}, junk)),  # chosen not a string
    tag(False, st.builds(lambda v: {**GOOD, "rejected": v}, st.sampled_from(["", "   ", "\n"]))),  # empty
    tag(
        True, st.builds(lambda v: {**GOOD, "prompt": v}, st.one_of(st.integers(), st.lists(st.integers(), min_size=1)))
    ),
    tag(  # not JSON at all ("" would be an empty CSV cell, i.e. no features; "[]" a valid empty list)
        False,
        st.builds(lambda v: {**GOOD, "user_features": v}, st.one_of(text.map("x".__add__), st.lists(text, min_size=1))),
    ),
    tag(False, st.builds(lambda v: {"chosen": "x" + v, "rejected": "y" + v}, text)),  # implicit, no shared prefix
)


def _writes_a_mistake(typed: bool, suffix: str, broken: str) -> bool:
    """Whether the file written holds a mistake. Bad bytes break every format; a broken line only JSONL (``_encode``
    writes it nowhere else); the bad row breaks every format except a typed one in CSV, whose cells are strings."""
    return broken == "bytes" or (broken == "json" and suffix == ".jsonl") or not (typed and suffix == ".csv")


def _encode(rows: list, suffix: str, broken: str) -> bytes:
    if suffix == ".jsonl":
        lines = [json.dumps(r) for r in rows]
        if broken == "json":
            lines.insert(len(lines) // 2, "{not json")
        data = "\n".join(lines).encode()
    elif suffix == ".json":
        data = json.dumps(rows).encode()
    else:
        keys = sorted({k for r in rows for k in r})
        out = io.StringIO()
        writer = csv.DictWriter(out, keys)
        writer.writeheader()
        writer.writerows([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows])
        data = out.getvalue().encode()
    return data + (b"\xff\xfe bad bytes" if broken == "bytes" else b"")


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# a draw that writes no mistake (a typed value in CSV, a broken JSON line outside JSONL): the property skips it
@example(good=0, bad=(True, {**GOOD, "chosen": 0}), position=0, suffix=".csv", broken="json")
@given(
    good=st.integers(0, 4),
    bad=BAD_ROWS,
    position=st.integers(0, 4),
    suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
    broken=st.sampled_from(["", "json", "bytes"]),
)
def test_malformed_rows_and_files_fail_cleanly(tmp_path_factory, capsys, good, bad, position, suffix, broken):
    typed, bad = bad
    assume(_writes_a_mistake(typed, suffix, broken))
    folder = tmp_path_factory.mktemp("data")
    rows = [dict(GOOD) for _ in range(good)]
    rows.insert(min(position, len(rows)), bad)
    path = folder / f"prefs{suffix}"
    path.write_bytes(_encode(rows, suffix, broken))
    run_dir = folder / "run"
    capsys.readouterr()
    code = main(["train", f"data.source={path}", f"train.output_dir={run_dir}", "em.scope=pair", "train.max_steps=1"])
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("moedpo train: error:")]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and len(message) == 1 and str(path) in message[0]
    assert not run_dir.exists()
