"""What a served model's clients may change, parsed strictly: per-request options, booleans, request ids.

The operator decides (the server's environment, read by :mod:`.plugin`); a client
sends ``vllm_xargs`` (``SamplingParams.extra_args``) and an ``X-Request-Id``. Nothing
here trusts the client:

* per-request options (``featurewatch_off``, ``featurewatch_detectors``) are refused
  unless the operator allows them (``FEATUREWATCH_ALLOW_REQUEST_OPTIONS=1``), and even
  then a request may leave out only the detectors the operator lists as optional
  (``FEATUREWATCH_OPTIONAL_DETECTORS``; by default every detector whose action is not
  ``block``). A refused or malformed option never fails the engine: the request runs
  with every detector, and the use is logged and counted;
* booleans are ``1/0``, ``true/false``, ``yes/no``, ``on/off`` (or JSON booleans);
  anything else is an error naming the setting, never a silent "off";
* a request id becomes a ``run_id`` only bounded and in a safe charset.

No torch, no vLLM: imported by the plugin at start-up and by the engine monitor per request.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError

OFF_KEY = "featurewatch_off"
"""``SamplingParams.extra_args`` key (``vllm_xargs`` over HTTP): a true value leaves the request unmonitored."""
DETECTORS_KEY = "featurewatch_detectors"
"""``extra_args`` key: the detector names (a list, or a comma-separated string) to run on this request."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
BOOLEAN_HELP = "use 1/0, true/false, yes/no or on/off"

RUN_ID_MAX = 128
_RUN_ID_OK = re.compile(r"[A-Za-z0-9._:@~-]")


def parse_bool(value: Any, name: str) -> bool:
    """A strict boolean: a JSON bool, 0/1, or one of the words in :data:`BOOLEAN_HELP`; else ``ConfigError``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ConfigError(f"{name}={value!r} is not a boolean: {BOOLEAN_HELP}")


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean environment variable (unset or empty: ``default``); an unknown value is a ``ConfigError``."""
    raw = env.get(name, "")
    return default if not raw.strip() else parse_bool(raw, name)


def shadow_switch(raw: str) -> bool | tuple[str, ...] | None:
    """``FEATUREWATCH_SHADOW``: unset/empty → None (the pack decides), a boolean word → all or none,
    anything else → detector names, comma-separated (checked against the detectors at start-up)."""
    raw = raw.strip()
    if not raw:
        return None
    if raw.lower() in _TRUE or raw.lower() in _FALSE:
        return parse_bool(raw, "FEATUREWATCH_SHADOW")
    return tuple(n.strip() for n in raw.split(",") if n.strip())


@dataclass(frozen=True)
class RequestPolicy:
    """What a request's ``extra_args`` may change (the operator's choice)."""

    allow: bool = False
    """Per-request options are honoured at all (``FEATUREWATCH_ALLOW_REQUEST_OPTIONS``)."""
    optional: tuple[str, ...] | None = None
    """Detectors a request may leave out (``FEATUREWATCH_OPTIONAL_DETECTORS``); None: every non-``block`` one."""

    def optional_names(self, detectors: Sequence[Any]) -> set[str]:
        if self.optional is None:
            return {d.name for d in detectors if d.action != "block"}
        return set(self.optional)


SERVER_DEFAULT = RequestPolicy()
"""A server's default: no per-request option is honoured."""


@dataclass(frozen=True)
class Decision:
    """The detectors a request runs, and what happened to its options (``status``: a counter's key)."""

    detectors: list[Any]
    status: str  # "none" (no option sent) | "accepted" | "narrowed" (some kept) | "refused" | "invalid"
    message: str = ""


def _wanted_names(value: Any, known: Sequence[str]) -> list[str]:
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",")]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = [n.strip() for n in value]
    else:
        raise ConfigError(f"{DETECTORS_KEY}={value!r} is not detector names: send a list of names or one "
                          f"comma-separated string (detectors: {', '.join(known)})")
    names = [n for n in names if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{DETECTORS_KEY} names detectors this server does not run ({', '.join(unknown)}); "
                          f"detectors: {', '.join(known)}")
    return names


def decide(extra: Mapping[str, Any] | None, detectors: Sequence[Any], policy: RequestPolicy) -> Decision:
    """The detectors one request runs under ``policy`` (never raises: a bad option runs every detector)."""
    extra = extra or {}
    sent = [k for k in (OFF_KEY, DETECTORS_KEY) if k in extra]
    everything = list(detectors)
    if not sent:
        return Decision(everything, "none")
    if not policy.allow:
        return Decision(everything, "refused", f"featurewatch: request options {sent} refused (this server does "
                                               "not allow them: FEATUREWATCH_ALLOW_REQUEST_OPTIONS); the request "
                                               "runs with every detector")
    known = [d.name for d in detectors]
    try:
        off = parse_bool(extra[OFF_KEY], OFF_KEY) if OFF_KEY in extra else False
        wanted = set() if off else set(_wanted_names(extra[DETECTORS_KEY], known)) if DETECTORS_KEY in extra \
            else set(known)
    except ConfigError as exc:
        return Decision(everything, "invalid", f"featurewatch: invalid request option: {exc}; the request runs "
                                               "with every detector")
    optional = policy.optional_names(detectors)
    kept = [d for d in detectors if d.name in wanted or d.name not in optional]
    dropped_refused = sorted(d.name for d in detectors if d.name not in wanted and d.name not in optional)
    if dropped_refused:
        return Decision(kept, "narrowed", f"featurewatch: request options {sent} may not leave out "
                                          f"{', '.join(dropped_refused)} (not in FEATUREWATCH_OPTIONAL_DETECTORS); "
                                          f"running {', '.join(d.name for d in kept)}")
    return Decision(kept, "accepted", f"featurewatch: request options {sent} accepted; running "
                                      f"{', '.join(d.name for d in kept) or 'no detector (unmonitored)'}")


def safe_run_id(request_id: str) -> str:
    """A client's request id as a ``run_id``: at most :data:`RUN_ID_MAX` characters of ``[A-Za-z0-9._:@~-]``.

    Other characters become ``_``; an id that had to be changed or cut keeps a short hash of the
    original, so distinct ids stay distinct. A safe id is returned as it is.
    """
    request_id = str(request_id)
    clean = "".join(c if _RUN_ID_OK.fullmatch(c) else "_" for c in request_id)
    if clean == request_id and len(clean) <= RUN_ID_MAX:
        return clean
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{clean[:RUN_ID_MAX - 13]}~{digest}"
