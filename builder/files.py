"""Writing output files: atomically, only when changed, secrets 0600 from the first byte."""

from __future__ import annotations

import os
from pathlib import Path


def write_files(out: Path, files: dict[str, bytes], secret: set[str]) -> list[str]:
    """Write each file of `files` into `out` unless it already holds those bytes with the
    right mode; return the names written, so re-runs with the same input write nothing."""
    out.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, data in files.items():
        path = out / name
        mode = 0o600 if name in secret else 0o644
        if path.exists() and path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            continue
        tmp = out / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        changed.append(name)
    return changed
