"""The error tree.

Every error featurewatch raises on purpose names the bad value and, where there
is one, the fix. They subclass the built-in type a caller would expect, so
``except ValueError`` keeps working::

    FeatureWatchError
     ├── ConfigError (ValueError)          bad settings, specs or packs
     │    ├── HookpointNotFound (LookupError)
     │    ├── WidthMismatch                SAE d_in != the model's width
     │    ├── FeatureOutOfRange (IndexError)
     │    └── PortInUse (OSError)          the metrics port is taken by another process
     ├── SAEFormatError (ValueError)       unreadable or corrupt SAE files
     ├── RecordError (ValueError)          malformed JSONL input (names the line)
     ├── ModelNotAvailable (LookupError)   model files missing (says how to install)
     └── MonitorError (RuntimeError)       a fault inside the forward pass (fail-closed)

    GenerationBlocked (Exception)          NOT a FeatureWatchError: a ``block``
                                           action stops a generation, and
                                           ``except FeatureWatchError`` must never
                                           swallow it.
"""

from __future__ import annotations

from typing import Any


class FeatureWatchError(Exception):
    """Base class of every error featurewatch raises on purpose."""


class ConfigError(FeatureWatchError, ValueError):
    """A setting, detector spec or pack is invalid."""


class HookpointNotFound(ConfigError, LookupError):
    """A hookpoint names no module of the model."""


class WidthMismatch(ConfigError):
    """An SAE's input width differs from the activations it would read."""


class FeatureOutOfRange(ConfigError, IndexError):
    """A feature id is outside ``0 .. d_sae - 1``."""


class PortInUse(ConfigError, OSError):
    """A port to serve on (``/metrics``) is already bound by another process.

    Also an :class:`OSError`, so code written against ``socket`` errors keeps
    catching it; the message names the port and the fix.
    """


class SAEFormatError(FeatureWatchError, ValueError):
    """SAE files are missing, truncated, corrupt or hold non-finite weights."""


class RecordError(FeatureWatchError, ValueError):
    """A JSONL record is malformed; ``line`` is its 1-based line number."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        where = f"{path or '<input>'}:{line}: " if line is not None else ""
        super().__init__(where + message)
        self.reason = message
        """What is wrong, without the place."""
        self.path = path
        self.line = line


class ModelNotAvailable(FeatureWatchError, LookupError):
    """Model weights cannot be found locally."""


class MonitorError(FeatureWatchError, RuntimeError):
    """A monitoring fault inside the forward pass (raised only when fail-closed)."""


class GenerationBlocked(Exception):
    """A detector with ``action="block"`` stopped a generation.

    ``alert`` is the first blocking alert; ``results`` always holds every
    :class:`~featurewatch.generation.GenerationResult` of the call (one per prompt),
    partial text included, so the application can still log or show what was produced
    before the stop; ``result`` is the blocked one.
    """

    def __init__(self, alert: Any, results: list[Any] | None = None) -> None:
        super().__init__(f"generation blocked by detector {alert.detector!r} "
                         f"(score {alert.score:.3g} >= threshold {alert.threshold:.3g})")
        self.alert = alert
        self.results: list[Any] = list(results or [])

    @property
    def result(self) -> Any:
        """The blocked generation's result (the first blocked one in a batch)."""
        blocked = [r for r in self.results if getattr(r, "outcome", None) == "blocked"]
        return (blocked or self.results or [None])[0]
