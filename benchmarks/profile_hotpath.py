"""Profile the monitor's hot path: where the time of the hooks goes on decode steps.

Generates with the embedded model (or ``--model DIR``) at batch 1 and batch 8 and reports
(1) the hooks' own wall time per forward pass (pre-hook + hookpoint hooks, timed around
the real hook functions, medians), and (2) a cProfile of the monitored decode loop
restricted to featurewatch's functions. With ``--baseline REF`` the package as it was at
git ref REF is imported beside the working tree's (as ``featurewatch_baseline``) and the two
monitors alternate on the same model (A B A B …), so before/after share the same load. Run:

    .venv/bin/python benchmarks/profile_hotpath.py [--baseline HEAD~1] [--new-tokens 16] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from featurewatch.models import load_model
from featurewatch.monitor import Monitor

PROMPT = "Write a short email to a colleague about tomorrow's meeting."


def baseline_monitor_class(ref: str) -> Any:
    """``Monitor`` from the package as committed at ``ref``, imported as ``featurewatch_baseline``."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="fw-baseline-"))
    archive = subprocess.run(["git", "-C", str(root), "archive", ref, "featurewatch"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / "featurewatch").rename(tmp / "featurewatch_baseline")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("featurewatch_baseline.monitor").Monitor


class HookTimes:
    """Per forward pass: the hooks' wall time and the process CPU time they used (seconds)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def clear(self) -> None:
        self.wall.clear()
        self.cpu.clear()


def timed_hooks(monitor: Any) -> HookTimes:
    """Re-attach ``monitor`` with its hooks wrapped in timers; return where the per-pass times go.

    CPU time (``time.process_time``) is the figure to trust on a shared machine: a hook
    descheduled for 30 ms by another process's work shows 30 ms of wall time but no CPU time.
    """
    times = HookTimes()
    pending = [0.0, 0.0]
    pre, make = monitor._pre_hook, monitor._make_hook

    def pre_hook(*args: Any) -> Any:
        t, c = time.perf_counter(), time.process_time()
        try:
            return pre(*args)
        finally:
            pending[0], pending[1] = time.perf_counter() - t, time.process_time() - c

    def make_hook(readout: Any) -> Any:
        inner = make(readout)

        def hook(*args: Any) -> Any:
            t, c = time.perf_counter(), time.process_time()
            try:
                return inner(*args)
            finally:
                pending[0] += time.perf_counter() - t
                pending[1] += time.process_time() - c
                if readout.deepest:
                    times.wall.append(pending[0])
                    times.cpu.append(pending[1])
        return hook

    monitor.detach()
    monitor._pre_hook = pre_hook
    monitor._make_hook = make_hook
    monitor.attach()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--pack", default="smollm2-135m-instruct")
    ap.add_argument("--baseline", default=None, help="git ref to compare with (e.g. HEAD~1)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top-features", type=int, default=0)
    ap.add_argument("--top", type=int, default=20, help="rows of the cProfile table")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lm = load_model(args.model)
    from featurewatch.pack import resolve_pack_path

    pack = str(resolve_pack_path(args.pack))
    versions: dict[str, Any] = {"current": Monitor(lm.model, lm.tokenizer, pack=pack)}
    if args.baseline:
        versions["current"].detach()
        versions = {"baseline": baseline_monitor_class(args.baseline)(lm.model, lm.tokenizer, pack=pack),
                    **versions}
    timers = {}
    for name, monitor in versions.items():
        timers[name] = timed_hooks(monitor)
        monitor.detach()
    out: dict[str, Any] = {"new_tokens": args.new_tokens, "top_features": args.top_features, "batches": {}}
    for b in (int(x) for x in args.batches.split(",")):
        prompts = [PROMPT] * b
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, raise_on_block=False,
                  top_features=args.top_features)
        res: dict[str, Any] = {}
        for rep in range(args.reps + 1):  # A B A B …, the first round warms up
            for name, monitor in versions.items():
                monitor.attach()
                monitor.generate_batch(prompts, **kw)
                monitor.detach()
                if not rep:
                    timers[name].clear()
        for name, monitor in versions.items():
            keep = [i % args.new_tokens != 0 for i in range(len(timers[name].wall))]  # not the prefills
            decode = [t for t, k in zip(timers[name].wall, keep) if k]
            decode_cpu = [t for t, k in zip(timers[name].cpu, keep) if k]
            monitor.attach()
            prof = cProfile.Profile()
            prof.enable()
            monitor.generate_batch(prompts, **kw)
            prof.disable()
            monitor.detach()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(r"featurewatch", args.top)
            res[name] = {"hook_cpu_us_per_decode_step_p50": round(1e6 * statistics.median(decode_cpu), 1),
                         "hook_us_per_decode_step_p50": round(1e6 * statistics.median(decode), 1),
                         "hook_us_per_decode_step_mean": round(1e6 * statistics.fmean(decode), 1),
                         "decode_steps": len(decode), "profile": buf.getvalue()}
            if not args.json:
                print(f"== batch {b}, {name}: hooks {res[name]['hook_cpu_us_per_decode_step_p50']} µs CPU, "
                      f"{res[name]['hook_us_per_decode_step_p50']} µs wall per decode step (p50) over "
                      f"{len(decode)} steps")
                print(res[name]["profile"], flush=True)
        out["batches"][b] = res
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
