"""Suppression measured: does a detector's ``suppress`` action lower its score over the rest of the generation?

For a shipped completion-phase detector, two copies are made (the shipped pack is
not changed): one that only alerts and one whose action is ``suppress`` (ablate
its positively weighted features from the position after it fires). Both
generate greedily on the same prompts (hand-written cases from
examples/data/handwritten_<set>.jsonl, the assistant reply dropped). For the
prompts where the alerting copy fires during generation, this compares:

* the detector's mean per-token score over the completion tokens after the
  firing position, suppressed vs. not (the detector reads the residual BEFORE
  the ablation at the same layer, so the score can only drop through the text
  changing — the honest measurement);
* how much of the text changed (first differing token, share of tokens after
  the firing position that differ);
* the cost: next-token KL(suppressed ‖ unsuppressed model) on the suppressed
  continuation, over the positions the ablation touched.

Run:  python benchmarks/suppression.py --set sycophancy --n 12 --max-new-tokens 80
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="sycophancy,deception",
                    help="detectors, comma-separated: sycophancy, deception, scam-email, dangerous-content "
                         "(each on its examples/data/handwritten_*.jsonl positives)")
    ap.add_argument("--phases", help="override the copies' phases, e.g. prompt,completion (the shipped spec is "
                                     "left alone); a prompt-phase firing suppresses the whole reply")
    ap.add_argument("--n", type=int, default=12, help="positive (label 1) cases to run")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--json", help="write per-case rows here")
    args = ap.parse_args()

    from featurewatch.models import load_model
    from featurewatch.pack import load_pack

    torch.set_num_threads(1)  # on a shared CPU, one thread per process is much faster than oversubscription

    pack = load_pack()
    t0 = time.time()
    loaded = load_model()
    print(f"model loaded in {time.time() - t0:.0f}s", file=sys.stderr)
    all_rows = {}
    for name in args.set.split(","):
        all_rows[name] = measure(args, name, pack, loaded, t0)
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=1, ensure_ascii=False))
    return 0


def measure(args: argparse.Namespace, name: str, pack: Any, loaded: Any, t0: float) -> list[dict[str, Any]]:
    """Run one detector's cases plain and suppressed; print the table; return the per-case rows."""
    from featurewatch.hooks import hooked
    from featurewatch.monitor import Monitor

    model, tok = loaded.model, loaded.tokenizer
    shipped = pack.detectors[name]
    phases = args.phases.split(",") if args.phases else shipped.phases
    alerting = shipped.model_copy(update={"action": "alert", "phases": phases})
    suppressing = shipped.model_copy(update={"action": "suppress", "phases": phases})
    data = {"scam-email": "scam", "dangerous-content": "dangerous"}.get(name, name)
    rows = [json.loads(line) for line in (ROOT / f"examples/data/handwritten_{data}.jsonl").open()]
    cases = [r for r in rows if r.get("label") == 1][: args.n]
    prompts: list[Any] = [r["text"] if "text" in r else
                          [m for m in r["messages"] if m is not r["messages"][-1] or m["role"] != "assistant"]
                          for r in cases]

    def run(spec: Any) -> list[tuple[Any, torch.Tensor]]:
        out = []
        with Monitor(model, tok, pack=pack, detectors=[spec], model_name=loaded.name) as m:
            for i in range(0, len(prompts), args.batch):
                steps: list[torch.Tensor] = []
                rec = (model.get_output_embeddings(),
                       lambda _m, _a, o, steps=steps: steps.append(torch.log_softmax(o[:, -1].float(), -1)))
                with hooked([rec]):
                    res = m.generate_batch(prompts[i:i + args.batch], max_new_tokens=args.max_new_tokens)
                logp = torch.stack(steps)  # (steps, batch, vocab)
                out += [(r, logp[:, j]) for j, r in enumerate(res)]
                print(f"  {spec.action}: {len(out)}/{len(prompts)} ({time.time() - t0:.0f}s)", file=sys.stderr)
        return out

    plain = run(alerting)
    supp = run(suppressing)
    readout_spec = shipped
    weights = {f.id: f.weight for f in readout_spec.features}
    report = []
    for case, (a, _), (s, ls) in zip(cases, plain, supp):
        fired = a.session.rows[a.row].fired.get(shipped.name)
        width = a.session.positions.n_prompt[a.row]  # the left-padded prompt width of the batch
        row = {"id": case["id"], "kind": case.get("kind"), "fired_at": None if fired is None else fired - width,
               "final_score_plain": a.phase_scores.get("completion", {}).get(shipped.name),
               "final_score_suppressed": s.phase_scores.get("completion", {}).get(shipped.name),
               "text_plain": a.text, "text_suppressed": s.text}
        if fired is None or fired >= width + len(a.token_ids) - 2:  # no alert, or only the end-of-run verdict
            report.append(row)
            continue

        def rest_score(result: Any, fired: int = fired) -> tuple[float, int]:
            vals = [shipped.bias + sum(weights.get(f, 0.0) * v for f, v in r.features.items())
                    for r in result.readings() if r.phase == "completion" and not r.excluded and r.position > fired]
            return (sum(vals) / len(vals) if vals else float("nan")), len(vals)

        rp, n_rp = rest_score(a)
        rs, n_rs = rest_score(s)
        k0 = max(fired - width + 2, 0)  # token k is chosen at position width + k - 1; ablation from fired + 1
        diff = [i for i, (x, y) in enumerate(zip(a.token_ids, s.token_ids)) if x != y]
        eos = tok.eos_token_id
        n = next((i + 1 for i, t in enumerate(s.token_ids) if t == eos), len(s.token_ids))
        kl = float("nan")
        if n > k0:
            prompt_ids = s.session.rows[s.row].token_ids[:width]
            lead = next(i for i, t in enumerate(prompt_ids) if t != tok.pad_token_id)  # left padding
            ids = torch.tensor([prompt_ids[lead:] + s.token_ids[:n]])
            p0 = ids.shape[1] - n
            with torch.inference_mode():
                lu = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            lsr = ls[k0:n]
            lur = lu[p0 - 1 + k0:p0 - 1 + n]
            kl = float((lsr.exp() * (lsr - lur)).sum(-1).mean())
        row.update(rest_plain=rp, rest_suppressed=rs, rest_tokens=n_rp, rest_tokens_suppressed=n_rs,
                   first_diff=diff[0] if diff else None,
                   changed_after=sum(1 for i in diff if i >= k0) / max(len(a.token_ids) - k0, 1), kl=kl)
        report.append(row)
    fired_rows = [r for r in report if "rest_plain" in r]
    print(f"\n{name}: {len(cases)} cases, fired during generation in {len(fired_rows)}")
    print(f"{'id':<16} {'fired@':>6} {'rest plain':>10} {'rest supp':>10} {'Δ':>7} {'1st diff':>8} "
          f"{'changed':>7} {'KL':>7}")
    for r in fired_rows:
        print(f"{r['id']:<16} {r['fired_at']:>6} {r['rest_plain']:>10.3f} {r['rest_suppressed']:>10.3f} "
              f"{r['rest_suppressed'] - r['rest_plain']:>+7.3f} {str(r['first_diff']):>8} "
              f"{r['changed_after']:>7.0%} {r['kl']:>7.4f}")
    if fired_rows:
        import statistics as st

        d = [r["rest_suppressed"] - r["rest_plain"] for r in fired_rows]
        print(f"mean rest score plain {st.mean(r['rest_plain'] for r in fired_rows):.3f}, suppressed "
              f"{st.mean(r['rest_suppressed'] for r in fired_rows):.3f}, mean Δ {st.mean(d):+.3f}, "
              f"lower in {sum(x < 0 for x in d)}/{len(d)}, text changed in "
              f"{sum(r['first_diff'] is not None for r in fired_rows)}/{len(d)}, "
              f"mean KL {st.mean(r['kl'] for r in fired_rows if r['kl'] == r['kl']):.4f}")
    return report


if __name__ == "__main__":
    sys.exit(main())
