"""Held-out table through the real runtime: the shipped pack, ``Monitor.score_records``, its own alerts.

Reads the wrapped sets that examples/recalibrate.py built (runs/recal/*.jsonl), keeps the held-out
split (sha256 of the base id in the first 20 %, every wrapper of a text together), scores each
record once with all detectors and their -probe variants, and writes runs/recal/runtime_report.json
and .md with the same columns as the calibration report (featurewatch.calibration.report).

Usage: python examples/eval_heldout.py [--max-per-set N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from recalibrate_fit import DETECTORS, markdown  # noqa: E402

from featurewatch.calibration.data import load_labelled  # noqa: E402
from featurewatch.calibration.report import evaluate_runs  # noqa: E402
from featurewatch.training.harvest import is_held_out  # noqa: E402

OUT = ROOT / "runs" / "recal"
PACK = ROOT / "detectors" / "smollm2-135m-instruct"
log = logging.getLogger("eval_heldout")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-per-set", type=int, default=None, help="at most this many held-out records per set")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from featurewatch.models import load_model
    from featurewatch.monitor import Monitor

    sets = sorted({s for cfg in DETECTORS.values() for s in cfg["pos"] + cfg["neg"]})
    records = {}
    for name in sets:
        path = OUT / f"{name}.jsonl"
        if not path.exists():
            print(f"error: {path} missing; run examples/recalibrate.py --steps build first", file=sys.stderr)
            return 2
        recs = [r for r in load_labelled(path).records if is_held_out(str(r.extra["base_id"]), 0.2)]
        records[name] = recs[: args.max_per_set] if args.max_per_set else recs
    names = list(DETECTORS) + [f"{d}-probe" for d in DETECTORS]
    loaded = load_model(None)
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=PACK, detectors=names, model_name=loaded.name,
                      capture_text=False)
    runs = {}
    try:
        for name, recs in records.items():
            log.info("score %s: %d held-out records", name, len(recs))
            runs[name] = [run for _, run in monitor.score_records(recs, batch_size=16, max_tokens=192)]
    finally:
        monitor.detach()
    results = {}
    for det, cfg in DETECTORS.items():
        for spec_name in (det, f"{det}-probe"):
            spec = json.loads((PACK / f"{spec_name}.json").read_text())
            recs, rs = [], []
            for s in cfg["pos"] + cfg["neg"]:
                for r, run in zip(records[s], runs[s]):
                    if s in cfg["pos"] or r.extra["label"] == 0:
                        recs.append(r)
                        rs.append(run)
            results[spec_name] = {"table": evaluate_runs(spec, recs, rs)}
    (OUT / "runtime_report.json").write_text(json.dumps(results, indent=1))
    (OUT / "runtime_report.md").write_text(markdown(results, detail=False))
    log.info("wrote %s", OUT / "runtime_report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
