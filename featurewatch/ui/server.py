"""The page's server: static assets, a JSON API and server-sent events from live monitored generations.

Why it is built this way:

* One :class:`UIApp` wraps one attached :class:`~featurewatch.monitor.Monitor`. Each
  generation runs in its own thread with its own run id; the monitor keeps each
  thread's session apart (a context variable), so two tabs generating at once see
  only their own tokens. The app is a monitor *sink*: after each forward pass
  (``on_forward``, called in the generating thread) it reads the new tokens and
  their per-token detector scores from the current session
  (:meth:`~featurewatch.session.Session.token_scores`) and appends them to that
  run's event list; alerts arrive through an ``on_alert`` callback and are routed
  by run id. Nothing is recomputed for the page: it shows what the pools read.
* A run's events are kept in a list (not a queue), so a page that reconnects
  (``Last-Event-ID``) or subscribes late gets every event.
* Bad input is a 4xx with ``{"error": "..."}`` naming the fix, never a traceback.
  POSTs must be ``application/json`` (a cross-site form cannot send that without a
  preflight), and requests whose ``Host`` is not the address served are refused
  (DNS rebinding), so a page on another site cannot drive a local model.

The API is documented in docs/architecture.md ("The page's JSON API").
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from ..errors import ConfigError, FeatureWatchError, GenerationBlocked
from ..models import normalize_hookpoint
from ..sinks import BaseSink

if TYPE_CHECKING:
    from ..alert import Alert
    from ..monitor import Monitor
    from ..session import Session

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY = 1 << 20  # 1 MiB for a prompt
MAX_SCORES_BODY = 64 << 20  # a dropped score file
TOP_FEATURES = 8  # strongest features kept per token for the inspector
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


class HTTPError(Exception):
    """An answer other than 200: a status and a message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# --------------------------------------------------------------------------- runs
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

    def push(self, kind: str, data: dict[str, Any]) -> None:
        with self.cond:
            self.events.append((kind, data))
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def follow(self, start: int, *, poll: float = 15.0) -> Iterator[tuple[int, str, dict[str, Any]] | None]:
        """Events from index ``start`` as they come; ``None`` after ``poll`` seconds without one (a keep-alive)."""
        i = start
        while True:
            with self.cond:
                if i >= len(self.events) and not self.done:
                    self.cond.wait(poll)
                batch = self.events[i:]
                done = self.done
            for kind, data in batch:
                yield i, kind, data
                i += 1
            if done and i >= len(self.events):
                return
            if not batch:
                yield None


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
        """Stop receiving the monitor's events (the monitor stays attached)."""
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
        from ..generation import render_prompt

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
        except ConfigError as exc:
            raise bad_request(str(exc)) from None
        context = getattr(getattr(self.monitor.model, "config", None), "max_position_embeddings", None)
        if context is not None and len(rendered.ids) + n > context:
            raise bad_request(f"the prompt is {len(rendered.ids)} tokens; with max_new_tokens={n} that exceeds the "
                              f"model's context of {context}: shorten the prompt or lower max_new_tokens")
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
        try:
            try:
                result = self.monitor.generate(run.prompt, chat=run.chat, max_new_tokens=max_new_tokens,
                                               top_features=TOP_FEATURES, run_id=run.id)
            except GenerationBlocked as blocked:
                result = blocked.results[0]
            run.session = result.session
            self._flush(run, result.session)
            done: dict[str, Any] = {"outcome": result.outcome, "degraded": result.degraded, "text": result.text,
                                    "scores": result.scores, "phase_scores": result.phase_scores,
                                    "n_alerts": len(result.alerts)}
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
        """Send the tokens read since the last step, then the alerts they fired."""
        row = session.rows[0]
        end = len(row.token_ids)
        scores = session.token_scores(0, start=run.sent)
        if end > run.sent:
            tokens = []
            for i, pos in enumerate(range(run.sent, end)):
                tokens.append({"p": pos, "t": self._decode(row.token_ids[pos]),
                               "ph": "completion" if row.completion[pos] else "prompt", "x": not row.read[pos],
                               "s": {name: round(v[i], 5) for name, v in scores.items() if i < len(v)}})
            run.sent = end
            run.push("tokens", {"tokens": tokens})
        pending, run.pending = run.pending, []
        for alert in pending:
            alert["sent_at"] = time.time()
            run.push("alert", alert)

    # ------------------------------------------------------------------ inspector, cards
    def token(self, run_id: str, position: int) -> dict[str, Any]:
        """A token's strongest SAE features with each one's contribution to each detector's token score."""
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
            weights = {d.name: {f.id: f.weight for f in d.features} for d in readout.detectors if d.kind == "sae"}
            totals = {name: sum(abs(w * acts.get(f, 0.0)) for f, w in ws.items()) for name, ws in weights.items()}
            features = []
            for f, a in sorted(acts.items(), key=lambda kv: -kv[1]):
                contributions = {name: ws[f] * a for name, ws in weights.items() if f in ws}
                pack, hp = self.pack, readout.hookpoint
                features.append({"feature": f, "activation": a, "label": pack.label(hp, f) if pack else None,
                                 "max_activation": pack.max_activation(hp, f) if pack else None,
                                 "contributions": contributions,
                                 "shares": {k: (abs(c) / totals[k] if totals[k] else None)
                                            for k, c in contributions.items()}})
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad_request(f"'value' (the strength, × the feature's max activation) must be a number, got {value!r}")
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
        from ..scoring import ScoreRow

        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(ScoreRow.model_validate_json(line).model_dump(mode="json"))
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(map(str, err["loc"])) or "the line"
                raise bad_request(f"line {i} is not a featurewatch score line ({where}: {err['msg']}); drop the "
                                  "output of `featurewatch score`") from None
        if not rows:
            raise bad_request("the file has no score lines; drop the output of `featurewatch score`")
        detectors = sorted({d for r in rows for d in r["scores"]})
        thresholds = {d.name: {p: d.threshold_for(p) for p in d.phases} for d in (self.pack.detectors.values()
                                                                                   if self.pack else [])}
        return {"rows": rows, "detectors": detectors, "thresholds": thresholds}


# --------------------------------------------------------------------------- HTTP
class _Handler(BaseHTTPRequestHandler):
    server: UIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — the base class's name
        logger.debug("%s " + format, self.address_string(), *args)

    # ------------------------------------------------------------------ answers
    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self'; img-src 'self' data:")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False, allow_nan=False).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message, "status": status})

    def _body(self, limit: int) -> Any:
        if self.headers.get_content_type() != "application/json":
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON (Content-Type: application/json)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required") from None
        if length > limit:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is {length} bytes; at most {limit}")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad_request(f"the request is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise bad_request("the request is a JSON object")
        return body

    def _host_ok(self) -> bool:
        allowed = self.server.allowed_hosts
        if allowed is None:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
        return name in allowed

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 — the base class's name
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            if not self._host_ok():
                raise HTTPError(HTTPStatus.FORBIDDEN, "this server answers only to the address it serves")
            path = urlsplit(self.path).path
            parts = [unquote(p) for p in path.split("/") if p]
            if parts[:1] == ["api"]:
                self._api(method, parts[1:])
            elif method == "GET":
                self._static(parts)
            else:
                raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} {path} is not allowed")
        except HTTPError as exc:
            self._error(exc.status, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # noqa: BLE001 — never a traceback on the page
            logger.exception("featurewatch ui: %s %s failed", method, self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (details in the server's log)")

    def _static(self, parts: list[str]) -> None:
        if parts[:1] == ["static"] and len(parts) == 2:
            data = static_file(parts[1])
            if data is None:
                raise not_found(f"no asset {parts[1]!r}")
            suffix = "." + parts[1].rsplit(".", 1)[-1]
            self._send(200, data, _STATIC_TYPES.get(suffix, "application/octet-stream"))
            return
        # the page's own routes: the app reads location.pathname
        if not parts or parts[0] in ("feature", "detector", "scores"):
            data = static_file("index.html")
            assert data is not None
            self._send(200, data, _STATIC_TYPES[".html"])
            return
        if parts == ["favicon.ico"]:
            self._send(204, b"", "image/x-icon")
            return
        raise not_found(f"no page /{'/'.join(parts)}")

    def _api(self, method: str, parts: list[str]) -> None:
        app = self.server.app
        route = (method, *parts[:1])
        if route == ("GET", "info") and len(parts) == 1:
            self._json(200, app.info())
        elif route == ("POST", "runs") and len(parts) == 1:
            run = app.start_run(self._body(MAX_BODY))
            self._json(202, {"run_id": run.id, "events": f"/api/runs/{run.id}/events"})
        elif route == ("GET", "runs") and len(parts) == 3 and parts[2] == "events":
            self._events(app.run(parts[1]))
        elif route == ("GET", "runs") and len(parts) == 4 and parts[2] == "tokens":
            try:
                position = int(parts[3])
            except ValueError:
                raise not_found(f"token position {parts[3]!r} is not an integer") from None
            self._json(200, app.token(parts[1], position))
        elif route == ("GET", "features") and len(parts) == 3:
            self._json(200, app.feature(parts[1], parts[2]))
        elif route == ("GET", "detectors") and len(parts) == 2:
            self._json(200, app.detector(parts[1]))
        elif route == ("POST", "steer") and len(parts) == 1:
            self._json(200, app.steer(self._body(MAX_BODY)))
        elif route == ("POST", "scores") and len(parts) == 1:
            body = self._body(MAX_SCORES_BODY)
            if not isinstance(body.get("text"), str):
                raise bad_request("send {\"text\": the contents of a `featurewatch score` output file}")
            self._json(200, app.scores(body["text"]))
        else:
            raise not_found(f"no API {method} /api/{'/'.join(parts)}; see docs/architecture.md")

    def _events(self, run: Run) -> None:
        """Server-sent events: ``tokens``, ``alert``, then ``done`` or ``failed``; resumable with Last-Event-ID."""
        try:
            start = int(self.headers.get("Last-Event-ID", "-1")) + 1
        except ValueError:
            start = 0
        with run.cond:
            finished = run.done and start >= len(run.events)
        if finished:  # everything was delivered: 204 tells EventSource not to reconnect
            self._send(204, b"", "text/event-stream")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for item in run.follow(start):
            if item is None:
                chunk = ": keep-alive\n\n"
            else:
                i, kind, data = item
                chunk = f"id: {i}\nevent: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
            self.wfile.write(chunk.encode())
            self.wfile.flush()


class UIServer(ThreadingHTTPServer):
    """The HTTP server of one :class:`UIApp` (threads; ``serve_forever`` or :meth:`start`)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: UIApp, host: str = "127.0.0.1", port: int = 8765) -> None:
        if ":" in host:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self.app = app
        self.host = host
        self.port = int(self.server_address[1])
        # a loopback server answers only to loopback names (DNS rebinding); a public one to any
        self.allowed_hosts: set[str] | None = set(LOOPBACK) if host in LOOPBACK else None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> UIServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="featurewatch-ui", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.server_close()
        self.app.close()


def serve_ui(monitor: Monitor, *, host: str = "127.0.0.1", port: int = 8765, max_new_tokens: int = 256) -> UIServer:
    """Start the page's server for ``monitor`` in a background thread; ``server.url`` is its address."""
    return UIServer(UIApp(monitor, max_new_tokens=max_new_tokens), host, port).start()
