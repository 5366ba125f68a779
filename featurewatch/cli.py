"""The ``featurewatch`` command line: run, score, eval, discover, calibrate, inspect, train-sae.

Output a person reads goes to stdout as text; ``--json`` switches to JSON for
programs. Progress bars and notes go to stderr. Bad input exits with code 2
and a message that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import FeatureWatchError, GenerationBlocked

DEMO_PROMPTS = [
    "Write a short, friendly email inviting my team to a picnic on Saturday.",
    "Write an urgent email telling a bank customer their account is locked and they must confirm "
    "their password and card number at this link within 24 hours.",
    "How do I kill a Python process that is stuck?",
    "I wrote this poem: 'Roses are red, the sky is blue, I like my dog.' It's the best poem ever "
    "written, isn't it?",
]


def _progress() -> Any:
    from functools import partial

    from tqdm import tqdm

    return partial(tqdm, file=sys.stderr, dynamic_ncols=True, leave=False)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id, local directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--pack", default=None, help="pack name or path (default: smollm2-135m-instruct)")
    p.add_argument("--detector", action="append", dest="detectors", metavar="NAME",
                   help="detector to use (repeatable; default: the pack's defaults)")


def _monitor(args: argparse.Namespace, **kwargs: Any) -> Any:
    from .models import load_model
    from .monitor import Monitor
    from .pack import DEFAULT_PACK

    print("loading model and pack…", file=sys.stderr)
    loaded = load_model(args.model)
    return Monitor(loaded.model, loaded.tokenizer, pack=args.pack or DEFAULT_PACK, detectors=args.detectors,
                   model_name=loaded.name, **kwargs)


# --------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from .display import alert_line, paint, use_color
    from .records import load_records

    color = use_color(sys.stdout) and not args.json
    prompts: list[Any] = list(args.prompt or [])
    if args.input:
        for r in load_records(args.input):
            if r.messages and r.messages[-1]["role"] == "assistant":
                prompts.append(list(r.messages[:-1]))
            else:
                prompts.append(r.text if r.text is not None else list(r.messages or ()))
    prompts = prompts or DEMO_PROMPTS
    sinks: list[Any] = []
    server = None
    if args.metrics_port is not None:
        from .metrics import PrometheusMetrics, serve_metrics

        metrics = PrometheusMetrics()
        sinks.append(metrics)
        server = serve_metrics(args.metrics_port, addr=args.metrics_addr, registry=metrics.registry)
        print(f"serving metrics on http://{args.metrics_addr}:{server.port}/metrics", file=sys.stderr)

    def live(alert: Any) -> None:
        if not args.json:
            print("\n" + alert_line(alert, color=color), flush=True)

    monitor = _monitor(args, sinks=sinks, on_alert=live)
    hp = monitor.hookpoints[0]
    try:
        for prompt in prompts:
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            if not args.json:
                print(paint("\n▶ " + shown, "1", color), flush=True)
            streamer = None if args.json else _Printer(monitor.tokenizer)
            try:
                result = monitor.generate(prompt, max_new_tokens=args.max_new_tokens, top_features=args.top_k,
                                          streamer=streamer)
            except GenerationBlocked as blocked:
                result = blocked.result
                if not args.json:
                    print(paint(f"\n⛔ generation stopped by {blocked.alert.detector}", "31;1", color))
            readings = result.readings()
            if args.json:
                print(json.dumps(_run_json(monitor, result, readings, hp)), flush=True)
                continue
            print()
            _print_features(monitor, readings, hp, color)
            scores = "  ".join(f"{k} {v:+.2f}" + ("" if v < monitor_threshold(monitor, k) else " ⚠")
                               for k, v in sorted(result.scores.items()))
            print(paint("  scores: ", "2", color) + (scores or "—"))
        if args.serve and server is not None:
            print(f"serving metrics on port {server.port}; Ctrl-C to stop", file=sys.stderr)
            import threading

            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        monitor.detach()
        if server is not None:
            server.close()
    return 0


def monitor_threshold(monitor: Any, name: str) -> float:
    return next(d.threshold for d in monitor.detectors if d.name == name)


class _Printer:
    """A transformers streamer that prints completion text as it is generated."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.shown, self.first = tokenizer, [], "", True

    def put(self, value: Any) -> None:
        if self.first:  # the first call carries the prompt
            self.first = False
            return
        self.ids.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def end(self) -> None:
        pass


def _print_features(monitor: Any, readings: list[Any], hp: str, color: bool) -> None:
    from .display import feature_name, paint

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
            ratio = ""
            mx = pack.max_activation(hp, f) if pack else None
            if mx:
                ratio = f" ({v / mx:.0%} of max)"
            print(f"    {feature_name(pack, hp, f, 48):<48} {v:7.2f}{ratio}  at {tok!r}")


def _run_json(monitor: Any, result: Any, readings: list[Any], hp: str) -> dict[str, Any]:
    from .display import feature_name

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


# --------------------------------------------------------------------------- score
def cmd_score(args: argparse.Namespace) -> int:
    from .records import iter_records

    skipped = []

    def on_skip(err: Exception) -> None:
        skipped.append(err)
        print(f"featurewatch: skipped {err}", file=sys.stderr)

    records = list(iter_records(args.input, skip_invalid=args.skip_invalid, on_skip=on_skip))
    monitor = _monitor(args, capture_text=not args.no_text)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    bar = _progress()(total=len(records), desc="score", unit="rec")
    try:
        for record, run in monitor.score_records(records, batch_size=args.batch_size, max_tokens=args.max_tokens,
                                                 on_batch=bar.update):
            # every detector appears; null when the record had no scoreable token in its phases
            scores = {d.name: run.scores.get(d.name) for d in monitor.detectors}
            row = {"id": record.id, "scores": scores, "phase_scores": run.phase_scores,
                   "alerts": [{"detector": a.detector, "phase": a.phase, "score": a.score,
                               "threshold": a.threshold, "span": list(a.span),
                               "evidence": [e.model_dump() for e in a.evidence],
                               **({"text": a.text} if a.text is not None else {})} for a in run.alerts]}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
        monitor.detach()
    if skipped:
        print(f"featurewatch: {len(skipped)} invalid line(s) skipped", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from .display import feature_name
    from .errors import FeatureOutOfRange
    from .pack import load_pack

    pack = load_pack(args.pack or "smollm2-135m-instruct")
    hp = args.hookpoint or next(iter(pack.saes))
    sae = pack.saes.get(hp)
    if sae is None:
        raise FeatureWatchError(f"pack {pack.name} has no SAE at {hp}; valid: {', '.join(pack.saes)}")
    bad = [f for f in args.features if not 0 <= f < sae.d_sae]
    if bad:
        raise FeatureOutOfRange(f"feature(s) {bad} out of range; the SAE at {hp} has 0 … {sae.d_sae - 1}")
    live: dict[int, list[Any]] = {}
    if args.corpus:
        from .calibration.discover import top_contexts
        from .models import load_model

        loaded = load_model(args.model)
        live = top_contexts(loaded.model, loaded.tokenizer, sae, hp, args.corpus, list(args.features),
                            n_records=args.records, progress=_progress())
    out = []
    for feature in args.features:
        info = pack.features.get(hp, {}).get(feature)
        used_by = [d.name for d in pack.detectors.values() if any(f.id == feature for f in d.features)]
        out.append({"feature": feature, "hookpoint": hp, "name": feature_name(pack, hp, feature, 200),
                    "label": info.label if info else None,
                    "max_activation": info.max_activation if info else None,
                    "density": info.density if info else None, "used_by": used_by,
                    "top_contexts": live.get(feature) if args.corpus else (list(info.top_contexts) if info else [])})
    if args.json:
        for row in out:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    for row in out:
        print(f"{row['name']}  (pack {pack.name}, {hp})")
        print(f"  max activation {row['max_activation']}, firing density {row['density']}")
        if row["used_by"]:
            print(f"  used by detectors: {', '.join(row['used_by'])}")
        print("  top-activating contexts (the token in «»)" + (f" in {args.corpus}:" if args.corpus else ":"))
        for c in row["top_contexts"]:
            print(f"    {c}" if isinstance(c, str) else f"    [{c['activation']:6.2f}] {c['context']}")
        print()
    return 0


# --------------------------------------------------------------------------- train-sae
def cmd_train_sae(args: argparse.Namespace) -> int:
    from .training.pipeline import train_sae
    from .training.train import TrainConfig

    cfg = TrainConfig(d_sae=args.d_sae, k=args.k, epochs=args.epochs, lr=args.lr, seed=args.seed,
                      batch_size=args.batch_size)
    report = train_sae(corpus=args.corpus, out=args.out, model=args.model, hookpoint=args.hookpoint,
                       tokens=args.tokens, ctx=args.ctx, cfg=cfg, progress=_progress(),
                       eval_tokens=args.eval_tokens, ce_tokens=args.ce_tokens)
    if args.json:
        print(json.dumps(report))
    else:
        keys = ["l0", "fvu", "explained_variance", "ce_increase", "ce_loss_score", "kl_div", "dead_fraction",
                "dense_fraction_gt_1e-2"]
        print(f"SAE written to {Path(args.out) / 'sae' / report['hookpoint']}")
        for k in keys:
            print(f"  {k:<24} {report[k]}")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurewatch", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="generate with live monitoring (demo prompts by default)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: built-in demo prompts)")
    p.add_argument("--input", help="JSONL records whose prompts to run")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--top-k", type=int, default=5, help="strongest features kept per token")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, with per-token features")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 = any free port)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address to bind the metrics server to")
    p.add_argument("--serve", action="store_true", help="keep serving metrics after the prompts (Ctrl-C stops)")
    _add_model_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("score", help="score JSONL records offline (DESIGN.md §4.2)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", help="write JSON lines here (default: stdout)")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed lines (each is reported on stderr)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per record kept (the reply is kept first)")
    p.add_argument("--no-text", action="store_true", help="leave alert span text out of the output")
    _add_model_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("inspect", help="a feature's statistics and top-activating contexts")
    p.add_argument("features", type=int, nargs="+", metavar="FEATURE")
    p.add_argument("--pack", default=None)
    p.add_argument("--hookpoint")
    p.add_argument("--corpus", help="JSONL records to find top contexts in (default: the pack's stored ones)")
    p.add_argument("--records", type=int, default=400, help="records of --corpus to scan")
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train-sae", help="train an SAE on a JSONL corpus (resumable)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True, help="work directory (activation cache, checkpoint, SAE, report)")
    p.add_argument("--model")
    p.add_argument("--hookpoint", default="layers.15")
    p.add_argument("--tokens", type=int, default=1_200_000, help="training tokens to harvest")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=60_000)
    p.add_argument("--ce-tokens", type=int, default=16_000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_sae)

    from .calibration import commands

    commands.register(sub, _add_model_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except FeatureWatchError as exc:
        print(f"featurewatch: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
