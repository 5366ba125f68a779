"""featurewatch beside the tools people use today: same model, same SAE, same jobs, one run.

Two jobs, on the embedded SmolLM2-135M-Instruct (or ``--model DIR``) and the pack's SAE:

* **offline** — the SAE features of N chat records (``examples/data/handwritten_*.jsonl``),
  batch 8, at most 512 tokens each;
* **live** — generate ``--new-tokens`` tokens at batch 1 and read the SAE features of every
  new token.

Tools: the bare model (*the limit*: the forward stopped after the SAE's layer offline, plain
``generate`` live, both under ``torch.inference_mode``), a hand-written forward hook with a
full SAE encode, featurewatch (its detectors, with and without top-feature readings), nnsight
(``LanguageModel`` around the loaded model) and TransformerLens's bridge; SAELens where it can
load this model offline (it cannot: see ``failed``).

**Speed** is measured in this one process, on one loaded model, interleaved: every round
runs every tool once on the same prompt / batches, in a rotating order; the first round
warms up and is dropped. Per round, each tool's time is divided into the limit's, and the
median and quartiles of those ratios are reported (ratios taken a few seconds apart survive
a shared machine far better than absolute speeds). nnsight and TransformerLens rewrite the
model they are given in place (nnsight wraps every module's ``forward``; the bridge replaces
the decoder layers), so each gets its own deep copy, and the control row ``limit-copy`` (the
bare model on a copy) shows what copying alone does to the ratio. featurewatch attaches its
hooks for its own calls only (``attach``/``detach`` outside the timed call).

**Memory** (``--memory``, on by default): each tool then runs once more in a process of its
own, so its peak RSS and what it holds beyond the loaded model are its own.

    benchmarks/setup-peers.sh      # once: .venv-peers with nnsight, TransformerLens, SAELens
    .venv-peers/bin/python benchmarks/peers.py [--reps 20] [--records 16] [--new-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
TOOLS = ("limit", "limit-copy", "hand-hook", "featurewatch", "featurewatch+readings", "nnsight",
         "transformer-lens", "saelens")
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
        self.sae.requires_grad_(False)
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
        self.round = 0  # the driver sets it: every tool gets the same prompt in a round
        self.monitor: Any = None  # featurewatch's, shared by its two rows (one monitor per model)
        self.monitor_hooks: Any = None

    def next_prompt(self) -> Any:
        return self.prompts[self.round % len(self.prompts)]

    def gen_kwargs(self) -> dict[str, Any]:
        n = self.args.new_tokens
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=self.tok.pad_token_id)

    def own_model(self, shared: bool) -> Any:
        """The loaded model, or (``shared``: other tools run in this process) a deep copy of it."""
        return copy.deepcopy(self.model) if shared else self.model


Runner = Callable[[], int]  # runs one job once, returns the tokens it produced features for


@dataclass
class Tool:
    """One tool's jobs, and what must happen around its calls outside the timed region."""

    jobs: dict[str, Runner]
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None
    # for tools whose work is a hook: the CPU seconds spent inside it, appended per forward pass
    hook_cpu: list[float] | None = None


def _decoder_layer(model: Any, index: int) -> Any:
    from featurewatch.models import decoder_layers

    return decoder_layers(model)[index]


def _limit(job: Job, model: Any) -> Tool:
    import torch

    from featurewatch.hooks import forward_until

    def offline() -> int:
        for _, ids, mask in job.batches:
            forward_until(model, ids, mask, [job.hookpoint])
        return job.offline_tokens

    def live() -> int:
        with torch.inference_mode():
            model.generate(**job.next_prompt(), **job.gen_kwargs())
        return job.args.new_tokens

    return Tool({"offline": offline, "live": live})


def tool_limit(job: Job, shared: bool) -> Tool:
    return _limit(job, job.model)


def tool_limit_copy(job: Job, shared: bool) -> Tool:
    """The control: the bare model on a deep copy, as the in-place peers get."""
    return _limit(job, job.own_model(shared))


def tool_hand_hook(job: Job, shared: bool) -> Tool:
    """What a careful engineer writes: one forward hook, full encode, stop after the layer offline."""
    import torch

    class Stop(Exception):
        pass

    layer = _decoder_layer(job.model, job.layer)
    sae = job.sae
    hook_cpu: list[float] = []

    def run(inputs: dict[str, Any], generate: bool) -> list[Any]:
        feats: list[Any] = []

        def hook(_m: Any, _a: Any, out: Any) -> None:
            c = time.process_time()
            h = out if torch.is_tensor(out) else out[0]
            feats.append(sae.encode(h[:, -1:] if generate and feats else h).cpu())
            hook_cpu.append(time.process_time() - c)
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

    return Tool({"offline": offline, "live": live}, hook_cpu=hook_cpu)


def _tool_featurewatch(job: Job, top_features: int) -> Tool:
    import torch

    from featurewatch.monitor import Monitor
    from featurewatch.records import pad_right, render

    # one monitor per model (featurewatch refuses a second one on the same model); attached only
    # around featurewatch's own calls, so the other tools run on a model without its hooks
    if job.monitor is None:
        from profile_hotpath import timed_hooks  # a sibling script: the same timers as the profile

        job.monitor = Monitor(job.model, job.tok, pack=job.args.pack)
        job.monitor_hooks = timed_hooks(job.monitor)
        job.monitor.detach()
    monitor, hooks = job.monitor, job.monitor_hooks

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
        prompt = PROMPTS[job.round % len(PROMPTS)]  # the same prompt as the other tools this round
        n = job.args.new_tokens
        result = monitor.generate(prompt, max_new_tokens=n, min_new_tokens=n, raise_on_block=False,
                                  top_features=top_features)
        if top_features:
            result.readings()
        return n

    return Tool({"offline": offline, "live": live}, enter=monitor.attach, leave=monitor.detach, hook_cpu=hooks.cpu)


def tool_nnsight(job: Job, shared: bool) -> Tool:
    import torch
    from nnsight import LanguageModel

    lm = LanguageModel(job.own_model(shared), tokenizer=job.tok)
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

    return Tool({"offline": offline, "live": live})


def tool_transformer_lens(job: Job, shared: bool) -> Tool:
    """TransformerLens's bridge around the loaded HF model (+ the SAE as a plain encode)."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    model = job.own_model(shared)
    name = getattr(model.config, "_name_or_path", "") or "HuggingFaceTB/SmolLM2-135M-Instruct"
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=job.tok)
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

    return Tool({"offline": offline, "live": live})


def tool_saelens(job: Job, shared: bool) -> Tool:
    """SAELens's HookedSAETransformer: the way its docs load a model (this fails here; see RESULTS.md)."""
    from sae_lens import HookedSAETransformer

    name = getattr(job.model.config, "_name_or_path", "") or "HuggingFaceTB/SmolLM2-135M-Instruct"
    HookedSAETransformer.from_pretrained(name, hf_model=job.own_model(shared), tokenizer=job.tok)
    raise RuntimeError("HookedSAETransformer loaded this model: add its jobs to benchmarks/peers.py")


BUILDERS: dict[str, Callable[[Job, bool], Tool]] = {
    "limit": tool_limit,
    "limit-copy": tool_limit_copy,
    "hand-hook": tool_hand_hook,
    "featurewatch": lambda job, shared: _tool_featurewatch(job, 0),
    "featurewatch+readings": lambda job, shared: _tool_featurewatch(job, 5),
    "nnsight": tool_nnsight,
    "transformer-lens": tool_transformer_lens,
    "saelens": tool_saelens,
}


def _failure(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


# ---------------------------------------------------------------------- speed: one process
def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def measure_speed(args: argparse.Namespace, tools: list[str], jobs: list[str]) -> dict[str, Any]:
    _set_threads(args.threads)
    job = Job(args)
    built: dict[str, Tool] = {}
    failed: dict[str, str] = {}
    for name in tools:  # build and warm up (imports, lazy init, first-call costs: untimed)
        try:
            tool = BUILDERS[name](job, True)
            tool.enter()
            try:
                for j in jobs:
                    tool.jobs[j]()
            finally:
                tool.leave()
            built[name] = tool
        except Exception as exc:  # noqa: BLE001 — reported, the run goes on without this tool
            failed[name] = _failure(exc)
            if args.verbose:
                traceback.print_exc()
    names = list(built)
    wall: dict[str, dict[str, list[float]]] = {j: {t: [] for t in names} for j in jobs}
    cpu: dict[str, dict[str, list[float]]] = {j: {t: [] for t in names} for j in jobs}
    hook_share: dict[str, dict[str, list[float]]] = {j: {t: [] for t in names} for j in jobs}
    tokens: dict[str, dict[str, int]] = {j: {} for j in jobs}
    for rnd in range(args.reps + 1):  # round 0 warms up and is dropped
        job.round = rnd
        for j in jobs:
            k = rnd % len(names) if names else 0
            for name in names[k:] + names[:k]:
                tool = built[name]
                tool.enter()
                if tool.hook_cpu is not None:
                    tool.hook_cpu.clear()
                try:
                    t, c = time.perf_counter(), time.process_time()
                    n = tool.jobs[j]()
                    dt, dc = time.perf_counter() - t, time.process_time() - c
                finally:
                    tool.leave()
                if rnd:
                    wall[j][name].append(dt)
                    cpu[j][name].append(dc)
                    if tool.hook_cpu is not None:
                        hook_share[j][name].append(sum(tool.hook_cpu) / dc)
                tokens[j][name] = n
        if args.verbose:
            print(f"round {rnd} of {args.reps} done", file=sys.stderr)
    out: dict[str, Any] = {}
    for j in jobs:
        rows = {}
        lim, lim_cpu = wall[j].get("limit"), cpu[j].get("limit")
        for name in names:
            ts, cs = wall[j][name], cpu[j][name]
            row: dict[str, Any] = {"tokens_per_s": round(tokens[j][name] / statistics.median(ts), 2),
                                   "seconds_median": round(statistics.median(ts), 4)}
            if lim:  # per round: the limit's time over this tool's (speed as a fraction of the limit)
                ratios = [a / b for a, b in zip(lim, ts)]
                row["speed_vs_limit"] = round(statistics.median(ratios), 4)
                row["speed_vs_limit_iqr"] = [round(q, 4) for q in _quartiles(ratios)]
            if lim_cpu:  # the same with process CPU time
                row["speed_vs_limit_cpu"] = round(statistics.median(a / b for a, b in zip(lim_cpu, cs)), 4)
            if hook_share[j][name]:  # the tool's own work, timed inside its hooks: not blurred by the machine
                row["hook_cpu_share"] = round(statistics.median(hook_share[j][name]), 5)
            row["seconds"] = [round(x, 4) for x in ts]  # every timed round, for re-analysis
            rows[name] = row
        out[j] = rows
    return {"jobs": out, "failed": failed}


# ---------------------------------------------------------------------- memory: a process per tool
def worker(args: argparse.Namespace) -> int:
    """Load, build one tool, run each job twice; print RSS figures as one JSON line."""
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints must not mix with the result line
    try:
        _set_threads(args.threads)
        job = Job(args)
        rss_model = _rss_mb()
        tool = BUILDERS[args.worker](job, False)
        tool.enter()
        for name in args.jobs.split(","):
            for _ in range(2):
                tool.jobs[name]()
        tool.leave()
    except Exception as exc:  # noqa: BLE001 — reported, the run goes on without this tool
        out.write(json.dumps({"error": _failure(exc)}) + "\n")
        return 1
    out.write(json.dumps({"rss_model_mb": round(rss_model, 1), "rss_mb": round(_rss_mb(), 1),
                          "peak_rss_mb": round(_peak_mb(), 1)}) + "\n")
    return 0


def measure_memory(args: argparse.Namespace, tools: list[str]) -> dict[str, Any]:
    """One process per tool, one after another (loading in parallel would only fight for the cores)."""
    result: dict[str, Any] = {}
    for name in tools:
        cmd = [sys.executable, __file__, "--worker", name, "--records", str(args.records), "--batch",
               str(args.batch), "--max-tokens", str(args.max_tokens), "--new-tokens", str(args.new_tokens),
               "--pack", args.pack, "--jobs", args.jobs, "--threads", str(args.threads)]
        if args.model:
            cmd += ["--model", str(args.model)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        lines = proc.stdout.strip().splitlines()
        info = json.loads(lines[-1]) if lines else {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        if "error" not in info:
            info["rss_over_model_mb"] = round(info["rss_mb"] - info["rss_model_mb"], 1)
        result[name] = info
        if args.verbose:
            print(f"memory: {name} {info}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--pack", default="smollm2-135m-instruct", help="pack whose (first) SAE every tool uses")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from: {', '.join(TOOLS)}")
    ap.add_argument("--jobs", default="offline,live")
    ap.add_argument("--reps", type=int, default=20, help="timed rounds (one more warms up)")
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on 2 shared cores a second thread adds noise, not speed)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-tool memory processes")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {', '.join(bad)}; valid: {', '.join(TOOLS)}")
    if "limit" not in tools:
        ap.error("--tools must include limit: every figure is a ratio to it")
    jobs = args.jobs.split(",")
    load_start = os.getloadavg()
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "verbose")},
                              **measure_speed(args, tools, jobs)}
    result["load_average"] = {"start": load_start, "end": os.getloadavg()}
    if args.memory:
        mem = measure_memory(args, [t for t in tools if t not in result["failed"] and t != "limit-copy"])
        result["memory"] = mem
        for name, info in mem.items():
            for rows in result["jobs"].values():
                if name in rows and "error" not in info:
                    rows[name].update(peak_rss_mb=info["peak_rss_mb"], rss_over_model_mb=info["rss_over_model_mb"])
    if args.json:
        print(json.dumps(result))
        return 0
    for j, rows in result["jobs"].items():
        print(f"\n{j}: {'tool':<24}{'tokens/s':>10}{'× limit':>10}{'IQR':>16}{'× (CPU)':>10}{'hooks %':>9}"
              f"{'peak RSS MB':>13}{'over model':>12}")
        for name, r in rows.items():
            iqr = r.get("speed_vs_limit_iqr", [float("nan")] * 2)
            print(f"{'':<9}{name:<24}{r['tokens_per_s']:>10}{r.get('speed_vs_limit', float('nan')):>10.3f}"
                  f"{f'{iqr[0]:.3f}–{iqr[1]:.3f}':>16}{r.get('speed_vs_limit_cpu', float('nan')):>10.3f}"
                  f"{100 * r.get('hook_cpu_share', float('nan')):>9.2f}"
                  f"{r.get('peak_rss_mb') or float('nan'):>13.0f}{r.get('rss_over_model_mb', float('nan')):>12.0f}")
    for name, why in result["failed"].items():
        print(f"{name}: could not run: {why}")
    print(f"load average at the start / end: {result['load_average']['start']} / {result['load_average']['end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
