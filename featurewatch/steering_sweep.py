"""The cost of an intervention, measured: a sweep over strengths.

Steering is only useful in the range where the model still writes well, so
for each strength this measures both sides:

* **effect**: sample generations on a few prompts, the share that match a
  concept regex, and the steered features' mean activation in the generated
  text — read by the *unsteered* model over prompt + steered reply, so it says
  how much the text itself carries the concept (at the steered layer the
  clamped value would say nothing);
* **cost**: the next-token KL divergence KL(steered ‖ unsteered) on the
  generated replies (the steered distributions are those the generation
  sampled from, recorded at the LM head) and on a held-out corpus, and the
  change in cross-entropy on that corpus (nats/token).

The strength replaces the ``value`` of every ``clamp``/``add``/``scale``
intervention (× max activation unless ``absolute``; the factor for ``scale``);
``ablate`` takes no strength. The unsteered model is the first row
(``strength=None``). Reference passes run outside any monitor session, so the
monitor's hooks stay idle there; a monitor with interventions of its own is
refused, since it would steer the samples but not the reference.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ._plot import pyplot
from .errors import ConfigError
from .generation import render_prompt
from .hooks import hooked, unwrap
from .intervention import Intervention, sae_hookpoint
from .models import resolve_hookpoint
from .records import Record, Rendered, iter_records, records_from_lines, render

if TYPE_CHECKING:
    from .monitor import Monitor

log = logging.getLogger(__name__)

DEFAULT_STRENGTHS: tuple[float, ...] = (-10.0, -5.0, -2.0, 0.0, 2.0, 5.0, 10.0)
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Write a short note to a colleague about tomorrow's meeting.",
    "Give me three tips for staying focused while studying.",
    "Describe your ideal weekend.",
)


class Sample(BaseModel):
    """One generation of a sweep point."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    text: str
    matches: bool | None = Field(default=None, description="the concept regex matches the text (None: no regex)")


class SweepPoint(BaseModel):
    """What one strength did: its effect and its cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strength: float | None = Field(description="the value every clamp/add/scale intervention got; None: unsteered")
    activation: dict[str, float] = Field(description=(
        "'HOOKPOINT:FEATURE' → mean activation over the generated tokens, read by the unsteered model"))
    activation_rel: dict[str, float | None] = Field(description="the same, in units of the feature's max activation")
    kl_generated: float = Field(description="mean next-token KL(steered ‖ unsteered) on the generated replies, nats")
    kl_corpus: float = Field(description="mean next-token KL(steered ‖ unsteered) on the corpus, nats")
    ce_corpus: float = Field(description="cross-entropy on the corpus, nats/token")
    delta_ce: float = Field(description="ce_corpus minus the unsteered model's, nats/token")
    concept_rate: float | None = Field(description="share of samples matching the concept regex (None: no regex)")
    samples: list[Sample]


class SweepResult(BaseModel):
    """A whole sweep: the interventions swept, the settings, and one point per strength (unsteered first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interventions: list[Intervention]
    strengths: list[float]
    keywords: str | None
    max_new_tokens: int
    corpus_tokens: int
    points: list[SweepPoint]


def with_strength(iv: Intervention, strength: float) -> Intervention:
    """The intervention at ``strength`` (``ablate`` has none and is returned as it is)."""
    return iv if iv.mode == "ablate" else iv.model_copy(update={"value": float(strength)})


def default_corpus() -> list[Record]:
    """The built-in held-out corpus: a few neutral sentences and short chats, shipped with the package."""
    data = resources.files("featurewatch").joinpath("data/neutral.jsonl").read_bytes()
    return list(records_from_lines(data.splitlines(keepends=True), path="featurewatch/data/neutral.jsonl"))


def load_corpus(path: str | Path | None) -> list[Record]:
    """Records from a JSONL file, or the built-in corpus when ``path`` is None."""
    return default_corpus() if path is None else list(iter_records(path))


def sweep(monitor: Monitor, interventions: Sequence[Intervention],
          strengths: Sequence[float] = DEFAULT_STRENGTHS, *, prompts: Sequence[str] = DEFAULT_PROMPTS,
          corpus: Iterable[Record] | None = None, keywords: str | None = None, max_new_tokens: int = 40,
          chat: bool = True, max_corpus_tokens: int = 256,
          progress: Callable[..., Any] | None = None) -> SweepResult:
    """Measure effect and cost of ``interventions`` at each strength; see the module docstring.

    ``monitor`` supplies model, tokenizer, SAEs and max activations; give it no interventions
    of its own. ``progress``: a tqdm-like factory (``progress(total=…, desc=…)``) for a bar.
    """
    if not interventions:
        raise ConfigError("the sweep needs at least one intervention")
    if not prompts:
        raise ConfigError("the sweep needs at least one prompt")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; it must be at least 1")
    if getattr(monitor, "_steering", None):
        raise ConfigError("this monitor steers every run by itself (interventions= or a detector with action "
                          "'suppress'): the sweep compares against the unsteered model, so build it without them")
    try:
        concept = re.compile(keywords, re.IGNORECASE) if keywords else None
    except re.error as exc:
        raise ConfigError(f"--keywords {keywords!r} is not a regular expression: {exc}") from exc
    swept = any(iv.mode != "ablate" for iv in interventions)
    levels: list[float | None] = [None, *([float(s) for s in strengths] if swept else [0.0])]
    targets = _targets(monitor, interventions)
    monitor._compile(list(interventions))  # fail now, with the monitor's message, on a bad hookpoint or unit
    tok = monitor.tokenizer
    rows = [render(r, tok, max_tokens=max_corpus_tokens) for r in (default_corpus() if corpus is None else corpus)]
    rows = [r for r in rows if len(r.ids) > 1]
    if not rows:
        raise ConfigError("the corpus has no record of two or more tokens")
    bar = progress(total=len(levels), desc="steer", unit="strength") if progress else None
    base_corpus = [_logprobs(monitor, r, None) for r in rows]
    points = []
    try:
        for level in levels:
            ivs = [] if level is None else [with_strength(iv, level) for iv in interventions]
            log.info("sweep: strength %s", level)
            points.append(_point(monitor, ivs, level, prompts, rows, base_corpus, targets, concept,
                                 max_new_tokens, chat))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    base_ce = points[0].ce_corpus
    points = [p.model_copy(update={"delta_ce": p.ce_corpus - base_ce}) for p in points]
    n_corpus = sum(int(m.sum()) for m in (_targets_mask(r) for r in rows))
    return SweepResult(interventions=list(interventions), strengths=[float(s) for s in levels[1:] if s is not None],
                       keywords=keywords, max_new_tokens=max_new_tokens, corpus_tokens=n_corpus, points=points)


# ------------------------------------------------------------------ one strength
def _point(monitor: Monitor, ivs: list[Intervention], level: float | None, prompts: Sequence[str],
           rows: list[Rendered], base_corpus: list[tuple[Tensor, Tensor]], targets: list[tuple[str, int]],
           concept: re.Pattern[str] | None, max_new_tokens: int, chat: bool) -> SweepPoint:
    tok = monitor.tokenizer
    results, steered = _generate(monitor, list(prompts), ivs, max_new_tokens, chat)
    eos = _eos_ids(monitor)
    kl_sum, kl_n = 0.0, 0
    act_sum = {t: 0.0 for t in targets}
    act_n = 0
    samples = []
    special = set(getattr(tok, "all_special_ids", []) or [])
    for r, (prompt, res) in enumerate(zip(prompts, results)):
        n = _valid_length(res.token_ids, eos)
        samples.append(Sample(prompt=prompt, text=res.text,
                              matches=None if concept is None else bool(concept.search(res.text))))
        if n == 0:
            continue
        rendered = render_prompt(prompt, tok, chat=chat)
        ids = torch.tensor([rendered.ids + res.token_ids[:n]])
        logp_u, acts = _reference(monitor, ids, targets)
        p0 = len(rendered.ids)
        ls = steered[:n, r]  # (n, vocab) steered log-probs of the steps that chose the n tokens
        lu = logp_u[p0 - 1:p0 - 1 + n]
        kl_sum += float(_kl(ls, lu).sum())
        kl_n += n
        keep = torch.tensor([t not in special for t in res.token_ids[:n]])
        for j, t in enumerate(targets):
            act_sum[t] += float(acts[j][p0:p0 + n][keep].sum())
        act_n += int(keep.sum())
    kl_c, ce_c, n_c = 0.0, 0.0, 0
    for rendered, base in zip(rows, base_corpus):
        lu = base[0]
        ls, nll = _logprobs(monitor, rendered, ivs) if ivs else base
        mask = _targets_mask(rendered)
        kl_c += float(_kl(ls[:-1][mask], lu[:-1][mask]).sum())
        ce_c += float(nll[mask].sum())
        n_c += int(mask.sum())
    pack = monitor.pack
    activation = {f"{hp}:{f}": act_sum[(hp, f)] / max(act_n, 1) for hp, f in targets}
    rel: dict[str, float | None] = {}
    for hp, f in targets:
        unit = pack.max_activation(hp, f) if pack is not None else None
        rel[f"{hp}:{f}"] = activation[f"{hp}:{f}"] / unit if unit else None
    rate = None if concept is None else sum(bool(s.matches) for s in samples) / len(samples)
    return SweepPoint(strength=level, activation=activation, activation_rel=rel,
                      kl_generated=kl_sum / max(kl_n, 1), kl_corpus=kl_c / max(n_c, 1), ce_corpus=ce_c / max(n_c, 1),
                      delta_ce=0.0, concept_rate=rate, samples=samples)


def _generate(monitor: Monitor, prompts: list[str], ivs: list[Intervention], max_new_tokens: int,
              chat: bool) -> tuple[list[Any], Tensor]:
    """Greedy generations, and the log-probs each step chose from ``(steps, batch, vocab)``, read at the LM head."""
    model: Any = monitor.model
    head = model.get_output_embeddings()
    steps: list[Tensor] = []

    def record(_m: Any, _a: Any, out: Tensor) -> None:
        steps.append(torch.log_softmax(out[:, -1, :].detach().float(), dim=-1).cpu())

    with hooked([(head, record)]):
        results = monitor.generate_batch(prompts, max_new_tokens=max_new_tokens, chat=chat, interventions=ivs,
                                         raise_on_block=False, do_sample=False)
    return results, torch.stack(steps)


@torch.inference_mode()
def _reference(monitor: Monitor, ids: Tensor, targets: list[tuple[str, int]]) -> tuple[Tensor, list[Tensor]]:
    """The unsteered model on ``ids`` ``(1, seq)``: log-probs ``(seq, vocab)`` and each target's activations."""
    readouts = {r.hookpoint: r for r in monitor.readouts}
    captured: dict[str, Tensor] = {}

    def grab(hp: str) -> Callable[..., None]:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            captured[hp] = unwrap(out)[0].float()
        return hook

    device = next(monitor.model.parameters()).device
    with hooked([(readouts[hp].module, grab(hp)) for hp in {hp for hp, _ in targets}]):
        logits = monitor.model(input_ids=ids.to(device), use_cache=False).logits[0]
    acts = []
    for hp, f in targets:
        sae = readouts[hp].sae
        assert sae is not None  # _targets checked it
        acts.append(sae.subset([f])(captured[hp])[:, 0].cpu())
    return torch.log_softmax(logits.float(), dim=-1).cpu(), acts


def _logprobs(monitor: Monitor, rendered: Rendered, ivs: list[Intervention] | None) -> tuple[Tensor, Tensor]:
    """Log-probs ``(seq, vocab)`` of one record, steered by ``ivs`` (None: unsteered), and each next token's NLL."""
    ids = torch.tensor([rendered.ids])
    device = next(monitor.model.parameters()).device
    with torch.inference_mode():
        if ivs is None:
            logits = monitor.model(input_ids=ids.to(device), use_cache=False).logits[0]
        else:
            with monitor.session(1, n_prompt=[rendered.n_prompt], content=[rendered.content], interventions=ivs):
                logits = monitor.model(input_ids=ids.to(device), use_cache=False).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    nll = -logp[:-1].gather(1, ids[0, 1:].unsqueeze(1))[:, 0]
    return logp, nll


def _targets_mask(rendered: Rendered) -> Tensor:
    """Which next-token predictions count: those whose target is content (not chat markup)."""
    return torch.tensor(rendered.content[1:], dtype=torch.bool)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Per-row KL(p ‖ q) of log-probability rows."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def _eos_ids(monitor: Monitor) -> set[int]:
    cfg = getattr(monitor.model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        eos = getattr(monitor.tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _valid_length(token_ids: Sequence[int], eos: set[int]) -> int:
    """Generated tokens up to and including the first end-of-sequence (padding after it is not the model's)."""
    for i, t in enumerate(token_ids):
        if t in eos:
            return i + 1
    return len(token_ids)


def _targets(monitor: Monitor, interventions: Sequence[Intervention]) -> list[tuple[str, int]]:
    """The distinct ``(hookpoint, feature)`` pairs the interventions touch, hookpoints canonical."""
    saes = [r.hookpoint for r in monitor.readouts if r.sae is not None]
    out: list[tuple[str, int]] = []
    for iv in interventions:
        hp = sae_hookpoint(iv, saes, lambda name: resolve_hookpoint(monitor.model, name)[0])
        if (hp, iv.feature) not in out:
            out.append((hp, iv.feature))
    return out


def plot(result: SweepResult, path: str | Path) -> Path:
    """Write a PNG of KL / ΔCE and the concept rate against strength (needs matplotlib)."""
    plt = pyplot("--plot")
    pts = [p for p in result.points if p.strength is not None]
    if not pts:
        raise ConfigError("nothing to plot: the sweep has no steered point")
    x = [float(p.strength or 0.0) for p in pts]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    ax.plot(x, [p.kl_generated for p in pts], "o-", label="KL on generated replies")
    ax.plot(x, [p.kl_corpus for p in pts], "s-", label="KL on corpus")
    ax.plot(x, [p.delta_ce for p in pts], "^-", label="ΔCE on corpus")
    ax.set_xlabel("strength (× max activation)" if all(iv.mode != "scale" for iv in result.interventions)
                  else "strength")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if result.keywords:
        ax2 = ax.twinx()
        ax2.plot(x, [float(p.concept_rate or 0.0) for p in pts], "D--", color="tab:red", label="concept rate")
        ax2.set_ylabel("concept rate")
        ax2.set_ylim(-0.05, 1.05)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    names = ", ".join(f"{iv.feature}:{iv.mode}" for iv in result.interventions)
    ax.set_title(f"steering sweep: {names}")
    ax.legend(handles, labels, fontsize=8, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out

