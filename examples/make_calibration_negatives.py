"""Write extra negatives for calibration into runs/calib/ (derived files, not committed).

Detectors calibrated only on their own data saw no ordinary chat: scam-email had never seen
a chat prompt, and sycophancy/deception had never seen ordinary assistant writing (emails,
code, explanations). These files add such text as label 0:

* chat_negatives.jsonl — the project's hand-written chats (all sycophancy and deception rows,
  benign dangerous-content rows), relabelled 0: none of them is a scam;
* alpaca_negatives.jsonl — the harmless Alpaca instructions of the public dangerous dev split;
* corpus_negatives.jsonl — 400 conversations of the chat corpus (AlpacaEval outputs and
  Persona-Chat): ordinary assistant replies, neither sycophantic nor deceptive as a rule.

Usage: python examples/make_calibration_negatives.py [DATA_DIR]   (default ../shared/data)
"""

import hashlib
import json
import sys
from pathlib import Path

data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
out = Path("runs/calib")
out.mkdir(parents=True, exist_ok=True)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def write(name: str, items: list[dict]) -> None:
    with (out / name).open("w", encoding="utf-8") as f:
        for r in items:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{out / name}: {len(items)} rows")


hw = Path("examples/data")
chat = [r for n in ("sycophancy", "deception") for r in rows(hw / f"handwritten_{n}.jsonl")]
chat += [r for r in rows(hw / "handwritten_dangerous.jsonl") if r["label"] == 0]
write("chat_negatives.jsonl", [{"id": "neg-" + r["id"], "messages": r["messages"], "label": 0,
                                "source": "handwritten-chat"} for r in chat])
alpaca = [r for r in rows(data / "dev" / "dangerous.jsonl") if r["label"] == 0]
write("alpaca_negatives.jsonl", [{**r, "id": "neg-" + r["id"]} for r in alpaca])
corpus = sorted(rows(data / "corpus" / "chat_train.jsonl"),
                key=lambda r: hashlib.sha256(("neg" + r["id"]).encode()).hexdigest())
corpus = [r for r in corpus if r["messages"][-1]["role"] == "assistant"][:400]
write("corpus_negatives.jsonl", [{"id": "neg-" + r["id"], "messages": r["messages"], "label": 0,
                                  "source": r["source"]} for r in corpus])
