"""Every module imports (catches syntax errors and import cycles in files no other test touches)."""

import importlib
import pathlib
import pkgutil

import moedpo


def test_every_module_imports():
    root = pathlib.Path(moedpo.__file__).parent
    names = [m.name for m in pkgutil.walk_packages([str(root)], prefix="moedpo.")]
    assert "moedpo.losses.mixture" in names
    for name in names:
        importlib.import_module(name)
