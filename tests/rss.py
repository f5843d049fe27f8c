"""Peak resident memory of a command, as its parent sees it when the command ends.

A small launcher process of its own starts the command (fork, exec, ``os.wait4``): a child forked
from the test's process would start its peak at the test's size, and a process cannot read its
own peak reliably while it runs (the kernel updates it lazily).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

#: argv[1]: the file to write the peak (KB) to; argv[2:]: the command.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass(frozen=True)
class Measured:
    peak_mb: int  #: peak resident memory, MB
    returncode: int
    stdout: str
    stderr: str


def measure(command: Sequence[object], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            timeout: float | None = None) -> Measured:
    """Run ``command`` (its first item an executable's path) and return its peak memory and output."""
    with tempfile.TemporaryDirectory() as folder:
        peak = Path(folder) / "peak"
        done = subprocess.run([sys.executable, "-c", LAUNCHER, str(peak), *map(str, command)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
        return Measured(int(peak.read_text()) // 1024, done.returncode, done.stdout, done.stderr)
