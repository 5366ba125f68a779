"""``featurewatch steer``: sweep an intervention over strengths — what it does to the text and what it costs.

For each strength: sample generations on a few prompts, the share matching
``--keywords``, the steered features' mean activation in the generated text,
next-token KL from the unsteered model (on the replies and on a held-out
corpus) and the change in cross-entropy on that corpus. The measuring is
:mod:`featurewatch.steering_sweep`; this module also owns the ``--steer``
option ``run`` shares (parsed and range-checked before the model loads).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ._common import POSITIVE, CLIError, add_model_args, check_input, json_line, load_model, load_pack_checked, progress

if TYPE_CHECKING:
    from ..intervention import Intervention
    from ..pack import Pack
    from ..steering_sweep import SweepResult

STEER_FORM = "[HOOKPOINT:]FEATURE:MODE[:VALUE]"


def register(sub: Any) -> None:
    p = sub.add_parser("steer", help="sweep a feature intervention over strengths: samples, concept rate, KL, ΔCE")
    p.add_argument("--feature", type=POSITIVE_OR_ZERO, action="append", dest="features", metavar="F",
                   help="feature to steer (repeatable; all get --mode)")
    p.add_argument("--mode", choices=("clamp", "add", "scale", "ablate"), default="clamp",
                   help="what the strength does to --feature (default: clamp)")
    p.add_argument("--hookpoint", help="hookpoint of --feature (default: the pack's SAE hookpoint)")
    p.add_argument("--steer", action="append", default=[], metavar=STEER_FORM,
                   help="an intervention to sweep (repeatable); VALUE may be left out: each strength replaces it")
    p.add_argument("--strengths", type=strengths, default="-10,-5,-2,0,2,5,10",
                   help="comma-separated strengths (write --strengths=-5,0,5 when the first is negative): × max "
                        "activation for clamp/add (raw with --absolute), the factor for scale "
                        "(default: -10,-5,-2,0,2,5,10)")
    p.add_argument("--absolute", action="store_true", help="clamp/add strengths are raw activations")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: three built-in neutral ones)")
    p.add_argument("--corpus", help="held-out JSONL records for KL and ΔCE (default: built-in neutral sentences)")
    p.add_argument("--keywords", help="regex (case-insensitive): concept rate = share of samples it matches")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=40, help="tokens generated per prompt (default 40)")
    p.add_argument("--samples", type=int, default=1, help="samples shown per strength in the table (default 1)")
    p.add_argument("--json", action="store_true", help="print the whole sweep as one JSON object")
    p.add_argument("--plot", metavar="OUT.png", help="write a PNG of KL/ΔCE and concept rate against strength")
    add_model_args(p, detectors=False)
    p.set_defaults(func=cmd_steer)


def POSITIVE_OR_ZERO(text: str) -> int:  # noqa: N802 — named like the other argparse types
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a feature index (an integer >= 0), got {text!r}")
    return value


def strengths(text: str) -> list[float]:
    """An argparse type: ``"-10,-5,0,5"`` → floats."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"give comma-separated numbers, e.g. -10,-5,-2,0,2,5,10; got {text!r}")
    return values


def parse_steer(specs: list[str], *, absolute: bool = False, value_optional: bool = False) -> list[Intervention]:
    """``--steer`` specs → interventions; a bad spec is a ConfigError naming the valid form."""
    from ..intervention import Intervention

    out = []
    for spec in specs:
        try:
            iv = Intervention.parse(spec)
        except ConfigError:
            if not value_optional:
                raise
            try:  # FEATURE:MODE without a value: the sweep's strengths give it
                iv = Intervention.parse(spec + ":1")
            except ConfigError:
                iv = Intervention.parse(spec)  # re-raise the message about the spec as written
        out.append(iv.model_copy(update={"absolute": True}) if absolute else iv)
    return out


def check_features(interventions: list[Intervention], pack: Pack) -> None:
    """Hookpoints with an SAE, features in range, a unit for relative values — checked before the model loads."""
    from ..models import normalize_hookpoint

    default = next(iter(pack.saes), None)
    for iv in interventions:
        hp = normalize_hookpoint(iv.hookpoint) if iv.hookpoint else default  # HookpointNotFound: one line
        sae = pack.saes.get(hp) if hp else None
        if hp is None or sae is None:
            raise CLIError(f"--steer {iv.hookpoint or ''}:{iv.feature}: pack {pack.name} has no SAE at "
                           f"{hp or 'any hookpoint'}; its SAE hookpoints: {', '.join(pack.saes) or 'none'}")
        from ..sae import check_feature_ids

        check_feature_ids(sae, [iv.feature], hookpoint=hp)
        if iv.mode in ("clamp", "add") and not iv.absolute and not pack.max_activation(hp, iv.feature):
            raise CLIError(f"pack {pack.name} knows no max activation for feature {iv.feature} at {hp}: give raw "
                           "values with --steer-absolute / --absolute")


def _interventions(args: argparse.Namespace) -> list[Intervention]:
    from ..intervention import Intervention

    out = [Intervention(feature=f, mode=args.mode, value=None if args.mode == "ablate" else 1.0,
                        absolute=args.absolute, hookpoint=args.hookpoint) for f in args.features or []]
    out += parse_steer(args.steer, absolute=args.absolute, value_optional=True)
    if not out:
        raise CLIError(f"say what to steer: --feature F [--mode clamp|add|scale|ablate] or --steer {STEER_FORM}")
    for strength in args.strengths:  # each strength is a value: in range before the model loads
        for iv in out:
            if iv.mode != "ablate":
                try:
                    Intervention.model_validate({**iv.model_dump(), "value": float(strength)})
                except ValueError as exc:
                    raise CLIError(f"--strengths {strength:g}: {_one_line(exc)}") from None
    return out


def _one_line(exc: ValueError) -> str:
    from pydantic import ValidationError

    from ..intervention import first_error

    return first_error(exc) if isinstance(exc, ValidationError) else str(exc)


def cmd_steer(args: argparse.Namespace) -> int:
    from ..monitor import Monitor
    from ..steering_sweep import DEFAULT_PROMPTS, load_corpus, plot, sweep

    ivs = _interventions(args)
    if args.keywords:
        try:
            re.compile(args.keywords)
        except re.error as exc:
            raise CLIError(f"--keywords {args.keywords!r} is not a regular expression: {exc}") from None
    corpus = load_corpus(check_input(args.corpus, "--corpus") if args.corpus else None)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib: pip install 'featurewatch[plot]'") from None
    pack = load_pack_checked(args)
    check_features(ivs, pack)
    loaded = load_model(args)
    monitor = Monitor(loaded.model, loaded.tokenizer, pack=pack, detectors=[], model_name=loaded.name)
    try:
        result = sweep(monitor, ivs, args.strengths, prompts=args.prompt or DEFAULT_PROMPTS, corpus=corpus,
                       keywords=args.keywords, max_new_tokens=args.max_new_tokens, progress=progress())
    finally:
        monitor.detach()
    if args.plot:
        print(f"plot written to {plot(result, args.plot)}", file=sys.stderr)
    if args.json:
        print(json_line(result.model_dump(mode="json")))
    else:
        print(table(result, samples=args.samples))
    return 0


def table(result: SweepResult, *, samples: int = 1) -> str:
    """The sweep as a plain-text table, then a few samples per strength."""
    keys = list(result.points[0].activation)
    head = (f"{'strength':>8}  " + "  ".join(f"{'act ' + k.split(':')[-1]:>10}" for k in keys)
            + f"  {'KL gen':>7}  {'KL corpus':>9}  {'ΔCE':>7}" + ("  concept" if result.keywords else ""))
    lines = [head, "-" * len(head)]
    for p in result.points:
        s = "none" if p.strength is None else f"{p.strength:g}"
        acts = "  ".join(f"{p.activation[k]:>10.3f}" for k in keys)
        row = f"{s:>8}  {acts}  {p.kl_generated:>7.3f}  {p.kl_corpus:>9.3f}  {p.delta_ce:>+7.3f}"
        if p.concept_rate is not None:
            row += f"  {p.concept_rate:>7.0%}"
        lines.append(row)
    if samples > 0:
        lines.append("")
        for p in result.points:
            s = "none" if p.strength is None else f"{p.strength:g}"
            for smp in p.samples[:samples]:
                lines.append(f"[{s:>5}] {' '.join(smp.text.split())[:160]}")
    return "\n".join(lines)
