"""The embedded model's own replies to ordinary writing requests: a benign pool for scam-email.

A polite letter the model writes for a user (a thank-you note, an invitation, a customer e-mail)
shares its salutations and sign-offs with a phishing mail; a scam detector must stay silent on it.
The requests are the project's own words (examples/data/writing_requests.jsonl); the replies are
generated greedily, ``--max-new-tokens`` each, and split by a hash of the id into a calibration pool
(``writing_replies_fit.jsonl``) and a check set the calibration never sees (``writing_replies_check.jsonl``).

Usage: python examples/writing_replies.py [--out-dir examples/data] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", default=str(HERE / "data" / "writing_requests.jsonl"))
    ap.add_argument("--out-dir", default=str(HERE / "data"))
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=10)
    args = ap.parse_args()
    import torch

    from featurewatch.models import load_model

    loaded = load_model(None)
    tok, model = loaded.tokenizer, loaded.model
    rows = [json.loads(line) for line in Path(args.requests).read_text().splitlines() if line.strip()]
    tok.padding_side = "left"
    out = []
    for s in range(0, len(rows), args.batch_size):
        batch = rows[s:s + args.batch_size]
        prompts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in batch]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for r, g in zip(batch, gen):
            reply = tok.decode(g[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            out.append({"id": r["id"], "label": 0, "source": "smollm2_writing_replies",
                        "messages": r["messages"] + [{"role": "assistant", "content": reply}]})
        print(f"{len(out)}/{len(rows)}", file=sys.stderr)
    fit = [r for r in out if hashlib.sha256(r["id"].encode()).digest()[0] % 2 == 0]
    check = [r for r in out if r not in fit]
    for name, part in (("writing_replies_fit.jsonl", fit), ("writing_replies_check.jsonl", check)):
        with (Path(args.out_dir) / name).open("w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(part)} replies to {Path(args.out_dir) / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
