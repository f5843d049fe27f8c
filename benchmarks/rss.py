"""Peak resident memory and CPU time of a command, as its parent sees them when the command ends.

A small launcher process of its own starts the command (fork, exec, ``os.wait4``): a child forked
from the caller's process would start its peak at the caller's size, and a process cannot read its
own peak reliably while it runs (the kernel updates it lazily). The benchmarks and the tests'
memory bounds (``tests/rss.py``) both measure through :func:`measure`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

#: argv[1]: the file to write the figures to (``exit-code cpu-seconds peak-KB``); argv[2:]: the
#: command. The launcher exits with the command's exit code.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as fh:
    fh.write(f"{code} {usage.ru_utime + usage.ru_stime} {usage.ru_maxrss}")
sys.exit(code)
"""


@dataclass(frozen=True)
class Measured:
    peak_mb: int  #: peak resident memory, MB
    returncode: int
    stdout: str
    stderr: str
    peak_kb: int = 0  #: peak resident memory, KB (``ru_maxrss``)
    cpu_seconds: float = 0.0  #: user + system CPU seconds of the command


def measure(command: Sequence[object], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            timeout: float | None = None) -> Measured:
    """Run ``command`` (its first item an executable's path) and return its peak memory, CPU
    time and output."""
    with tempfile.TemporaryDirectory() as folder:
        figures = Path(folder) / "figures"
        done = subprocess.run([sys.executable, "-c", LAUNCHER, str(figures), *map(str, command)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
        _, cpu, peak = figures.read_text().split()
        return Measured(int(peak) // 1024, done.returncode, done.stdout, done.stderr, int(peak), float(cpu))


def proc_status(key: str) -> int:
    """A figure of this process's ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssFile``...), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)
