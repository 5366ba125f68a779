"""Not collected by default: `pytest tests/_loop_ctrl_c.py` runs `run --serve` + SIGINT N times (FW_LOOP)."""
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
N = int(os.environ.get("FW_LOOP", "20"))


@pytest.mark.parametrize("i", range(N))
def test_ctrl_c_loop(i: int, tiny_lm_dir: Path, tiny_lm_pack: Path) -> None:
    argv = [sys.executable, "-X", "faulthandler", "-m", "featurewatch.cli", "run", "--model", str(tiny_lm_dir),
            "--pack", str(tiny_lm_pack), "--prompt", "Hello there", "--max-new-tokens", "4", "--json",
            "--metrics-port", "0", "--serve"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) as proc:
        try:
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if "Ctrl-C to stop" in line:
                    break
            port = int(re.search(r"\(port (\d+)\)", lines[-1]).group(1))
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
                with open(f"/tmp/ctrlc/hang-{i}.txt", "w") as f:
                    f.write(proc.stderr.read())
                pytest.fail("no exit 20 s after SIGINT; stacks in /tmp/ctrlc")
            with open("/tmp/ctrlc/times.txt", "a") as f:
                f.write(f"{i} {code} {time.monotonic() - t0:.2f}\n")
            assert code == 130
        finally:
            if proc.poll() is None:
                proc.kill()
