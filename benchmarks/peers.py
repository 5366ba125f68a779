"""featurewatch beside the tools people use today: same model, same SAE, same jobs, one run.

Two jobs, on the embedded SmolLM2-135M-Instruct (or ``--model DIR``) and the pack's SAE:

* **offline** — the SAE features of N chat records (``examples/data/handwritten_*.jsonl``),
  batch 8, at most 512 tokens each;
* **live** — generate ``--new-tokens`` tokens at batch 1 and read the SAE features of every
  new token.

Tools: the bare model (*the limit*: the forward stopped after the SAE's layer offline, plain
``generate`` live), a hand-written forward hook with a full SAE encode, featurewatch (its
detectors, with and without top-feature readings), nnsight (``LanguageModel`` around the
loaded model) and TransformerLens / SAELens where they can load this model offline.

Each tool runs in its own worker process, started once (its peak RSS is its own) and
idle while another works; this orchestrating process sends the jobs round-robin — every
round runs every tool once, in a rotating order — drops the first (warm-up) round, and
reports medians and, per round, each tool's time over the limit's (ratios survive a
busy machine far better than absolute speeds). A tool that cannot load says why. Run:

    benchmarks/setup-peers.sh      # once: .venv-peers with nnsight, TransformerLens, SAELens
    .venv-peers/bin/python benchmarks/peers.py [--reps 5] [--records 64] [--new-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("limit", "hand-hook", "featurewatch", "featurewatch+readings", "nnsight", "transformer-lens")
PROMPTS = [
    "Write a short email to a colleague about tomorrow's meeting.",
    "Explain in two sentences how vaccines train the immune system.",
    "Your account has been suspended. Reply with your password to restore access.",
]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------- the worker side
class Job:
    """What every tool gets: the model, the SAE, the rendered records and the prompts."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from featurewatch.models import load_model
        from featurewatch.pack import load_pack
        from featurewatch.records import load_records, pad_right, render

        torch.manual_seed(0)
        self.args = args
        self.lm = load_model(args.model)
        self.model, self.tok = self.lm.model, self.lm.tokenizer
        self.pack = load_pack(args.pack)
        self.hookpoint, sae = next(iter(self.pack.saes.items()))
        self.layer = int(self.hookpoint.rsplit(".", 1)[1])
        self.sae = sae.to(torch.float32)
        records = []
        for path in sorted((ROOT / "examples" / "data").glob("handwritten_*.jsonl")):
            records.extend(load_records(path))
        # interleave the files so every batch mixes lengths as real traffic would
        records.sort(key=lambda r: (hash(r.id) % 997, r.id))
        self.records = records[: args.records]
        self.batches = []
        for i in range(0, len(self.records), args.batch):
            chunk = self.records[i:i + args.batch]
            rendered = [render(r, self.tok, max_tokens=args.max_tokens) for r in chunk]
            self.batches.append((chunk, *pad_right([r.ids for r in rendered], self.tok.pad_token_id)))
        self.offline_tokens = int(sum(int(mask.sum()) for _, _, mask in self.batches))
        self.prompts = []
        for p in PROMPTS:
            text = self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True)
            self.prompts.append(self.tok([text], return_tensors="pt", add_special_tokens=False))
        self.n_live = 0

    def next_prompt(self) -> Any:
        self.n_live += 1
        return self.prompts[self.n_live % len(self.prompts)]

    def gen_kwargs(self) -> dict[str, Any]:
        n = self.args.new_tokens
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=self.tok.pad_token_id)


Runner = Callable[[], int]  # runs one job once, returns the tokens it produced features for


def _decoder_layer(model: Any, index: int) -> Any:
    from featurewatch.models import decoder_layers

    return decoder_layers(model)[index]


def tool_limit(job: Job) -> dict[str, Runner]:
    import torch

    from featurewatch.hooks import forward_until

    def offline() -> int:
        for _, ids, mask in job.batches:
            forward_until(job.model, ids, mask, [job.hookpoint])
        return job.offline_tokens

    def live() -> int:
        with torch.inference_mode():
            job.model.generate(**job.next_prompt(), **job.gen_kwargs())
        return job.args.new_tokens

    return {"offline": offline, "live": live}


def tool_hand_hook(job: Job) -> dict[str, Runner]:
    """What a careful engineer writes: one forward hook, full encode, stop after the layer offline."""
    import torch

    class Stop(Exception):
        pass

    layer = _decoder_layer(job.model, job.layer)
    sae = job.sae

    def run(inputs: dict[str, Any], generate: bool) -> list[Any]:
        feats: list[Any] = []

        def hook(_m: Any, _a: Any, out: Any) -> None:
            h = out if torch.is_tensor(out) else out[0]
            feats.append(sae.encode(h[:, -1:] if generate and feats else h).cpu())
            if not generate:
                raise Stop

        handle = layer.register_forward_hook(hook)
        try:
            with torch.inference_mode(), contextlib.suppress(Stop):
                if generate:
                    job.model.generate(**inputs, **job.gen_kwargs())
                else:
                    job.model(**inputs, use_cache=False)
        finally:
            handle.remove()
        return feats

    def offline() -> int:
        for _, ids, mask in job.batches:
            run({"input_ids": ids, "attention_mask": mask}, generate=False)
        return job.offline_tokens

    def live() -> int:
        run(dict(job.next_prompt()), generate=True)
        return job.args.new_tokens

    return {"offline": offline, "live": live}


def _tool_featurewatch(job: Job, top_features: int) -> dict[str, Runner]:
    import torch

    from featurewatch.monitor import Monitor
    from featurewatch.records import pad_right, render

    monitor = Monitor(job.model, job.tok, pack=job.args.pack)

    def offline() -> int:
        if not top_features:
            for _ in monitor.score_records(job.records, batch_size=job.args.batch, max_tokens=job.args.max_tokens):
                pass
            return job.offline_tokens
        # with readings: the same path as score_records, opened with top_features, and every row read
        from featurewatch.hooks import _StopForward

        for chunk, _, _ in job.batches:
            rendered = [render(r, job.tok, max_tokens=job.args.max_tokens) for r in chunk]
            ids, mask = pad_right([r.ids for r in rendered], job.tok.pad_token_id)
            session = monitor.session(len(chunk), n_prompt=[r.n_prompt for r in rendered],
                                      content=[r.content for r in rendered], stop_after_deepest=True,
                                      top_features=top_features)
            with session, torch.inference_mode(), contextlib.suppress(_StopForward):
                job.model(input_ids=ids, attention_mask=mask, use_cache=False)
            session.results()
            for row in range(len(chunk)):
                session.readings(row)
        return job.offline_tokens

    def live() -> int:
        job.next_prompt()  # same rotation as the other tools
        prompt = PROMPTS[job.n_live % len(PROMPTS)]
        n = job.args.new_tokens
        result = monitor.generate(prompt, max_new_tokens=n, min_new_tokens=n, raise_on_block=False,
                                  top_features=top_features)
        if top_features:
            result.readings()
        return n

    return {"offline": offline, "live": live}


def tool_nnsight(job: Job) -> dict[str, Runner]:
    import torch
    from nnsight import LanguageModel

    lm = LanguageModel(job.model, tokenizer=job.tok)
    layer = lm.model.layers[job.layer]
    sae = job.sae

    def offline() -> int:
        for _, ids, mask in job.batches:
            with torch.inference_mode(), lm.trace({"input_ids": ids, "attention_mask": mask},
                                                  use_cache=False) as tracer:
                h = layer.output
                feats = sae.encode(h if torch.is_tensor(h) else h[0]).save()
                tracer.stop()
            del feats
        return job.offline_tokens

    def live() -> int:
        enc = job.next_prompt()
        with torch.inference_mode(), lm.generate(dict(enc), **job.gen_kwargs()) as tracer:
            feats = list().save()
            for _step in tracer.all():
                h = layer.output
                feats.append(sae.encode((h if torch.is_tensor(h) else h[0])[:, -1:]).cpu())
        return job.args.new_tokens

    return {"offline": offline, "live": live}


def tool_transformer_lens(job: Job) -> dict[str, Runner]:
    """TransformerLens's bridge around the loaded HF model (+ the SAE as a plain encode)."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    name = getattr(job.model.config, "_name_or_path", "") or "HuggingFaceTB/SmolLM2-135M-Instruct"
    bridge = TransformerBridge.boot_transformers(name, hf_model=job.model, tokenizer=job.tok)
    hook_name = f"blocks.{job.layer}.hook_resid_post"
    sae = job.sae

    def offline() -> int:
        for _, ids, mask in job.batches:
            with torch.inference_mode():
                _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=hook_name,
                                                 stop_at_layer=job.layer + 1)
                sae.encode(cache[hook_name])
        return job.offline_tokens

    def live() -> int:
        feats: list[Any] = []

        def hook(act: Any, hook: Any) -> None:
            feats.append(sae.encode(act[:, -1:] if feats else act).cpu())

        enc = job.next_prompt()
        with torch.inference_mode(), bridge.hooks(fwd_hooks=[(hook_name, hook)]):
            bridge.generate(enc["input_ids"], max_new_tokens=job.args.new_tokens, do_sample=False, verbose=False)
        return job.args.new_tokens

    return {"offline": offline, "live": live}


BUILDERS: dict[str, Callable[[Job], dict[str, Runner]]] = {
    "limit": tool_limit,
    "hand-hook": tool_hand_hook,
    "featurewatch": lambda job: _tool_featurewatch(job, 0),
    "featurewatch+readings": lambda job: _tool_featurewatch(job, 5),
    "nnsight": tool_nnsight,
    "transformer-lens": tool_transformer_lens,
}


def worker(args: argparse.Namespace) -> int:
    """Serve jobs on stdin (``offline`` / ``live`` / ``quit``), one JSON line out per job."""
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not mix with the protocol
    try:
        job = Job(args)
        rss_model = _rss_mb()
        runners = BUILDERS[args.worker](job)
        for name in args.jobs.split(","):  # one untimed call each: imports, lazy init, first-call costs
            runners[name]()
    except Exception as exc:  # noqa: BLE001 — reported, the run goes on without this tool
        out.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}",
                              "trace": traceback.format_exc(limit=6)}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps({"ready": True, "rss_model_mb": round(rss_model, 1),
                          "offline_tokens": job.offline_tokens}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        t, c = time.perf_counter(), time.process_time()
        tokens = runners[cmd]()
        out.write(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
                              "tokens": tokens}) + "\n")
        out.flush()
    out.write(json.dumps({"peak_rss_mb": round(_peak_mb(), 1), "rss_mb": round(_rss_mb(), 1)}) + "\n")
    out.flush()
    return 0


# ---------------------------------------------------------------------- the orchestrator
class Worker:
    def __init__(self, tool: str, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", tool, "--records", str(args.records), "--batch", str(args.batch),
               "--max-tokens", str(args.max_tokens), "--new-tokens", str(args.new_tokens), "--pack", args.pack,
               "--jobs", args.jobs]
        if args.model:
            cmd += ["--model", str(args.model)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
        self.tool = tool
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.info: dict[str, Any] = {}

    def ready(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.info = {"ready": False, "error": err.strip().splitlines()[-1] if err.strip() else "no output"}
        else:
            self.info = json.loads(line)
        return self.info

    def run(self, job: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(job + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> dict[str, Any]:
        if self.proc.poll() is not None:
            return {}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        final = json.loads(self.proc.stdout.readline())
        self.proc.wait(timeout=60)
        return final


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    tools = [t for t in args.tools.split(",") if t]
    jobs = args.jobs.split(",")
    workers: dict[str, Worker] = {}
    failed: dict[str, str] = {}
    # start workers one after another (loading in parallel would only fight for the cores)
    for tool in tools:
        w = Worker(tool, args)
        info = w.ready()
        if info.get("ready"):
            workers[tool] = w
        else:
            failed[tool] = info.get("error", "unknown")
            if args.verbose and info.get("trace"):
                print(info["trace"], file=sys.stderr)
    live = list(workers)
    times: dict[str, dict[str, list[float]]] = {j: {t: [] for t in live} for j in jobs}
    cpu: dict[str, dict[str, list[float]]] = {j: {t: [] for t in live} for j in jobs}
    tokens: dict[str, dict[str, int]] = {j: {} for j in jobs}
    for rnd in range(args.reps + 1):  # round 0 warms up and is dropped
        for job in jobs:
            order = live[rnd % len(live):] + live[:rnd % len(live)] if live else []
            for tool in order:
                r = workers[tool].run(job)
                if rnd:
                    times[job][tool].append(r["seconds"])
                    cpu[job][tool].append(r["cpu_seconds"])
                tokens[job][tool] = r["tokens"]
        if args.verbose:
            print(f"round {rnd} done", file=sys.stderr)
    memory = {tool: {**w.info, **w.close()} for tool, w in workers.items()}
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "verbose")},
                              "load_average": os.getloadavg(), "failed": failed, "jobs": {}}
    for job in jobs:
        rows = {}
        lim, lim_cpu = times[job].get("limit"), cpu[job].get("limit")
        for tool in live:
            ts, cs = times[job][tool], cpu[job][tool]
            row = {"tokens_per_s": round(tokens[job][tool] / statistics.median(ts), 2),
                   "tokens_per_cpu_s": round(tokens[job][tool] / statistics.median(cs), 2),
                   "seconds_median": round(statistics.median(ts), 3),
                   "peak_rss_mb": memory[tool].get("peak_rss_mb"),
                   "rss_model_mb": memory[tool].get("rss_model_mb"),
                   # what the tool holds beyond the loaded model once its jobs ran (the peak is the
                   # model load's for most tools: dequantising the GGUF file)
                   "rss_over_model_mb": round(memory[tool].get("rss_mb", 0) - memory[tool].get("rss_model_mb", 0), 1)}
            if lim:
                # per round: the limit's time over this tool's (speed as a fraction of the limit)
                row["speed_vs_limit"] = round(statistics.median(a / b for a, b in zip(lim, ts)), 4)
            if lim_cpu:  # the same with process CPU time: steadier when other work shares the cores
                row["speed_vs_limit_cpu"] = round(statistics.median(a / b for a, b in zip(lim_cpu, cs)), 4)
            rows[tool] = row
        base = memory.get("limit", {}).get("peak_rss_mb")
        if base:
            for tool in rows:
                if rows[tool]["peak_rss_mb"] is not None:
                    rows[tool]["peak_rss_over_limit_mb"] = round(rows[tool]["peak_rss_mb"] - base, 1)
        result["jobs"][job] = rows
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--pack", default="smollm2-135m-instruct", help="pack whose (first) SAE every tool uses")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from: {', '.join(TOOLS)}")
    ap.add_argument("--jobs", default="offline,live")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (one more warms up)")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    bad = [t for t in args.tools.split(",") if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {', '.join(bad)}; valid: {', '.join(TOOLS)}")
    result = orchestrate(args)
    if args.json:
        print(json.dumps(result))
        return 0
    for job, rows in result["jobs"].items():
        print(f"\n{job}: {'tool':<24}{'tokens/s':>10}{'× limit':>10}{'× (CPU)':>10}{'peak RSS MB':>13}"
              f"{'Δ vs limit':>12}")
        for tool, r in rows.items():
            print(f"{'':<9}{tool:<24}{r['tokens_per_s']:>10}{r.get('speed_vs_limit', float('nan')):>10.3f}"
                  f"{r.get('speed_vs_limit_cpu', float('nan')):>10.3f}"
                  f"{r['peak_rss_mb'] or float('nan'):>13.0f}{r.get('peak_rss_over_limit_mb', float('nan')):>12.0f}")
    for tool, why in result["failed"].items():
        print(f"{tool}: could not run: {why}")
    print(f"load average at the end: {result['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
