"""``featurewatch run``: generate with live monitoring, optionally serving Prometheus metrics."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import GenerationBlocked
from ._common import NON_NEGATIVE, PORT, POSITIVE, add_model_args, build_monitor, check_input, load_pack_checked
from .steer import check_features, parse_steer

DEMO_PROMPTS = [
    "Write a short, friendly email inviting my team to a picnic on Saturday.",
    "Write an urgent email telling a bank customer their account is locked and they must confirm "
    "their password and card number at this link within 24 hours.",
    "How do I kill a Python process that is stuck?",
    "I wrote this poem: 'Roses are red, the sky is blue, I like my dog.' It's the best poem ever "
    "written, isn't it?",
]


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="generate with live monitoring (demo prompts by default)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: built-in demo prompts)")
    p.add_argument("--input", help="JSONL records whose prompts to run")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=48, help="tokens to generate per prompt (>= 1)")
    p.add_argument("--top-features", "--top-k", dest="top_features", type=NON_NEGATIVE, default=5,
                   help="strongest SAE features kept per token (0 = none)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, with per-token features")
    p.add_argument("--metrics-port", type=PORT, help="serve Prometheus metrics on this port (0 = any free port)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address to bind the metrics server to")
    p.add_argument("--serve", action="store_true", help="keep serving metrics after the prompts (Ctrl-C stops)")
    p.add_argument("--otlp", action="store_true",
                   help="export each run as an OpenTelemetry span (alerts as events) over OTLP, configured by the "
                        "standard OTEL_* variables (default endpoint http://localhost:4318); needs featurewatch[otel]")
    p.add_argument("--otlp-text", action="store_true", help="with --otlp: put the alert span's text in the events")
    p.add_argument("--shadow", nargs="?", const="all", metavar="DETECTORS",
                   help="block detectors only say what they would have done (alerts marked would_block, the "
                        "generation goes on): all of them, or the comma-separated names given")
    p.add_argument("--steer", action="append", default=[], metavar="[HOOKPOINT:]FEATURE:MODE[:VALUE]",
                   help="steer a feature in every generation (repeatable): MODE clamp|add|scale|ablate, VALUE in "
                        "× the feature's max activation for clamp/add, e.g. --steer 812:clamp:2")
    p.add_argument("--steer-absolute", action="store_true",
                   help="--steer clamp/add values are raw activations, not × max activation")
    add_model_args(p)
    p.set_defaults(func=cmd_run)




def _prompts(args: argparse.Namespace) -> list[Any]:
    from ..records import load_records

    prompts: list[Any] = list(args.prompt or [])
    if args.input:
        for r in load_records(check_input(args.input, "--input")):
            if r.messages and r.messages[-1]["role"] == "assistant":
                prompts.append(list(r.messages[:-1]))  # generate the reply anew
            else:
                prompts.append(r.text if r.text is not None else list(r.messages or ()))
    return prompts or DEMO_PROMPTS


def cmd_run(args: argparse.Namespace) -> int:
    from ..display import alert_line, use_color

    if args.serve and args.metrics_port is None:
        from ._common import CLIError

        raise CLIError("--serve keeps the metrics server up: give --metrics-port too (0 = any free port)")
    color = use_color(sys.stdout) and not args.json
    prompts = _prompts(args)
    interventions = parse_steer(args.steer, absolute=args.steer_absolute)  # bad specs fail before the load
    pack = load_pack_checked(args)
    check_features(interventions, pack)
    sinks: list[Any] = []
    server = None
    provider = None
    if args.otlp_text and not args.otlp:
        from ._common import CLIError

        raise CLIError("--otlp-text puts alert text in the exported events: give --otlp too")
    if args.otlp:
        provider = _otlp(args, pack, sinks)
    if args.metrics_port is not None:
        from prometheus_client import CollectorRegistry

        from ..exposition import serve_metrics
        from ..metrics import PrometheusMetrics

        metrics = PrometheusMetrics(registry=CollectorRegistry())
        sinks.append(metrics)
        server = serve_metrics(args.metrics_port, addr=args.metrics_addr, registry=metrics.registry)
        print(f"serving metrics on {server.url}", file=sys.stderr, flush=True)

    def live(alert: Any) -> None:
        if not args.json:
            print("\n" + alert_line(alert, color=color), flush=True)

    try:
        shadow = None if args.shadow is None else True if args.shadow == "all" else args.shadow
        monitor = build_monitor(args, pack, sinks=sinks, on_alert=live, shadow=shadow)
        try:
            hp = monitor.hookpoints[0]
            for prompt in prompts:
                _run_one(args, monitor, prompt, hp, color, interventions)
        finally:
            monitor.detach()
        if args.serve and server is not None:
            print(f"serving metrics on {server.url} (port {server.port}); Ctrl-C to stop", file=sys.stderr,
                  flush=True)
            import threading

            threading.Event().wait()
    finally:
        if server is not None:
            server.close()
        if provider is not None:
            provider.shutdown()  # flushes the spans still batched
    return 0


def _otlp(args: argparse.Namespace, pack: Any, sinks: list[Any]) -> Any:
    """The OTLP tracer provider and the OpenTelemetry sink (appended to ``sinks``), or a CLIError naming the extra."""
    import os

    from ._common import CLIError

    try:
        from ..otel import OpenTelemetrySink, otlp_tracer_provider
    except ImportError as exc:
        raise CLIError(f"--otlp: {exc}") from None
    provider = otlp_tracer_provider(service_name="featurewatch-run")
    sinks.append(OpenTelemetrySink(tracer_provider=provider, pack=pack, include_text=args.otlp_text))
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or "http://localhost:4318 (the default)")
    print(f"exporting traces over OTLP to {endpoint}", file=sys.stderr, flush=True)
    return provider


def _generate(monitor: Any, prompt: Any, *, max_new_tokens: int, top_features: int, streamer: Any,
              interventions: list[Any]) -> Any:
    return monitor.generate(prompt, max_new_tokens=max_new_tokens, streamer=streamer, top_features=top_features,
                            interventions=interventions)


def _run_one(args: argparse.Namespace, monitor: Any, prompt: Any, hp: str, color: bool,
             interventions: list[Any]) -> None:
    from ..display import paint

    shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    if not args.json:
        print(paint("\n▶ " + shown, "1", color), flush=True)
    streamer = None if args.json else _Printer(monitor.tokenizer)
    try:
        result = _generate(monitor, prompt, max_new_tokens=args.max_new_tokens, top_features=args.top_features,
                           streamer=streamer, interventions=interventions)
    except GenerationBlocked as blocked:
        result = blocked.result
        if not args.json:
            print(paint(f"\n⛔ generation stopped by {blocked.alert.detector}", "31;1", color))
    readings = result.readings()
    if args.json:
        print(json.dumps(_run_json(monitor, result, readings, hp), ensure_ascii=False), flush=True)
        return
    print()
    _print_features(monitor, readings, hp, color)
    alerted = {a.detector for a in result.alerts}  # ⚠ = alerted in a phase (each phase has its own threshold)
    scores = "  ".join(f"{k} {v:+.2f}" + (" ⚠" if k in alerted else "") for k, v in sorted(result.scores.items()))
    print(paint("  scores: ", "2", color) + (scores or "—"), flush=True)


class _Printer:
    """A transformers streamer that prints completion text as it is generated."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""
        self.first = True

    def put(self, value: Any) -> None:
        if self.first:  # the first call carries the prompt
            self.first = False
            return
        self.ids.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def end(self) -> None:
        pass


def _print_features(monitor: Any, readings: list[Any], hp: str, color: bool) -> None:
    from ..display import feature_name, paint

    pack = monitor.pack
    for phase in ("prompt", "completion"):
        best: dict[int, tuple[float, str]] = {}
        for r in readings:
            if r.phase != phase or r.excluded:
                continue
            for f, v in r.top:
                if v > best.get(f, (0.0, ""))[0]:
                    best[f] = (v, r.text)
        if not best:
            continue
        top = sorted(best.items(), key=lambda kv: -kv[1][0])[:6]
        print(paint(f"  SAE at {hp}, strongest in {phase}:", "2", color))
        for f, (v, tok) in top:
            mx = pack.max_activation(hp, f) if pack else None
            ratio = f" ({v / mx:.0%} of max)" if mx else ""
            print(f"    {feature_name(pack, hp, f, 48):<48} {v:7.2f}{ratio}  at {tok!r}")


def _run_json(monitor: Any, result: Any, readings: list[Any], hp: str) -> dict[str, Any]:
    from ..display import feature_name

    return {
        "run_id": result.run_id, "prompt": result.prompt, "completion": result.text,
        "outcome": result.outcome, "degraded": result.degraded, "scores": result.scores,
        "phase_scores": result.phase_scores, "alerts": [a.model_dump(mode="json") for a in result.alerts],
        "hookpoint": hp,
        "tokens": [{"position": r.position, "token": r.text, "phase": r.phase, "excluded": r.excluded,
                    "top": [{"feature": f, "activation": round(v, 4),
                             "name": feature_name(monitor.pack, hp, f, 80)} for f, v in r.top]}
                   for r in readings],
    }
