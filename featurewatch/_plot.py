"""matplotlib for the commands that draw (`steer --plot`, `redteam --plot`, `inspect --map`), headless."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def pyplot(flag: str) -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a ConfigError naming ``flag`` and the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(f"{flag} needs matplotlib: pip install 'featurewatch[plot]'") from exc
    return plt
