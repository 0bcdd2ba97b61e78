"""Every example config loads, and opens with the command that runs it."""

import pathlib

import pytest

from moedpo.config import load_config

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_loads_and_names_its_command(path):
    assert path.read_text().startswith(f"# moedpo train --config examples/configs/{path.name}")
    load_config(path)
