"""Start saelab on several CPU ranks with torchrun, as a user would: the tests marked `distributed` use this."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun(
    *args: str, ranks: int = 2, timeout: float = 300, cwd: str | Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node RANKS ARGS...` (ARGS: `-m saelab train CONFIG`, or a script and its
    arguments) with one thread per rank, its output captured; raises `subprocess.TimeoutExpired` past `timeout`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout, check=False
    )


def tracebacks(done: subprocess.CompletedProcess[str], *, lines: int = 12) -> str:
    """The end (`lines` lines) of each Python traceback the ranks printed, in order, torchrun's own left out: what a
    failed launch's assertion shows, so that the rank that failed first is named even when the output is long."""
    found, block = [], None
    for line in done.stderr.splitlines():
        text = line.split("]: ", 1)[1] if line.startswith("[rank") and "]: " in line else line
        if text.startswith("Traceback (most recent call last)"):
            block = [line]
        elif block is not None:
            block.append(line)
            if text and not text[0].isspace():  # the exception line ends the traceback
                if "ChildFailedError" not in text:
                    found.append("\n".join(block[-lines:]))
                block = None
    return "\n\n".join(found) or done.stderr[-3000:]
