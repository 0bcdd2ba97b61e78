"""Every example runs (with --shrink) and checks itself; a new example without a test here fails."""

import pathlib
import runpy
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
EXERCISED = {"planted_experts.py", "hierarchical_model.py"}  # the latter: tests/test_custom_model.py


def test_every_example_is_exercised():
    assert {p.name for p in EXAMPLES.glob("*.py")} == EXERCISED


def run_example(name, *args):
    sys.argv = [name, *args]
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return exit_info.value.code


def test_planted_experts_shrink(capsys):
    assert run_example("planted_experts.py", "--shrink") == 0
    out = capsys.readouterr().out
    assert "annotator-type ARI" in out and "[FAIL]" not in out


@pytest.mark.slow
def test_planted_experts_full(capsys):
    assert run_example("planted_experts.py") == 0
    assert "[FAIL]" not in capsys.readouterr().out
