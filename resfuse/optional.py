"""Libraries only some features need, imported when first used: a missing one is one line
naming the feature and the extra that installs it, never an ImportError traceback."""

from __future__ import annotations

import importlib
from typing import Any

from resfuse.errors import ConfigError


def optional_module(name: str, feature: str, extra: str) -> Any:
    """Module `name`, or ConfigError: "FEATURE needs NAME: pip install 'resfuse[EXTRA]'"."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"{feature} needs {name}: pip install 'resfuse[{extra}]'") from exc
