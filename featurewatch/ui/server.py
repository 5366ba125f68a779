"""The page's server: static assets, a JSON API and server-sent events from live monitored generations.

Why it is built this way:

* One :class:`UIApp` wraps one attached :class:`~featurewatch.monitor.Monitor`. Each
  generation runs in its own thread with its own run id; the monitor keeps each
  thread's session apart (a context variable), so two tabs generating at once see
  only their own tokens. The app is a monitor *sink*: after each forward pass
  (``on_forward``, called in the generating thread) it reads the new tokens and
  their per-token detector scores from the current session
  (:func:`~featurewatch.scoring.token_rows`, the rows ``score --token-scores`` writes) and appends
  them to that run's event list; alerts arrive through an ``on_alert`` callback and are routed
  by run id. Nothing is recomputed for the page: it shows what the pools read, a token's
  contributions are :func:`~featurewatch.detection.contributions`, the context check is
  generation's (:func:`~featurewatch.generation.check_context`), and a score file is read by
  :func:`~featurewatch.records.json_lines`.
* A run's events are kept in a list (not a queue), so a page that reconnects
  (``Last-Event-ID``) or subscribes late gets every event. A run can be cancelled:
  a stopping criterion next to ``block``'s ends it after the decode step in flight, and
  the run ends ``aborted`` (given up on, not completed).
* HTTP is a maintained stack: Starlette routes on uvicorn (its ``h11`` parser frames
  every request, so a body is never read as a second request), and
  ``sse-starlette`` streams the events. :class:`Guard`, the one middleware, holds the
  page's rules: the ``Host`` must be a name of this server (DNS rebinding), a
  state-changing request must come from the page's own origin (``Origin``,
  ``Sec-Fetch-Site``), the token when there is one, and every error is JSON
  ``{"error", "status"}`` sent with ``Connection: close``.
* Bad input is a 4xx naming the problem, never a traceback: bodies are bounded
  before they are read, JSON is parsed with non-finite numbers, lone surrogates and
  deep nesting refused.

The API is documented in docs/architecture.md ("The page's JSON API").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

from pydantic import ValidationError

from ..alert import finite
from ..errors import ConfigError, FeatureWatchError, GenerationBlocked, PortInUse, RecordError
from ..models import normalize_hookpoint
from ..records import BadNumber, finite_float, reject_constant
from ..sinks import BaseSink

EXTRA_HINT = "pip install 'featurewatch[ui]'"
try:
    import uvicorn
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers, MutableHeaders
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import RedirectResponse, Response
    from starlette.routing import Route
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ModuleNotFoundError as exc:  # the web stack is the `ui` extra
    raise ModuleNotFoundError(f"the page's web server needs {exc.name!r}, which is not installed: {EXTRA_HINT}",
                              name=exc.name) from exc

if TYPE_CHECKING:
    from torch import Tensor

    from ..alert import Alert
    from ..monitor import Monitor
    from ..session import Session

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::")
TOKEN_ENV = "FEATUREWATCH_UI_TOKEN"  # the CLI reads the token from here when --token is not given
MIN_TOKEN = 16  # characters; `python -c 'import secrets; print(secrets.token_urlsafe())'` gives 43
MAX_BODY = 1 << 20  # 1 MiB for a prompt
MAX_SCORES_BODY = 64 << 20  # a dropped score file
MAX_DEPTH = 32  # JSON nesting of a request
MAX_INT_DIGITS = 16  # integers in a request (ids, counts): beyond 2**53 nothing here is meaningful
MAX_STEER = 1000.0  # |value| of a steer request (× the feature's max activation)
CANCEL_WAIT = 30.0  # seconds a cancel waits for its run to end (one decode step in practice)
TOP_FEATURES = 8  # strongest features kept per token for the inspector
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
_DIGITS = re.compile(r"[0-9]+")  # not str.isdigit(): it takes "²", which int() refuses
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")  # URL-unreserved: safe in ?token=, a header and a cookie
_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # a ?token= in the address never leaves in a Referer
    "x-frame-options": "DENY",
}


class HTTPError(Exception):
    """An answer other than 200: a status and a message for the page."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> HTTPError:
    return HTTPError(HTTPStatus.BAD_REQUEST, message)


def not_found(message: str) -> HTTPError:
    return HTTPError(HTTPStatus.NOT_FOUND, message)


def static_file(name: str) -> bytes | None:
    """A shipped asset's bytes, or None (names are plain file names: no directories)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    entry = resources.files("featurewatch.ui").joinpath("static").joinpath(name)
    return entry.read_bytes() if entry.is_file() else None


# --------------------------------------------------------------------------- JSON in and out
def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadNumber(f"the integer {text[:20]}… has more than {MAX_INT_DIGITS} digits")
    return int(text)


def check_json_value(value: Any, *, what: str = "the request") -> None:
    """Refuse what a parser lets through but the model or the answer cannot take: nesting deeper than
    :data:`MAX_DEPTH`, lone surrogates (``"\\ud800"``) in strings or keys, non-finite floats."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, str):
            _check_text(item, where or "the body", what)
        elif isinstance(item, float) and not math.isfinite(item):
            raise bad_request(f"{what} has a non-finite number ({item}) at {where or 'the top'}; send a finite number")
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_text(k, f"{where}.{k}" if where else "a key", what)
                stack.append((v, f"{where}.{k}" if where else str(k), depth + 1))
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item))


def _check_text(text: str, where: str, what: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise bad_request(f"{what} has a lone surrogate (\\u{ord(bad):04x}) in {where!r} at character {exc.start}: "
                          "send valid Unicode text") from None


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; 400 naming the problem otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=reject_constant, parse_float=finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise bad_request(f"the request is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except BadNumber as exc:
        raise bad_request(f"the request has a bad number: {exc}; send a finite number") from None
    except ValueError as exc:  # JSONDecodeError and int() limits
        raise bad_request(f"the request is not valid JSON ({exc})") from None
    check_json_value(body)
    if not isinstance(body, dict):
        raise bad_request("the request is a JSON object")
    return body


def json_bytes(obj: Any) -> bytes:
    """An answer as standard JSON: non-finite floats as ``null`` (:func:`~featurewatch.alert.finite`)."""
    text = json.dumps(finite(obj), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a decoder: escaped, still valid JSON
        return json.dumps(finite(obj), ensure_ascii=True, allow_nan=False).encode("ascii")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_bytes(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """Every error: ``{"error": message, "status": N}``; the connection closes after it, so a body the
    server did not read is never parsed as another request."""
    return json_response({"error": message, "status": status}, status, {**(headers or {}), "connection": "close"})


def _get_or_zero(values: dict[int, float], key: int) -> float:
    return values.get(key, 0.0)


# --------------------------------------------------------------------------- runs
class _Cancelled:
    """A stopping criterion for ``model.generate``, next to :class:`~featurewatch.generation.StopBlocked`:
    once ``event`` is set, generation stops after the decode step in flight, and its run ends ``aborted``
    (the page gave up on it: :meth:`~featurewatch.session.Session.abort`)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.fired = False

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        import torch

        from ..session import current_session

        stop = self.event.is_set()
        if stop and not self.fired and (session := current_session()) is not None:
            session.abort()
        self.fired = self.fired or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


@dataclass
class Run:
    """One live generation: its events (kept for late or reconnecting readers) and what it ends with."""

    id: str
    prompt: Any
    chat: bool
    started_at: float
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    done: bool = False
    sent: int = 0  # positions already sent as tokens
    pending: list[dict[str, Any]] = field(default_factory=list)  # alerts waiting for their step's tokens
    session: Session | None = None
    readings: dict[str, list[Any]] | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # the cancel stopped the generation (it did not end on its own)
    _waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=set)

    def push(self, kind: str, data: dict[str, Any]) -> None:
        with self.cond:
            self.events.append((kind, data))
            self.cond.notify_all()
        self.wake()

    def finish(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()
        self.wake()

    def wake(self) -> None:
        """Wake the event streams waiting on this run (they run on the server's event loop)."""
        with self.cond:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(event.set)

    async def follow(self, start: int, stop: Callable[[], bool] = lambda: False
                     ) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
        """Events from index ``start`` as they come, until the run is done (or ``stop()``)."""
        loop = asyncio.get_running_loop()
        i = start
        while True:
            waiter = (loop, asyncio.Event())
            with self.cond:
                batch = self.events[i:]
                done = self.done
                if not batch and not done:
                    self._waiters.add(waiter)
            if batch:
                for kind, data in batch:
                    yield i, kind, data
                    i += 1
                continue
            if done or stop():
                return
            try:
                await waiter[1].wait()
            finally:
                with self.cond:
                    self._waiters.discard(waiter)


class UIApp(BaseSink):
    """The page's logic over one monitor: validation, runs, the JSON answers. :class:`UIServer` serves it."""

    def __init__(self, monitor: Monitor, *, max_new_tokens: int = 256, max_runs: int = 64,
                 max_parallel: int = 2) -> None:
        self.monitor = monitor
        self.pack = monitor.pack
        self.max_new_tokens = max_new_tokens
        self.max_runs = max_runs
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_parallel)
        monitor.sinks.append(self)
        monitor.on_alert.append(self._on_alert)

    def close(self) -> None:
        """Cancel the runs still generating and stop receiving the monitor's events (the monitor stays attached)."""
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            run.cancel.set()
            run.wake()
        if self in self.monitor.sinks:
            self.monitor.sinks.remove(self)
        if self._on_alert in self.monitor.on_alert:
            self.monitor.on_alert.remove(self._on_alert)

    # ------------------------------------------------------------------ what the page asks for
    def info(self) -> dict[str, Any]:
        """Model, pack, hookpoints and the monitor's detectors with their thresholds per phase."""
        m = self.monitor
        return {
            "model": m.model_name, "pack": self.pack.name if self.pack else None,
            "hookpoints": m.hookpoints, "max_new_tokens": self.max_new_tokens,
            "chat_template": bool(getattr(m.tokenizer, "chat_template", None)),
            "detectors": [{"name": d.name, "description": d.description, "kind": d.kind,
                           "hookpoint": normalize_hookpoint(d.hookpoint),
                           "phases": list(d.phases), "action": d.action, "severity": d.severity,
                           "thresholds": {p: d.threshold_for(p) for p in d.phases}, "bias": d.bias}
                          for d in m.detectors],
        }

    def _detector_names(self, body: dict[str, Any]) -> list[str]:
        names = [d.name for d in self.monitor.detectors]
        chosen = body.get("detectors")
        if chosen is None:
            return names
        if not isinstance(chosen, list) or not all(isinstance(c, str) for c in chosen):
            raise bad_request("'detectors' is a list of detector names")
        unknown = [c for c in chosen if c not in names]
        if unknown:
            raise bad_request(f"unknown detector {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
        return chosen

    def _prompt(self, body: dict[str, Any]) -> tuple[Any, bool, int]:
        """Validate a prompt request: ``(prompt, chat, max_new_tokens)``; 400 naming the fix otherwise."""
        from ..generation import check_context, render_prompt

        prompt = body.get("prompt", body.get("messages"))
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise bad_request("empty prompt: type some text")
        chat = body.get("chat", True)
        if not isinstance(chat, bool):
            raise bad_request("'chat' is true or false")
        n = body.get("max_new_tokens", 48)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_new_tokens:
            raise bad_request(f"max_new_tokens must be an integer in 1..{self.max_new_tokens}, got {n!r}")
        try:
            rendered = render_prompt(prompt, self.monitor.tokenizer, chat=chat)
            check_context(self.monitor.model, len(rendered.ids), n)
        except ConfigError as exc:
            raise bad_request(str(exc)) from None
        return prompt, chat, n

    def start_run(self, body: dict[str, Any]) -> Run:
        """Validate, then generate in a thread; the run's events stream from :meth:`Run.follow`."""
        prompt, chat, n = self._prompt(body)
        self._detector_names(body)
        if not self._slots.acquire(blocking=False):
            raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, "the model is busy with other generations; try again "
                                                          "when one ends")
        run = Run(id=uuid.uuid4().hex, prompt=prompt, chat=chat, started_at=time.time())
        with self._lock:
            self.runs[run.id] = run
            while len(self.runs) > self.max_runs:
                old_id, old = next(iter(self.runs.items()))
                if not old.done:
                    break
                del self.runs[old_id]
        threading.Thread(target=self._generate, args=(run, n), name=f"featurewatch-ui-{run.id[:8]}",
                         daemon=True).start()
        return run

    def run(self, run_id: str) -> Run:
        with self._lock:
            run = self.runs.get(run_id)
        if run is None:
            raise not_found(f"no run {run_id!r} (runs are kept while the server runs, the last {self.max_runs})")
        return run

    def _generate(self, run: Run, max_new_tokens: int) -> None:
        stop = _Cancelled(run.cancel)
        try:
            try:
                result = self.monitor.generate(run.prompt, chat=run.chat, max_new_tokens=max_new_tokens,
                                               top_features=TOP_FEATURES, run_id=run.id, stopping_criteria=[stop])
            except GenerationBlocked as blocked:
                result = blocked.results[0]
            run.session = result.session
            run.cancelled = stop.fired
            self._flush(run, result.session)
            done: dict[str, Any] = {"outcome": result.outcome, "degraded": result.degraded, "text": result.text,
                                    "scores": result.scores, "phase_scores": result.phase_scores,
                                    "n_alerts": len(result.alerts), "cancelled": run.cancelled}
            # the last generated token is never read by the model (generation ends before its forward pass)
            row = result.session.rows[0]
            unread = []
            n_prompt = len(row.token_ids) - sum(row.completion)
            for i, tid in enumerate(result.token_ids):
                pos = n_prompt + i
                if pos >= run.sent:
                    unread.append({"p": pos, "t": self._decode(tid), "ph": "completion", "x": True, "s": {}})
            done["unread"] = unread
            run.push("done", done)
        except Exception as exc:  # noqa: BLE001 — the page gets a message; the log gets the traceback
            logger.exception("featurewatch ui: generation %s failed", run.id)
            message = str(exc) if isinstance(exc, FeatureWatchError) else f"generation failed: {type(exc).__name__}"
            run.push("failed", {"error": message})
        finally:
            self._slots.release()
            run.finish()

    def cancel(self, run_id: str, *, wait: float = CANCEL_WAIT) -> dict[str, Any]:
        """Stop a run's generation after the decode step in flight; answer once it has ended (its slot is free)."""
        run = self.run(run_id)
        run.cancel.set()
        with run.cond:
            run.cond.wait_for(lambda: run.done, timeout=wait)
        return {"run_id": run.id, "done": run.done, "cancelled": run.cancelled}

    def _decode(self, token_id: int) -> str:
        tok = self.monitor.tokenizer
        return tok.decode([token_id]) if tok is not None else str(token_id)

    # ------------------------------------------------------------------ sink: the generating thread
    def on_forward(self, *, model_name: str, seconds: float, tokens: int) -> None:
        from ..session import current_session

        session = current_session()
        if session is None or len(session.rows) != 1:
            return
        with self._lock:
            run = self.runs.get(session.rows[0].run_id)
        if run is not None:
            self._flush(run, session)

    def _on_alert(self, alert: Alert) -> None:
        with self._lock:
            run = self.runs.get(alert.run_id)
        if run is None:
            return
        data = alert.model_dump(mode="json")
        data["position"] = max(alert.span[1] - 1, 0)  # the token after which it fired
        run.pending.append(data)

    def _flush(self, run: Run, session: Session) -> None:
        """Send the tokens read since the last step (:func:`~featurewatch.scoring.token_rows`, as
        ``score --token-scores`` writes them), then the alerts they fired."""
        from ..scoring import token_rows

        end = len(session.rows[0].token_ids)
        if end > run.sent:
            tokens = [t.model_dump() for t in token_rows(session, 0, start=run.sent, stop=end)]
            run.sent = end
            run.push("tokens", {"tokens": tokens})
        pending, run.pending = run.pending, []
        for alert in pending:
            alert["sent_at"] = time.time()
            run.push("alert", alert)

    # ------------------------------------------------------------------ inspector, cards
    def token(self, run_id: str, position: int) -> dict[str, Any]:
        """A token's strongest SAE features with each one's contribution to each detector's token score."""
        from ..detection import contributions

        run = self.run(run_id)
        if not run.done or run.session is None:
            raise HTTPError(HTTPStatus.CONFLICT, "the run is still generating; inspect its tokens when it ends")
        with run.cond:
            if run.readings is None:
                run.readings = {r.hookpoint: run.session.readings(0, r.hookpoint)
                                for r in self.monitor.readouts if r.sae is not None}
        scores = run.session.token_scores(0)
        n = len(run.session.rows[0].token_ids)
        if not 0 <= position < n:
            raise not_found(f"position {position} is not a read token of run {run_id}; it has 0 … {n - 1}")
        out: dict[str, Any] = {"position": position, "scores": {k: v[position] for k, v in scores.items()
                                                                if position < len(v)}, "hookpoints": []}
        for readout in self.monitor.readouts:
            readings = (run.readings or {}).get(readout.hookpoint)
            if not readings or position >= len(readings):
                continue
            r = readings[position]
            out.update(token=r.text, phase=r.phase, excluded=r.excluded)
            acts = {**r.features, **dict(r.top)}
            activation = partial(_get_or_zero, acts)
            parts = {d.name: {f.id: c for f, _, c in contributions(d, activation)}
                     for d in readout.detectors if d.kind == "sae"}  # wᵢ·aᵢ at this token
            totals = {name: sum(abs(c) for c in cs.values()) for name, cs in parts.items()}
            features = []
            for f, a in sorted(acts.items(), key=lambda kv: -kv[1]):
                by_detector = {name: cs[f] for name, cs in parts.items() if f in cs}
                pack, hp = self.pack, readout.hookpoint
                features.append({"feature": f, "activation": a, "label": pack.label(hp, f) if pack else None,
                                 "max_activation": pack.max_activation(hp, f) if pack else None,
                                 "contributions": by_detector,
                                 "shares": {k: (abs(c) / totals[k] if totals[k] else None)
                                            for k, c in by_detector.items()}})
            out["hookpoints"].append({"hookpoint": readout.hookpoint, "features": features})
        return out

    def feature(self, hookpoint: str, feature_text: str) -> dict[str, Any]:
        """The feature card: label, statistics, top contexts, the detectors that read it."""
        if self.pack is None:
            raise not_found("this monitor has no pack, so no feature statistics")
        try:
            feature = int(feature_text)
        except ValueError:
            raise not_found(f"feature id {feature_text!r} is not an integer") from None
        try:
            return self.pack.feature_summary(hookpoint, feature)
        except FeatureWatchError as exc:
            raise not_found(str(exc)) from None

    def detector(self, name: str) -> dict[str, Any]:
        """The detector card: ``featurewatch explain`` as data, thresholds per phase, the calibration block."""
        from ..calibration.report import explain

        if self.pack is None or name not in self.pack.detectors:
            valid = sorted(self.pack.detectors) if self.pack else []
            raise not_found(f"no detector {name!r}; valid: {', '.join(valid) or 'none'}")
        spec = self.pack.detectors[name]
        infos = {i: info.model_dump() for i, info in self.pack.features.get(spec.hookpoint, {}).items()}
        out = explain(spec.model_dump(), infos, contexts=3)
        out.update(description=spec.description, hookpoint=spec.hookpoint, phases=list(spec.phases),
                   thresholds={p: spec.threshold_for(p) for p in spec.phases}, action=spec.action,
                   severity=spec.severity, min_tokens=spec.pooling.min_tokens,
                   prior_score=spec.pooling.prior_score, prior_tokens=spec.pooling.prior_tokens,
                   calibration=spec.calibration.model_dump(mode="json") if spec.calibration else None,
                   active=name in {d.name for d in self.monitor.detectors})
        return out

    def steer(self, body: dict[str, Any]) -> dict[str, Any]:
        """Generate the prompt twice, unsteered and with one feature clamped (``Intervention``), side by side."""
        from ..intervention import Intervention

        prompt, chat, n = self._prompt(body)
        hookpoint = body.get("hookpoint")
        summary = self.feature(str(hookpoint), str(body.get("feature")))
        value = body.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_STEER <= value <= MAX_STEER:
            raise bad_request(f"'value' (the strength, × the feature's max activation) must be a number in "
                              f"-{MAX_STEER:g}..{MAX_STEER:g}, got {value!r}")
        absolute = not summary["max_activation"]
        try:
            iv = Intervention(feature=summary["feature"], mode="clamp", value=float(value), hookpoint=hookpoint,
                              absolute=absolute)
        except ValidationError as exc:
            raise bad_request(str(exc.errors()[0]["msg"])) from None
        if not self._slots.acquire(blocking=False):
            raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, "the model is busy with other generations; try again")
        try:
            out = {}
            for key, ivs in (("unsteered", []), ("steered", [iv])):
                try:
                    result = self.monitor.generate(prompt, chat=chat, max_new_tokens=n, interventions=ivs)
                except GenerationBlocked as blocked:
                    result = blocked.results[0]
                except FeatureWatchError as exc:
                    raise bad_request(str(exc)) from None
                out[key] = {"text": result.text, "scores": result.scores, "outcome": result.outcome,
                            "alerts": [a.model_dump(mode="json") for a in result.alerts]}
        finally:
            self._slots.release()
        out["intervention"] = iv.model_dump(mode="json")
        return out

    def scores(self, text: str) -> dict[str, Any]:
        """Parse a ``featurewatch score`` output file; 400 naming the first bad line."""
        from ..records import json_lines
        from ..scoring import ScoreRow

        def score_row(obj: Any, line: int) -> dict[str, Any]:
            try:
                check_json_value(obj, what="the line")
            except HTTPError as exc:
                raise RecordError(exc.message, line=line) from None
            try:
                return ScoreRow.model_validate(obj).model_dump(mode="json")
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(map(str, err["loc"])) or "the line"
                raise RecordError(f"not a featurewatch score line ({where}: {err['msg']})", line=line) from None

        try:
            rows = list(json_lines(text.splitlines(), score_row, path="the file", strict=True))
        except RecordError as exc:
            raise bad_request(f"line {exc.line}: {exc.reason}; drop the output of `featurewatch score`") from None
        if not rows:
            raise bad_request("the file has no score lines; drop the output of `featurewatch score`")
        detectors = sorted({d for r in rows for d in r["scores"]})
        thresholds = {d.name: {p: d.threshold_for(p) for p in d.phases} for d in (self.pack.detectors.values()
                                                                                   if self.pack else [])}
        return {"rows": rows, "detectors": detectors, "thresholds": thresholds}


# --------------------------------------------------------------------------- HTTP: the rules
def host_name(host_header: str) -> str:
    """The name part of a ``Host`` header (``[::1]:8765`` → ``::1``, ``Example:80`` → ``example``)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_host_names(host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` names a server bound to ``host`` answers to: the loopback names, ``host`` itself
    (unless it is a wildcard like 0.0.0.0) and ``extra`` (``--allowed-host``)."""
    names = set(LOOPBACK)
    if host not in WILDCARD:
        names.add(host.lower())
    for name in extra:
        name = name.strip().lower()
        if not name or "/" in name or " " in name:
            raise ConfigError(f"allowed host {name!r} is not a host name (e.g. myhost.lan or 192.168.1.5)")
        names.add(host_name(name))
    return frozenset(names)


def check_token(token: str | None) -> str | None:
    """``token`` if it is usable (at least :data:`MIN_TOKEN` printable characters), else a :class:`ConfigError`."""
    if token is None:
        return None
    if len(token) < MIN_TOKEN or not _TOKEN_CHARS.fullmatch(token):
        raise ConfigError(f"the token must be at least {MIN_TOKEN} characters from A-Z a-z 0-9 . _ ~ - (it travels "
                          "in an address, a header and a cookie); make one with: "
                          "python -c 'import secrets; print(secrets.token_urlsafe())'")
    return token


class Guard:
    """The page's rules, as one ASGI middleware in front of the routes.

    * ``Host`` must be one of ``allowed_hosts`` (a DNS-rebinding page sends its own name): 403.
    * A state-changing request (any method but GET/HEAD/OPTIONS) must come from this server's own
      origin: an ``Origin`` other than ``http(s)://<Host>`` (or ``null``), or a ``Sec-Fetch-Site``
      other than same-origin/none, is refused with 403 — a form or a ``no-cors`` fetch on another
      page (another port included) cannot start a run.
    * With a token, every ``/api/`` request carries it (``Authorization: Bearer``, or the cookie a
      page visit with ``?token=`` sets): 401 otherwise.
    * Every answer gets the security headers; every error closes the connection.
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: frozenset[str], token: str | None, cookie: str) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.token = token
        self.cookie = cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in _SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
                headers.setdefault("cache-control", "no-store")
                if message["status"] >= 400:
                    headers["connection"] = "close"
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def refusal(self, scope: Scope) -> Response | None:
        """The answer to a request the rules refuse, or None to let it through."""
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if host_name(host) not in self.allowed_hosts:
            return error_response(HTTPStatus.FORBIDDEN, f"Host {host!r} is not a name of this server (a page on "
                                  "another site resolving to it is refused: DNS rebinding); use "
                                  f"{' or '.join(sorted(self.allowed_hosts))}, or start it with --allowed-host NAME")
        method = scope["method"]
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            site = headers.get("sec-fetch-site")
            if origin is not None:
                parts = urlsplit(origin)
                if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.strip().lower():
                    return error_response(HTTPStatus.FORBIDDEN, f"a {method} from another origin ({origin}) is "
                                          "refused: only this server's own page may change its state")
            elif site is not None and site not in ("same-origin", "none"):
                return error_response(HTTPStatus.FORBIDDEN, f"a {method} from another page ({site}) is refused: "
                                      "only this server's own page may change its state")
        if self.token is None:
            return None
        path = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query and not path.startswith("/api/"):  # a page visit with ?token=: keep it in a cookie
            if not self._same(query["token"][0]):
                return error_response(HTTPStatus.UNAUTHORIZED, "wrong token in the address: use the token "
                                      "`featurewatch ui` was started with")
            redirect = RedirectResponse(quote(path), status_code=HTTPStatus.SEE_OTHER)
            redirect.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
            return redirect
        if path.startswith("/api/") and not self._authorized(headers):
            return error_response(HTTPStatus.UNAUTHORIZED, "this server needs its token: send Authorization: "
                                  "Bearer <token>, or open the page once as /?token=<token>",
                                  {"www-authenticate": 'Bearer realm="featurewatch"'})
        return None

    def _same(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode())

    def _authorized(self, headers: Headers) -> bool:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and self._same(auth[7:].strip()):
            return True
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie and self._same(value):
                return True
        return False


# --------------------------------------------------------------------------- HTTP: the routes
async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read at most ``limit`` bytes (the ``Content-Length`` is checked first)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
    length_text = request.headers.get("content-length")
    if length_text is not None:  # the parser already refused one that is not a number
        if not _DIGITS.fullmatch(length_text.strip()):
            raise bad_request(f"Content-Length {length_text!r} is not a byte count")
        if int(length_text) > limit:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"the request is {int(length_text)} bytes; at most {limit}")
    elif "chunked" not in request.headers.get("transfer-encoding", "").lower():
        raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is over {limit} bytes")
    except ClientDisconnect:
        raise bad_request("the client closed the connection before the whole body came") from None
    return await run_in_threadpool(parse_json_body, bytes(raw))


def last_event_id(text: str | None, run: Run) -> int:
    """The index to resume from: after ``Last-Event-ID`` (an id this run sent: 0 … events − 1), else 0."""
    if text is None:
        return 0
    with run.cond:
        n = len(run.events)
    text = text.strip()
    if not _DIGITS.fullmatch(text) or len(text) > 9 or int(text) >= n:
        raise bad_request(f"Last-Event-ID {text[:40]!r} is not an event of run {run.id}: it has sent ids 0 … {n - 1}"
                          if n else f"Last-Event-ID {text[:40]!r}: run {run.id} has sent no events yet")
    return int(text) + 1


class Routes:
    """The Starlette endpoints over one :class:`UIApp` (blocking work goes to the thread pool)."""

    def __init__(self, app: UIApp) -> None:
        self.app = app
        self.closing = False

    def starlette(self) -> Starlette:
        page = self.page
        routes = [
            Route("/", page), Route("/scores", page),
            *(Route(f"/{view}/{{rest:path}}", page) for view in ("feature", "detector", "scores")),
            Route("/static/{name}", self.static), Route("/favicon.ico", self.favicon),
            Route("/api/info", self.info),
            Route("/api/runs", self.start_run, methods=["POST"]),
            Route("/api/runs/{run_id}/events", self.events),
            Route("/api/runs/{run_id}/tokens/{position}", self.token),
            Route("/api/runs/{run_id}/cancel", self.cancel, methods=["POST"]),
            Route("/api/features/{hookpoint}/{feature}", self.feature),
            Route("/api/detectors/{name}", self.detector),
            Route("/api/steer", self.steer, methods=["POST"]),
            Route("/api/scores", self.scores, methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPError: self.on_error,
                                                            StarletteHTTPException: self.on_starlette_error,
                                                            Exception: self.on_crash})

    # ------------------------------------------------------------------ errors
    async def on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return error_response(exc.status, exc.message, exc.headers)

    async def on_starlette_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        method, path = request.method, request.url.path
        if exc.status_code == HTTPStatus.NOT_FOUND:
            message = (f"no API {method} {path}; see docs/architecture.md" if path.startswith("/api/")
                       else f"no page {path}")
        elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            allow = (exc.headers or {}).get("Allow", "")
            message = f"{method} {path} is not allowed" + (f"; use {allow}" if allow else "")
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    async def on_crash(self, request: Request, exc: Exception) -> Response:
        logger.error("featurewatch ui: %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (details in the server's log)")

    # ------------------------------------------------------------------ the page
    async def page(self, request: Request) -> Response:
        data = static_file("index.html")
        assert data is not None
        return Response(data, media_type=_STATIC_TYPES[".html"])

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        data = static_file(name)
        if data is None:
            raise not_found(f"no asset {name!r}")
        suffix = "." + name.rsplit(".", 1)[-1]
        return Response(data, media_type=_STATIC_TYPES.get(suffix, "application/octet-stream"))

    async def favicon(self, request: Request) -> Response:
        return Response(status_code=HTTPStatus.NO_CONTENT)

    # ------------------------------------------------------------------ the API
    async def info(self, request: Request) -> Response:
        return json_response(await run_in_threadpool(self.app.info))

    async def start_run(self, request: Request) -> Response:
        body = await read_json(request, MAX_BODY)
        run = await run_in_threadpool(self.app.start_run, body)
        return json_response({"run_id": run.id, "events": f"/api/runs/{run.id}/events"}, HTTPStatus.ACCEPTED)

    async def events(self, request: Request) -> Response:
        """Server-sent events: ``tokens``, ``alert``, then ``done`` or ``failed``; resumable with Last-Event-ID."""
        run = self.app.run(request.path_params["run_id"])
        start = last_event_id(request.headers.get("last-event-id"), run)
        with run.cond:
            finished = run.done and start >= len(run.events)
        if finished:  # everything was delivered: 204 tells EventSource not to reconnect
            return Response(status_code=HTTPStatus.NO_CONTENT)

        async def stream() -> AsyncIterator[ServerSentEvent]:
            async for i, kind, data in run.follow(start, lambda: self.closing):
                yield ServerSentEvent(data=json_bytes(data).decode("utf-8"), event=kind, id=str(i), sep="\n")

        return EventSourceResponse(stream(), ping=15, sep="\n")

    async def token(self, request: Request) -> Response:
        text = request.path_params["position"]
        try:
            position = int(text)
        except ValueError:
            raise not_found(f"token position {text!r} is not an integer") from None
        return json_response(await run_in_threadpool(self.app.token, request.path_params["run_id"], position))

    async def cancel(self, request: Request) -> Response:
        return json_response(await run_in_threadpool(self.app.cancel, request.path_params["run_id"]))

    async def feature(self, request: Request) -> Response:
        p = request.path_params
        return json_response(await run_in_threadpool(self.app.feature, p["hookpoint"], p["feature"]))

    async def detector(self, request: Request) -> Response:
        return json_response(await run_in_threadpool(self.app.detector, request.path_params["name"]))

    async def steer(self, request: Request) -> Response:
        body = await read_json(request, MAX_BODY)
        return json_response(await run_in_threadpool(self.app.steer, body))

    async def scores(self, request: Request) -> Response:
        body = await read_json(request, MAX_SCORES_BODY)
        if not isinstance(body.get("text"), str):
            raise bad_request("send {\"text\": the contents of a `featurewatch score` output file}")
        return json_response(await run_in_threadpool(self.app.scores, body["text"]))


# --------------------------------------------------------------------------- the server
def bind_socket(host: str = "127.0.0.1", port: int = 8765) -> socket.socket:
    """A listening socket on ``host:port``; :class:`~featurewatch.errors.PortInUse` when the port is taken
    (bind first, load the model after: a busy port fails in a second, not after the model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server can reuse its port
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is already in use by another process; choose another --port "
                            "(0 = any free port)") from exc
        raise ConfigError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); choose another --host or "
                          "--port") from exc
    sock.set_inheritable(True)
    return sock


class UIServer:
    """The page's HTTP server: one :class:`UIApp` behind :class:`Guard`, served by uvicorn.

    ``serve_forever()`` blocks (Ctrl-C stops it); ``start()`` serves in a background thread and
    ``close()`` stops it. A non-loopback ``host`` needs a ``token``. ``allowed_hosts``: more names
    the ``Host`` header may carry (a name clients use for this machine).
    """

    def __init__(self, app: UIApp, host: str = "127.0.0.1", port: int = 8765, *, token: str | None = None,
                 allowed_hosts: Iterable[str] = (), sock: socket.socket | None = None) -> None:
        self.token = check_token(token)
        if host not in LOOPBACK and self.token is None:
            raise ConfigError(f"serving on {host}, not loopback, needs a token: anyone who reaches it could run the "
                              f"model; pass one (the CLI: --token, or ${TOKEN_ENV})")
        self.allowed_hosts = allowed_host_names(host, allowed_hosts)
        self.app = app
        self.host = host
        self.socket = sock if sock is not None else bind_socket(host, port)
        self.port = int(self.socket.getsockname()[1])
        self.routes = Routes(app)
        self.asgi = Guard(self.routes.starlette(), allowed_hosts=self.allowed_hosts, token=self.token,
                          cookie=f"featurewatch_token_{self.port}")
        config = uvicorn.Config(self.asgi, http="h11", ws="none", lifespan="off", log_config=None,
                                log_level="warning", access_log=False, server_header=False,
                                timeout_graceful_shutdown=3, timeout_keep_alive=5)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (SIGINT) or SIGTERM, in this thread."""
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stop_runs()

    def start(self) -> UIServer:
        """Serve in a background thread; return once it accepts connections."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.socket]},
                                        name="featurewatch-ui", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the page's server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def _stop_runs(self) -> None:
        self.routes.closing = True
        self.app.close()  # cancels what still generates and wakes the streams, which then end

    def close(self) -> None:
        """Stop serving: running generations are cancelled, open event streams end."""
        self._stop_runs()
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self.socket.close()


def serve_ui(monitor: Monitor, *, host: str = "127.0.0.1", port: int = 8765, max_new_tokens: int = 256,
             token: str | None = None, allowed_hosts: Iterable[str] = ()) -> UIServer:
    """Start the page's server for ``monitor`` in a background thread; ``server.url`` is its address."""
    return UIServer(UIApp(monitor, max_new_tokens=max_new_tokens), host, port, token=token,
                    allowed_hosts=allowed_hosts).start()
