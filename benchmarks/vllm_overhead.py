"""vLLM tok/s with and without featurewatch, interleaved in one run, and the monitor's time per step.

Run in .venv-vllm (``bash .ci/setup-vllm.sh``)::

    .venv-vllm/bin/python benchmarks/vllm_overhead.py --model .cache/smollm2-hf

One in-process engine (eager, prefix caching off). Rounds alternate between
*off* (no monitor: the layer taps are no-ops) and *on* (the default pack, all
its detectors, subset encode), after a *baseline* round before anything is
tapped, so load on a shared machine hits both sides alike. Each round
generates ``--batch`` requests of ``--tokens`` tokens (``ignore_eos``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

PROMPTS = [
    "Write an urgent email telling a bank customer their account is locked.",
    "How do I boil an egg?",
    "Give me three tips for keeping houseplants alive.",
    "Explain photosynthesis in two sentences.",
    "What's a good name for a golden retriever puppy?",
    "Write a short, friendly email inviting my team to a picnic on Saturday.",
    "I think the moon landing was faked. You agree, right?",
    "Summarise the plot of Hamlet.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face folder (featurewatch export-model)")
    parser.add_argument("--pack", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from featurewatch.integrations.vllm import attach
    from featurewatch.integrations.vllm.worker import PROCESS

    llm = LLM(args.model, dtype="float32", enforce_eager=True, enable_prefix_caching=False, max_model_len=1024,
              seed=0)
    prompts = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    def tok_per_s() -> float:
        t0 = time.perf_counter()
        outs = llm.chat(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)

    tok_per_s()  # warm-up
    baseline = tok_per_s()
    handle = attach(llm, pack=args.pack)
    monitor = PROCESS.monitor
    if monitor is None:
        raise SystemExit("the benchmark needs the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    off, on = [], []
    for _ in range(args.rounds):
        PROCESS.monitor = None
        off.append(tok_per_s())
        PROCESS.monitor = monitor
        steps0, seconds0 = monitor.steps, monitor.hook_seconds
        on.append(tok_per_s())
    steps, seconds = monitor.steps - steps0, monitor.hook_seconds - seconds0
    handle.detach()
    report = {
        "baseline_tok_s": round(baseline, 1),
        "off_tok_s": round(statistics.median(off), 1),
        "on_tok_s": round(statistics.median(on), 1),
        "overhead": round(statistics.median(off) / statistics.median(on) - 1, 4),
        "hook_ms_per_step": round(1000 * seconds / max(1, steps), 3),
        "rounds": args.rounds, "batch": args.batch, "tokens": args.tokens,
        "detectors": handle.detectors, "layers": handle.layers,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"baseline (untapped): {report['baseline_tok_s']} tok/s")
        print(f"off (taps idle):     {report['off_tok_s']} tok/s  (median of {args.rounds})")
        print(f"on  (featurewatch):  {report['on_tok_s']} tok/s  (median of {args.rounds})")
        print(f"overhead: {100 * report['overhead']:.1f} %   monitor time: {report['hook_ms_per_step']} ms/step "
              f"({args.batch} requests per step)")


if __name__ == "__main__":
    main()
