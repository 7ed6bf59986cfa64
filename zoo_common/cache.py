"""Where the project keeps what it computes once and reuses (mask PNGs, pixel means, validation marks)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(name: str) -> Path:
    """``$XDG_CACHE_HOME/residual-zoo/<name>`` (default ``~/.cache/residual-zoo/<name>``); not created here."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "residual-zoo" / name
