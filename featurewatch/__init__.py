"""featurewatch: white-box safety monitoring for open LLMs.

Reads sparse-autoencoder features from a Hugging Face model's residual stream
while it generates, scores safety detectors, and reports alerts to callbacks,
logs, LangChain and Prometheus. Importing this package changes nothing and
loads nothing heavy: names resolve on first use, so a metrics-only worker
process (``featurewatch.metrics``) never imports torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Alert": "alert",
    "RunResult": "alert",
    "DetectorSpec": "detector",
    "FeatureWatchError": "errors",
    "GenerationBlocked": "errors",
    "GenerationResult": "generation",
    "Intervention": "intervention",
    "Monitor": "monitor",
    "BaseSink": "sinks",
    "load_pack": "pack",
    "SparseAutoencoder": "sae",
}
__all__ = [
    "Alert", "BaseSink", "DetectorSpec", "FeatureWatchError", "GenerationBlocked", "GenerationResult",
    "Intervention", "Monitor", "RunResult", "SparseAutoencoder", "load_pack",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .alert import Alert, RunResult
    from .detector import DetectorSpec
    from .errors import FeatureWatchError, GenerationBlocked
    from .generation import GenerationResult
    from .intervention import Intervention
    from .monitor import Monitor
    from .pack import load_pack
    from .sae import SparseAutoencoder
    from .sinks import BaseSink


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featurewatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
