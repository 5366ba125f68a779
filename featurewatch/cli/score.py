"""``featurewatch score``: score JSONL records offline, one JSON line per record."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from ._common import POSITIVE, add_model_args, build_monitor, check_input, load_pack_checked, open_output, progress


def register(sub: Any) -> None:
    p = sub.add_parser("score", help="score JSONL records offline (format: docs/architecture.md)",
                       description="Score JSONL records offline: one JSON line per valid input line, in order, "
                                   "with every detector's pooled score (null when the record has no scoreable "
                                   "token), per-phase scores and alerts. Record and output formats: "
                                   "docs/architecture.md.")
    p.add_argument("--input", required=True, help="JSONL records (text or messages)")
    p.add_argument("--output", help="write JSON lines here (default: stdout)")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed lines (each is reported on stderr)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="records per forward pass (>= 1)")
    p.add_argument("--max-tokens", type=POSITIVE, default=512,
                   help="tokens kept per record (>= 1; the reply is kept first)")
    p.add_argument("--no-text", action="store_true", help="leave alert span text out of the output")
    p.add_argument("--token-scores", action="store_true",
                   help="add each record's tokens with their per-token detector scores (for `featurewatch ui`)")
    add_model_args(p)
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    from ..records import iter_records
    from ..scoring import ScoreRow, score_with_tokens

    skipped: list[Exception] = []

    def on_skip(err: Exception) -> None:
        skipped.append(err)
        print(f"featurewatch: skipped {err}", file=sys.stderr)

    records = list(iter_records(check_input(args.input, "--input"), skip_invalid=args.skip_invalid,
                                on_skip=on_skip))
    pack = load_pack_checked(args)
    out = open_output(args.output)
    try:
        monitor = build_monitor(args, pack, capture_text=not args.no_text)
        names = [d.name for d in monitor.detectors]
        bar = progress()(total=len(records), desc="score", unit="rec")
        try:
            kw: dict[str, Any] = dict(batch_size=args.batch_size, max_tokens=args.max_tokens, on_batch=bar.update)
            rows: Iterator[tuple[Any, Any, Any]] = (
                score_with_tokens(monitor, records, **kw) if args.token_scores
                else ((record, run, None) for record, run in monitor.score_records(records, **kw)))
            for record, run, tokens in rows:
                out.write(ScoreRow.from_run(record, run, names, tokens=tokens).to_json() + "\n")
                out.flush()  # one line at a time: a killed run keeps every row written so far
        finally:
            bar.close()
            monitor.detach()
    finally:
        if out is not sys.stdout:
            out.close()
    if skipped:
        print(f"featurewatch: {len(skipped)} invalid line(s) skipped", file=sys.stderr)
    return 0

