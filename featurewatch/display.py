"""Formatting for people: feature names, alert lines, tables.

The CLI owns the terminal; these helpers only build strings, so they are easy
to test and reuse (the LangChain handler logs the same alert line).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Sequence

from .alert import Alert
from .pack import Pack


def use_color(stream: Any) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, code: str, color: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if color else text


def feature_name(pack: Pack | None, hookpoint: str, feature: int, width: int = 40) -> str:
    """``#123 label`` — the pack's label, else the tokens it fires on most (from its top contexts)."""
    label = None
    if pack is not None:
        label = pack.label(hookpoint, feature)
        if label is None:
            info = pack.features.get(hookpoint, {}).get(feature)
            if info and info.top_contexts:
                toks = Counter(c.split("«", 1)[1].split("»", 1)[0].strip() for c in info.top_contexts if "«" in c)
                common = [t for t, _ in toks.most_common(3) if t]
                label = "tokens: " + ", ".join(repr(t) for t in common) if common else None
    name = f"#{feature}" + (f" {label}" if label else "")
    return name if len(name) <= width else name[: width - 1] + "…"


def alert_line(alert: Alert, *, color: bool = False) -> str:
    """One readable line for an alert."""
    sev = {"critical": "31;1", "warning": "33;1", "info": "36"}[alert.severity]
    head = paint(f"⚠ {alert.detector}", sev, color)
    evidence = ", ".join(f"#{e.feature}" + (f" {e.label}" if e.label else "") for e in alert.evidence[:3])
    text = f' "{_clip(alert.text, 60)}"' if alert.text else ""
    action = "block (shadow: would block, went on)" if alert.would_block else alert.action
    return (f"{head} [{alert.phase}] score {alert.score:.2f} ≥ {alert.threshold:.2f} → {action}"
            f" (tokens {alert.span[0]}–{alert.span[1]}){text}" + (f"  evidence: {evidence}" if evidence else ""))


def _clip(text: str | None, n: int) -> str:
    text = (text or "").replace("\n", "⏎").strip()
    return text if len(text) <= n else "…" + text[-(n - 1):]


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "—" if value != value else f"{value:.3f}"
    return "—" if value is None else str(value)
