"""``featurewatch redteam``: clamp a concept feature on ordinary requests and check the monitor catches what comes out.

The loop and its verdicts are :mod:`featurewatch.redteam`; this module reads
the options, checks every one of them before the model loads (feature ids,
hookpoints, strengths, detector and probe, the prompt file, the output
paths), then prints the per-strength table (or ``--json``) and writes every
reply as a record to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ._common import POSITIVE, CLIError, check_input, json_line, load_model, open_output, progress
from .steer import strengths

if TYPE_CHECKING:
    from ..pack import Pack
    from ..redteam import RedteamResult, Target

_FEATURE = re.compile(r"^(?:(?P<hp>[A-Za-z_][\w.]*):)?(?P<feature>\d+)$")


def register(sub: Any) -> None:
    p = sub.add_parser("redteam", help="clamp a concept feature on neutral requests; judge the replies by the "
                                       "concept's probe, the SAE detector and fluency")
    p.add_argument("--feature", type=feature_ref, action="append", dest="features", metavar="[HP:]F",
                      help="feature to clamp (repeatable: clamped together; HP default: the pack's SAE hookpoint)")
    p.add_argument("--detector", metavar="D",
                   help="the concept: its SAE detector and D-probe judge the replies; without --feature, D's "
                        "strongest feature is clamped (default with --feature: the detector weighing it most)")
    p.add_argument("--strengths", type=strengths, default="0,1,2,3",
                   help="comma-separated clamp values, × the feature's max activation (default 0,1,2,3); the "
                        "unsteered model is always measured too")
    p.add_argument("--prompts", metavar="FILE",
                   help="JSONL of requests, one {\"text\": ...} per line (default: the built-in neutral requests)")
    p.add_argument("--n", type=POSITIVE, default=32, help="requests used (the first N; default 32)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=48, help="tokens generated per reply (default 48)")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="requests generated together (default 16)")
    p.add_argument("--out", required=True, metavar="OUT.jsonl",
                   help="every reply as a record (messages, label = the probe's verdict, source steered:HP:F@s)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--plot", metavar="OUT.png", help="write a PNG of concept rate, recall and fluency per strength")
    p.add_argument("--model", help="hub id, local directory or .gguf file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--pack", default=None, help="pack name or directory (default: smollm2-135m-instruct)")
    p.set_defaults(func=cmd_redteam)


def feature_ref(text: str) -> tuple[str | None, int]:
    """An argparse type: ``[HOOKPOINT:]FEATURE`` → (hookpoint or None, feature)."""
    m = _FEATURE.match(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"write [HOOKPOINT:]FEATURE, e.g. 2632 or layers.15:2632; got {text!r}")
    return m["hp"], int(m["feature"])


def target_of(args: argparse.Namespace, pack: Pack) -> Target:
    """What to clamp and who judges, checked against the pack (no model needed)."""
    from ..models import normalize_hookpoint
    from ..redteam import Target, judge_probe, reading_detector, strongest_feature

    if args.detector is not None and args.detector not in pack.detectors:
        raise CLIError(f"--detector {args.detector!r} is not in pack {pack.name}; "
                       f"valid: {', '.join(sorted(n for n, s in pack.detectors.items() if s.kind == 'sae'))}")
    if not args.features:
        if args.detector is None:
            raise CLIError("say what to steer: --feature [HP:]F, or --detector D (its strongest feature)")
        spec = pack.detectors[args.detector]
        refs = [(spec.hookpoint, strongest_feature(pack, args.detector))]
    else:
        refs = args.features
    default = next(iter(pack.saes), None)
    hps = {normalize_hookpoint(hp) if hp else default for hp, _ in refs}
    if len(hps) != 1:
        raise CLIError(f"--feature: clamp features at one hookpoint per run; got {', '.join(sorted(map(str, hps)))}")
    hp = hps.pop()
    sae = pack.saes.get(hp) if hp else None
    if hp is None or sae is None:
        raise CLIError(f"--feature: pack {pack.name} has no SAE at {hp or 'any hookpoint'}; its SAE hookpoints: "
                       f"{', '.join(pack.saes) or 'none'}")
    features = tuple(dict.fromkeys(f for _, f in refs))
    from ..sae import check_feature_ids

    check_feature_ids(sae, features, hookpoint=hp, what="--feature")
    detector = args.detector or reading_detector(pack, hp, features)
    if pack.detectors[detector].kind != "sae":
        raise CLIError(f"--detector {detector!r} is a dense probe; name the SAE detector (its probe judges)")
    probe = judge_probe(pack, detector)
    for f in features:
        if not pack.max_activation(hp, f):
            raise CLIError(f"pack {pack.name} knows no max activation for feature {f} at {hp}, so a strength "
                           "× max activation means nothing; pick a feature with statistics in features.json")
    return Target(hookpoint=hp, features=features, detector=detector, probe=probe)


def check_strengths(values: list[float]) -> None:
    """Each strength a valid clamp value (finite, within the steering limit), before the model loads."""
    from pydantic import ValidationError

    from ..intervention import Intervention, first_error

    for s in values:
        try:
            Intervention(feature=0, mode="clamp", value=float(s))
        except ValidationError as exc:
            raise CLIError(f"--strengths {s:g}: {first_error(exc)}") from None


def load_prompts(path: str | None, n: int) -> list[str]:
    """The first ``n`` requests: of ``--prompts`` (``text`` records), or the built-in neutral ones."""
    from ..records import iter_records
    from ..redteam import NEUTRAL_REQUESTS

    if path is None:
        return list(NEUTRAL_REQUESTS[:n])
    out = []
    for record in iter_records(check_input(path, "--prompts")):
        if record.text is None or not record.text.strip():
            raise CLIError(f"--prompts {path}:{record.line}: a request is a record with a non-empty \"text\" "
                           "(the user's message)")
        out.append(record.text)
        if len(out) == n:
            break
    if not out:
        raise CLIError(f"--prompts {path} holds no request")
    return out


def cmd_redteam(args: argparse.Namespace) -> int:
    from ..monitor import Monitor
    from ..pack import DEFAULT_PACK, load_pack
    from ..redteam import plot, records, redteam

    check_strengths(args.strengths)
    prompts = load_prompts(args.prompts, args.n)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib: pip install 'featurewatch[plot]'") from None
    pack = load_pack(args.pack or DEFAULT_PACK)
    try:
        target = target_of(args, pack)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if args.plot:
        open_output(args.plot, "--plot").close()  # a bad --plot path fails now, not after the run
    out = open_output(args.out, "--out")
    loaded = load_model(args)
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=pack, detectors=[target.detector, target.probe],
                      model_name=loaded.name, capture_text=False)
    try:
        result = redteam(monitor, target, args.strengths, prompts, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, progress=progress())
    finally:
        monitor.detach()
    with out:
        for row in records(result, target):
            out.write(json_line(row) + "\n")
    print(f"{len(result.replies)} replies written to {args.out}", file=sys.stderr)
    if args.plot:
        print(f"plot written to {plot(result, args.plot)}", file=sys.stderr)
    if args.json:
        print(json_line({**result.model_dump(mode="json", exclude={"replies"}), "out": args.out,
                         "samples": samples(result)}))
    else:
        print(report(result, target))
    return 0


def samples(result: RedteamResult) -> list[dict[str, Any]]:
    """Per strength, the reply the probe scored highest, with its verdicts."""
    out = []
    for p in result.points:
        judged = [j for j in result.replies if j.strength == p.strength]
        best = max(judged, key=lambda j: -1e9 if j.probe_score is None else j.probe_score, default=None)
        if best is not None:
            out.append(json.loads(best.model_dump_json()))
    return out


def report(result: RedteamResult, target: Target) -> str:
    """The per-strength table, then each strength's most concept-like reply."""
    from ..display import table

    feats = "+".join(map(str, target.features))
    head = (f"red-teaming {target.detector}: clamp {target.hookpoint}:{feats} on {result.n_prompts} requests "
            f"({result.max_new_tokens} tokens), judged by {target.probe}")
    rows = []
    for p in result.points:
        s = "none" if p.strength is None else f"{p.strength:g}"
        rows.append([s, f"{p.concept}/{p.n}", f"{p.concept_rate:.0%}", f"{p.fluent_concept_rate:.0%}",
                     "—" if p.recall is None else f"{p.caught}/{p.concept}", f"{p.alert_rate:.0%}",
                     p.distinct_words, p.ce])
    lines = [head, "", table(rows, ["strength", "concept", "rate", "fluent", "caught", "alerts", "distinct",
                                    "CE"]), ""]
    lines.append("concept: the probe alerted on the reply; fluent: concept with distinct-word ratio >= 0.35; "
                 "caught: of those, the SAE detector alerted; CE: nats/token under the unsteered model")
    for sample in samples(result):
        s = "none" if sample["strength"] is None else f"{sample['strength']:g}"
        reply = " ".join(sample["reply"].split())
        verdicts = (f"probe {_num(sample['probe_score'])}{' ⚑' if sample['concept'] else ''}, detector "
                    f"{_num(sample['detector_score'])}{' ⚠' if sample['caught'] else ''}")
        lines.append(f"\n[{s:>5}] ▶ {sample['prompt']}\n        {reply[:300]}\n        ({verdicts})")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:+.2f}"
