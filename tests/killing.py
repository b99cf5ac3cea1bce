"""Real crashes for tests: a script run in its own process and SIGKILLed part way through its work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path


def killed_part_way(script: Path, args: list[str], delays: Iterable[float]) -> Iterator[float]:
    """Run ``script`` with ``args`` once per delay and SIGKILL it that many seconds after it prints READY
    (its work starts then); yields each delay once the process is gone."""
    for delay in delays:
        proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        yield delay
