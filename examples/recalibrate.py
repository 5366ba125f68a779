"""Recalibrate the default pack's four detectors, wrapper-invariant, with per-phase thresholds.

Steps (each reads the previous one's output under runs/recal/):

  build    wrap every labelled example in several wrappers (featurewatch.calibration.wrappers)
           and write one JSONL per set; derived files, never committed
  extract  one forward pass per set: per-token layer-15 residuals of content tokens (cached)
  fit      select features and fit each detector (featurewatch.calibration.select), set
           per-phase thresholds on each hard-negative group (calibration.thresholds), write specs
  report   held-out table per detector / group / wrapper / phase (calibration.report)

Usage: python examples/recalibrate.py [--data DIR] [--steps build,extract,fit,report] [--pack DIR]
The data directory (default $DATA or ../shared/data) must hold dev/*.jsonl and corpus/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from featurewatch.calibration.wrappers import MAIL_REQUESTS, NEUTRAL_CONTENTS, pick, wrap

ROOT = Path(__file__).resolve().parent.parent

OUT = ROOT / "runs" / "recal"
HW = ROOT / "examples" / "data"
MAX_CHARS = 200  # ≈ 45 tokens of mail; the same content fits every wrapper under its max_tokens
MAX_TOKENS = {
    "neutral": 192,
    "danger_prompt": 192,
    "danger_alpaca": 192,
    "danger_hw": 192,
    "sycophancy": 96,
    "chats": 96,
}  # the rest: 128 (2 CPU cores: ~100-500 tokens/s)
SETS = (
    "neutral",
    "danger_prompt",
    "danger_alpaca",
    "mail",
    "danger_hw",
    "danger_reply",
    "chats",
    "deception",
    "sycophancy",
)
log = logging.getLogger("recalibrate")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def by_hash(items: list[dict], n: int, salt: str = "recal") -> list[dict]:
    """A deterministic subset. Salted: unsalted id-hash order would pick the held-out split first."""
    return sorted(items, key=lambda r: hashlib.sha256((salt + str(r["id"])).encode()).hexdigest())[:n]


def per_label(items: list[dict], n: int) -> list[dict]:
    return [r for label in (0, 1) for r in by_hash([r for r in items if r["label"] == label], n)]


def half(r: dict, salt: str) -> bool:
    return hashlib.sha256((salt + str(r["id"])).encode()).digest()[0] % 2 == 0


def tagged(r: dict, group: str) -> dict:
    return {**r, "group": group}


def build(data: Path) -> None:
    """Write the wrapped sets to runs/recal/<set>.jsonl."""
    dev = data / "dev"
    out: dict[str, list[dict]] = {s: [] for s in SETS}
    # neutral contents in every wrapper, with and without a system prompt: the wrapper probe
    for i, text in enumerate(NEUTRAL_CONTENTS):
        base = {"id": f"neutral-{i:02d}", "text": text, "label": 0, "source": "neutral", "group": "short"}
        out["neutral"] += wrap(base, ["plain"])
        for sys_on in (False, True):
            out["neutral"] += [
                dict(r, id=r["id"] + ("+sys" if sys_on else ""))
                for r in wrap(base, ["quoted", "request", "reply"], system=sys_on)
            ]
    # small talk: a short user turn and a short reply
    for i, text in enumerate(NEUTRAL_CONTENTS):
        chat = {
            "id": f"smalltalk-{i:02d}",
            "label": 0,
            "source": "smalltalk",
            "group": "short-chat",
            "messages": [
                {"role": "user", "content": pick(NEUTRAL_CONTENTS, f"u{i}")},
                {"role": "assistant", "content": text},
            ],
        }
        out["chats"] += wrap(chat, ["native"])
    # mail: public phishing and legitimate list mail, our scams and look-alike notices
    scam = rows(dev / "scam.jsonl")
    mail = [tagged(r, "phishing_pot" if r["label"] else "legit-mail") for r in per_label(scam, 50)]
    mail += [tagged(r, "handwritten-scam" if r["label"] else "look-alike") for r in rows(HW / "handwritten_scam.jsonl")]
    for r in mail:  # every text as a document and as a reply; half of them also quoted by a user
        ws = ["plain", "reply"] + (["quoted"] if half(r, "quoted") else [])
        out["mail"] += wrap(r, ws, max_chars=MAX_CHARS, requests=MAIL_REQUESTS)
    # dangerous requests: public harmful instructions vs Alpaca
    dang = rows(dev / "dangerous.jsonl")
    for r in dang:
        if r["label"] == 1:
            out["danger_prompt"] += wrap(tagged(r, "harmful-requests"), ["plain", "request"], max_chars=420)
    for r in by_hash([r for r in dang if r["label"] == 0], 120):
        out["danger_alpaca"] += wrap(tagged(r, "alpaca"), ["plain", "request"], max_chars=420)
    # dangerous replies behind neutral user turns (the original requests would give the label away)
    for r in per_label(rows(dev / "dangerous_completion.jsonl"), 70):
        r = tagged(r, "harmful-replies" if r["label"] else "alpaca-replies")
        out["danger_reply"] += wrap(r, ["reply"], max_chars=MAX_CHARS)
    # ours: harmful requests and XSTest-style safe look-alikes (as documents and as requests), replies
    for r in rows(HW / "handwritten_dangerous.jsonl"):
        if "messages" in r and r["messages"][-1]["role"] == "assistant":
            r = tagged(r, "handwritten-harmful-reply" if r["label"] else "handwritten-safe-reply")
            out["danger_hw"] += wrap(r, ["reply"], max_chars=MAX_CHARS)
        else:  # a request as written (text rows as documents), and every other one also the other way
            r = tagged(r, "handwritten-harmful" if r["label"] else "xstest-style")
            own = "plain" if "text" in r else "request"
            other = "request" if own == "plain" else "plain"
            out["danger_hw"] += wrap(r, [own] + ([other] if half(r, other) and half(r, "again") else []), max_chars=420)
    # our small talk: short texts and short everyday chats, as they are
    for r in rows(HW / "handwritten_smalltalk.jsonl"):
        out["chats"] += wrap(tagged(r, "smalltalk"), ["plain" if "text" in r else "native"])
    # ordinary chats from the corpus: the negatives every detector must stay quiet on
    corpus = [r for r in rows(data / "corpus" / "chat_train.jsonl") if r["messages"][-1]["role"] == "assistant"]
    for r in by_hash(corpus, 50, salt="recal"):
        out["chats"] += wrap({**r, "label": 0, "group": "ordinary-chats"}, ["native"], max_chars=500)
    for name in ("deception", "sycophancy"):
        pub = per_label(rows(dev / f"{name}.jsonl"), 40 if name == "deception" else 25)
        items = [tagged(r, r["source"]) for r in pub]
        items += [tagged(r, f"handwritten-{name}") for r in rows(HW / f"handwritten_{name}.jsonl")]
        for r in items:
            out[name] += wrap(r, ["native"], max_chars=400)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, items in out.items():
        with (OUT / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in items:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        log.info("%s: %d records", name, len(items))


def extract(sets: list[str]) -> None:
    """Token activations of each set, cached under runs/recal/acts."""
    from featurewatch.calibration.data import cached_acts, load_labelled
    from featurewatch.models import load_model

    loaded = load_model(None)
    for name in sets:
        data = load_labelled(OUT / f"{name}.jsonl")
        log.info("extract %s: %d records", name, len(data.records))
        cached_acts(
            loaded.model,
            loaded.tokenizer,
            data,
            "layers.15",
            max_tokens=MAX_TOKENS.get(name, 128),
            cache_dir=OUT / "acts",
            model_name=loaded.name,
            progress=_LogProgress,
        )
        log.info("extract %s: done", name)


class _LogProgress:
    """A tqdm stand-in that logs every ~10 %."""

    def __init__(self, total: int, desc: str = "", unit: str = "") -> None:
        self.total, self.desc, self.n, self.next = total, desc, 0, total / 10

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n >= self.next:
            log.info("%s %d/%d", self.desc, self.n, self.total)
            self.next += self.total / 10

    def close(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--steps", default="build,extract,fit,report")
    ap.add_argument("--sets", default=",".join(SETS), help="sets to extract")
    ap.add_argument("--only", default="", help="detectors to fit/report (default: all four)")
    ap.add_argument("--pack", default=str(ROOT / "detectors" / "smollm2-135m-instruct"),
                    help="pack whose SAE the detectors read and where their specs go (default: the default pack)")
    ap.add_argument("--allow-missing", action="store_true", help="fit on the sets already extracted (debugging)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    data = Path(args.data)
    if not (data / "dev").is_dir() or not (data / "corpus").is_dir():
        print(
            f"error: data directory {data} has no dev/ and corpus/ (pass --data DIR or DATA=DIR; "
            "see ../shared/data/README.md)",
            file=sys.stderr,
        )
        return 2
    steps = args.steps.split(",")
    if "build" in steps:
        build(data)
    if "extract" in steps:
        extract(args.sets.split(","))
    if "fit" in steps or "report" in steps:
        from recalibrate_fit import run  # noqa: E402  (examples/recalibrate_fit.py)

        run(
            OUT,
            Path(args.pack),
            {name: MAX_TOKENS.get(name, 128) for name in SETS},
            fit="fit" in steps,
            report="report" in steps,
            allow_missing=args.allow_missing,
            only=[d for d in args.only.split(",") if d] or None,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
