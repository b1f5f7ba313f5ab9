"""Loading user plug-ins named `package.module:function`."""

from __future__ import annotations

import importlib

from pgraft.errors import ConfigError


def load_plugin(spec: str, key: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"config error: {key}: {spec!r} is not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"config error: {key}: cannot import {module_name!r} ({exc})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"config error: {key}: {module_name!r} has no attribute {attr!r}") from None
