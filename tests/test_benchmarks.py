"""Each benchmark script runs end to end on the tiny model with tiny sizes and writes JSON.

These are smoke tests: benchmarks are not tests, so nothing here asserts a timing.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> Any:
    out = subprocess.run([sys.executable, str(BENCH / script), *args, "--json"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir: Path, tiny_lm_pack: Path) -> list[str]:
    return ["--model", str(tiny_lm_dir), "--pack", str(tiny_lm_pack)]


def test_peers_runs_every_installed_tool_and_says_why_the_others_cannot(tiny: list[str]) -> None:
    out = run("peers.py", *tiny, "--records", "4", "--batch", "2", "--max-tokens", "32", "--new-tokens", "2",
              "--reps", "1")
    for job in ("offline", "live"):
        rows = out["jobs"][job]
        assert {"limit", "limit-copy", "hand-hook", "featurewatch", "featurewatch+readings"} <= set(rows)
        assert rows["limit"]["speed_vs_limit"] == 1.0
        assert all(r["tokens_per_s"] > 0 and len(r["speed_vs_limit_iqr"]) == 2 for r in rows.values())
        # memory comes from a process per tool (the control row limit-copy has none of its own)
        assert all(r["peak_rss_mb"] > 0 for name, r in rows.items() if name != "limit-copy")
    for tool in ("nnsight", "transformer-lens", "saelens"):
        assert tool in out["jobs"]["live"] or out["failed"][tool]  # measured, or the reason it could not run


def test_scaling_sweeps_every_axis(tiny: list[str], tmp_path: Path) -> None:
    plots = ["--plots", str(tmp_path)] if importlib.util.find_spec("matplotlib") else []
    out = run("scaling.py", tiny[0], tiny[1], "--layer", "1", "--widths", "8,32", "--watched", "2,8",
              "--detectors", "1,2", "--batches", "1,2", "--lengths", "4,8", "--batch", "2", "--new-tokens", "2",
              "--reps", "1", *plots)
    assert set(out["sweeps"]) == {"width", "watched", "detectors", "batch", "length"}
    assert all(len(rows) == 2 for rows in out["sweeps"].values())
    assert all("readings_ms" in r for r in out["sweeps"]["width"])
    if plots:
        assert len(out["plots"]) == 5 and all(Path(p).is_file() for p in out["plots"])


def test_memory_samples_and_sizes_what_a_run_keeps(tiny: list[str]) -> None:
    out = run("memory.py", *tiny, "--runs", "4", "--every", "2", "--keep", "2", "--new-tokens", "2")
    assert [s["runs"] for s in out["samples"]] == [0, 2, 4]
    assert all(s["live_sessions"] == 0 for s in out["samples"])
    assert out["kept"]["top_features=5"]["bytes_per_token"] > 0


def test_profile_hotpath_reports_hook_time_and_a_profile(tiny: list[str]) -> None:
    out = run("profile_hotpath.py", *tiny, "--batches", "1", "--new-tokens", "3", "--reps", "1")
    res = out["batches"]["1"]["current"]
    assert res["decode_steps"] == 2 and "featurewatch" in res["profile"]


