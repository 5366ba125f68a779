"""The ``featurewatch`` command line: run, score, eval, explain, discover, calibrate, build-pack, inspect, steer,
redteam, train-sae, export-model, ui.

Output a person reads goes to stdout as text; ``--json`` switches to JSON for
programs. Progress bars and notes go to stderr. Bad input exits with code 2
and one line, ``featurewatch: error: <what is wrong and the fix>``; Ctrl-C
exits with 130 and one line. Each command family is a module of this package
(``run``, ``score``, ``inspect``, ``steer``, ``redteam``, ``train``, ``calibrate``, ``build_pack``, ``export``,
``ui``) with a
``register(subparsers)``; shared option types and early checks are in
``_common``. Formats and the data flow: docs/architecture.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
from typing import Sequence

from ..errors import FeatureWatchError
from . import build_pack, calibrate, export, inspect, redteam, run, score, steer, train, ui

__all__ = ["build_parser", "console", "main"]

_COMMANDS = (run, score, calibrate, build_pack, inspect, steer, redteam, train, export, ui)


def build_parser() -> argparse.ArgumentParser:
    """The ``featurewatch`` argument parser with every command registered."""
    parser = argparse.ArgumentParser(prog="featurewatch", description=(
        "White-box safety monitoring for open LLMs: SAE features read during inference, detectors, alerts. "
        "Formats and the data flow: docs/architecture.md."))
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details (and tracebacks) to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status (0 ok, 2 bad input, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return _interrupted()
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for reports that record their command
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _interrupted()
    except FeatureWatchError as exc:
        return _error(str(exc), verbose=args.verbose)
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, and keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # disk full, a file removed under us, ...
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        return _error(message, verbose=args.verbose)


def console() -> None:
    """The ``featurewatch`` program (and ``python -m featurewatch.cli``): :func:`main`, then the process exits.

    Before exiting, every live object is moved out of the garbage collector's reach
    (``gc.freeze``): a command that loaded a model holds ~400 000 tracked objects over ~3 000
    modules (torch, transformers, scipy), and the interpreter's collections at exit walked them
    all — 1.5 s of CPU on an idle machine, many seconds on a loaded one, so ``run --serve`` could
    still be tearing down tens of seconds after Ctrl-C. Objects are still freed by reference
    counting, files are still flushed and closed, ``atexit`` handlers still run; only the
    collector's passes over the frozen objects are skipped (the process is ending anyway).
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more to deliver
            stream.flush()
    gc.freeze()
    sys.exit(code)


def _error(message: str, *, verbose: bool) -> int:
    if verbose:
        import traceback

        traceback.print_exc()
    print(f"featurewatch: error: {message}", file=sys.stderr)
    return 2


def _interrupted() -> int:
    print("featurewatch: interrupted", file=sys.stderr)
    return 130
