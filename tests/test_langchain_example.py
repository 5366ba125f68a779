"""examples/langchain_app.py runs end to end on the embedded model (CI runs the example through this test)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "langchain_app.py"


def test_the_email_drafting_app_runs(smollm: Any) -> None:
    spec = importlib.util.spec_from_file_location("langchain_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    out = io.StringIO()
    summary = app.main(smollm, max_new_tokens=12, out=out)
    assert summary["shadow"]["refund"]["draft"] and summary["enforce"]["refund"]["refused"] is False
    assert "scam-email" in summary["shadow"]["phishing"]["alerts"]   # shadow: reported, not stopped
    assert summary["shadow"]["phishing"]["draft"]
    assert summary["enforce"]["phishing"]["refused"] is True        # enforce: blocked, the fallback refused
    assert any('outcome="blocked"' in line for line in summary["metrics"])
    text = out.getvalue()
    assert '"detector": "scam-email"' in text and '"ticket": "phishing"' in text  # the alert log's context
