"""vLLM tok/s with and without featurewatch, interleaved in one run, and the monitor's time per step.

Run in .venv-vllm (``bash .ci/setup-vllm.sh``)::

    .venv-vllm/bin/python benchmarks/vllm_overhead.py --model .cache/smollm2-hf
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --model .cache/smollm2-hf --load 1,4,8 --long 2048

``--load N,N,…``: requests in flight at once, each streamed token by token from the engine's steps:
throughput and p50/p95 inter-token latency (the gap between one request's consecutive tokens; its
first token excluded), plugin off and on alternating per round, for short prompts and, with
``--long T``, prompts of T tokens. On a GPU the same command runs unchanged (``--device`` is vLLM's).

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
    parser.add_argument("--load", default="", help="concurrent streaming requests, e.g. 1,4,8 (the load table)")
    parser.add_argument("--long", type=int, default=0, help="also prompts of this many tokens under --load")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from featurewatch.integrations.vllm import attach
    from featurewatch.integrations.vllm.worker import PROCESS

    llm = LLM(args.model, dtype="float32", enforce_eager=True, enable_prefix_caching=False,
              max_model_len=max(1024, args.long + args.tokens + 64), seed=0)
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
    load = [_load_row(llm, PROCESS, monitor, n, length, args) for n in _ints(args.load)
            for length in ([0] + ([args.long] if args.long else []))] if args.load else []
    handle.detach()
    report = {
        "baseline_tok_s": round(baseline, 1),
        "off_tok_s": round(statistics.median(off), 1),
        "on_tok_s": round(statistics.median(on), 1),
        "overhead": round(statistics.median(off) / statistics.median(on) - 1, 4),
        "hook_ms_per_step": round(1000 * seconds / max(1, steps), 3),
        "rounds": args.rounds, "batch": args.batch, "tokens": args.tokens,
        "detectors": handle.detectors, "layers": handle.layers, "load": load,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"baseline (untapped): {report['baseline_tok_s']} tok/s")
        print(f"off (taps idle):     {report['off_tok_s']} tok/s  (median of {args.rounds})")
        print(f"on  (featurewatch):  {report['on_tok_s']} tok/s  (median of {args.rounds})")
        print(f"overhead: {100 * report['overhead']:.1f} %   monitor time: {report['hook_ms_per_step']} ms/step "
              f"({args.batch} requests per step)")
        for r in load:
            print(f"{r['concurrent']} in flight, {r['prompt_tokens']}-token prompts: {r['off_tok_s']} → "
                  f"{r['on_tok_s']} tok/s ({100 * r['overhead']:+.1f} %); inter-token p50 {r['off_itl_p50_ms']} → "
                  f"{r['on_itl_p50_ms']} ms, p95 {r['off_itl_p95_ms']} → {r['on_itl_p95_ms']} ms")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _stream(llm: object, n: int, prompt_tokens: int, new_tokens: int, tag: str) -> tuple[float, list[float]]:
    """``n`` requests in flight together, stepped by hand: tokens/s and every inter-token gap (seconds)."""
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine  # type: ignore[attr-defined]
    tok = llm.get_tokenizer()  # type: ignore[attr-defined]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(n):
        if prompt_tokens:
            text = " ".join(PROMPTS[(i + j) % len(PROMPTS)] for j in range(prompt_tokens // 8 + 1))
            ids = tok(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
        else:
            text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                           add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=list(ids)), params)
    seen: dict[str, int] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            k = len(out.outputs[0].token_ids)
            new = k - seen.get(out.request_id, 0)
            if new <= 0:
                continue
            if out.request_id in last:  # the first token is the prefill's, not an inter-token gap
                gaps += [(now - last[out.request_id]) / new] * new
            last[out.request_id], seen[out.request_id] = now, k
    return sum(seen.values()) / (time.perf_counter() - t0), gaps


def _load_row(llm: object, process: object, monitor: object, n: int, prompt_tokens: int, args: argparse.Namespace
              ) -> dict[str, object]:
    """Plugin off and on alternating for ``args.rounds`` rounds at one load; medians of the rounds."""
    sides: dict[str, dict[str, list[float]]] = {"off": {"tps": [], "gaps": []}, "on": {"tps": [], "gaps": []}}
    _stream(llm, n, prompt_tokens, 4, "warm")
    for r in range(args.rounds):
        for side in ("off", "on"):
            process.monitor = monitor if side == "on" else None  # type: ignore[attr-defined]
            tps, gaps = _stream(llm, n, prompt_tokens, args.tokens, f"{side}{r}-{n}-{prompt_tokens}")
            sides[side]["tps"].append(tps)
            sides[side]["gaps"] += gaps
    process.monitor = monitor  # type: ignore[attr-defined]

    def q(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return round(1000 * xs[min(len(xs) - 1, int(p * len(xs)))], 2) if xs else float("nan")

    off, on = statistics.median(sides["off"]["tps"]), statistics.median(sides["on"]["tps"])
    return {"concurrent": n, "prompt_tokens": prompt_tokens or "short", "off_tok_s": round(off, 1),
            "on_tok_s": round(on, 1), "overhead": round(off / on - 1, 4),
            "off_itl_p50_ms": q(sides["off"]["gaps"], 0.5), "on_itl_p50_ms": q(sides["on"]["gaps"], 0.5),
            "off_itl_p95_ms": q(sides["off"]["gaps"], 0.95), "on_itl_p95_ms": q(sides["on"]["gaps"], 0.95)}


if __name__ == "__main__":
    main()
