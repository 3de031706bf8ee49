"""Run a command as a process and measure its own wall time and peak RSS.

Linux records a process's RSS high-water mark across exec, starting from the mm it forked: a
command spawned straight from a big bench process (torch loaded, tensors read) reports that
process's peak as its own. So every command runs under a tiny launcher (a fresh interpreter,
a few MiB) that forks and execs it and prints the child's wait4 `ru_maxrss` as its last stderr
line, which `run_measured` strips from what it returns.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(f'@maxrss {usage.ru_maxrss}', file=sys.stderr, flush=True)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)
_MARK = re.compile(r"^@maxrss (\d+)\n?", re.M)


@dataclass
class Measured:
    wall_s: float
    peak_rss_gib: float
    returncode: int
    output: str  # stdout + stderr (without the launcher's line); empty when written to a log file


def run_measured(cmd: list[str], env: Optional[dict[str, str]] = None, cwd: Union[str, Path, None] = None,
                 log: Union[str, Path, None] = None) -> Measured:
    """Run `cmd`; its wall time, its own peak RSS, exit status and output (or output to `log`)."""
    with tempfile.TemporaryFile() as buf:
        t0 = time.time()
        rc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], env=env, cwd=cwd, stdout=buf,
                            stderr=subprocess.STDOUT).returncode
        wall = time.time() - t0
        buf.seek(0)
        text = buf.read().decode(errors="replace")
    marks = _MARK.findall(text)
    rss_kib = int(marks[-1]) if marks else 0
    text = _MARK.sub("", text)
    if log is not None:
        Path(log).write_text(text)
        text = ""
    return Measured(wall, rss_kib / 1024**2, rc, text)
