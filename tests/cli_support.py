"""Running the command line in the tests: ``python -m mrlstore`` in a subprocess, or in this process through
the same entry point.

Most commands are run in this process (``run_cli``): a fresh ``python -m mrlstore`` spends about 0.6 s
importing mrlstore, most of what a small command costs, and the test suite runs over a hundred. The code
path is the one ``python -m mrlstore`` takes: ``mrlstore.integrations.cli.main`` in click's standalone mode,
so the exit status (``sys.exit`` in the command, click's 2 for usage errors), stdout and stderr (file
descriptors 1 and 2 included, for what C code writes) are the command's own. What only a process shows stays
with ``python_m_mrlstore``: a pipe closed early, signals, permissions dropped before the start, the
interpreter's own exit."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from mrlstore.integrations.cli import main

# a fresh interpreter's warning filters (python -W unset): pytest shows warnings a user would not see
_DEFAULT_FILTERS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def python_m_mrlstore(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess:
    """``python -m mrlstore ARGS`` in a subprocess (``env`` added to this process's environment)."""
    return subprocess.run(
        [sys.executable, "-m", "mrlstore", *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
        **kw,
    )  # fmt: skip


def _show_on_stderr(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | str | None = None
) -> subprocess.CompletedProcess:
    """``mrlstore ARGS`` run in this process as ``python -m mrlstore`` runs it, with ``env`` added to the
    environment and ``cwd`` the working folder while it runs: a CompletedProcess of its exit status, stdout and
    stderr. An exception that escapes the command ends it as it ends the interpreter: its traceback on stderr
    and status 1. Warnings are printed to its stderr, filtered as in a fresh interpreter."""
    runner = CliRunner(capture="fd")
    with contextlib.chdir(cwd or os.getcwd()), warnings.catch_warnings():
        warnings.resetwarnings()
        for category in _DEFAULT_FILTERS:
            warnings.simplefilter("ignore", category)
        warnings.showwarning = _show_on_stderr
        result = runner.invoke(main, list(args), env=env, prog_name="python -m mrlstore")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))  # what the interpreter prints
    return subprocess.CompletedProcess(["mrlstore", *args], result.exit_code, result.stdout, stderr)
