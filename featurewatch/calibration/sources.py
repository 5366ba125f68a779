"""Labelled records grouped by where they came from: the input side of leave-one-source-out calibration.

A detector fitted on one corpus per label learns the corpus (a firm's mail
domain, a mailing-list footer, a data set's speaker label) as readily as the
concept, and a split *by record* inside those corpora scores that shortcut as
well as the concept. Here every record carries the value of a grouping field
(``--group-by source`` by default: the public set it came from), and the
fitting in :mod:`featurewatch.calibration.loso` leaves one whole group out at
a time.

What this module does to the files a user passes:

* ``--input`` files carry labels (0/1) for the detector; ``--negatives`` files
  are benign pools (ordinary chats, other concepts' data): every record counts
  as a negative whatever its own label;
* each record's *kind* is its ``group`` field where it has one (``pos``,
  ``neg``, ``hard_neg``, as in the shared multi-source data), else ``pos`` /
  ``neg`` from the label;
* ``max_per_group`` caps every (group, kind, label, wrapper) cell by a hash of
  the id, so a 600-row source does not drown a 25-row one and a 2-core
  machine extracts in minutes;
* ``wrap`` puts each *document* (``text`` record) in one of the given wrappers
  (chosen by a hash of its id, so each text is read once): as a document, quoted
  by a user, or as the assistant's reply (:mod:`featurewatch.calibration.wrappers`).
  With ``reply`` among them, a chat's final assistant message is also moved behind
  a neutral user turn ("Continue."), so a reply is judged without the request that
  gives its label away. Other chats keep their form; the judged content is their
  last message.

The prepared records are written as JSONL into the cache directory (their
activations are cached under the same key), never next to the user's data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..records import load_records
from .wrappers import MAIL_REQUESTS, NEUTRAL_REQUESTS, WRAPPERS, pick, wrap

KINDS = ("pos", "neg", "hard_neg")
DOCUMENT_WRAPPERS = ("plain", "quoted", "request", "reply")


def _h(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def judged_phase(record: dict[str, Any]) -> str:
    """The phase holding a record's judged content: a document and a request are read as the prompt,
    a chat ending in the assistant's message as the completion."""
    if "text" in record:
        return "prompt"
    return "completion" if record["messages"][-1]["role"] == "assistant" else "prompt"


def prepare(path: str | Path, *, group_by: str, negatives: bool, wrap_with: tuple[str, ...] = (),
            max_per_group: int | None = None, max_chars: int | None = None) -> list[dict[str, Any]]:
    """The records of one file, grouped, kind-tagged, capped and wrapped, as plain dicts.

    Fields added: ``fw_group`` (the grouping field's value; a benign pool's record without one is
    grouped under the file's stem, a labelled record without one is an error), ``fw_kind`` (pos /
    neg / hard_neg), ``fw_file`` (the file's stem), ``fw_negatives``; the id becomes
    ``<dir>/<stem>/<id>`` so files may share ids. Errors name the file and line.
    """
    p = Path(path)
    bad = [w for w in wrap_with if w not in DOCUMENT_WRAPPERS]
    if bad:
        raise ConfigError(f"--wrap {','.join(wrap_with)}: {', '.join(bad)} is not a document wrapper "
                          f"(valid: {', '.join(DOCUMENT_WRAPPERS)})")
    out: list[dict[str, Any]] = []
    for r in load_records(p):
        raw: dict[str, Any] = {"id": r.id, **r.extra}
        if r.text is not None:
            raw["text"] = r.text
        else:
            raw["messages"] = [dict(m) for m in r.messages or ()]
        label = raw.get("label")
        if negatives:
            label = 0
        elif label not in (0, 1):
            raise ConfigError(f"{p}:{r.line}: needs 'label': 0 or 1 (or pass the file with --negatives, "
                              "where every record counts as a negative)")
        kind = raw.get("group") if raw.get("group") in KINDS and not negatives else ("pos" if label else "neg")
        if negatives and raw.get("group") == "hard_neg":
            kind = "hard_neg"
        if kind == "pos" and label != 1 or kind != "pos" and label != 0:
            raise ConfigError(f"{p}:{r.line}: group {raw.get('group')!r} disagrees with label {label}")
        value = raw.get(group_by, p.stem if negatives else None)
        if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
            raise ConfigError(f"{p}:{r.line}: --group-by {group_by}: the field is {value!r}; it must be a "
                              "non-empty string or an integer")
        raw.update(label=int(label), fw_group=str(value), fw_kind=kind, fw_file=p.stem, fw_negatives=negatives,
                   id=f"{p.parent.name}/{p.stem}/{r.id}")
        out.append(raw)
    if not out:
        raise ConfigError(f"{p}: no records")
    if max_per_group is not None:
        cells: dict[tuple, list[dict[str, Any]]] = {}
        for raw in out:
            cells.setdefault((raw["fw_group"], raw["fw_kind"], raw["label"], raw.get("wrapper")), []).append(raw)
        out = [raw for cell in cells.values()
               for raw in sorted(cell, key=lambda x: _h("cap" + x["id"]))[:max_per_group]]
        out.sort(key=lambda x: x["id"])
    if wrap_with:
        wrapped = []
        for raw in out:
            if "text" in raw:
                w = pick(tuple(wrap_with), "wrap" + raw["id"])
            elif "reply" in wrap_with and raw["messages"][-1]["role"] == "assistant":
                w = "reply"  # the reply behind a neutral user turn: the original request stays out
            else:
                wrapped.append(raw)
                continue
            requests = MAIL_REQUESTS if "text" in raw and w == "reply" else NEUTRAL_REQUESTS
            wrapped += wrap({k: v for k, v in raw.items() if k != "wrapper"}, [w], max_chars=max_chars,
                            requests=requests)
        out = wrapped
    elif max_chars is not None:
        from .wrappers import truncate

        for raw in out:
            if "text" in raw:
                raw["text"] = truncate(raw["text"], max_chars)
            else:
                raw["messages"][-1]["content"] = truncate(raw["messages"][-1]["content"], max_chars)
    return out


def write_prepared(records: list[dict[str, Any]], cache_dir: Path, stem: str) -> Path:
    """Write what the model reads of prepared records to ``cache_dir/prepared/<stem>-<hash>.jsonl``.

    Only ids and contents go in (labels, groups and kinds stay with the caller), so one file read
    as labelled data by one detector and as a benign pool by another shares its activations.
    """
    body = "".join(json.dumps({"id": r["id"], "label": 0, **{k: r[k] for k in ("text", "messages") if k in r}},
                              ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    d = cache_dir / "prepared"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{stem}-{_h(body)[:12]}.jsonl"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(path)
    return path


__all__ = ["DOCUMENT_WRAPPERS", "KINDS", "WRAPPERS", "judged_phase", "prepare", "write_prepared"]


def sae_fingerprint(sae: Any) -> str:
    """A short fingerprint of an SAE's weights (shape and a strided sample of the encoder)."""
    w = sae.W_enc.detach().float().flatten()[::9973].cpu().numpy().tobytes()
    return f"{sae.d_in}x{sae.d_sae}-" + hashlib.sha256(w).hexdigest()[:12]


def load_rows(prepared: list[tuple[Path, list[dict[str, Any]]]], *, model: Any, tokenizer: Any, model_name: str,
              sae: Any, hookpoint: str, phases: list[str], max_tokens: int, cache_dir: Path,
              progress: Any = None, log: Any = None) -> Any:
    """Activations of every prepared file (one forward pass each, cached), pooled per phase, as task rows."""
    from .data import acts_cache_path, cached_acts, load_labelled
    from .loso import Rows, pooled_phases, task_rows

    parts = []
    key = sae_fingerprint(sae)
    for path, records in prepared:
        data = load_labelled(path)
        if log:
            log(f"activations of {path.name} ({len(records)} records)")
        acts = cached_acts(model, tokenizer, data, hookpoint, max_tokens=max_tokens, cache_dir=cache_dir,
                           model_name=model_name, progress=progress)
        # keyed by the activations' own cache name (content, model, hookpoint, budget) and the SAE: new
        # activations or another model never meet an old file's pooled codes
        acts_key = acts_cache_path(data, hookpoint, max_tokens=max_tokens, cache_dir=cache_dir,
                                   model_name=model_name).stem
        memo = cache_dir / f"pooled-{acts_key}-{key}.npz"
        pooled = pooled_phases(acts, sae, cache=memo)
        rows = task_rows(records, pooled, phases)
        if len(rows):
            parts.append(rows)
    return Rows.concat(parts)
