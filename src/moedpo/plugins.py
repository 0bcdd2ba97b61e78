"""A user's own objects named in the config as ``package.module:name`` (``em.model``, ``em.guide``,
``report.rewards``): imported from the working directory, like ``python -m``."""

from __future__ import annotations

import importlib
import os
import sys

from moedpo.config import ConfigError


def import_object(spec: str, key: str):
    """``package.module:name`` -> the object; ``key`` names the config key in errors."""
    if ":" not in spec:
        raise ConfigError(f"{key}={spec!r}: expected a built-in name or package.module:name")
    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}={spec!r}: cannot import {module_name!r} ({err})") from None
    if not hasattr(module, name):
        raise ConfigError(f"{key}={spec!r}: module {module_name!r} has no attribute {name!r}")
    return getattr(module, name)
