"""The one place that runs subprocesses: logs, captures stderr, raises CommandError."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from builder.errors import CommandError

log = logging.getLogger("wg-appliance")


def run(
    argv: Sequence[str | Path],
    *,
    input: bytes | str | None = None,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; text in and out. Raises CommandError on a non-zero exit when `check`."""
    args = [str(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    proc = subprocess.run(
        args,
        input=input.decode() if isinstance(input, bytes) else input,
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, proc.stderr or "")
    return proc
