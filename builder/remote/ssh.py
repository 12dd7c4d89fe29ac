"""SSH to the appliance with paramiko: the host key is pinned, never learned."""

from __future__ import annotations

import base64
import io
import logging
import time
from dataclasses import dataclass

import paramiko

from builder.errors import ConnectError

# paramiko logs transport-thread failures with tracebacks; ConnectError says it in one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class HostKeyMismatch(ConnectError):
    """The appliance offered another host key than the pinned one: never retried."""


@dataclass(frozen=True)
class Target:
    host: str
    user: str
    private_key: str  # OpenSSH-format ed25519, the tool's own key from the state dir
    host_public: str  # "ssh-ed25519 AAAA...": the only host key accepted
    port: int = 22


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


def connect(target: Target, timeout: float = 10.0) -> paramiko.SSHClient:
    """Connect or raise ConnectError saying what failed and what to do."""
    client = paramiko.SSHClient()
    kind, blob = target.host_public.split()[:2]
    host_key = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    name = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    client.get_host_keys().add(name, kind, host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(target.private_key))
    where = f"{target.user}@{target.host}:{target.port}"
    try:
        client.connect(
            target.host,
            port=target.port,
            username=target.user,
            pkey=pkey,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
    except paramiko.BadHostKeyException as e:
        client.close()
        raise HostKeyMismatch(
            f"{where}: host key mismatch: the appliance offered {e.key.get_name()} "
            f"{e.key.get_fingerprint().hex()}, but the state dir pins another key. "
            "Not connecting: if the appliance was rebuilt with another state dir, "
            "use that state dir (--state); otherwise treat this as an attack"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise ConnectError(
            f"{where}: authentication failed with the tool's key "
            "(was the appliance deployed from this state dir?)"
        ) from None
    except (OSError, paramiko.SSHException, EOFError) as e:
        client.close()
        raise ConnectError(
            f"{where}: cannot connect: {e or type(e).__name__} "
            "(is the appliance running and reachable from here?)"
        ) from None
    return client


def execute(
    client: paramiko.SSHClient, command: str, input: str = "", timeout: float = 60
) -> Result:
    """One command; stdin is sent whole, then closed."""
    stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
    if input:
        stdin.write(input)
    stdin.channel.shutdown_write()
    out = stdout.read().decode(errors="replace")
    err = stderr.read().decode(errors="replace")
    return Result(stdout.channel.recv_exit_status(), out, err)


def wait_for_ssh(target: Target, deadline: float, interval: float = 2.0) -> paramiko.SSHClient:
    """Poll until the appliance answers SSH with the pinned key, or the deadline passes.

    A host-key mismatch is final: it is raised at once, never retried into acceptance.
    """
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return connect(target, timeout=min(10.0, max(1.0, deadline - time.monotonic())))
        except HostKeyMismatch:
            raise
        except ConnectError as e:
            last = e
        time.sleep(interval)
    raise ConnectError(f"no SSH answer from {target.host} in time: {last}")
