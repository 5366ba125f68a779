"""The monitor: attach to a model, read features as it runs, score detectors, act.

Why it is built this way:

* Hooks are registered once at attach and removed on detach (idempotent, also
  after errors). They do nothing unless a :class:`~featurewatch.session.Session`
  is active in the calling thread/task, so an attached model costs nothing
  outside monitored calls and concurrent runs never see each other's state.
* A forward *pre*-hook on the model records which positions are new (the whole
  prompt at prefill, one token per decode step with a KV cache; only the new
  tail when the cache is off), their token ids and which are attention sinks.
* Each hookpoint hook encodes only the watched features (exact for
  element-wise SAEs), scores every detector at that hookpoint with one matmul,
  moves a few numbers to the host, and updates the per-run pools.
* ``suppress`` ablates the detector's features from the next position on,
  keeping the SAE error term; ``block`` stops generation through a stopping
  criterion and surfaces as :class:`~featurewatch.errors.GenerationBlocked`.
* Faults inside the forward pass are fail-open by default (logged once,
  reported to sinks, run marked degraded); ``on_error="raise"`` makes them fatal.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from .alert import Alert, FeatureEvidence, RunResult
from .detector import DetectorSpec
from .errors import ConfigError, FeatureOutOfRange, GenerationBlocked, MonitorError, WidthMismatch
from .hooks import _StopForward, rewrap, unwrap
from .models import LoadedModel, load_model, model_width, resolve_hookpoint
from .pack import DEFAULT_PACK, Pack, load_pack
from .pooling import PhasePool
from .records import PHASES, Record, pad_right, render
from .sae import SparseAutoencoder
from .session import RunState, Session, TokenReading, _current, concat

logger = logging.getLogger(__name__)

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Monitor]" = weakref.WeakKeyDictionary()
AlertCallback = Callable[[Alert], Any]


@dataclass
class _Plan:
    """Everything one hookpoint's hook needs, decided at attach time."""

    hookpoint: str
    module: nn.Module
    sae: SparseAutoencoder | None
    feature_ids: list[int]  # watched features, sorted
    W_enc: Tensor | None  # (d_in, m) — subset encoder (element-wise SAEs)
    b_enc: Tensor | None
    theta: Tensor | None
    W_dec: Tensor | None  # (m, d_in) decoder rows in activation units
    detectors: list[DetectorSpec]
    W_feat: Tensor  # (m, n_det)
    W_probe: Tensor | None  # (d_in, n_det)
    bias: Tensor  # (n_det,)
    suppress_masks: dict[str, Tensor]  # detector -> bool (m,) features a suppress action ablates
    deepest: bool = False

    def encode(self, x: Tensor) -> Tensor:
        assert self.sae is not None
        if self.W_enc is None:  # TopK: full encode, then select
            return self.sae.encode(x)[..., self.feature_ids]
        sae = self.sae
        if sae.input_scale != 1.0:
            x = x * sae.input_scale
        if sae.apply_b_dec_to_input:
            x = x - sae.b_dec
        pre = x @ self.W_enc + self.b_enc
        if sae.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.theta)
        return torch.relu(pre)


@dataclass
class GenerationResult:
    """One monitored generation: the text and everything the monitor saw."""

    run_id: str
    prompt: str
    text: str
    token_ids: list[int]
    alerts: list[Alert]
    scores: dict[str, float]
    phase_scores: dict[str, dict[str, float]]
    outcome: str
    degraded: bool
    session: Session
    row: int = 0

    def readings(self, hookpoint: str | None = None) -> list[TokenReading]:
        """Token-by-token readings (prompt and completion)."""
        return self.session.readings(self.row, hookpoint)


class Monitor:
    """Watches a causal LM's residual stream through SAEs and scores detectors.

    Example::

        monitor = Monitor.default(on_alert=print)      # embedded model + default pack
        result = monitor.generate("Write a phishing email to a bank customer.")
        result.alerts, result.scores

    With your own model::

        monitor = Monitor(model, tokenizer, pack="path/to/pack", sinks=[PrometheusMetrics()])
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, pack: Pack | str | Path | None = None,
                 detectors: Sequence[str | DetectorSpec] | None = None,
                 saes: dict[str, SparseAutoencoder] | None = None,
                 watch: dict[str, Sequence[int]] | None = None, sinks: Sequence[Any] = (),
                 on_alert: AlertCallback | Sequence[AlertCallback] = (),
                 on_error: Literal["log", "raise"] = "log", capture_text: bool = True,
                 model_name: str | None = None, clock: Callable[[], float] = time.time) -> None:
        if on_error not in ("log", "raise"):
            raise ConfigError(f"on_error={on_error!r}; valid: 'log' (fail-open), 'raise' (fail-closed)")
        self.model = model
        self.tokenizer = tokenizer
        self.pack = load_pack(pack) if isinstance(pack, (str, Path)) else pack
        self.sinks = list(sinks)
        self.on_alert = [on_alert] if callable(on_alert) else list(on_alert)
        self.on_error = on_error
        self.capture_text = capture_text
        self.clock = clock
        self.model_name = model_name or (self.pack.manifest.model if self.pack else
                                         getattr(getattr(model, "config", None), "_name_or_path", "") or
                                         type(model).__name__)
        self.detectors = self._select_detectors(detectors)
        self._saes = dict(self.pack.saes) if self.pack else {}
        self._saes.update(saes or {})
        self._special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
        self._warned: set[tuple[str, str]] = set()
        self._plans = self._compile(watch or {})
        self._handles: list[Any] = []
        self.attach()

    # ------------------------------------------------------------------ building
    @classmethod
    def default(cls, *, model: str | None = None, pack: str | Path = DEFAULT_PACK,
                **kwargs: Any) -> "Monitor":
        """A ready monitor on the embedded SmolLM2-135M-Instruct with the default pack."""
        loaded: LoadedModel = load_model(model)
        return cls(loaded.model, loaded.tokenizer, pack=pack, model_name=loaded.name, **kwargs)

    def _select_detectors(self, detectors: Sequence[str | DetectorSpec] | None) -> list[DetectorSpec]:
        if detectors is None:
            return self.pack.select(None) if self.pack else []
        names = [d for d in detectors if isinstance(d, str)]
        if names and not self.pack:
            raise ConfigError(f"detectors named by string ({', '.join(names)}) need a pack")
        picked = self.pack.select(names) if names else []
        by_name = {d.name: d for d in picked}
        specs = [by_name[d] if isinstance(d, str) else d for d in detectors]
        if len({s.name for s in specs}) != len(specs):
            raise ConfigError("detector names must be unique")
        return specs

    def _compile(self, watch: dict[str, Sequence[int]]) -> list[_Plan]:
        width = model_width(self.model)
        device = next(self.model.parameters()).device
        by_hp: dict[str, list[DetectorSpec]] = {}
        for spec in self.detectors:
            by_hp.setdefault(resolve_hookpoint(self.model, spec.hookpoint)[0], []).append(spec)
        for hp in watch:
            by_hp.setdefault(resolve_hookpoint(self.model, hp)[0], [])
        for hp in self._saes:
            by_hp.setdefault(resolve_hookpoint(self.model, hp)[0], [])
        plans = []
        for hp, specs in by_hp.items():
            name, index, module = resolve_hookpoint(self.model, hp)
            sae = self._saes.get(name)
            if sae is not None:
                if sae.d_in != width:
                    raise WidthMismatch(f"the SAE at {name} reads width {sae.d_in}, but the model's residual "
                                        f"stream is {width} wide: use an SAE trained for this model")
                sae = sae.to(device=device, dtype=torch.float32)
            needed = {f.id for s in specs if s.kind == "sae" for f in s.features}
            needed |= {int(i) for i in watch.get(hp, watch.get(name, []))}
            if needed and sae is None:
                raise ConfigError(f"detectors or watched features at {name} need an SAE there; "
                                  f"SAEs given for: {', '.join(self._saes) or 'none'}")
            if sae is not None and needed and max(needed) >= sae.d_sae:
                raise FeatureOutOfRange(f"feature {max(needed)} is out of range for the SAE at {name} "
                                        f"(features 0 … {sae.d_sae - 1})")
            ids = sorted(needed)
            col = {f: i for i, f in enumerate(ids)}
            n = len(specs)
            W_feat = torch.zeros(len(ids), n)
            W_probe = torch.zeros(width, n) if any(s.kind == "probe" for s in specs) else None
            masks = {}
            for j, spec in enumerate(specs):
                if spec.kind == "sae":
                    for f in spec.features:
                        W_feat[col[f.id], j] = f.weight
                    m = torch.zeros(len(ids), dtype=torch.bool)
                    m[[col[f.id] for f in spec.features if f.weight > 0]] = True
                    masks[spec.name] = m.to(device)
                else:
                    assert self.pack is not None and W_probe is not None
                    W_probe[:, j] = self.pack.probe_weight(spec)
            idx = torch.tensor(ids, dtype=torch.long, device=device)
            elementwise = sae is not None and sae.elementwise and bool(ids)
            plans.append(_Plan(
                hookpoint=name, module=module, sae=sae, feature_ids=ids,
                W_enc=sae.W_enc.index_select(1, idx).contiguous() if elementwise else None,
                b_enc=sae.b_enc.index_select(0, idx) if elementwise else None,
                theta=sae.threshold.index_select(0, idx) if elementwise else None,
                W_dec=sae.decoder_directions(ids).contiguous() if sae is not None and ids else None,
                detectors=specs, W_feat=W_feat.to(device),
                W_probe=None if W_probe is None else W_probe.to(device),
                bias=torch.tensor([s.bias for s in specs], dtype=torch.float32, device=device),
                suppress_masks=masks,
            ))
        plans.sort(key=lambda p: int(p.hookpoint.split(".")[1]))
        if plans:
            plans[-1].deepest = True
        return plans

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def hookpoints(self) -> list[str]:
        return [p.hookpoint for p in self._plans]

    def attach(self) -> "Monitor":
        """Register the hooks (done by the constructor); attaching twice is a no-op."""
        if self._handles:
            return self
        other = _ATTACHED.get(self.model)
        if other is not None and other is not self:
            raise ConfigError("another Monitor is already attached to this model; call its detach() first")
        self._handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for plan in self._plans:
            self._handles.append(plan.module.register_forward_hook(self._make_hook(plan)))
        _ATTACHED[self.model] = self
        self._emit("on_attach", model_name=self.model_name, detectors=self.detectors)
        return self

    def detach(self) -> None:
        """Remove every hook; safe to call more than once."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
            self._emit("on_detach")

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # ------------------------------------------------------------------ sessions
    def session(self, batch_size: int = 1, *, top_k: int = 0, n_prompt: list[int] | None = None,
                run_ids: list[str] | None = None, stop_after_deepest: bool = False) -> Session:
        """A session for driving the model yourself (``with monitor.session() as s: model(...)``)."""
        if not self._handles:
            raise ConfigError("the monitor is detached; call attach() first")
        s = Session(batch_size, top_k=top_k, capture_text=self.capture_text, n_prompt=n_prompt,
                    run_ids=run_ids, stop_after_deepest=stop_after_deepest, clock=self.clock)
        s._monitor = self
        for row in s.rows:
            for spec in self.detectors:
                for phase in spec.phases:
                    row.pools[(spec.name, phase)] = PhasePool(spec.pooling, spec.threshold,
                                                              spec.hysteresis, spec.cooldown_tokens)
                row.combined[spec.name] = PhasePool(spec.pooling, spec.threshold)
            self._emit("on_run_start", run_id=row.run_id, model_name=self.model_name)
        return s

    def _end_session(self, session: Session, *, error: bool) -> None:
        session.outcome_error = error
        if not error:
            plans = {spec.name: plan for plan in self._plans for spec in plan.detectors}
            for row in session.rows:
                for spec in self.detectors:
                    for phase in spec.phases:
                        pool = row.pools[(spec.name, phase)]
                        if not row.blocked and pool.final():
                            self._fire(plans[spec.name], session, row, spec, phase, pool, pool.last_pos,
                                       final=True)
        for result in session.results():
            self._emit("on_run_end", result)

    def _run_result(self, session: Session, row: RunState) -> RunResult:
        scores = {name: pool.value for name, pool in row.combined.items() if pool.n}
        phase_scores: dict[str, dict[str, float]] = {}
        for (name, phase), pool in row.pools.items():
            if pool.n:
                phase_scores.setdefault(phase, {})[name] = pool.value
        outcome = "error" if session.outcome_error else "blocked" if row.blocked else "completed"
        return RunResult(run_id=row.run_id, model_name=self.model_name, outcome=outcome, scores=scores,
                         phase_scores=phase_scores, alerts=list(row.alerts), n_tokens=len(row.token_ids),
                         degraded=row.degraded, started_at=row.started_at, ended_at=self.clock())

    # ------------------------------------------------------------------ hot path
    def _pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        session = _current.get()
        if session is None:
            return
        try:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            length = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
            start = session.n_seen
            # prefill, or a cached decode step: every position is new; with the cache off the
            # model sees the whole sequence again and only its tail is new
            n_new = length if start == 0 or length <= start else length - start
            session.step_start, session.step_new = start, n_new
            session.step_seconds = 0.0
            batch = len(session.rows)
            new_ids = ids[:, -n_new:].cpu() if ids is not None else torch.full((batch, n_new), -1)
            excluded = torch.isin(new_ids, self._special)
            if mask is not None:
                if session.first_real is None:
                    session.first_real = mask.long().argmax(dim=1).cpu()
                excluded |= mask[:, start:start + n_new].cpu() == 0
            elif session.first_real is None:
                session.first_real = torch.zeros(batch, dtype=torch.long)
            positions = torch.arange(start, start + n_new)
            excluded |= positions.unsqueeze(0) == session.first_real.unsqueeze(1)
            session.step_excluded = excluded
            for r, row in enumerate(session.rows):
                if row.n_prompt is None:
                    row.n_prompt = start + n_new
                row.token_ids.extend(new_ids[r].tolist())
                row.excluded.extend(excluded[r].tolist())
                row.phases.extend("prompt" if p < row.n_prompt else "completion" for p in positions.tolist())
            session.n_seen = start + n_new
        except Exception as exc:  # noqa: BLE001 — fail-open policy, see module docstring
            self._fault(session, "pre_hook", exc)

    def _make_hook(self, plan: _Plan) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            session = _current.get()
            if session is None:
                return None
            t0 = time.perf_counter()
            result = None
            try:
                result = self._process(plan, session, output)
            except MonitorError:
                raise
            except Exception as exc:  # noqa: BLE001 — fail-open policy
                self._fault(session, "hook", exc)
            session.step_seconds += time.perf_counter() - t0
            if plan.deepest:
                self._emit("on_forward", model_name=self.model_name, seconds=session.step_seconds,
                           tokens=session.step_new * len(session.rows))
                if session.stop_after_deepest:
                    raise _StopForward
            return result

        return hook

    def _process(self, plan: _Plan, session: Session, output: Any) -> Any:
        hidden = unwrap(output)
        n_new = session.step_new
        x = hidden[:, -n_new:, :].float()
        changed = None
        feats = plan.encode(x) if plan.feature_ids else x.new_zeros(x.shape[0], n_new, 0)
        # suppress: ablate features of detectors that fired, keeping the SAE error term
        for r, row in enumerate(session.rows):
            mask = row.suppressed.get(plan.hookpoint)
            if mask is not None and plan.W_dec is not None:
                keep = ~session.step_excluded[r].to(x.device)
                delta = (-(feats[r] * mask)) @ plan.W_dec  # (n_new, d)
                if changed is None:
                    changed = hidden.clone()
                changed[r, -n_new:] += (delta * keep.unsqueeze(-1)).to(hidden.dtype)
        if plan.detectors:
            scores = feats @ plan.W_feat + plan.bias
            if plan.W_probe is not None:
                scores = scores + x @ plan.W_probe
            scores_cpu = scores.cpu()
        feats_cpu = feats.cpu()
        top = None
        if session.top_k and plan.sae is not None:
            full = plan.sae.encode(x)
            vals, idx = full.topk(min(session.top_k, plan.sae.d_sae), dim=-1)
            top = (vals.cpu(), idx.cpu())
        start = session.step_start
        for r, row in enumerate(session.rows):
            row.watched.setdefault(plan.hookpoint, []).append(feats_cpu[r])
            if top is not None:
                row.top.setdefault(plan.hookpoint, []).append((top[0][r], top[1][r]))
            excluded = row.excluded[start:start + n_new]
            phases = row.phases[start:start + n_new]
            for phase in PHASES:
                sel = [i for i in range(n_new) if not excluded[i] and phases[i] == phase]
                if sel:
                    key = (plan.hookpoint, phase)
                    s = feats_cpu[r, sel].sum(0)
                    row.feature_sums[key] = row.feature_sums[key] + s if key in row.feature_sums else s
                    row.feature_counts[key] = row.feature_counts.get(key, 0) + len(sel)
            if plan.detectors and not row.blocked:
                self._pool(plan, session, row, scores_cpu[r], start, excluded, phases)
        return None if changed is None else rewrap(output, changed)

    def _pool(self, plan: _Plan, session: Session, row: RunState, scores: Tensor, start: int,
              excluded: list[bool], phases: list[str]) -> None:
        table = scores.tolist()  # (n_new, n_det)
        last = {phase: i for i, phase in enumerate(phases) if not excluded[i]}  # judge each phase once per pass
        for j, spec in enumerate(plan.detectors):
            combined = row.combined[spec.name]
            for i, token_scores in enumerate(table):
                phase = phases[i]
                pool = row.pools.get((spec.name, phase))
                if excluded[i] or pool is None:
                    continue
                s = token_scores[j]
                combined.update(s, start + i, check=False)
                if pool.update(s, start + i, check=last[phase] == i):
                    self._fire(plan, session, row, spec, phase, pool, start + i)

    def _fire(self, plan: _Plan, session: Session, row: RunState, spec: DetectorSpec, phase: str,
              pool: PhasePool, position: int, final: bool = False) -> None:
        span = pool.span(position)
        text = None
        if session.capture_text and self.tokenizer is not None:
            text = self.tokenizer.decode([t for t in row.token_ids[span[0]:span[1]] if t >= 0])
        alert = Alert(detector=spec.name, phase=phase, score=pool.value, threshold=spec.threshold,  # type: ignore[arg-type]
                      action=spec.action, severity=spec.severity, run_id=row.run_id, model_name=self.model_name,
                      span=span, text=text, evidence=self._evidence(plan, row, spec, phase),
                      started_at=row.started_at, fired_at=self.clock())
        row.alerts.append(alert)
        if not final:  # at the end of a run there is nothing left to suppress or stop
            if spec.action == "block":
                row.blocked = True
            elif spec.action == "suppress" and spec.name in plan.suppress_masks:
                current = row.suppressed.get(plan.hookpoint)
                mask = plan.suppress_masks[spec.name]
                row.suppressed[plan.hookpoint] = mask if current is None else current | mask
        for callback in self.on_alert:
            try:
                callback(alert)
            except Exception as exc:  # noqa: BLE001 — a user callback must not kill generation
                self._fault(session, "callback", exc)
        self._emit("on_alert", alert)

    def _evidence(self, plan: _Plan, row: RunState, spec: DetectorSpec, phase: str, top: int = 5
                  ) -> list[FeatureEvidence]:
        key = (plan.hookpoint, phase)
        if spec.kind != "sae" or key not in row.feature_sums:
            return []
        mean = row.feature_sums[key] / max(1, row.feature_counts[key])
        col = {f: i for i, f in enumerate(plan.feature_ids)}
        items = [(f.weight * float(mean[col[f.id]]), f, float(mean[col[f.id]])) for f in spec.features]
        items = [it for it in items if it[0] > 0]
        items.sort(key=lambda it: -it[0])
        return [FeatureEvidence(feature=f.id, label=f.label or (self.pack.label(plan.hookpoint, f.id)
                                                               if self.pack else None),
                                activation=act, contribution=c) for c, f, act in items[:top]]

    # ------------------------------------------------------------------ faults and sinks
    def _fault(self, session: Session | None, stage: str, exc: BaseException) -> None:
        if self.on_error == "raise":
            raise MonitorError(f"monitoring fault in {stage}: {type(exc).__name__}: {exc}") from exc
        key = (stage, type(exc).__name__)
        if key not in self._warned:
            self._warned.add(key)
            logger.error("featurewatch %s fault (run continues unmonitored where needed): %s", stage, exc,
                         exc_info=exc)
        if session is not None:
            for row in session.rows:
                row.degraded = True
        self._emit("on_error", stage=stage, error=exc)

    def _emit(self, method: str, *args: Any, **kwargs: Any) -> None:
        for sink in self.sinks:
            fn = getattr(sink, method, None)
            if fn is None:
                continue
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 — sinks never break generation
                if self.on_error == "raise":
                    raise MonitorError(f"sink {type(sink).__name__}.{method} failed: {exc}") from exc
                key = (f"sink:{type(sink).__name__}.{method}", type(exc).__name__)
                if key not in self._warned:
                    self._warned.add(key)
                    logger.error("featurewatch sink %s.%s failed: %s", type(sink).__name__, method, exc)
                if method != "on_error":
                    for other in self.sinks:
                        if other is not sink and hasattr(other, "on_error"):
                            try:
                                other.on_error(stage="sink", error=exc)
                            except Exception:  # noqa: BLE001
                                pass

    # ------------------------------------------------------------------ readings
    def _readings(self, session: Session, row: RunState, hookpoint: str | None) -> list[TokenReading]:
        plan = self._plans[0] if hookpoint is None else next(
            (p for p in self._plans if p.hookpoint == hookpoint), None)
        if plan is None:
            raise ConfigError(f"no readings at {hookpoint!r}; watched hookpoints: {', '.join(self.hookpoints)}")
        watched = concat(row.watched.get(plan.hookpoint, []), len(plan.feature_ids))
        tops = row.top.get(plan.hookpoint, [])
        top_vals = torch.cat([t[0] for t in tops]) if tops else None
        top_ids = torch.cat([t[1] for t in tops]) if tops else None
        out = []
        for pos, tid in enumerate(row.token_ids[: watched.shape[0]]):
            acts = watched[pos]
            nz = acts.nonzero().flatten().tolist()
            top = []
            if top_vals is not None and top_ids is not None:
                top = [(int(i), float(v)) for v, i in zip(top_vals[pos], top_ids[pos]) if v > 0]
            text = self.tokenizer.decode([tid]) if self.tokenizer is not None and tid >= 0 else ""
            out.append(TokenReading(pos, tid, text, row.phases[pos], row.excluded[pos],
                                    {plan.feature_ids[i]: float(acts[i]) for i in nz}, top))
        return out

    # ------------------------------------------------------------------ generation
    def _encode_prompts(self, prompts: Sequence[str | Sequence[dict[str, str]]], chat: bool) -> Any:
        tok = self.tokenizer
        if tok is None:
            raise ConfigError("generate() needs the tokenizer; pass it to Monitor(model, tokenizer, ...)")
        texts = []
        for p in prompts:
            if isinstance(p, str) and not (chat and tok.chat_template):
                texts.append(p)
            else:
                msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
                texts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        finally:
            tok.padding_side = side
        return enc.to(next(self.model.parameters()).device), texts

    def generate(self, prompt: str | Sequence[dict[str, str]], **kwargs: Any) -> GenerationResult:
        """Generate for one prompt (a string, or chat messages) with monitoring."""
        return self.generate_batch([prompt], **kwargs)[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[dict[str, str]]], *, max_new_tokens: int = 64,
                       chat: bool = True, top_k: int = 0, raise_on_block: bool = True,
                       **generate_kwargs: Any) -> list[GenerationResult]:
        """Generate for several prompts at once (left padding, KV cache) with monitoring."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        if not prompts:
            raise ConfigError("generate_batch() needs at least one prompt")
        enc, texts = self._encode_prompts(prompts, chat)
        width = enc["input_ids"].shape[1]
        session = self.session(len(prompts), top_k=top_k, n_prompt=[width] * len(prompts))

        class _Block(StoppingCriteria):
            def __call__(self, input_ids: Tensor, scores: Any, **kw: Any) -> Tensor:
                return torch.tensor([row.blocked for row in session.rows], device=input_ids.device)

        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with session:
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens,
                                      stopping_criteria=StoppingCriteriaList([_Block()]), **generate_kwargs)
        results = []
        for r, row in enumerate(session.rows):
            new = out[r, width:].tolist()
            run = self._run_result(session, row)
            results.append(GenerationResult(
                run_id=row.run_id, prompt=texts[r], text=self.tokenizer.decode(new, skip_special_tokens=True),
                token_ids=new, alerts=run.alerts, scores=run.scores, phase_scores=run.phase_scores,
                outcome=run.outcome, degraded=run.degraded, session=session, row=r))
        blocked = [res for res in results if res.outcome == "blocked"]
        if raise_on_block and blocked:
            alert = next(a for a in blocked[0].alerts if a.action == "block")
            raise GenerationBlocked(alert, blocked[0] if len(results) == 1 else results)
        return results

    # ------------------------------------------------------------------ offline scoring
    def score_records(self, records: Iterable[Record], *, batch_size: int = 8, max_tokens: int = 512,
                      on_batch: Callable[[int], Any] | None = None) -> Iterator[tuple[Record, RunResult]]:
        """Score records (DESIGN.md §4.1) in order; the forward stops after the deepest watched layer."""
        if self.tokenizer is None:
            raise ConfigError("score_records() needs the tokenizer")
        batch: list[Record] = []
        for record in records:
            batch.append(record)
            if len(batch) == batch_size:
                yield from self._score_batch(batch, max_tokens)
                if on_batch:
                    on_batch(len(batch))
                batch = []
        if batch:
            yield from self._score_batch(batch, max_tokens)
            if on_batch:
                on_batch(len(batch))

    def _score_batch(self, batch: list[Record], max_tokens: int) -> Iterator[tuple[Record, RunResult]]:
        rendered = [render(r, self.tokenizer, max_tokens=max_tokens) for r in batch]
        ids, mask = pad_right([r.ids for r in rendered], self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        session = self.session(len(batch), n_prompt=[r.n_prompt for r in rendered], stop_after_deepest=True)
        with session, torch.inference_mode():
            try:
                self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _StopForward:
                pass
        for record, run in zip(batch, session.results()):
            yield record, run
