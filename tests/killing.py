"""Real crashes for tests: a script run in its own process and SIGKILLed part way through its work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path


def killed_part_way(script: Path, args: list[str], delays: Iterable[float]) -> Iterator[float]:
    """Run ``script`` with ``args`` once per delay and SIGKILL it that many seconds after it prints READY
    (its work starts then), unless it ended first; yields each delay once the process is gone. A long last
    delay is "after the work" however slow the machine, and costs only the work's time."""
    for delay in delays:
        proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        yield delay
