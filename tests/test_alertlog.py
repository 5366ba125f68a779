"""JsonAlertLog: one JSON line per alert, text only when asked for."""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Iterator

import pytest

from featurewatch.alert import FeatureEvidence
from featurewatch.alertlog import ALERT_LOGGER, JsonAlertLog


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger writing bare messages to a buffer, as a JSONL file handler would."""
    logger = logging.getLogger("test.featurewatch.alerts")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    yield logger, buffer
    logger.removeHandler(handler)


def lines(buffer: io.StringIO) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for line in buffer.getvalue().splitlines():
        level, _, payload = line.partition(" ")
        out.append((level, json.loads(payload)))
    return out


def test_one_json_line_per_alert_without_text(captured: Any, make_alert: Any) -> None:
    logger, buffer = captured
    sink = JsonAlertLog(logger=logger)
    sink.on_alert(make_alert(text="Dear customer,\nwire $500", run_id="r-1", severity="critical",
                             evidence=[FeatureEvidence(feature=7, label="urgency", activation=2.5, contribution=1.25)]))
    sink.on_alert(make_alert(run_id="r-2", detector="sycophancy", phase="completion", severity="info"))
    [(level1, first), (level2, second)] = lines(buffer)
    assert (level1, level2) == ("CRITICAL", "INFO")
    assert first == {
        "event": "alert", "run_id": "r-1", "model_name": "tiny", "detector": "scam-email", "phase": "prompt",
        "score": 3.1, "threshold": 1.5, "action": "alert", "would_block": False, "severity": "critical",
        "span": [2, 9], "started_at": 1000.0, "fired_at": 1000.5,
        "evidence": [{"feature": 7, "label": "urgency", "activation": 2.5, "contribution": 1.25}],
    }
    assert "wire" not in buffer.getvalue()
    assert second["detector"] == "sycophancy" and second["phase"] == "completion"


def test_text_is_logged_only_when_enabled(captured: Any, make_alert: Any) -> None:
    logger, buffer = captured
    JsonAlertLog(logger=logger, include_text=True).on_alert(make_alert(text="Dear customer,\nwire $500 — now"))
    [(_, record)] = lines(buffer)  # the newline stays escaped inside one line
    assert record["text"] == "Dear customer,\nwire $500 — now"


def test_structured_fields_ride_on_the_record(make_alert: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ALERT_LOGGER):
        JsonAlertLog().on_alert(make_alert(score=float("nan")))
    [record] = caplog.records
    assert record.name == "featurewatch.alerts" and record.levelno == logging.WARNING
    assert record.featurewatch_alert["detector"] == "scam-email"  # type: ignore[attr-defined]
    assert json.loads(record.getMessage())["score"] is None  # NaN is not JSON


def test_nothing_is_serialised_below_the_logger_level(make_alert: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger=ALERT_LOGGER):
        JsonAlertLog().on_alert(make_alert(severity="warning"))
        JsonAlertLog().on_alert(make_alert(severity="critical"))
    assert [r.levelname for r in caplog.records] == ["CRITICAL"]


def test_context_for_the_run_rides_along(captured: Any, make_alert: Any) -> None:
    logger, buffer = captured
    contexts = {"r-1": {"tags": ["checkout"], "metadata": {"user": "u-7", "when": object()}}}
    sink = JsonAlertLog(logger=logger, context=contexts.get)
    sink.on_alert(make_alert(run_id="r-1"))
    sink.on_alert(make_alert(run_id="r-2"))
    [(_, first), (_, second)] = lines(buffer)
    assert first["context"]["tags"] == ["checkout"] and first["context"]["metadata"]["user"] == "u-7"
    assert first["context"]["metadata"]["when"].startswith("<object")  # not JSON: written with str()
    assert "context" not in second
