"""Helpers every command shares: option types, early checks, the model and pack, progress bars.

The rule they serve: anything that can be checked without the model is checked
before the model loads (a load takes ~25 s on a CPU), and every failure is a
:class:`CLIError` or another :class:`~featurewatch.errors.FeatureWatchError`
that ``main`` prints as one ``featurewatch: error: ...`` line with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from ..alert import finite
from ..errors import FeatureWatchError

if TYPE_CHECKING:
    from ..monitor import Monitor
    from ..pack import Pack


class CLIError(FeatureWatchError):
    """A command-line argument is unusable (a path that cannot be read or written, a bad combination)."""


# --------------------------------------------------------------------------- argparse types
def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``lo .. hi`` (``hi=None``: no upper bound)."""
    valid = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {valid}, got {value}")
        return value

    parse.__name__ = valid  # argparse shows the type's name in some messages
    return parse


def float_range(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
                ) -> Callable[[str], float]:
    """An argparse type: a finite float between ``lo`` and ``hi`` (open or closed ends)."""
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    valid = f"a number in {left}{lo}, {'inf' if hi is None else hi}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}") from None
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo)
        if hi is not None:
            ok = ok and (value < hi if hi_open else value <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text}")
        return value

    parse.__name__ = valid
    return parse


POSITIVE = int_range(1)
NON_NEGATIVE = int_range(0)
PORT = int_range(0, 65535)


# --------------------------------------------------------------------------- shared options
def add_model_args(p: argparse.ArgumentParser, *, detectors: bool = True) -> None:
    """``--model``, ``--pack`` and (optionally) ``--detector``."""
    p.add_argument("--model", help="hub id, local directory or .gguf file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--pack", default=None, help="pack name or directory (default: smollm2-135m-instruct)")
    if detectors:
        p.add_argument("--detector", action="append", dest="detectors", metavar="NAME",
                       help="detector to use (repeatable; default: the pack's defaults)")


# --------------------------------------------------------------------------- early checks
def check_input(path: str, option: str) -> Path:
    """A file to read: it exists, is not a directory, and is readable."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{option} {path}: no such file")
    if p.is_dir():
        raise CLIError(f"{option} {path} is a directory; give a JSONL file")
    if not os.access(p, os.R_OK):
        raise CLIError(f"{option} {path}: permission denied; make it readable or give another file")
    return p


def check_output_dir(path: str, option: str) -> Path:
    """A directory to write into (created if missing): not a file, and writable once it exists."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{option} {path} is a file; give a directory")
    existing = p
    while not existing.exists():  # the nearest existing ancestor must be a writable directory
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path}: cannot write in {existing}; choose a writable place")
    return p


def open_output(path: str | None, option: str = "--output") -> IO[str]:
    """Open the output file now (before any model load), or stdout; line-buffered so a kill loses no row."""
    if path is None:
        return sys.stdout
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{option} {path} is a directory; give a file path")
    if not p.parent.is_dir():
        raise CLIError(f"{option} {path}: directory {p.parent} does not exist; create it first")
    try:
        return open(p, "w", encoding="utf-8", buffering=1)
    except OSError as exc:
        raise CLIError(f"{option} {path}: cannot write ({exc.strerror}); choose a writable place") from None


def load_pack_checked(args: argparse.Namespace) -> Pack:
    """The ``--pack``, loaded (cheap) so that ``--detector`` names are checked before the model loads."""
    from ..pack import DEFAULT_PACK, load_pack

    pack = load_pack(args.pack or DEFAULT_PACK)
    pack.select(getattr(args, "detectors", None))  # unknown names: ConfigError listing the valid ones
    return pack


# --------------------------------------------------------------------------- model, monitor, progress
def load_model(args: argparse.Namespace) -> Any:
    """The ``--model`` (a :class:`~featurewatch.models.LoadedModel`), announced on stderr."""
    from .. import models

    print("loading model…", file=sys.stderr)
    return models.load_model(args.model)


def build_monitor(args: argparse.Namespace, pack: Pack, **kwargs: Any) -> Monitor:
    """Load the model and attach a monitor with the checked pack and detectors."""
    from ..monitor import Monitor

    loaded = load_model(args)
    return Monitor(loaded.model, loaded.tokenizer, pack=pack, detectors=getattr(args, "detectors", None),
                   model_name=loaded.name, **kwargs)


def progress() -> Callable[..., Any]:
    """A ``tqdm`` factory writing to stderr (stdout stays clean for JSON)."""
    from functools import partial

    from tqdm import tqdm

    return partial(tqdm, file=sys.stderr, dynamic_ncols=True, leave=False)


def json_line(obj: Any) -> str:
    """One line of standard JSON (never bare ``NaN``/``Infinity``, which most parsers reject)."""
    import json

    return json.dumps(finite(obj), ensure_ascii=False, allow_nan=False)
