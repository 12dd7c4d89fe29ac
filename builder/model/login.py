"""An SSH login to a host as the admin gives it (`root@ipfire:222`): parsed, not used.

Pure, so the commands that only write files (`ipfire --out`) never load an SSH library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder.errors import InputError

DEFAULT_PORT = 222  # IPFire's sshd
SSH_RE = re.compile(r"(?:([A-Za-z0-9._-]+)@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d+))?")


@dataclass(frozen=True)
class HostLogin:
    user: str
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


def parse_login(value: str) -> HostLogin:
    m = SSH_RE.fullmatch(value.strip())
    if not m:
        raise InputError(value, "--ssh", "expected root@HOST or root@HOST:PORT")
    user, host, port = m.group(1) or "root", m.group(2).strip("[]"), m.group(3)
    if port is not None and not 1 <= int(port) <= 65535:
        raise InputError(value, "--ssh", f"port {port} is out of range (1..65535)")
    return HostLogin(user, host, int(port) if port else DEFAULT_PORT)
