"""Monitoring overhead on the embedded model: generation speed with and without featurewatch.

Interleaves monitored and unmonitored generations in one process
and reports medians, plus the hook's own time per forward pass and offline
scoring throughput. Run:

    .venv/bin/python benchmarks/overhead.py [--reps 7] [--new-tokens 32] [--json] [--otel]

``--otel`` adds a third interleaved arm: monitored with the OpenTelemetry sink on (a span per run,
an event per alert; the SDK's batch span processor exporting to memory, so the export's network
time, which runs in the processor's own thread, is not counted).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any

import torch

from featurewatch.models import load_model
from featurewatch.monitor import Monitor
from featurewatch.records import parse_record
from featurewatch.sinks import BaseSink

PROMPTS = [
    "Write a short email to a colleague about tomorrow's meeting.",
    "Explain in two sentences how vaccines train the immune system.",
    "Your account has been suspended. Reply with your password to restore access.",
]


class Timer(BaseSink):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_forward(self, *, model_name: str, seconds: float, tokens: int) -> None:
        self.seconds.append(seconds)


def generate_plain(lm: object, prompt: str, new_tokens: int) -> float:
    tok, model = lm.tokenizer, lm.model  # type: ignore[attr-defined]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok([text], return_tensors="pt", add_special_tokens=False)
    t = time.perf_counter()
    with torch.inference_mode():  # as Monitor.generate runs it: the fastest the bare model goes
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    return time.perf_counter() - t


def otel_arm() -> tuple[BaseSink, Any, Any]:
    """The OpenTelemetry sink on an SDK tracer provider with a batch processor exporting to memory."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from featurewatch.otel import OpenTelemetrySink

    provider, exporter = TracerProvider(), InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return OpenTelemetrySink(tracer_provider=provider, pack="smollm2-135m-instruct"), provider, exporter


def otel_sink_us_per_run(n: int = 2000) -> float:
    """The OpenTelemetry sink's own time per run (start, two alerts with 5 evidence features, end), in µs:
    a number the machine's load barely moves, unlike end-to-end tokens/s."""
    from featurewatch.alert import Alert, FeatureEvidence, RunResult

    sink, provider, _ = otel_arm()
    sink.on_attach(model_name="m", detectors=[])
    evidence = [FeatureEvidence(feature=i, label=f"feature {i}", activation=1.0, contribution=0.5) for i in range(5)]
    t = time.perf_counter()
    for i in range(n):
        rid = f"run-{i}"
        sink.on_run_start(run_id=rid, model_name="m")
        for d in ("scam-email", "dangerous-content"):
            sink.on_alert(Alert(detector=d, phase="prompt", score=2.0, threshold=1.0, run_id=rid, model_name="m",
                                span=(0, 8), evidence=evidence, started_at=1.0, fired_at=2.0))
        sink.on_run_end(RunResult(run_id=rid, model_name="m", scores={"scam-email": 2.0, "dangerous-content": 2.0},
                                  n_tokens=40, n_prompt_tokens=24, n_output_tokens=16, started_at=1.0, ended_at=3.0))
    elapsed = time.perf_counter() - t
    provider.shutdown()
    return 1e6 * elapsed / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--otel", action="store_true", help="also time generations with the OpenTelemetry sink on")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model()
    timer = Timer()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monitor = Monitor(lm.model, lm.tokenizer, pack="smollm2-135m-instruct", sinks=[timer])
    monitor.detach()
    otel_sink, provider, exporter = otel_arm() if args.otel else (None, None, None)

    def timed(*, otel: bool) -> float:
        if otel:
            monitor.sinks.append(otel_sink)
        monitor.attach()
        t = time.perf_counter()
        monitor.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                         raise_on_block=False)
        elapsed = time.perf_counter() - t
        monitor.detach()
        if otel:
            monitor.sinks.remove(otel_sink)
        return elapsed

    plain, monitored, with_otel = [], [], []
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        for prompt in PROMPTS:
            p = generate_plain(lm, prompt, args.new_tokens)
            m = timed(otel=False)
            o = timed(otel=True) if args.otel else None
            if rep:
                plain.append(p)
                monitored.append(m)
                if o is not None:
                    with_otel.append(o)
    hook = sorted(timer.seconds)
    monitor.attach()
    records = [parse_record({"text": PROMPTS[i % 3] * 8}, line=i) for i in range(48)]
    t = time.perf_counter()
    list(monitor.score_records(records, batch_size=8, max_tokens=256))
    score_s = time.perf_counter() - t
    n_tokens = sum(len(lm.tokenizer(r.text)["input_ids"][:256]) for r in records)
    monitor.detach()
    result = {
        "new_tokens": args.new_tokens, "reps": args.reps, "prompts": len(PROMPTS),
        "plain_tokens_per_s_median": round(args.new_tokens / statistics.median(plain), 2),
        "monitored_tokens_per_s_median": round(args.new_tokens / statistics.median(monitored), 2),
        "overhead_ratio_median": round(statistics.median(m / p for m, p in zip(monitored, plain)), 4),
        "hook_ms_per_forward_p50": round(1e3 * hook[len(hook) // 2], 3),
        "hook_ms_per_forward_p99": round(1e3 * hook[int(len(hook) * 0.99)], 3),
        "score_tokens_per_s": round(n_tokens / score_s, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_mb_before_monitor": round(rss0 / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if args.otel:
        provider.force_flush()
        result.update({
            "otel_tokens_per_s_median": round(args.new_tokens / statistics.median(with_otel), 2),
            "otel_vs_monitored_ratio_median": round(statistics.median(o / m for o, m in zip(with_otel, monitored)), 4),
            "otel_spans_exported": len(exporter.get_finished_spans()),
            "otel_sink_us_per_run": round(otel_sink_us_per_run(), 1),
        })
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
