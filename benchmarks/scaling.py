"""How the monitor's cost grows: SAE width, watched features, detectors, batch size, prompt length.

Every point builds a monitor on the embedded model (or ``--model DIR``) with a synthetic
JumpReLU SAE of the right shape at the middle layer and synthetic detectors, then times
plain and monitored calls interleaved (plain, monitored, plain, …) in this one process,
drops the first pair and reports two figures:

* ``overhead``: median over pairs of monitored time / plain time − 1 (what a user sees;
  noisy on a shared machine);
* ``overhead_cpu``: the same with process CPU time instead of wall time;
* ``hook_share``: the hooks' own CPU time (timed around the real hook functions) over
  the monitored call's CPU time (what the monitor costs, far less sensitive to other load).

Sweeps: SAE width with top-feature readings on (residuals kept, encoded only when
``readings()`` is called; that call is timed separately), watched features, detectors,
batch size (generation) and prompt length (one forward of the prompt). PNG plots go to
``--plots DIR`` (matplotlib, from the ``plot`` extra). Run:

    .venv-peers/bin/python benchmarks/scaling.py [--reps 5] [--new-tokens 32] [--plots benchmarks] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_hotpath import HookTimes, timed_hooks  # noqa: E402  (a sibling script)

from featurewatch.detector import DetectorSpec, FeatureWeight, Pooling  # noqa: E402
from featurewatch.models import decoder_layers, load_model, model_width  # noqa: E402
from featurewatch.monitor import Monitor  # noqa: E402
from featurewatch.sae import SparseAutoencoder  # noqa: E402

PROMPT = "Write a short email to a colleague about tomorrow's meeting, and say what to bring."
SWEEPS = ("width", "watched", "detectors", "batch", "length")


def synthetic_sae(d_in: int, d_sae: int, seed: int = 0) -> SparseAutoencoder:
    """A JumpReLU SAE of the given shape whose activations are about as sparse as a trained one's."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5
    W_dec = torch.randn(d_sae, d_in, generator=g) / d_sae ** 0.5
    return SparseAutoencoder(W_enc, W_dec, torch.zeros(d_sae), torch.zeros(d_in), architecture="jumprelu",
                             threshold=torch.full((d_sae,), 2.0))


def synthetic_detectors(n: int, d_sae: int, hookpoint: str, per_detector: int = 50, seed: int = 0
                        ) -> list[DetectorSpec]:
    """``n`` SAE detectors of ``per_detector`` random features each, half on each phase, never firing."""
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(n):
        ids = torch.randperm(d_sae, generator=g)[:per_detector].tolist()
        specs.append(DetectorSpec(
            name=f"synthetic-{i}", description="scaling benchmark", hookpoint=hookpoint,
            features=[FeatureWeight(id=f, weight=0.01) for f in ids], threshold=1e9,
            pooling=Pooling(method="mean", min_tokens=8), phases=["prompt" if i % 2 else "completion"]))
    return specs


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lm = load_model(args.model)
        self.model, self.tok = self.lm.model, self.lm.tokenizer
        self.d_in = model_width(self.model)
        self.hookpoint = f"layers.{args.layer if args.layer >= 0 else len(decoder_layers(self.model)) // 2}"
        self.saes: dict[int, SparseAutoencoder] = {}

    def sae(self, width: int) -> SparseAutoencoder:
        if width not in self.saes:
            self.saes[width] = synthetic_sae(self.d_in, width)
        return self.saes[width]

    def monitor(self, *, width: int, n_detectors: int, watched: int = 0, per_detector: int = 50
                ) -> tuple[Monitor, HookTimes]:
        watch = {self.hookpoint: list(range(0, width, max(1, width // watched)))[:watched]} if watched else None
        m = Monitor(self.model, self.tok, saes={self.hookpoint: self.sae(width)}, watch=watch,
                    detectors=synthetic_detectors(n_detectors, width, self.hookpoint, per_detector))
        return m, timed_hooks(m)

    def pairs(self, plain: Callable[[], Any], monitored: Callable[[], Any], monitor: Monitor,
              hooks: HookTimes) -> dict[str, Any]:
        """Interleave plain and monitored calls; medians over pairs, the first pair dropped.

        The order alternates (plain first, then monitored first) so that a slow drift of the
        machine's speed does not favour either side. Wall and process CPU time are both taken;
        ``overhead_iqr`` gives the quartiles of the per-pair wall ratios (the resolution).
        """
        ratios, cpu_ratios, shares, plain_s = [], [], [], []

        def timed(monitor_on: bool) -> tuple[float, float]:
            if monitor_on:
                monitor.attach()
                hooks.clear()
            else:
                monitor.detach()
            t, c = time.perf_counter(), time.process_time()
            (monitored if monitor_on else plain)()
            return time.perf_counter() - t, time.process_time() - c

        for rep in range(self.args.reps + 1):
            if rep % 2:
                (m, mc), (p, pc) = timed(True), timed(False)
            else:
                (p, pc), (m, mc) = timed(False), timed(True)
            if rep:
                ratios.append(m / p)
                cpu_ratios.append(mc / pc)
                shares.append(sum(hooks.cpu) / mc)
                plain_s.append(p)
        monitor.detach()
        q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
        return {"overhead": round(statistics.median(ratios) - 1, 4),
                "overhead_iqr": [round(q[0] - 1, 4), round(q[2] - 1, 4)],
                "overhead_cpu": round(statistics.median(cpu_ratios) - 1, 4),
                "hook_share": round(statistics.median(shares), 4), "plain_s": round(statistics.median(plain_s), 3)}

    def generation(self, monitor: Monitor, hooks: HookTimes, batch: int, top_features: int = 0
                   ) -> dict[str, float]:
        n = self.args.new_tokens
        prompts = [PROMPT] * batch
        text = self.tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                            add_generation_prompt=True) if self.tok.chat_template else PROMPT
        enc = self.tok([text] * batch, return_tensors="pt", padding=True)
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=self.tok.pad_token_id)
        results: list[Any] = []

        def plain() -> None:
            with torch.inference_mode():
                self.model.generate(**enc, **kw)

        def monitored() -> None:
            results[:] = monitor.generate_batch(prompts, top_features=top_features, raise_on_block=False, **kw)

        out = self.pairs(plain, monitored, monitor, hooks)
        if top_features:  # the lazy part: a full encode of the kept residuals when readings are asked for
            monitor.attach()
            t = time.perf_counter()
            readings = results[0].readings()
            out["readings_ms"] = round(1e3 * (time.perf_counter() - t), 1)
            out["readings_tokens"] = len(readings)
            monitor.detach()
        return out

    def prefill(self, monitor: Monitor, hooks: HookTimes, length: int) -> dict[str, float]:
        base = self.tok(PROMPT * (1 + length // 8), return_tensors="pt")["input_ids"][:, :length]
        ids = base.repeat(self.args.batch, 1)

        def plain() -> None:
            with torch.inference_mode():
                self.model(input_ids=ids, use_cache=False)

        def monitored() -> None:
            with monitor.session(ids.shape[0]), torch.inference_mode():
                self.model(input_ids=ids, use_cache=False)

        return self.pairs(plain, monitored, monitor, hooks)


def run_sweep(bench: Bench, name: str) -> Iterator[dict[str, Any]]:
    """The points of one sweep, each as it is measured."""
    a = bench.args
    if name == "width":
        for width in a.widths:
            m, hooks = bench.monitor(width=width, n_detectors=4)
            yield {"width": width, **bench.generation(m, hooks, 1, top_features=5)}
    elif name == "watched":
        for watched in a.watched:
            m, hooks = bench.monitor(width=a.widths[0], n_detectors=1, watched=min(watched, a.widths[0]),
                                     per_detector=min(10, watched))
            yield {"watched": len(m.readouts[0].feature_ids), **bench.generation(m, hooks, 1)}
    elif name == "detectors":
        for n in a.detectors:
            m, hooks = bench.monitor(width=a.widths[0], n_detectors=n)
            yield {"detectors": n, "watched": len(m.readouts[0].feature_ids), **bench.generation(m, hooks, 1)}
    elif name == "batch":
        for b in a.batches:
            m, hooks = bench.monitor(width=a.widths[0], n_detectors=4)
            yield {"batch": b, **bench.generation(m, hooks, b)}
    elif name == "length":
        for length in a.lengths:
            m, hooks = bench.monitor(width=a.widths[0], n_detectors=4)
            yield {"prompt_tokens": length, "batch": a.batch, **bench.prefill(m, hooks, length)}


def _progress(sweep: str, row: dict[str, Any]) -> None:
    """One line on stderr per point as it completes (a full run takes a quarter of an hour)."""
    print(f"{sweep}: " + "  ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)


def plot(results: dict[str, list[dict[str, Any]]], directory: Path) -> list[str]:
    """One PNG per sweep: overhead and hook share against the swept quantity."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plots needs matplotlib: pip install -e '.[plot]' ({exc})") from exc
    keys = {"width": "width", "watched": "watched", "detectors": "detectors", "batch": "batch",
            "length": "prompt_tokens"}
    labels = {"width": "SAE width (features), top-5 readings on", "watched": "watched features",
              "detectors": "detectors (50 features each)", "batch": "batch size (generation)",
              "length": "prompt length (tokens, one forward)"}
    written = []
    directory.mkdir(parents=True, exist_ok=True)
    for sweep, rows in results.items():
        if not rows:
            continue
        x = [r[keys[sweep]] for r in rows]
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        y = [100 * r["overhead"] for r in rows]
        err = [[y_ - 100 * r["overhead_iqr"][0] for y_, r in zip(y, rows)],
               [100 * r["overhead_iqr"][1] - y_ for y_, r in zip(y, rows)]]
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label="overhead (monitored / plain − 1), quartiles")
        ax.plot(x, [100 * r["overhead_cpu"] for r in rows], "^-", label="overhead, CPU time")
        ax.plot(x, [100 * r["hook_share"] for r in rows], "s--", label="hooks' share of the monitored CPU time")
        ax.axhline(2, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(labels[sweep])
        ax.set_ylabel("% of the monitored call")
        ax.set_title(f"featurewatch cost vs {sweep}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = directory / f"scaling_{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--layer", type=int, default=15, help="SAE layer (-1: the middle one)")
    ap.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, from: {', '.join(SWEEPS)}")
    ap.add_argument("--widths", type=_ints, default=_ints("4608,16384,32768,65536"))
    ap.add_argument("--watched", type=_ints, default=_ints("10,100,1000,4608"))
    ap.add_argument("--detectors", type=_ints, default=_ints("1,4,16,64"))
    ap.add_argument("--batches", type=_ints, default=_ints("1,4,8,32"))
    ap.add_argument("--lengths", type=_ints, default=_ints("32,128,512"))
    ap.add_argument("--batch", type=int, default=8, help="batch of the prompt-length sweep")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="timed pairs per point (one more warms up)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on 2 shared cores a second thread adds noise, not speed)")
    ap.add_argument("--plots", type=Path, default=None, help="write scaling_<sweep>.png here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bad = [s for s in args.sweeps.split(",") if s not in SWEEPS]
    if bad:
        ap.error(f"unknown sweep(s) {', '.join(bad)}; valid: {', '.join(SWEEPS)}")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    results: dict[str, list[dict[str, Any]]] = {}
    for sweep in args.sweeps.split(","):
        results[sweep] = []
        for row in run_sweep(bench, sweep):
            _progress(sweep, row)
            results[sweep].append(row)
    out: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "hookpoint": bench.hookpoint, "torch_threads": torch.get_num_threads(),
                           "sweeps": results}
    if args.plots is not None:
        out["plots"] = plot(results, args.plots)
    out["load_average"] = os.getloadavg()
    if args.json:
        print(json.dumps(out))
    else:
        for sweep, rows in results.items():
            print(f"== {sweep}")
            for r in rows:
                print("   " + "  ".join(f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
