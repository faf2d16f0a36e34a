"""Start a polysim process for a benchmark (leading underscore: not a benchmark itself)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(args: list[str], timeout: float = 60.0) -> tuple[subprocess.Popen, int]:
    """Run `python -m polysim --port 0 ARGS`, wait for its ready line, return (process, port).

    Kills it and exits with a one-line message if it is not listening within timeout.
    """
    cmd = [sys.executable, "-m", "polysim", "--port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            if line.startswith("polysim listening on "):
                return proc, int(line.strip().rsplit(":", 1)[1])
            if not line:
                break
    proc.kill()
    raise SystemExit("polysim did not start")
