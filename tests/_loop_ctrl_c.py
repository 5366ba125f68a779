"""Not collected by default: `pytest tests/_loop_ctrl_c.py` runs `run --serve` + SIGINT N times (FW_LOOP, default 20).

The proof of issue 26 §5a: run it beside a busy loop on every core; each run appends
"<i> <exit code> <seconds from SIGINT to exit>" to $FW_TIMES (default /tmp/featurewatch-ctrl-c.txt), and a run
that has not exited 20 s after SIGINT is aborted (SIGABRT, faulthandler's stacks next to the times file).
"""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import serving_port

ROOT = Path(__file__).resolve().parent.parent
N = int(os.environ.get("FW_LOOP", "20"))
TIMES = os.environ.get("FW_TIMES", "/tmp/featurewatch-ctrl-c.txt")


@pytest.mark.parametrize("i", range(N))
def test_ctrl_c_loop(i: int, tiny_lm_dir: Path, tiny_lm_pack: Path) -> None:
    argv = [sys.executable, "-X", "faulthandler", "-m", "featurewatch.cli", "run", "--model", str(tiny_lm_dir),
            "--pack", str(tiny_lm_pack), "--prompt", "Hello there", "--max-new-tokens", "4", "--json",
            "--metrics-port", "0", "--serve"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) as proc:
        try:
            port = serving_port(proc)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                response.read()
            proc.stdout.readline()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGABRT)
                proc.wait(timeout=20)
                with open(f"{TIMES}.hang-{i}", "w") as f:
                    f.write(proc.stderr.read())
                pytest.fail(f"no exit 20 s after SIGINT; stacks in {TIMES}.hang-{i}")
            with open(TIMES, "a") as f:
                f.write(f"{i} {code} {time.monotonic() - t0:.2f}\n")
            assert code == 130
        finally:
            if proc.poll() is None:
                proc.kill()
